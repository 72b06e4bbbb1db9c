"""Tiny random-weight Qwen2-VL and Qwen2.5-VL built from configs (no download), and prompts for them.

Same layout as the released checkpoints: patch 14, two frames per temporal patch, 2x2 spatial merge, so a video of
``T`` frames at ``H x W`` pixels has ``video_grid_thw = (T/2, H/14, W/14)`` and ``(T/2) * (H/14) * (W/14) / 4``
video tokens wrapped in ``<|vision_start|>``/``<|vision_end|>``; M-RoPE with
the released ``mrope_section`` and head_dim 128. Only the widths and depths are small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tiny import Prompt, random_model

#: The released ids are 151655 (image), 151656 (video), 151652/151653 (vision start/end) in a 151936-token
#: vocabulary; the tiny model keeps a 1000-token vocabulary (embedding and LM head of the real one take most of the
#: build time and memory and touch no attention) and the locator reads the ids from the config either way.
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 995, 996, 997, 998
PAD, BOS = 0, 1
#: The families this module builds, by the name the CLI and the example use.
FAMILIES = ("qwen2-vl", "qwen2.5-vl")
#: mm_token_type_ids values transformers' ``get_rope_index`` reads: text 0, image 1, video 2.
_TYPE = {IMAGE_TOKEN: 1, VIDEO_TOKEN: 2}


def tiny_qwen_config(family: str = "qwen2.5-vl", attn_implementation: str | dict | None = None, layers: int = 2,
                     text_shapes: dict | None = None) -> "object":
    """Config of a tiny ``family`` model: 4 query heads, 2 KV heads, head_dim 128 (the released head_dim)."""
    widths = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
    widths.update(text_shapes or {})
    text = dict(vocab_size=1000, num_hidden_layers=layers, max_position_embeddings=32768, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                  "mrope_section": [16, 24, 24]}, **widths)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=1, embed_dim=32, hidden_size=widths["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **kwargs)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=widths["hidden_size"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, **kwargs)
    raise ValueError(f"family: unknown Qwen VLM family {family!r}; expected one of {FAMILIES}")


def tiny_qwen_model(family: str = "qwen2.5-vl", attn_implementation: str | dict | None = None, seed: int = 0,
                    layers: int = 2, text_shapes: dict | None = None) -> "object":
    """Random weights from ``seed``; never stops early (no EOS), so runs produce exactly ``max_new_tokens``."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cfg = tiny_qwen_config(family, attn_implementation, layers, text_shapes)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2-vl" else Qwen2_5_VLForConditionalGeneration
    return random_model(cls, cfg, seed, PAD)


@dataclass(frozen=True)
class Visual:
    """One video (``frames`` frames) or image (``frames=0``) of ``height x width`` pixels (multiples of 28)."""

    frames: int
    height: int = 196
    width: int = 224

    def grid(self, temporal_patch: int = 2, patch: int = 14) -> tuple[int, int, int]:
        if self.height % (2 * patch) or self.width % (2 * patch):
            raise ValueError(f"height, width: {self.height}x{self.width} px are not multiples of {2 * patch} "
                             "(patch 14, 2x2 merge)")
        if self.frames % temporal_patch:
            raise ValueError(f"frames: {self.frames} is not a multiple of the temporal patch {temporal_patch}")
        return (max(1, self.frames // temporal_patch), self.height // patch, self.width // patch)


@dataclass(frozen=True)
class QwenPrompt(Prompt):
    """A :class:`~wq_compile.integrations.tiny.Prompt` that also says which visual inputs each sample holds."""

    visuals: tuple[tuple[Visual, ...], ...] = field(default=())


def qwen_prompt(model: object, samples: list[list[Visual]], seed: int = 0, question: int = 12) -> QwenPrompt:
    """Left-padded batch: per sample ``[BOS, text, (<vs> visual <ve> text)*, question]`` with random pixels of the
    processor's shapes (``pixel_values_videos [sum(t*h*w), 3*2*14*14]``) and ``mm_token_type_ids`` for M-RoPE."""
    cfg = model.config  # type: ignore[attr-defined]
    v = cfg.vision_config
    gen = torch.Generator().manual_seed(seed)
    row = v.in_channels * v.temporal_patch_size * v.patch_size**2
    seqs, vid_grids, img_grids = [], [], []
    for visuals in samples:
        seq = [BOS, 5, 6, 7]
        for vis in visuals:
            t, h, w = vis.grid(v.temporal_patch_size, v.patch_size)
            tok = VIDEO_TOKEN if vis.frames else IMAGE_TOKEN
            (vid_grids if vis.frames else img_grids).append((t, h, w))
            seq += [VISION_START] + [tok] * (t * h * w // v.spatial_merge_size**2) + [VISION_END, 8]
        seqs.append(seq + torch.randint(10, 990, (question,), generator=gen).tolist())
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):] = torch.tensor(s)
        mask[b, n - len(s):] = 1
    types = torch.zeros_like(ids)
    for tok, kind in _TYPE.items():
        types[ids == tok] = kind
    inputs: dict = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    for grids, key, grid_key in ((vid_grids, "pixel_values_videos", "video_grid_thw"),
                                 (img_grids, "pixel_values", "image_grid_thw")):
        if grids:
            g = torch.tensor(grids, dtype=torch.long)
            inputs[key] = torch.randn(int(g.prod(-1).sum()), row, generator=gen)
            inputs[grid_key] = g
    frames = tuple(vis.frames for visuals in samples for vis in visuals if vis.frames)
    return QwenPrompt(inputs, frames, tuple(tuple(s) for s in samples))
