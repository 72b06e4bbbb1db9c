"""What a CUDA split-KV decode configuration must satisfy, checked when a decoder or schedule is built (issue 21).

The split kernel runs one warp per query head of the GQA group (``32 * group`` threads per block) and keeps its
running state in registers; before these checks a group above 32 gave more than 1024 threads, a group of 16
capped registers at 64 (``__launch_bounds__(512, 2)``) against ~107 needed, and a layout chunk that is not a
multiple of 32 passed construction and failed at the first decode step. No TVM here: the decoder imports it.
"""

from __future__ import annotations

from itertools import combinations

from ..core.quant import key_words
from ..core.spec import KernelSpec
from .signatures import ALL_WIDTHS, SPLIT_STAGE_CHOICES, STATIC_SMEM_LIMIT, split_shared_stages, split_stages
# the static shared-memory model and the default stage count live with the spec helpers (split_stages needs them)
from .signatures import default_stages_of, split_static_shared_bytes  # noqa: F401 - re-exported

WARP = 32
#: CUDA's limit on threads per block.
MAX_THREADS_PER_BLOCK = 1024
#: 32-bit registers per SM (sm_80 .. sm_90) and the most one thread may have.
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255
#: Registers the split kernel needs without spilling: ptxas (CUDA 13, -Xptxas -v, sm_90a) reports 119 (0.5B, head_dim
#: 64), 116 (7B, head_dim 128, f16 and bf16) and 111 (group 16, head_dim 128) since issue 21 item 3 (the K tile
#: dequantized once, one state for all pieces; 89 / 107 / 109 before); with an int1 piece (``widths`` with 1, which a
#: decoder may have to build) 126 (0.5B) and 124 (7B); double-buffered (issue 21 item 6, the head_dim-128 default
#: without an int1 bucket) 128 for the 7B, which is also all ptxas gives ``__launch_bounds__(224, 2)``.
#: ``__launch_bounds__`` must leave this many.
SPLIT_REGISTERS_NEEDED = 128
#: Resident blocks per SM the split kernel asks for when its registers allow (2 hides one block's barriers).
PREFERRED_BLOCKS_PER_SM = 2
#: Dynamic shared memory one block may use (the opt-in maximum, which TVM's CUDA runtime requests with
#: ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` for launches of 48 KB or more) and shared memory per SM, by
#: architecture; CUDA reserves 1 KB of each SM's shared memory per resident block.
DYNAMIC_SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
#: The architecture a check assumes when none is given: the smaller limits (a CUDA target without an arch).
DEFAULT_ARCH = "sm_80"


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


def smem_arch(arch: str | None) -> str:
    """The limits' key of a CUDA arch: ``sm_90`` / ``sm_90a`` -> ``sm_90``, ``sm_80`` -> ``sm_80``; None (or
    another arch) -> the smaller, :data:`DEFAULT_ARCH`."""
    a = (arch or DEFAULT_ARCH).rstrip("a")
    return a if a in DYNAMIC_SMEM_LIMIT else DEFAULT_ARCH


def smem_blocks_per_sm(smem: int, arch: str | None) -> int:
    """Resident blocks per SM that ``smem`` bytes of shared memory per block allow."""
    return SMEM_PER_SM[smem_arch(arch)] // (smem + SMEM_RESERVED_PER_BLOCK)


def max_split_group() -> int:
    """The largest group whose threads fit a block with the registers the kernel needs."""
    fits = [g for g in range(1, MAX_THREADS_PER_BLOCK // WARP + 1)
            if register_cap(split_threads(g), min_blocks_per_sm(g)) >= SPLIT_REGISTERS_NEEDED]
    return max(fits)


def _r16(n: int) -> int:
    return -(-n // 16) * 16


def staging_slot_bytes(head_dim: int, chunk: int, bits: tuple[int, ...] = ALL_WIDTHS, k_group: int = 28,
                       dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of one slot of each double-buffered staging union of the split kernel (the factory's
    ``split_decode.staging_union_elems``): ``codes`` (key and value code words, the largest piece's), ``scales``
    (fp16 key scales and zero points), ``dense`` (the dense piece's K rows padded by 16 bytes, and V)."""
    d, c = head_dim, chunk
    quant = [b for b in bits if b != 16]
    out = {}
    if quant:
        ngk = (c + k_group - 2) // k_group + 1
        out["codes"] = max(_r16(ngk * d * key_words(b, k_group) * 4) + _r16(c * d // (32 // b) * 4) for b in quant)
        out["scales"] = 2 * _r16(ngk * d * 2)
    if 16 in bits:
        out["dense"] = _r16(c * (d + 16 // dtype_bytes) * dtype_bytes) + _r16(c * d * dtype_bytes)
    return out


def split_shared_bytes(group: int, head_dim: int, chunk: int, bits: tuple[int, ...] = ALL_WIDTHS,
                       k_group: int = 28, v_group: int = 64, dtype_bytes: int = 2,
                       stages: int | None = None) -> int:
    """Shared memory of one block of the split kernel with ``stages`` staging buffers. One: the static
    ``__shared__`` arrays (:func:`split_static_shared_bytes`). Two: the one dynamic allocation TVM merges the tiles
    into -- the tiles only one chunk's compute reads (query, scores, probabilities, the fp32 K tile, ``P x v_scale``,
    zero-point terms; reused across pieces as with one buffer) plus both slots of every staging union
    (:func:`staging_slot_bytes`), which stay live across iterations. None: the default for these tiles
    (:func:`~wq_compile.kernels.signatures.default_split_stages`)."""
    if stages is None:
        stages = split_shared_stages(group, head_dim, chunk, bits, k_group, v_group, dtype_bytes)
    if stages not in SPLIT_STAGE_CHOICES:
        raise ValueError(f"stages: expected one of {SPLIT_STAGE_CHOICES}, got {stages!r}")
    if stages == 1:
        return split_static_shared_bytes(group, head_dim, chunk, bits, k_group, v_group, dtype_bytes)
    g, d, c = group, head_dim, chunk
    quant = [b for b in bits if b != 16]
    total = _r16(g * d * 4) + 2 * _r16(g * c * 4)  # qf, scores, probabilities
    if quant:
        nvg = d // v_group
        total += _r16(c * (d + 4) * 4) + _r16(g * c * nvg * 4) + (len(quant) * _r16(g * nvg * 4) if nvg > 1 else 0)
    return total + stages * sum(staging_slot_bytes(d, c, bits, k_group, dtype_bytes).values())


def split_config_problem(num_q_heads: int, num_kv_heads: int, head_dim: int, chunk: int,
                         layout_chunk: int | None = None, *, gpu: bool = True, bits: tuple[int, ...] = ALL_WIDTHS,
                         k_group: int = 28, v_group: int = 64, dtype_bytes: int = 2, rows: int | None = None,
                         what: str = "split", stages: int | None = None,
                         arch: str | None = None) -> str | None:
    """Why the split kernel cannot run this configuration (None if it can). ``chunk``: the kernel's token chunk;
    ``layout_chunk``: the cache layout's chunk, which every piece's capacity is a multiple of; ``gpu``: also the
    CUDA schedule's limits (threads, registers, lanes, shared memory: static with one staging buffer, dynamic up
    to ``arch``'s opt-in maximum with two), which the same PrimFunc on llvm does not have. ``rows``: query rows
    per block (the multi-token kernel's; None: the GQA group)."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
    if layout_chunk is not None and layout_chunk % chunk:
        return (f"chunk ({layout_chunk}): the cache's capacities are multiples of it, and the split kernel takes "
                f"multiples of {chunk} only; use a multiple of {chunk} (e.g. 64)")
    if not gpu:
        return None
    group = num_q_heads // num_kv_heads if rows is None else rows
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
    unit = "query heads per KV head" if rows is None else "query rows per block"
    forms = default_forms(group, head_dim, chunk, bits, k_group, v_group, dtype_bytes) if stages is None else [
        (bits, stages)]
    for form, n in forms:
        why = _smem_problem(group, head_dim, chunk, form, k_group, v_group, dtype_bytes, n, unit, what, arch)
        if why is not None:
            return why
    return None


def default_forms(group: int, head_dim: int, chunk: int, bits: tuple[int, ...], k_group: int, v_group: int,
                  dtype_bytes: int) -> list[tuple[tuple[int, ...], int]]:
    """``(widths, stages)`` of every kernel a decoder over (subsets of) ``bits`` may build at the default stage
    count: each subset of the quantized widths (with the dense piece where ``bits`` has it), at its own default
    (one buffer, static shared memory, where that fits and ptxas did not show two buffers without spills; an int1
    bucket always makes it one there). All of them, not the largest: the static model is not monotone in the widths
    (the dense tiles reuse the quantized pieces' when they fit)."""
    quant = [b for b in bits if b != 16]
    dense = (16,) if 16 in bits else ()
    subsets = [tuple(c) + dense for n in range(len(quant), -1, -1) for c in combinations(quant, n)]
    return [(w, split_shared_stages(group, head_dim, chunk, w, k_group, v_group, dtype_bytes)) for w in subsets if w]


def _smem_problem(group: int, head_dim: int, chunk: int, bits: tuple[int, ...], k_group: int, v_group: int,
                  dtype_bytes: int, stages: int, unit: str, what: str, arch: str | None) -> str | None:
    """Why one kernel form's shared memory does not fit (None if it does)."""
    smem = split_shared_bytes(group, head_dim, chunk, bits, k_group, v_group, dtype_bytes, stages)
    what_cfg = (f"{group} {unit} at head_dim {head_dim} (widths {'/'.join(map(str, bits))}, {8 * dtype_bytes}-bit "
                f"activations)")
    if stages == 1 and smem > STATIC_SMEM_LIMIT:
        return (f"{what_cfg} need {smem:,} B of static shared memory per block of the {what} kernel with one "
                f"staging buffer; CUDA allows {STATIC_SMEM_LIMIT:,} B (sm_80, sm_90) without dynamic shared memory. "
                f"Use fewer {unit}, a smaller head_dim or 16-bit activations")
    key = smem_arch(arch)
    if stages > 1 and smem > DYNAMIC_SMEM_LIMIT[key]:
        return (f"{what_cfg} need {smem:,} B of dynamic shared memory per block of the {what} kernel with "
                f"{stages} staging buffers; {key} allows {DYNAMIC_SMEM_LIMIT[key]:,} B. Use fewer {unit}, a "
                f"smaller head_dim or 16-bit activations")
    return None


def check_split_config(num_q_heads: int, num_kv_heads: int, head_dim: int, chunk: int,
                       layout_chunk: int | None = None, *, gpu: bool = True, **limits) -> None:
    """Refuse a configuration the split kernel cannot run, when the decoder or schedule is built (``limits``: the
    keywords of :func:`split_config_problem`)."""
    why = split_config_problem(num_q_heads, num_kv_heads, head_dim, chunk, layout_chunk, gpu=gpu, **limits)
    if why is not None:
        kernel = "multi-token" if limits.get("what") == "multi-token" else "split-KV decode"
        raise ValueError(f"{'CUDA ' if gpu else ''}{kernel}: {why}")


def check_split_spec(spec: KernelSpec, rows: int | None = None, arch: str | None = None) -> None:
    """:func:`check_split_config` for a split kernel spec (``rows``: the multi-token kernel's rows per block;
    its ``stages`` from the spec)."""
    check_split_config(spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.chunk, bits=spec.bits,
                       k_group=spec.k_group, v_group=spec.v_group, dtype_bytes=spec.torch_dtype.itemsize,
                       rows=rows, what="split" if rows is None else "multi-token", stages=split_stages(spec),
                       arch=arch)
