"""Validated, frozen descriptions of the quantization format and of one compiled kernel.

One :class:`KernelSpec` gives one URI (``decode_k4v4_kg28_vg64_d64_h14kv2_f32``) that names the TIR function,
its tuning-log folder, its module file and its torch op, so the four can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Widths a window may be stored at. 16 means "not quantized" (kept in the model's dtype). 1 is a 2-level code
#: (least-squares levels) for the least relevant windows: 1.89 effective bits, so at ~3 bits the search can mix.
BIT_WIDTHS: tuple[int, ...] = (16, 8, 4, 2, 1)
QUANT_BITS: tuple[int, ...] = (8, 4, 2, 1)
#: What a config allows unless told otherwise: 1 bit (like eviction) is opt-in, ``widths=(16, 8, 4, 2, 1)``.
DEFAULT_WIDTHS: tuple[int, ...] = (16, 8, 4, 2)
#: Buckets every layer holds whatever the config allows (the decode kernels' fixed pieces; 8 is the flush width).
CORE_BUCKETS: tuple[int, ...] = (8, 4, 2)
#: Widths one allocation may choose among (five): the search enumerates at most five runs of decreasing width.
MAX_WIDTHS = 5
#: Width 0: the window is evicted (not stored at all; it costs no bytes and attention no longer sees it). Only the
#: window search allocates it (``WindowQuantConfig(widths=(..., 0))``); no kernel reads it.
EVICT = 0
#: Every width the window search may allocate: the stored ones and eviction.
ALLOC_WIDTHS: tuple[int, ...] = (*BIT_WIDTHS, EVICT)
#: Codes are packed little-endian into 32-bit machine words (stored as int32).
WORD_BITS = 32
SCALE_DTYPE = torch.float16

_DTYPES = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}
_TVM_DTYPES = {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}


def dtype_tag(dtype: torch.dtype) -> str:
    """Short tag of a torch dtype used in URIs (``f16``/``f32``/``bf16``)."""
    for tag, dt in _DTYPES.items():
        if dt == dtype:
            return tag
    raise TypeError(f"dtype: unsupported dtype {dtype}; expected one of {list(_DTYPES.values())}")


def _check_int(name: str, value: object, lo: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")


def check_bits(bits: object, allowed: tuple[int, ...] = BIT_WIDTHS, name: str = "bits") -> int:
    """Return ``bits`` if it is an allowed width, else raise naming the argument."""
    _check_int(name, bits)
    if bits not in allowed:
        raise ValueError(f"{name}: must be one of {sorted(allowed)}, got {bits}")
    return int(bits)  # type: ignore[arg-type]


def bucket_widths(widths: "tuple[int, ...] | list[int]") -> tuple[int, ...]:
    """The quantized buckets a layer holds (and its decode kernels read) when ``widths`` may be stored, widest
    first: :data:`CORE_BUCKETS` always, plus every other quantized width among ``widths`` (1 bit when allowed)."""
    return tuple(sorted(set(CORE_BUCKETS) | {int(w) for w in widths if w in QUANT_BITS}, reverse=True))


def elems_per_word(bits: int) -> int:
    """How many ``bits``-wide codes fit in one storage word."""
    check_bits(bits, QUANT_BITS)
    return WORD_BITS // bits


@dataclass(frozen=True)
class QuantSpec:
    """KIVI-style asymmetric min/max format of one bucket.

    Keys are quantized per channel over groups of ``k_group`` consecutive tokens (outliers live in channels),
    values per token over groups of ``v_group`` channels. Scale and zero are fp16 per group.
    """

    bits: int
    k_group: int = 28
    v_group: int = 64

    def __post_init__(self) -> None:
        check_bits(self.bits, QUANT_BITS)
        _check_int("k_group", self.k_group)
        _check_int("v_group", self.v_group)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_word(self) -> int:
        return elems_per_word(self.bits)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise unless ``head_dim`` packs into whole words and whole value groups."""
        _check_int("head_dim", head_dim)
        if head_dim % self.per_word:
            raise ValueError(f"head_dim: {head_dim} is not a multiple of {self.per_word} ({self.bits}-bit codes per word)")
        if head_dim % self.v_group:
            raise ValueError(f"v_group: {self.v_group} does not divide head_dim {head_dim}")


@dataclass(frozen=True)
class KernelSpec:
    """Everything that fixes one compiled kernel; token counts stay symbolic (one module serves every length).

    ``bits`` lists the bucket widths the kernel reads (one for a per-bucket kernel, several for the fused one);
    16 stands for a dense piece in ``dtype``. ``chunk`` is the fixed tile of the dynamic token loop. ``multi``
    is the fused kernel for several new query tokens (causal among themselves; their count is a runtime size).
    """

    kind: str
    bits: tuple[int, ...]
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    k_group: int = 28
    v_group: int = 64
    dtype: str = "f32"
    chunk: int = 64
    extra: tuple[tuple[str, int], ...] = field(default=())

    KINDS = ("decode", "fused", "merge", "quantize", "multi")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"kind: must be one of {self.KINDS}, got {self.kind!r}")
        if not isinstance(self.bits, tuple) or not self.bits:
            raise TypeError(f"bits: expected a non-empty tuple of widths, got {self.bits!r}")
        for b in self.bits:
            check_bits(b)
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bits: duplicated width in {self.bits}")
        for name in ("head_dim", "num_q_heads", "num_kv_heads", "k_group", "v_group", "chunk"):
            _check_int(name, getattr(self, name))
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads: {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for b in self.bits:
            if b != 16:
                QuantSpec(b, self.k_group, self.v_group).check_head_dim(self.head_dim)

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def tvm_dtype(self) -> str:
        return _TVM_DTYPES[self.dtype]

    def quant(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.k_group, self.v_group)

    @property
    def uri(self) -> str:
        """Stable name: function name, tuning-log folder, module file and torch op name."""
        widths = "_".join(f"k{b}v{b}" if b != 16 else "dense" for b in self.bits)
        tail = "".join(f"_{k}{v}" for k, v in self.extra)
        return (
            f"{self.kind}_{widths}_kg{self.k_group}_vg{self.v_group}_d{self.head_dim}"
            f"_h{self.num_q_heads}kv{self.num_kv_heads}_{self.dtype}_c{self.chunk}{tail}"
        )
