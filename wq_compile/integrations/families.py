"""Which window locator a model needs, chosen by its config's family (``model_type``).

Each VLM family lays its visual tokens out differently (LLaVA-OneVision: fixed 196 tokens per frame and a newline;
Qwen2-VL: dynamic resolution described by grids). A config with no vision tower (a text-only decoder) has nothing to
window; a VLM of a family no locator knows is refused, since guessing its layout would quantize the wrong tokens.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from .llava import SampleLayout, VisualLayout, locate
from .qwen2_vl import MODEL_TYPES as QWEN_TYPES
from .qwen2_vl import QwenVisualLayout, locate_qwen

LLAVA_TYPES = ("llava_onevision",)
Layout = Union[VisualLayout, QwenVisualLayout]


def visual_layout(config: Any) -> Layout:
    """The layout of ``config``'s family; raises for a VLM family without a locator."""
    model_type = getattr(config, "model_type", None)
    if model_type in QWEN_TYPES:
        return QwenVisualLayout.from_config(config)
    if model_type in LLAVA_TYPES or getattr(config, "vision_config", None) is None:
        return VisualLayout.from_config(config)  # text-only decoders: no ids, no windows
    raise ValueError(f"config: no window locator for model_type {model_type!r}; supported VLM families: "
                     f"{sorted(LLAVA_TYPES + QWEN_TYPES)} (or a text-only decoder config)")


def locate_samples(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layout: Layout,
                   window: str | int, inputs: dict[str, Any]) -> list[SampleLayout]:
    """Windows of every sample, by the family's locator; ``inputs`` are the other processor outputs (grids)."""
    if isinstance(layout, QwenVisualLayout):
        return locate_qwen(input_ids, attention_mask, layout, window, inputs.get("video_grid_thw"),
                           inputs.get("image_grid_thw"))
    return locate(input_ids, attention_mask, layout, window)
