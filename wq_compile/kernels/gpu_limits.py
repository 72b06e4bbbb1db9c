"""What a CUDA split-KV decode configuration must satisfy, checked when a decoder or schedule is built (issue 21).

The split kernel runs one warp per query head of the GQA group (``32 * group`` threads per block) and keeps its
running state in registers; before these checks a group above 32 gave more than 1024 threads, a group of 16
capped registers at 64 (``__launch_bounds__(512, 2)``) against ~107 needed, and a layout chunk that is not a
multiple of 32 passed construction and failed at the first decode step. No TVM here: the decoder imports it.
"""

from __future__ import annotations

from ..core.spec import KernelSpec

WARP = 32
#: CUDA's limit on threads per block.
MAX_THREADS_PER_BLOCK = 1024
#: 32-bit registers per SM (sm_80 .. sm_90) and the most one thread may have.
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255
#: Registers the split kernel needs without spilling: ptxas (CUDA 13, -Xptxas -v, sm_90a) reports 119 (0.5B, head_dim
#: 64), 116 (7B, head_dim 128, f16 and bf16) and 111 (group 16, head_dim 128) since issue 21 item 3 (the K tile
#: dequantized once, one state for all pieces; 89 / 107 / 109 before); ``__launch_bounds__`` must leave this many.
SPLIT_REGISTERS_NEEDED = 119
#: Resident blocks per SM the split kernel asks for when its registers allow (2 hides one block's barriers).
PREFERRED_BLOCKS_PER_SM = 2


def split_threads(group: int) -> int:
    """Threads per block of the split kernel: one warp per query head of the group."""
    return WARP * group


def register_cap(threads: int, blocks_per_sm: int) -> int:
    """Registers per thread ptxas may use under ``__launch_bounds__(threads, blocks_per_sm)`` (allocation is in
    units of 8 per thread)."""
    return min(MAX_REGS_PER_THREAD, REGS_PER_SM // (threads * blocks_per_sm) // 8 * 8)


def min_blocks_per_sm(group: int) -> int:
    """The launch-bounds minimum for a group: 2 resident blocks where that leaves the registers the kernel needs
    (groups up to 8, every LLaVA-OneVision model: group 7), else 1 (groups 9-16: one block of up to 16 warps)."""
    threads = split_threads(group)
    return PREFERRED_BLOCKS_PER_SM if register_cap(threads, PREFERRED_BLOCKS_PER_SM) >= SPLIT_REGISTERS_NEEDED else 1


def max_split_group() -> int:
    """The largest group whose threads fit a block with the registers the kernel needs."""
    fits = [g for g in range(1, MAX_THREADS_PER_BLOCK // WARP + 1)
            if register_cap(split_threads(g), min_blocks_per_sm(g)) >= SPLIT_REGISTERS_NEEDED]
    return max(fits)


def split_config_problem(num_q_heads: int, num_kv_heads: int, head_dim: int, chunk: int,
                         layout_chunk: int | None = None, *, gpu: bool = True) -> str | None:
    """Why the split kernel cannot run this configuration (None if it can). ``chunk``: the kernel's token chunk;
    ``layout_chunk``: the cache layout's chunk, which every piece's capacity is a multiple of; ``gpu``: also the
    CUDA schedule's limits (threads, registers, lanes), which the same PrimFunc on llvm does not have."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
    if layout_chunk is not None and layout_chunk % chunk:
        return (f"chunk ({layout_chunk}): the cache's capacities are multiples of it, and the split kernel takes "
                f"multiples of {chunk} only; use a multiple of {chunk} (e.g. 64)")
    if not gpu:
        return None
    group = num_q_heads // num_kv_heads
    threads = split_threads(group)
    if threads > MAX_THREADS_PER_BLOCK:
        return (f"a group of {group} query heads per KV head needs {threads} threads per block (one warp per head); "
                f"CUDA allows {MAX_THREADS_PER_BLOCK} (groups up to {MAX_THREADS_PER_BLOCK // WARP})")
    cap = register_cap(threads, min_blocks_per_sm(group))
    if cap < SPLIT_REGISTERS_NEEDED:
        return (f"a group of {group} query heads gives {threads} threads per block, which leaves {cap} registers per "
                f"thread against the {SPLIT_REGISTERS_NEEDED} the kernel needs (it would spill); groups up to "
                f"{max_split_group()} fit")
    if head_dim % WARP:
        return f"head_dim ({head_dim}) must be a multiple of {WARP} (each lane owns head_dim / 32 channels)"
    if chunk % WARP:
        return f"the kernel chunk ({chunk}) must be a multiple of {WARP} (one token per lane)"
    return None


def check_split_config(num_q_heads: int, num_kv_heads: int, head_dim: int, chunk: int,
                       layout_chunk: int | None = None, *, gpu: bool = True) -> None:
    """Refuse a configuration the split kernel cannot run, when the decoder or schedule is built."""
    why = split_config_problem(num_q_heads, num_kv_heads, head_dim, chunk, layout_chunk, gpu=gpu)
    if why is not None:
        raise ValueError(f"{'CUDA ' if gpu else ''}split-KV decode: {why}")


def check_split_spec(spec: KernelSpec) -> None:
    """:func:`check_split_config` for a split kernel spec."""
    check_split_config(spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.chunk)
