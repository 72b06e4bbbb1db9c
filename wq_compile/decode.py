"""The kernels a WindowQuant cache runs: compiled modules when they can be had, the torch reference otherwise.

A :class:`Backend` is chosen once per cache (``make_backend``): ``decode`` is called once per layer per step (one
launch of the fused kernel over every bucket and the dense piece), ``quantize`` whenever windows or a residual
block enter a bucket. The reference path exists for machines where no module can be built, and says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .layout import LayerCache, Quantizer, torch_quantizer
from .quant import QuantizedKeys, QuantizedValues
from .reference import decode_attention
from .spec import KernelSpec, QuantSpec, dtype_tag


class Decoder(Protocol):
    def __call__(self, q: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        """``q [B, Hq, D]`` -> attention output ``[B, Hq, D]`` over every token of ``layer``."""


class ReferenceDecoder:
    """Dequantize-and-attend in torch: the oracle, and the fallback when no compiled module can be had."""

    def __call__(self, q: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        stats.reference_calls += 1
        return decode_attention(q, layer, sm_scale).to(q.dtype)  # type: ignore[union-attr]


class CompiledQuantizer:
    """The compiled quantize+pack kernel of each width (one module per width, every token count)."""

    def __init__(self, library: Any, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 chunk: int) -> None:
        self.library = library
        self.shape = dict(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          dtype=dtype_tag(dtype), chunk=chunk)
        self.dtype = dtype
        self.calls = 0

    def spec(self, qs: QuantSpec) -> KernelSpec:
        return KernelSpec("quantize", (qs.bits,), k_group=qs.k_group, v_group=qs.v_group, **self.shape)

    def __call__(self, qs: QuantSpec, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantizedKeys, QuantizedValues]:
        kernel = self.library.load(self.spec(qs))
        kc, ks, kz, vc, vs, vz = kernel.run(k.to(self.dtype).contiguous()[None], v.to(self.dtype).contiguous()[None])
        self.calls += 1
        return QuantizedKeys(kc[0], ks[0], kz[0], qs), QuantizedValues(vc[0], vs[0], vz[0], qs)


@dataclass
class Backend:
    """What the cache calls: ``decode`` per layer per step, ``quantize`` when tokens enter a bucket."""

    name: str
    decode: Decoder
    quantize: Quantizer


def make_backend(wq: Any, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> Backend:
    """Compiled modules for these shapes (``wq.backend`` "auto"/"tvm"); else the torch reference, with a warning
    ("auto") or an error ("tvm"). Modules load from the cache, else compile from the tuning log, else from the
    default schedule (``UntunedKernelWarning``)."""
    if wq.backend == "reference":
        return Backend("reference", ReferenceDecoder(), torch_quantizer)
    try:
        from .runtime import FusedDecoder, KernelLibrary

        library = KernelLibrary(wq.target or ("cuda" if torch.device(device).type == "cuda" else "llvm"))
        decoder = FusedDecoder.create(num_q_heads, num_kv_heads, head_dim, dtype, device, k_group=wq.k_group,
                                      v_group=wq.v_group, chunk=wq.chunk, library=library)
        quantizer = CompiledQuantizer(library, num_q_heads, num_kv_heads, head_dim, dtype, wq.chunk)
        for bits in (8, 4, 2):  # fail here, not in the middle of generation
            library.load(quantizer.spec(QuantSpec(bits, wq.k_group, wq.v_group)))
        return Backend(f"tvm:{library.device.tag}", decoder, quantizer)
    except Exception as exc:  # noqa: BLE001 - any failure to get a module falls back, loudly
        if wq.backend == "tvm":
            raise
        warnings.warn(f"WindowQuant: no compiled modules ({type(exc).__name__}: {exc}); using the torch "
                      f"reference, which dequantizes every step and is slow", RuntimeWarning, stacklevel=2)
        return Backend("reference", ReferenceDecoder(), torch_quantizer)
