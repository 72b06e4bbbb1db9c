"""A LLaVA-OneVision checkpoint's text and video preprocessing without torchvision.

transformers' ``LlavaOnevisionVideoProcessor`` (and the default image processor) need torchvision, and no
torchvision wheel loads beside the CPU build of torch the README installs, so ``AutoProcessor.from_pretrained`` fails
there. :class:`VideoProcessor` does what that processor does for videos from the same folder files:

- text: the folder's tokenizer and chat template; each ``<video>`` becomes ``frames * ceil(sqrt(num_image_tokens)
  / 2) ** 2 + 1`` video tokens (2x2-pooled patches per frame plus one newline), as
  ``LlavaOnevisionProcessor.replace_video_token`` counts them;
- pixels: every frame resized to the config's ``size`` with its ``resample`` filter (PIL), then
  ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32, the video processor's fused rescale and
  normalize, laid out ``[videos, frames, 3, H, W]``.

torchvision resizes uint8 tensors with its own antialiased filters, which match PIL's to within one level of 255;
``tests/test_checkpoint.py`` compares the two where torchvision imports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tiny import Prompt


@dataclass(frozen=True)
class PixelSettings:
    """What ``video_preprocessor_config.json`` says about pixels (defaults: ``LlavaOnevisionVideoProcessor``'s)."""

    height: int
    width: int
    resample: int
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    do_convert_rgb: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> PixelSettings:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        size = d.get("size") or {"height": 384, "width": 384}
        if not {"height", "width"} <= set(size):
            raise ValueError(f"{source}: size {size} is not {{'height', 'width'}}; only a fixed frame size is "
                             "supported here (LLaVA-OneVision's video processors use one)")
        if d.get("do_center_crop"):
            raise ValueError(f"{source}: do_center_crop is set; LLaVA-OneVision's video processor does not crop and "
                             "this preprocessing does not either")

        def triple(key: str, default: Sequence[float]) -> tuple[float, float, float]:
            v = d.get(key)
            v = default if v is None else v
            v = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
            if len(v) != 3:
                raise ValueError(f"{source}: {key} needs 3 values (RGB), got {v}")
            return (v[0], v[1], v[2])

        return cls(height=int(size["height"]), width=int(size["width"]),
                   resample=int(d.get("resample", 3)), do_resize=bool(d.get("do_resize", True)),
                   do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(d.get("do_normalize", True)), mean=triple("image_mean", OPENAI_CLIP_MEAN),
                   std=triple("image_std", OPENAI_CLIP_STD), do_convert_rgb=bool(d.get("do_convert_rgb", True)))


def _as_frames_hwc(frames: Any) -> np.ndarray:
    """``[T, H, W, C]`` uint8 from a numpy ``[T, H, W, C]`` array or a torch ``[T, C, H, W]`` tensor."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4:
            raise ValueError(f"frames: expected a [T, C, H, W] tensor, got shape {tuple(frames.shape)}")
        frames = frames.permute(0, 2, 3, 1).cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames: expected [T, H, W, C] with C in 1, 3, 4 (or a torch [T, C, H, W]), got "
                         f"shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 pixels (0-255), got {arr.dtype}")
    return arr


def preprocess_frames(frames: Any, s: PixelSettings) -> torch.Tensor:
    """``[T, 3, H', W']`` float32 pixel values: convert to RGB, resize (PIL), rescale and normalize (float32)."""
    from PIL import Image

    arr = _as_frames_hwc(frames)
    out = []
    for f in arr:
        img = Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f)
        if s.do_convert_rgb and img.mode != "RGB":
            img = img.convert("RGB")
        if s.do_resize and img.size != (s.width, s.height):
            img = img.resize((s.width, s.height), resample=Image.Resampling(s.resample))
        out.append(np.asarray(img))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(torch.float32)
    if s.do_normalize:  # the video processor's fused form: one subtraction and one division per element
        scale = s.rescale_factor if s.do_rescale else 1.0
        mean = torch.tensor(s.mean, dtype=torch.float32).view(1, 3, 1, 1) * (1.0 / scale)
        std = torch.tensor(s.std, dtype=torch.float32).view(1, 3, 1, 1) * (1.0 / scale)
        x = (x - mean) / std
    elif s.do_rescale:
        x = x * s.rescale_factor
    return x.contiguous()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


class VideoProcessor:
    """Tokenizer, chat template and video pixels of a local LLaVA-OneVision folder, no torchvision needed."""

    def __init__(self, tokenizer: Any, chat_template: str, pixels: PixelSettings, num_image_tokens: int,
                 video_token: str = "<video>") -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.pixels = pixels
        self.num_image_tokens = num_image_tokens
        self.video_token = video_token
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        if self.video_token_id is None or self.video_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer: {video_token!r} is not a token of this vocabulary")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VideoProcessor:
        """Read ``path``'s tokenizer, chat template, ``processor_config.json`` and video pixel settings (from
        ``video_preprocessor_config.json``, or ``preprocessor_config.json`` in folders written before it existed).
        The tokens per frame are checked against the vision tower in ``config.json``."""
        from transformers import AutoTokenizer

        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"{root}: no config.json (not a checkpoint folder)")
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        template = None
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        elif (root / "chat_template.json").is_file():
            template = _read_json(root / "chat_template.json").get("chat_template")
        template = template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"{root}: no chat template (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json)")
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (root / name).is_file():
                pixels = PixelSettings.from_dict(_read_json(root / name), str(root / name))
                break
        else:
            raise FileNotFoundError(f"{root}: no video_preprocessor_config.json or preprocessor_config.json")
        proc = _read_json(root / "processor_config.json") if (root / "processor_config.json").is_file() else {}
        vision = _read_json(root / "config.json").get("vision_config", {})
        if "image_size" not in vision or "patch_size" not in vision:
            raise ValueError(f"{root}/config.json: vision_config lacks image_size/patch_size")
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
        n = int(proc.get("num_image_tokens") or patches)
        if n != patches:
            raise ValueError(f"{root}: processor_config.json says {n} image tokens per frame, the vision tower "
                             f"({vision['image_size']} px / patch {vision['patch_size']}) makes {patches}")
        if (pixels.height, pixels.width) != (vision["image_size"],) * 2:
            raise ValueError(f"{root}: frames are resized to {pixels.height}x{pixels.width} but the vision tower "
                             f"takes {vision['image_size']}x{vision['image_size']}")
        return cls(tokenizer, template, pixels, n, proc.get("video_token", "<video>"))

    def video_token_count(self, frames: int) -> int:
        """Placeholder tokens of one video: pooled patches of every frame plus one newline."""
        pooled = math.ceil(int(math.sqrt(self.num_image_tokens)) / 2)
        return frames * pooled * pooled + 1

    def prompt(self, question: str) -> str:
        """The chat-template text of one user turn holding a video and ``question``, ready for the answer."""
        conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(conv, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, text: str | list[str], videos: list[Any]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (left-padded) and ``pixel_values_videos [B, T, 3, H, W]`` float32.

        Every ``<video>`` in ``text`` takes the next video of ``videos`` in order, as in transformers' processor.
        """
        texts = [text] if isinstance(text, str) else list(text)
        pixels = [preprocess_frames(v, self.pixels) for v in videos]
        placeholders = sum(t.count(self.video_token) for t in texts)
        if placeholders != len(pixels):
            raise ValueError(f"text has {placeholders} {self.video_token} placeholders for {len(pixels)} videos")
        it = iter(pixels)
        expanded = []
        for t in texts:
            parts = t.split(self.video_token)
            body = parts[0]
            for rest in parts[1:]:
                body += self.video_token * self.video_token_count(next(it).shape[0]) + rest
            expanded.append(body)
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(expanded, return_tensors="pt", padding=True, add_special_tokens=False)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pixels:
            if len({p.shape for p in pixels}) != 1:
                raise ValueError("videos: every video of one call needs the same frame count to stack "
                                 f"({[p.shape[0] for p in pixels]})")
            out["pixel_values_videos"] = torch.stack(pixels)
        return out


def load_checkpoint(path: str | Path, attn_implementation: Any) -> tuple[Any, VideoProcessor]:
    """``from_pretrained`` on a local folder (nothing is downloaded) plus its :class:`VideoProcessor`."""
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = VideoProcessor.from_pretrained(path)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(path), attn_implementation=attn_implementation, dtype="auto", local_files_only=True).eval()
    return model, processor


def video_question(model: Any, processor: VideoProcessor, frames: Any, question: str) -> Prompt:
    """``generate`` inputs for ``question`` about ``frames``, on the model's device, pixels in its dtype."""
    inputs = processor(processor.prompt(question), [frames])
    inputs = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
              for k, v in inputs.items()}
    return Prompt(inputs, (int(inputs["pixel_values_videos"].shape[1]),))


def random_frames(frames: int, size: int = 384, seed: int = 0) -> np.ndarray:
    """``[frames, size, size, 3]`` uint8 noise: a stand-in video when no file is given."""
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
