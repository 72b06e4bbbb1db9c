"""The one typed configuration of a WindowQuant cache, shared by the cache (integrations) and the backend (decode).

It lives here, not in the transformers integration, so :func:`wq_compile.runtime.backend.make_backend` can take it typed
without an import cycle and without importing ``transformers``. Fields that need no model are checked at
construction; fields that depend on the model's attention shapes (``v_group`` vs ``head_dim``) are checked, and
``v_group=None`` resolved, by :meth:`WindowQuantConfig.for_model` when a cache is built, not deep in ``generate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .meta8 import DEFAULT_META_BITS, check_meta_bits
from .quant_fit import DEFAULT_FIT, check_fit
from .spec import ALLOC_WIDTHS, BIT_WIDTHS, DEFAULT_WIDTHS, EVICT, MAX_WIDTHS, QUANT_BITS, bucket_widths

#: ``v_group=None`` means ``min(DEFAULT_V_GROUP, head_dim)``.
DEFAULT_V_GROUP = 64


def _positive_int(name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive int, got {value!r}; {fix}")


@dataclass(frozen=True)
class WindowQuantConfig:
    """What to quantize and how. ``avg_bits`` counts scale/zero overhead and fp16 group tails (effective bits).

    ``backend``: ``"auto"`` (compiled modules, else the torch reference with a warning), ``"tvm"`` (compiled or an
    error) or ``"reference"``. ``target``: a target for :func:`wq_compile.compiler.device.resolve_device` (default: the
    host CPU for CPU tensors, the local GPU for CUDA tensors). ``v_group=None``: ``min(64, head_dim)`` of the model.
    ``int8_dots``: the CPU kernel computes QK and P @ V of 4- and 2-bit buckets as int8 dot products (AVX-512
    VNNI + VBMI, AVX-VNNI or AVX2): the query quantized to int8 per head and key group, the probabilities to uint8
    per head, value group and key group. Faster, and adds a measured error well below what quantizing the cache
    costs (see the README).
    ``True`` asks for it (an error where no kernel has it), ``"auto"`` takes it where the target has it and the
    exact kernel elsewhere, ``False`` (the default) is exact everywhere: the README says why exact is the default
    (results then equal the reference's on every machine, and end to end the mode's gain was within noise).
    ``widths`` may include 0: the search may then evict a window (not stored; attention no longer sees it), and 1
    (a 2-level code, 1.89 effective bits): at ~3 bits the search can then mix widths (int2 alone costs 2.96), at
    most five widths in all; both are opt-in (docs/formats.md has the measurements).
    ``fit``: how each group's scale and zero are chosen (:mod:`wq_compile.core.quant_fit`), in one stored format that
    every decode kernel reads: ``"lsq-zs"`` (the default: keys by least squares, values by a zero search),
    ``"lsq-keys"``, ``"zs"`` and ``"minmax"`` are computed by the compiled quantize kernel; ``"lsq"``, ``"hqq"`` and
    ``"lsq-hqq"`` quantize with the torch reference (a larger share of the prefill).
    ``meta_bits``: bits of each group's scale and zero in the 2- and 1-bit buckets: 8 (the default: codes on a grid
    shared by runs of 16 key groups, :mod:`wq_compile.core.meta8`; int2 costs 2.61 effective bits instead of 2.96 at
    the same codes and error) or 16 (fp16, the format before). The CPU kernels read the codes; the split-KV (CUDA)
    kernels read their fp16 expansion, made per decode step (docs/formats.md has the measurements).
    """

    avg_bits: float = 3.0
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    window: str | int = "frame"
    k_group: int = 28
    v_group: int | None = None
    residual: int = 128
    flush_bits: int = 8
    scorer: str = "attention"
    backend: str = "auto"
    target: str | None = None
    chunk: int = 64
    int8_dots: bool | str = False
    fit: str = DEFAULT_FIT
    meta_bits: int = DEFAULT_META_BITS

    def __post_init__(self) -> None:
        if (isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float))
                or not math.isfinite(self.avg_bits) or self.avg_bits <= 0):
            raise ValueError(f"avg_bits: must be a finite positive number of effective bits per element (e.g. 3.0), "
                             f"got {self.avg_bits!r}")
        if not isinstance(self.widths, (tuple, list)) or len(self.widths) == 0:
            raise ValueError(f"widths: must be a non-empty tuple of widths among {BIT_WIDTHS}, got {self.widths!r}")
        for w in self.widths:
            if w not in ALLOC_WIDTHS or isinstance(w, bool):
                raise ValueError(f"widths: {w!r} is not one of {BIT_WIDTHS} or 0 (the window is evicted)")
        if all(w == EVICT for w in self.widths):
            raise ValueError(f"widths: {self.widths!r} would evict every window; add a stored width of {BIT_WIDTHS}")
        if len(set(self.widths)) > MAX_WIDTHS:
            raise ValueError(f"widths: at most five widths (the allocation enumerates five runs), got {self.widths!r};"
                             f" drop one, e.g. 8 or 0")
        check_fit(self.fit)
        check_meta_bits(self.meta_bits)
        _positive_int("k_group", self.k_group, "use e.g. 28 (tokens per key group)")
        if self.v_group is not None:
            _positive_int("v_group", self.v_group, "use a divisor of head_dim, or None for min(64, head_dim)")
        _positive_int("chunk", self.chunk, "use e.g. 64 (tokens per kernel tile)")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"residual: must be an int >= 0 (recent tokens kept dense), got {self.residual!r}; "
                             f"use e.g. 128")
        if not isinstance(self.int8_dots, bool) and self.int8_dots != "auto":
            raise ValueError(f"int8_dots: must be True, False or 'auto', got {self.int8_dots!r}")
        if self.scorer not in ("attention", "embedding"):
            raise ValueError(f"scorer: must be 'attention' or 'embedding', got {self.scorer!r}")
        if self.backend not in ("auto", "tvm", "reference"):
            raise ValueError(f"backend: must be 'auto', 'tvm' or 'reference', got {self.backend!r}")
        if self.flush_bits not in QUANT_BITS or isinstance(self.flush_bits, bool):
            raise ValueError(f"flush_bits: must be one of {QUANT_BITS}, got {self.flush_bits!r}")
        if self.window != "frame" and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                       or self.window <= 0):
            raise ValueError(f"window: must be 'frame' or a positive token count, got {self.window!r}")
        if isinstance(self.window, int) and self.window % self.k_group:
            raise ValueError(f"window: {self.window} tokens is not a whole number of key groups (k_group="
                             f"{self.k_group}); the remainder would stay fp16 in every window")

    def for_model(self, num_q_heads: int, num_kv_heads: int, head_dim: int) -> "WindowQuantConfig":
        """This config checked against a model's attention shapes, ``v_group=None`` resolved to
        ``min(64, head_dim)``. Raises ``ValueError`` naming the field and the fix."""
        for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _positive_int(name, value, "check the model config")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} does not divide num_q_heads {num_q_heads}")
        v_group = min(DEFAULT_V_GROUP, head_dim) if self.v_group is None else self.v_group
        if head_dim % v_group:
            raise ValueError(f"v_group: {v_group} does not divide the model's head_dim {head_dim}; use a divisor "
                             f"of {head_dim} or v_group=None (min(64, head_dim))")
        narrow = min(self.bucket_widths)
        per_word = 32 // narrow
        if head_dim % per_word:
            raise ValueError(f"head_dim: {head_dim} is not a multiple of {per_word} ({narrow}-bit codes per int32 "
                             f"word); WindowQuant cannot pack this model's values"
                             + (" at 1 bit: drop 1 from widths" if narrow == 1 else ""))
        return self if v_group == self.v_group else replace(self, v_group=v_group)

    @property
    def bucket_widths(self) -> tuple[int, ...]:
        """The quantized buckets every layer holds, widest first: 8, 4 and 2 always (the decode kernels' fixed
        pieces, whose tuning records ship), and 1 when ``widths`` allows it (then the kernels read an int1 bucket)."""
        return bucket_widths((*self.widths, self.flush_bits))
