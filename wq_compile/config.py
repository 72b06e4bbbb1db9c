"""The one typed configuration of a WindowQuant cache, shared by the cache (integrations) and the backend (decode).

It lives here, not in the transformers integration, so :func:`wq_compile.backend.make_backend` can take it typed
without an import cycle and without importing ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import BIT_WIDTHS, QUANT_BITS


@dataclass(frozen=True)
class WindowQuantConfig:
    """What to quantize and how. ``avg_bits`` counts scale/zero overhead and fp16 group tails (effective bits).

    ``backend``: ``"auto"`` (compiled modules, else the torch reference with a warning), ``"tvm"`` (compiled or an
    error) or ``"reference"``. ``target``: a target for :func:`wq_compile.device.resolve_device` (default: the
    host CPU for CPU tensors, the local GPU for CUDA tensors).
    """

    avg_bits: float = 3.0
    widths: tuple[int, ...] = BIT_WIDTHS
    window: str | int = "frame"
    k_group: int = 28
    v_group: int = 64
    residual: int = 128
    flush_bits: int = 8
    scorer: str = "attention"
    backend: str = "auto"
    target: str | None = None
    chunk: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or self.avg_bits <= 0:
            raise ValueError(f"avg_bits: must be a positive number, got {self.avg_bits!r}")
        for w in self.widths:
            if w not in BIT_WIDTHS:
                raise ValueError(f"widths: {w} is not one of {BIT_WIDTHS}")
        if self.scorer not in ("attention", "embedding"):
            raise ValueError(f"scorer: must be 'attention' or 'embedding', got {self.scorer!r}")
        if self.backend not in ("auto", "tvm", "reference"):
            raise ValueError(f"backend: must be 'auto', 'tvm' or 'reference', got {self.backend!r}")
        if self.flush_bits not in QUANT_BITS:
            raise ValueError(f"flush_bits: must be one of {QUANT_BITS}, got {self.flush_bits}")
        if self.window != "frame" and (not isinstance(self.window, int) or self.window <= 0):
            raise ValueError(f"window: must be 'frame' or a positive token count, got {self.window!r}")
        if isinstance(self.window, int) and self.window % self.k_group:
            raise ValueError(f"window: {self.window} tokens is not a whole number of key groups (k_group="
                             f"{self.k_group}); the remainder would stay fp16 in every window")
