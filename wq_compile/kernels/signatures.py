"""The argument description of every kernel (names, shapes, dtypes, outputs, size rules), without TVM.

This is the one definition of each kernel's argument order: the TIR factories (:mod:`.attention`, :mod:`.merge`,
:mod:`.quantize`, :mod:`.split_decode`) build their PrimFuncs from it, and the runtime checks and orders torch
tensors by it. It lives apart from the factories because they import TVM at module level (seconds), and a warm
load from the module cache must describe its kernels without importing TVM (:mod:`wq_compile.compiler.light_load`).
Only plain metadata and the spec helpers the decoder needs per call live here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.quant import key_words
from ..core.quant_fit import DEFAULT_FIT, LSQ_ITERS, ZS_SHIFTS, fit_named, fit_of
from .signature import ArgDesc, KernelSignature
from ..core.spec import KernelSpec

_F32 = "float32"
_I32 = "int32"
_F16 = "float16"


# ---- decode / fused ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One uniform-precision input of an attention kernel: a quantized bucket (bits 2/4/8) or the dense piece (16)."""

    bits: int
    tag: str  # block-name prefix and symbol suffix: "q4", "dense"
    n_sym: str  # symbolic token capacity (a multiple of spec.chunk)
    g_sym: str  # symbolic key-group count (quantized pieces)
    meta8: bool = False  # scale/zero are 8-bit codes on run bases (:mod:`wq_compile.core.meta8`)

    @property
    def r_sym(self) -> str:
        """Symbolic count of the run bases of an 8-bit scale/zero piece."""
        return "R" + self.n_sym[1:]

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    def block(self, stage: str) -> str:
        return f"{self.tag}_{stage}"


def pieces(spec: KernelSpec) -> tuple[Piece, ...]:
    """The pieces of a decode/fused/multi spec, in argument order."""
    if spec.kind not in ("decode", "fused", "multi"):
        raise ValueError(f"kind: attention pieces exist for decode/fused/multi, got {spec.kind!r}")
    if spec.kind == "decode" and len(spec.bits) != 1:
        raise ValueError(f"bits: a decode kernel reads one bucket, got {spec.bits}")
    if 16 in spec.bits and spec.bits[-1] != 16:
        raise ValueError(f"bits: the dense piece (16) must come last, got {spec.bits}")
    m8 = meta8_width(spec)
    if m8 and (spec.kind == "decode" or is_split(spec)):
        raise ValueError(f"{META8_KEY}: only the CPU fused and multi-token kernels read 8-bit scale/zero; the "
                         f"{'split-KV' if is_split(spec) else 'per-bucket'} kernel reads their fp16 expansion")
    out = []
    for b in spec.bits:
        tag = "dense" if b == 16 else f"q{b}"
        suffix = "" if spec.kind == "decode" else str(b)
        out.append(Piece(b, tag, f"N{suffix}", f"G{suffix}", meta8=b != 16 and b <= m8))
    return tuple(out)


#: ``(META8_KEY, W)`` in a fused/multi spec's extra: its buckets of width <= ``W`` store 8-bit scale/zero.
META8_KEY = "meta8"


def meta8_width(spec: KernelSpec) -> int:
    """The widest bucket of ``spec`` that stores 8-bit scale/zero (0: every bucket has fp16 scale/zero)."""
    return _extra_count(spec, META8_KEY, (1, 2, 4))


def piece_args(spec: KernelSpec, p: Piece) -> list[ArgDesc]:
    d, hkv = spec.head_dim, spec.num_kv_heads
    pre = "" if spec.kind == "decode" else f"{p.tag}_"
    if not p.quantized:
        return [
            ArgDesc.tensor(f"{pre}k", ("B", hkv, p.n_sym, d), spec.tvm_dtype),
            ArgDesc.tensor(f"{pre}v", ("B", hkv, p.n_sym, d), spec.tvm_dtype),
            ArgDesc.tensor(f"{pre}lens", ("B",), _I32),
        ]
    q = spec.quant(p.bits)
    w = d // q.per_word
    meta = "uint8" if p.meta8 else _F16
    args = [
        ArgDesc.tensor(f"{pre}k_codes", ("B", hkv, p.g_sym, d, key_words(p.bits, q.k_group)), _I32),
        ArgDesc.tensor(f"{pre}k_scale", ("B", hkv, p.g_sym, d), meta),
        ArgDesc.tensor(f"{pre}k_zero", ("B", hkv, p.g_sym, d), meta),
        ArgDesc.tensor(f"{pre}v_codes", ("B", hkv, p.n_sym, w), _I32),
        ArgDesc.tensor(f"{pre}v_scale", ("B", hkv, p.n_sym, d // q.v_group), meta),
        ArgDesc.tensor(f"{pre}v_zero", ("B", hkv, p.n_sym, d // q.v_group), meta),
    ]
    if p.meta8:  # the run bases (scale base, zero low end, zero step) and each key group's run
        args += [ArgDesc.tensor(f"{pre}k_base", ("B", hkv, p.r_sym, 3, d), _F16),
                 ArgDesc.tensor(f"{pre}v_base", ("B", hkv, p.r_sym, 3, d // q.v_group), _F16),
                 ArgDesc.tensor(f"{pre}run_of", ("B", p.g_sym), _I32)]
    return args + [ArgDesc.tensor(f"{pre}lens", ("B",), _I32)]


def attention_signature(spec: KernelSpec) -> KernelSignature:
    """Argument list of a decode/fused kernel (see the module docstring of :mod:`wq_compile.kernels`)."""
    ps = pieces(spec)
    args = [ArgDesc.tensor("q", ("B", spec.num_q_heads, spec.head_dim), spec.tvm_dtype)]
    for p in ps:
        args += piece_args(spec, p)
    args.append(ArgDesc.scalar("sm_scale", _F32))
    if spec.kind == "decode":
        args.append(ArgDesc.tensor("o", ("B", spec.num_q_heads, spec.head_dim), _F32, output=True))
        args.append(ArgDesc.tensor("lse", ("B", spec.num_q_heads), _F32, output=True))
    else:
        args.append(ArgDesc.tensor("out", ("B", spec.num_q_heads, spec.head_dim), spec.tvm_dtype, output=True))
    multiple = tuple((p.n_sym, spec.chunk) for p in ps)
    at_least = tuple((p.g_sym, p.n_sym, spec.k_group) for p in ps if p.quantized)
    return KernelSignature(spec.uri, tuple(args), multiple_of=multiple, at_least=at_least)


# ---- several new query tokens (multi) ----------------------------------------------------------------------------
#: New query tokens per sample of the multi-token kernel's tuning workload (one module serves every count ``S``;
#: the runtime cuts longer steps into chunks of :data:`MAX_STEP_CHUNK`).
MULTI_TUNING_STEPS = 32
#: Longest step one multi-token launch runs: longer ones (a new clip's turn) go in chunks, each causal at its offset.
MAX_STEP_CHUNK = 64


def multi_signature(spec: KernelSpec) -> KernelSignature:
    """The fused kernel's pieces with ``S`` new query tokens per sample, token-major as transformers lays them out:
    ``q [B, S, Hq, D]`` and ``out [B, S, Hq, D]``. The ``S`` new tokens are the last ``S`` valid tokens of each
    sample's dense piece (query ``i`` sees dense tokens ``< dense_lens[b] - (S - 1 - i)``, every bucket token)."""
    if spec.kind != "multi":
        raise ValueError(f"kind: expected a multi-token spec, got {spec.kind!r}")
    ps = pieces(spec)
    if ps[-1].quantized:
        raise ValueError(f"bits: the multi-token kernel needs the dense piece (16) that holds the new tokens, "
                         f"got {spec.bits}")
    hq, d = spec.num_q_heads, spec.head_dim
    args = [ArgDesc.tensor("q", ("B", "S", hq, d), spec.tvm_dtype)]
    for p in ps:
        args += piece_args(spec, p)
    args.append(ArgDesc.scalar("sm_scale", _F32))
    args.append(ArgDesc.tensor("out", ("B", "S", hq, d), spec.tvm_dtype, output=True))
    multiple = tuple((p.n_sym, spec.chunk) for p in ps)
    at_least = tuple((p.g_sym, p.n_sym, spec.k_group) for p in ps if p.quantized)
    return KernelSignature(spec.uri, tuple(args), multiple_of=multiple, at_least=at_least)


# ---- split-KV decode --------------------------------------------------------------------------------------------
#: Chunk (tokens) of the split-KV decode: whole chunks per split range (the layout's capacities are multiples).
SPLIT_CHUNK = 32
#: SMs of the GPU a tuning workload's split count ``P`` is chosen for (H100/H200); one module serves every ``P``.
TUNING_SM_COUNT = 132
#: Most splits one launch computes (``o_parts`` rows past it are not written); :func:`choose_splits` never exceeds
#: it. It also bounds ``P`` for TVM's integer bound analysis (an unbounded int32 ``P`` times the chunk overflows it).
MAX_SPLITS = 4096


def is_split(spec: KernelSpec) -> bool:
    """True for the split-KV form of a decode/fused spec (``("split", 1)`` in ``spec.extra``)."""
    return dict(spec.extra).get("split", 0) == 1


#: Chunks of staged codes in flight per block of the split kernel (``("stages", n)`` in ``spec.extra``; absent: the
#: default, :func:`default_split_stages`). 1: stage a chunk, barrier, compute it, barrier. 2: double buffering --
#: chunk ``i + 1``'s staging copies (``cp.async`` on CUDA) are issued into the second buffer before chunk ``i`` is
#: computed.
SPLIT_STAGE_CHOICES = (1, 2)


#: Static shared memory one block may declare (``__shared__`` arrays, no ``extern`` dynamic shared memory): 48 KB
#: on sm_80 and sm_90 alike; beyond it a kernel needs dynamic shared memory and the launch attribute. The split
#: kernel with one staging buffer uses static shared memory, with two (the default at
#: :data:`DOUBLE_BUFFERED_SHAPES` without an int1 bucket) dynamic.
STATIC_SMEM_LIMIT = 48 * 1024
#: The widths whose tiles a decoder may have to build (the 8-bit bucket has the largest code tiles).
ALL_WIDTHS = (8, 4, 2, 1, 16)


def split_static_shared_bytes(group: int, head_dim: int, chunk: int, bits: tuple[int, ...] = ALL_WIDTHS,
                               k_group: int = 28, v_group: int = 64, dtype_bytes: int = 2) -> int:
    """Static shared memory of one block of the split kernel (and of the multi-token kernel, ``group`` = its rows
    per block) under the CUDA schedule (:mod:`wq_compile.schedules.cuda_split`), from its tiles: the scaled query
    (``group x head_dim`` fp32), scores and probabilities (``group x chunk``), and per quantized piece the staged
    key codes / scales / zero points, value codes, the fp32 K tile (rows padded by 4 floats), ``P x v_scale``
    and (several value groups) the zero-point terms. The pieces run one after the other, so TVM gives each tile the
    size of the largest piece's and reuses it; the dense piece's K (rows padded by 16 bytes) and V tiles go into
    the smallest tile that holds them, else count in full. Each array rounded up to 64 bytes (TVM declares them
    ``alignas(64)``).

    Matches the ``__shared__`` arrays of the generated CUDA (7B f16 42,152 B, 0.5B f16 22,144 B, group 16 at
    d 128 51,584 B, Qwen2-VL-2B 41,104 B) up to that alignment (ptxas: 42,168, 22,144, 51,584, 41,136; the model
    42,176, 22,144, 51,584, 41,152) and over-estimates where TVM merges differently (f32, or only 4-bit buckets);
    see tests/runtime/test_gpu_limits.py."""
    def r64(n: int) -> int:
        return -(-n // 64) * 64

    g, d, c = group, head_dim, chunk
    quant = [b for b in bits if b != 16]
    total = r64(g * d * 4) + 2 * r64(g * c * 4)  # qf, scores, probabilities
    tiles: list[int] = []
    if quant:
        ngk = (c + k_group - 2) // k_group + 1  # key groups a chunk can touch (split_decode.key_groups_per_chunk)
        nvg = d // v_group
        tiles = [max(r64(ngk * d * key_words(b, k_group) * 4) for b in quant),  # key codes
                 r64(ngk * d * 2), r64(ngk * d * 2),                             # key scale, zero point (fp16)
                 max(r64(c * d // (32 // b) * 4) for b in quant),              # value codes
                 r64(c * (d + 4) * 4),                                           # dequantized K tile
                 r64(g * c * nvg * 4)]                                           # P x value scale
        total += sum(tiles) + (len(quant) * r64(g * nvg * 4) if nvg > 1 else 0)
    if 16 in bits:
        free = sorted(tiles)
        for need in (r64(c * (d + 16 // dtype_bytes) * dtype_bytes), r64(c * d * dtype_bytes)):  # dense K, V
            fit = next((t for t in free if t >= need), None)
            if fit is None:
                total += need
            else:
                free.remove(fit)
    return total


def split_shared_stages(group: int, head_dim: int, chunk: int, bits: tuple[int, ...], k_group: int, v_group: int,
                        dtype_bytes: int) -> int:
    """The default stage count of a split kernel with these tiles (:func:`~wq_compile.kernels.signatures.
    default_split_stages`, told whether one buffer's static tiles fit)."""
    one = split_static_shared_bytes(group, head_dim, chunk, bits, k_group, v_group, dtype_bytes)
    return default_split_stages(head_dim, bits, group, one <= STATIC_SMEM_LIMIT)


def default_stages_of(spec: KernelSpec) -> int:
    """The default stage count of a split (or multi-token split) spec: its tiles are the block's rows' (the
    multi-token kernel's ``rows``, default the GQA group, as :func:`~wq_compile.kernels.multi_token_split.
    multi_rows` reads them)."""
    rows = int(dict(spec.extra).get("rows", spec.group_size)) if spec.kind == "multi" else spec.group_size
    return split_shared_stages(rows, spec.head_dim, spec.chunk, spec.bits, spec.k_group, spec.v_group,
                               spec.torch_dtype.itemsize)


#: ``(head_dim, group)`` where ptxas (CUDA 13, TVM's nvcc flags, sm_90a and sm_80) showed the double-buffered split
#: kernel without an int1 bucket in registers, no spill: LLaVA-OV-7B / Qwen2-VL-7B (group 7: 128 of the 128
#: registers ``__launch_bounds__(224, 2)`` gives, f16 and bf16) and Qwen2-VL-2B (group 6: 159 / 163 of 168, f16).
#: Measured to spill there: head_dim 64 group 7 (the 0.5B, 76 B), head_dim 128 group 8 (Qwen2.5-VL-3B, 116 B on
#: sm_90a, 88 B on sm_80), a set with an int1 bucket (124 B for the 7B). Shapes not listed were not measured with
#: two buffers and get one (docs/offline_tuning.md).
DOUBLE_BUFFERED_SHAPES = frozenset({(128, 7), (128, 6)})


def default_split_stages(head_dim: int, widths: tuple[int, ...], group: int,
                         one_buffer_fits: bool = True) -> int:
    """The default staging buffers of a split kernel over the bucket ``widths`` (16, the dense piece, may be among
    them) with ``group`` query rows per block (one warp each): 2 where ptxas showed the double-buffered kernel
    without spills (:data:`DOUBLE_BUFFERED_SHAPES`, no int1 bucket), else 1 (one buffer: no spill at every shipped
    shape and bucket set measured, int1 included; tests/kernels/test_split_cuda.py holds the 7B int1 default to it).
    ``one_buffer_fits``: False where one buffer's static tiles pass the 48 KB of static shared memory (groups of 14+
    at head_dim 128, f32; none of the shipped models): 2 then, the only form that builds
    (:func:`default_stages_of`)."""
    if not one_buffer_fits:
        return 2
    return 2 if (head_dim, group) in DOUBLE_BUFFERED_SHAPES and 1 not in widths else 1


def split_stages(spec: KernelSpec) -> int:
    """Staging buffers of a split kernel spec (see :data:`SPLIT_STAGE_CHOICES`): its ``("stages", n)``, else the
    default for its head_dim, bucket widths, rows per block and tiles (:func:`default_split_stages`)."""
    extra = dict(spec.extra)
    stages = extra["stages"] if "stages" in extra else default_stages_of(spec)
    if stages not in SPLIT_STAGE_CHOICES:
        raise ValueError(f"stages: the split kernel stages 1 or 2 chunks at a time, got {stages!r}")
    return int(stages)


def with_split_stages(spec: KernelSpec, stages: int) -> KernelSpec:
    """``spec`` (a split spec) with ``stages`` staging buffers; the default leaves the key out (one URI per kernel).
    A non-default count is built as asked, even where ptxas showed it to spill (a tuner sweeping the knob measures
    it; the CUDA build reports the spill: :func:`wq_compile.compiler.build.compile_cuda_binary`)."""
    if stages not in SPLIT_STAGE_CHOICES:
        raise ValueError(f"stages: the split kernel stages 1 or 2 chunks at a time, got {stages!r}")
    bare = replace(spec, extra=tuple((k, v) for k, v in spec.extra if k != "stages"))
    return bare if stages == default_stages_of(bare) else replace(bare, extra=(*bare.extra, ("stages", stages)))


#: ptxas ``--register-usage-level`` of the CUDA multi-token split kernel (:mod:`.multi_token_split`). TVM builds
#: every CUDA kernel at 10; there ptxas takes all 128 registers ``__launch_bounds__(224, 2)`` gives and still spills
#: the default kernels of the 7B (8/4/2, two buffers: 24 B on sm_80; 8/4/2/1, one buffer: 196 B on sm_90a) and the
#: 0.5B (sm_90a: 320-560 B). At 5 (ptxas' own default; 6-10 spill the 7B) none of the shipped shapes' defaults
#: spills, f16 and bf16, sm_90a and sm_80, with and without an int1 bucket (docs/offline_tuning.md, "The
#: multi-token kernel's ptxas register level"). The split decode kernel keeps 10: its table was measured there.
MULTI_SPLIT_REGISTER_LEVEL = 5


def ptxas_register_level(spec: KernelSpec) -> int | None:
    """The ptxas register-usage level (0-10) ``spec``'s CUDA kernel is built with where it needs its own
    (:data:`MULTI_SPLIT_REGISTER_LEVEL` for the multi-token split kernel), else None: the build's (TVM's 10; the
    split decode kernel's measured table holds at 10)."""
    return MULTI_SPLIT_REGISTER_LEVEL if spec.kind == "multi" and is_split(spec) else None


def split_spec(spec: KernelSpec) -> KernelSpec:
    """The split-KV form of a decode/fused/multi spec (its URI ends in ``_split1``; multi: the CUDA multi-token
    kernel, :mod:`wq_compile.kernels.multi_token_split`)."""
    if spec.kind not in ("decode", "fused", "multi"):
        raise ValueError(f"kind: split-KV exists for decode/fused/multi, got {spec.kind!r}")
    if is_split(spec):
        return spec
    return KernelSpec(spec.kind, spec.bits, spec.head_dim, spec.num_q_heads, spec.num_kv_heads, spec.k_group,
                      spec.v_group, spec.dtype, spec.chunk, (*spec.extra, ("split", 1)))


def merge_spec(spec: KernelSpec) -> KernelSpec:
    """The ``merge`` kernel that combines the partials of ``spec`` (P symbolic) into ``out`` in ``spec.dtype``."""
    return KernelSpec("merge", (16,), spec.head_dim, spec.num_q_heads, spec.num_kv_heads, dtype=spec.dtype)


def choose_splits(sm_count: int, n_tokens: int, batch: int, kv_heads: int, chunk: int = 64,
                  blocks_per_sm: int = 2, min_chunks_per_split: int = 1) -> int:
    """Number of token splits ``P`` of a split-KV decode launch (``batch * kv_heads * P`` thread blocks).

    Enough blocks for ``blocks_per_sm`` resident blocks on each of ``sm_count`` SMs, never more splits than there
    are chunks (``ceil(n_tokens / chunk)``, at least ``min_chunks_per_split`` each), at least 1.
    ``n_tokens``: tokens of all pieces together (the split kernel cuts their concatenated chunks into ``P`` ranges;
    the decoder passes the pieces' capacities summed).
    """
    for name, v in (("sm_count", sm_count), ("batch", batch), ("kv_heads", kv_heads), ("chunk", chunk),
                    ("blocks_per_sm", blocks_per_sm), ("min_chunks_per_split", min_chunks_per_split)):
        if int(v) < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens: must be >= 0, got {n_tokens}")
    chunks = -(-int(n_tokens) // chunk)
    work = batch * kv_heads
    want = -(-(blocks_per_sm * sm_count) // work)
    return max(1, min(want, chunks // min_chunks_per_split, MAX_SPLITS))


def split_signature(spec: KernelSpec) -> KernelSignature:
    """Inputs as the decode/fused kernel (:func:`attention_signature`), outputs the partials."""
    ps = pieces(spec)
    hq, d = spec.num_q_heads, spec.head_dim
    args = [ArgDesc.tensor("q", ("B", hq, d), spec.tvm_dtype)]
    for p in ps:
        args += piece_args(spec, p)
    args.append(ArgDesc.scalar("sm_scale", _F32))
    args.append(ArgDesc.tensor("o_parts", ("P", "B", hq, d), _F32, output=True))
    args.append(ArgDesc.tensor("lse_parts", ("P", "B", hq), _F32, output=True))
    multiple = tuple((p.n_sym, spec.chunk) for p in ps)
    at_least = tuple((p.g_sym, p.n_sym, spec.k_group) for p in ps if p.quantized)
    return KernelSignature(spec.uri, tuple(args), multiple_of=multiple, at_least=at_least)


def multi_split_signature(spec: KernelSpec) -> KernelSignature:
    """The multi-token kernel's inputs (:func:`multi_signature`), outputs the partials of every (token, head) row:
    ``o_parts [P, B, S, Hq, D] f32, lse_parts [P, B, S, Hq] f32`` (the merge reads them as ``B * S`` samples)."""
    inputs = multi_signature(spec)
    hq, d = spec.num_q_heads, spec.head_dim
    args = (*inputs.args[:-1], ArgDesc.tensor("o_parts", ("P", "B", "S", hq, d), _F32, output=True),
            ArgDesc.tensor("lse_parts", ("P", "B", "S", hq), _F32, output=True))
    return KernelSignature(spec.uri, args, multiple_of=inputs.multiple_of, at_least=inputs.at_least)


# ---- merge ------------------------------------------------------------------------------------------------------
def num_parts(spec: KernelSpec) -> int | str:
    """The merge kernel's part count: ``("p", n)`` in ``spec.extra``, else the symbol ``P``."""
    return dict(spec.extra).get("p", "P")


def merge_signature(spec: KernelSpec) -> KernelSignature:
    hq, d, p = spec.num_q_heads, spec.head_dim, num_parts(spec)
    return KernelSignature(
        spec.uri,
        (
            ArgDesc.tensor("o_parts", (p, "B", hq, d), _F32),
            ArgDesc.tensor("lse_parts", (p, "B", hq), _F32),
            ArgDesc.tensor("out", ("B", hq, d), spec.tvm_dtype, output=True),
        ),
    )


# ---- quantize ---------------------------------------------------------------------------------------------------
#: ``spec.extra`` keys of the quantize kernel's fits: the keys' least squares (value: its iteration count) and the
#: values' zero search (value: its candidate count, ``len(ZS_SHIFTS)``).
#: At one bit ``vzs`` means the values' least squares, as in the reference (:func:`value_fit_iters`).
FIT_KEY = "klsq"
VALUE_FIT_KEY = "vzs"
#: A quantize spec with ``(GIVEN_KEY, 1)`` codes and packs against given fp16 scale/zero (inputs, no fit): the
#: 8-bit scale/zero grid (:mod:`wq_compile.core.meta8`) decides them, the kernel does the per-element work.
GIVEN_KEY = "given"


def _extra_count(spec: KernelSpec, key: str, allowed: tuple[int, ...] | None = None) -> int:
    n = dict(spec.extra).get(key, 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or (n and allowed is not None and n not in allowed):
        raise ValueError(f"spec.extra: {key} must be {'one of ' + str(allowed) if allowed else 'a non-negative count'}"
                         f", got {n!r}")
    return n


def key_fit_iters(spec: KernelSpec) -> int:
    """Least-squares iterations of the keys' scale/zero fit in a quantize ``spec`` (0: min/max)."""
    return _extra_count(spec, FIT_KEY)


def value_zero_search(spec: KernelSpec) -> bool:
    """True when a quantize ``spec``'s values take the ``zs`` fit (``VALUE_FIT_KEY`` in its extra): the zero search
    (:data:`~wq_compile.core.quant_fit.ZS_SHIFTS`), but at one bit least squares (:func:`value_fit_iters`)."""
    return _extra_count(spec, VALUE_FIT_KEY, (len(ZS_SHIFTS),)) > 0


def value_fit_iters(spec: KernelSpec) -> int:
    """Least-squares iterations of the values' fit in a quantize ``spec``: :data:`~wq_compile.core.quant_fit.
    LSQ_ITERS` where ``zs`` meets one bit (two levels: the reference's ``fit_params`` makes ``zs`` a 2-means there,
    min/max's scale leaving no zero to search), else 0 (min/max, or the zero search itself)."""
    return LSQ_ITERS if value_zero_search(spec) and quantize_bits(spec) == 1 else 0


def spec_fit(spec: KernelSpec) -> str:
    """The config fit (:data:`~wq_compile.core.quant_fit.FITS`) a quantize ``spec`` computes."""
    return fit_named("lsq" if key_fit_iters(spec) else "minmax", "zs" if value_zero_search(spec) else "minmax")


def compiled_fit(fit: str) -> bool:
    """True when the compiled quantize kernel computes ``fit`` (keys min/max or least squares, values min/max or
    the zero search); other fits (HQQ's zero, least squares on values) quantize with the torch reference."""
    return fit_of(fit, "v") in ("minmax", "zs") and fit_of(fit, "k") in ("minmax", "lsq")


def given_meta(spec: KernelSpec) -> bool:
    """True when a quantize ``spec`` takes its scale/zero as inputs (:data:`GIVEN_KEY`) instead of fitting them."""
    return _extra_count(spec, GIVEN_KEY, (1,)) > 0


def quantize_spec(bits: int, fit: str = DEFAULT_FIT, given: bool = False, **shape: object) -> KernelSpec:
    """The quantize kernel of width ``bits`` computing ``fit`` (:func:`compiled_fit`), or with ``given`` the one
    that codes against given scale/zero (no fit); ``shape``: the KernelSpec fields (head_dim, heads, groups, dtype,
    chunk). The one place the runtime, the tuner and the tests name it."""
    if given:
        return KernelSpec("quantize", (bits,), extra=((GIVEN_KEY, 1),), **shape)  # type: ignore[arg-type]
    if not compiled_fit(fit):
        raise ValueError(f"fit: the compiled quantize kernel fits keys by min/max or least squares and values by "
                         f"min/max or the zero search; {fit!r} quantizes with the torch reference")
    extra = ((FIT_KEY, LSQ_ITERS),) if fit_of(fit, "k") == "lsq" else ()
    extra += ((VALUE_FIT_KEY, len(ZS_SHIFTS)),) if fit_of(fit, "v") == "zs" else ()
    return KernelSpec("quantize", (bits,), extra=extra, **shape)  # type: ignore[arg-type]


def quantize_bits(spec: KernelSpec) -> int:
    if spec.kind != "quantize" or len(spec.bits) != 1 or spec.bits[0] == 16:
        raise ValueError(f"quantize: expected kind 'quantize' with one width in (1, 2, 4, 8), got {spec.kind} {spec.bits}")
    key_fit_iters(spec), value_zero_search(spec), given_meta(spec)  # a malformed fit is refused before any factory
    if given_meta(spec) and (key_fit_iters(spec) or value_zero_search(spec)):
        raise ValueError("quantize: a spec with given scale/zero has no fit to run; drop klsq/vzs from its extra")
    return spec.bits[0]


def quantize_signature(spec: KernelSpec) -> KernelSignature:
    qs = spec.quant(quantize_bits(spec))
    hkv, d = spec.num_kv_heads, spec.head_dim
    w = d // qs.per_word
    fitted = not given_meta(spec)  # scale/zero: outputs of the fit, or inputs (in the same positions)
    args = (
        ArgDesc.tensor("k", ("B", hkv, "n", d), spec.tvm_dtype),
        ArgDesc.tensor("v", ("B", hkv, "n", d), spec.tvm_dtype),
        ArgDesc.tensor("k_codes", ("B", hkv, "G", d, key_words(qs.bits, qs.k_group)), _I32, output=True),
        ArgDesc.tensor("k_scale", ("B", hkv, "G", d), _F16, output=fitted),
        ArgDesc.tensor("k_zero", ("B", hkv, "G", d), _F16, output=fitted),
        ArgDesc.tensor("v_codes", ("B", hkv, "n", w), _I32, output=True),
        ArgDesc.tensor("v_scale", ("B", hkv, "n", d // qs.v_group), _F16, output=fitted),
        ArgDesc.tensor("v_zero", ("B", hkv, "n", d // qs.v_group), _F16, output=fitted),
    )
    return KernelSignature(spec.uri, args, multiple_of=(("n", qs.k_group),), groups=(("G", "n", qs.k_group),))


# ---- dispatch ---------------------------------------------------------------------------------------------------
def signature(spec: KernelSpec) -> KernelSignature:
    """Argument list of ``make_kernel(spec)``, in call order, with outputs marked and the size rules."""
    if spec.kind in ("decode", "fused"):
        return split_signature(spec) if is_split(spec) else attention_signature(spec)
    if spec.kind == "merge":
        return merge_signature(spec)
    if spec.kind == "multi":
        return multi_split_signature(spec) if is_split(spec) else multi_signature(spec)
    if spec.kind == "quantize":
        return quantize_signature(spec)
    raise ValueError(f"kind: no kernel factory for {spec.kind!r}")


def piece_fields(arg_name: str) -> tuple[str, str]:
    """``(piece tag, field)`` of a fused/decode argument name: ``q4_k_codes`` -> ``("q4", "k_codes")``,
    ``dense_lens`` -> ``("dense", "lens")``; a decode kernel's unprefixed names give ``("", field)``. The runtime
    reads a bucket's tensors by these field names, so the argument order is defined once (the signature)."""
    tag, sep, rest = arg_name.partition("_")
    if sep and (tag == "dense" or (tag[:1] == "q" and tag[1:].isdigit())):
        return tag, rest
    return "", arg_name
