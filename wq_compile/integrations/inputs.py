"""Checks of a prompt that ``WindowQuantCache.prepare`` can make before any prefill runs: the first call that sees
the inputs refuses what would otherwise fail deep inside the model or silently poison the cache."""

from __future__ import annotations

from typing import Any

import torch

#: Processor outputs holding pixels (LLaVA-OneVision and Qwen2-VL both use these names).
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def check_prompt_inputs(max_positions: int | None, input_ids: Any, inputs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a prompt longer than the model's context or for non-finite pixels.

    A prompt past ``max_position_embeddings`` runs positions the model was never trained on (RoPE extrapolates
    without error, so nothing else would say so); NaN/inf pixels become NaN visual keys in every layer, which the
    cache would keep dense and every later token would read.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and max_positions:
        if input_ids.shape[1] > max_positions:
            raise ValueError(
                f"input_ids: the prompt has {input_ids.shape[1]} tokens, more than the model's context of "
                f"{max_positions} positions (max_position_embeddings); use fewer frames or a shorter text")
    for key in PIXEL_KEYS:
        x = inputs.get(key)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(f"{key}: {bad} of {x.numel()} pixel values are NaN or inf (check how the frames "
                                 "were decoded and normalised); they would become NaN keys in every layer")
