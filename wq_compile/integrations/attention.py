"""The ``"windowquant"`` attention function transformers calls per layer: exact SDPA at prefill (then the prompt is
stored into the cache), the compiled kernel over the buckets at each decode step, and its registration.

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..core.reference import decode_attention
from .cache_layer import WindowQuantLayer
from .multi_token import MAX_STEP_TOKENS, causal_steps, dequantized_attention, runs_compiled

if TYPE_CHECKING:  # the cache module imports nothing of this one: annotation only
    from .transformers import WindowQuantCache


NAME = "windowquant"

#: Pass as ``attn_implementation``: WindowQuant for the language model, SDPA for the vision tower.
ATTN_IMPLEMENTATION = {"text_config": NAME, "vision_config": "sdpa"}

def windowquant_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``transformers`` attention function: exact SDPA at prefill, the compiled kernels over the buckets after it
    (one new token: the fused decode kernel; several: the multi-token kernel, or where the backend has none the
    per-token kernels / the torch reference).

    ``query [B, Hq, S, D]``; returns ``[B, S, Hq, D]`` as every ``transformers`` attention function does.
    """
    cache: WindowQuantCache | None = kwargs.pop("wq_cache", None)
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or layer_idx is None:  # vision tower, or a model run without a WindowQuantCache
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer: WindowQuantLayer = cache.layers[layer_idx]
    if layer.store is None:  # prefill from an empty cache: exact attention on the prompt, then store it
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=sm_scale,
                                        dropout=dropout, **kwargs)
        cache.store_prompt(layer_idx, query, key, value, sm_scale)
        return out, None
    s = query.shape[2]
    if s == 1:
        out = cache.backend(query.dtype, query.device).decode(query[:, :, 0], layer.store, sm_scale, cache.stats)
        return out.unsqueeze(1).to(query.dtype), None
    backend = cache.backend(query.dtype, query.device)
    steps = getattr(backend, "decode_steps", None)
    if steps is not None:  # several new tokens (follow-up, draft verification, a new clip's turn): one launch
        out = steps(query, layer.store, sm_scale, cache.stats)  # [B, S, Hq, D]
        if cache.turn is not None:  # a turn with new visual content (cache.extend): its windows go to the buckets
            cache.store_turn(layer_idx, query, key, value, sm_scale)
        return out.to(query.dtype), None
    if cache.turn is None and runs_compiled(backend, s):  # no multi-token kernel: per-token kernels
        return causal_steps(backend, query, layer.store, sm_scale, cache.stats).to(query.dtype), None
    # several new tokens on a filled cache (chunked prefill, speculative): the reference path, causal tail
    cache.stats.reference_calls += 1
    if s > MAX_STEP_TOKENS:  # a long step (a new clip): dequantize once, one SDPA call
        out = dequantized_attention(query, layer.store, sm_scale).transpose(1, 2)
    else:
        out = decode_attention(query, layer.store, sm_scale, causal_tail=s)
    if cache.turn is not None:  # a turn with new visual content (cache.extend): its windows go to the buckets
        cache.store_turn(layer_idx, query, key, value, sm_scale)
    return out.transpose(1, 2).to(query.dtype), None

def register() -> None:
    """Register ``"windowquant"`` with transformers (attention function and its mask builder). Idempotent."""
    AttentionInterface.register(NAME, windowquant_attention)
    # Without a mask function transformers hands unknown implementations no mask at all (padding ignored).
    AttentionMaskInterface.register(NAME, sdpa_mask)

