"""A tiny random-weight LLaVA-OneVision built from a config (no download), and prompts for it.

Same layout as the released checkpoints (SigLIP 378 px / patch 14 -> 27x27 -> pooled 14x14 = 196 tokens per frame,
one newline after the frames, Qwen2 decoder with GQA); only the widths and depths are small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN, VIDEO_TOKEN, PAD, BOS = 998, 999, 0, 1


#: Text-model widths of llava-onevision-qwen2-0.5b-ov (the vocabulary stays small: it does not touch attention).
QWEN2_0_5B_TEXT = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2)


def tiny_config(attn_implementation: str | dict | None = None, layers: int = 2,
                text_shapes: dict | None = None) -> "object":
    """Config of the tiny model: 4 query heads, 2 KV heads, head_dim 64 (the kernels' smallest real shape).

    ``text_shapes`` overrides the decoder's widths (e.g. :data:`QWEN2_0_5B_TEXT` for a random-weight model with
    llava-ov-0.5b's attention and MLP shapes); the vision tower stays tiny.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=378, patch_size=14, vision_use_head=False)
    widths = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    widths.update(text_shapes or {})
    text = Qwen2Config(vocab_size=1000, num_hidden_layers=layers, max_position_embeddings=32768,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2, rope_theta=1e6, **widths)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=[[378, 378], [378, 756], [756, 378], [756, 756]], **kwargs,
    )


def tiny_model(attn_implementation: str | dict | None = None, seed: int = 0, layers: int = 2,
               text_shapes: dict | None = None) -> "object":
    """Random weights from ``seed``; never stops early (no EOS), so runs produce exactly ``max_new_tokens``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return random_model(LlavaOnevisionForConditionalGeneration, tiny_config(attn_implementation, layers, text_shapes),
                        seed, PAD)


def random_model(cls: type, config: object, seed: int, pad: int) -> "object":
    """``cls(config)`` with weights drawn from ``seed``, in eval mode, generating without EOS (so every run makes
    exactly ``max_new_tokens``) and padding with token ``pad``."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad
    return model


@dataclass(frozen=True)
class Prompt:
    """``generate`` keyword arguments plus what the example prints."""

    inputs: dict
    frames: tuple[int, ...]


def video_prompt(model: object, frames: list[int], seed: int = 0, question: int = 12) -> Prompt:
    """Left-padded batch, one video per sample (frame counts may differ; 0: a text-only sample):
    ``[BOS, text, video, question]``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    cfg = model.config  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    per_frame = (cfg.vision_config.image_size // cfg.vision_config.patch_size + 1) // 2
    seqs = []
    for f in frames:
        q = torch.randint(3, 990, (question,), generator=gen).tolist()
        seqs.append([BOS, 5, 6, 7] + [VIDEO_TOKEN] * (f * per_frame**2 + 1 if f else 0) + q)
    t = max(map(len, seqs))
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, t - len(s):] = torch.tensor(s)
        mask[b, t - len(s):] = 1
    size = cfg.vision_config.image_size
    pixels = [torch.randn(f, 3, size, size, generator=gen) for f in frames if f]  # the videos present only
    inputs: dict = {"input_ids": ids, "attention_mask": mask}
    if not pixels:
        pass
    elif len({f for f in frames if f}) == 1:
        inputs["pixel_values_videos"] = torch.stack(pixels)
    else:  # different frame counts cannot be stacked: encode each video, hand generate the features
        with torch.no_grad():
            feats = [model.model.get_video_features(p[None]).pooler_output for p in pixels]  # type: ignore
        inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=torch.cat(feats, 1))}
    return Prompt(inputs, tuple(frames))


def image_prompt(model: object, height: int = 500, width: int = 700, seed: int = 0) -> Prompt:
    """One anyres image (base view plus crops) followed by a question."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[height, width]])
    n = image_size_to_num_patches(sizes[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    s = cfg.vision_config.image_size
    pixel_values = torch.randn(1, n, 3, s, s, generator=gen)
    with torch.no_grad():
        n_tok = model.model.get_image_features(pixel_values, sizes).pooler_output[0].shape[0]  # type: ignore
    ids = torch.tensor([[BOS, 5] + [IMAGE_TOKEN] * n_tok + torch.randint(3, 990, (10,), generator=gen).tolist()])
    return Prompt({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
                   "image_sizes": sizes}, ())


def text_prompt(tokens: int = 40, seed: int = 0) -> Prompt:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([[BOS]]), torch.randint(3, 990, (1, tokens - 1), generator=gen)], 1)
    return Prompt({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ())
