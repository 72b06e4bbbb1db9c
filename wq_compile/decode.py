"""Decode attention over one layer's bucketed cache: the compiled fused kernel, or the torch reference.

A decoder is chosen once per cache (``make_decoder``) and called once per layer per step. The compiled path is one
launch of the fused kernel over every bucket and the dense piece; the reference path exists for machines where no
module can be built, and says so with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch

from .layout import LayerCache
from .reference import decode_attention


class Decoder(Protocol):
    def __call__(self, q: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        """``q [B, Hq, D]`` -> attention output ``[B, Hq, D]`` over every token of ``layer``."""


class ReferenceDecoder:
    """Dequantize-and-attend in torch: the oracle, and the fallback when no compiled module can be had."""

    def __call__(self, q: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        stats.reference_calls += 1
        return decode_attention(q, layer, sm_scale).to(q.dtype)  # type: ignore[union-attr]


def make_decoder(wq: Any, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> Decoder:
    """The compiled fused decoder for these shapes (``wq.backend`` "auto"/"tvm"), else the reference with a warning
    ("auto") or an error ("tvm")."""
    if wq.backend == "reference":
        return ReferenceDecoder()
    try:
        from .runtime import FusedDecoder

        return FusedDecoder.create(num_q_heads, num_kv_heads, head_dim, dtype, device, k_group=wq.k_group,
                                   v_group=wq.v_group, chunk=wq.chunk, target=wq.target)
    except Exception as exc:  # noqa: BLE001 - any failure to get a module falls back, loudly
        if wq.backend == "tvm":
            raise
        warnings.warn(f"WindowQuant: no compiled decode module ({type(exc).__name__}: {exc}); using the torch "
                      f"reference, which dequantizes every step and is slow", RuntimeWarning, stacklevel=2)
        return ReferenceDecoder()
