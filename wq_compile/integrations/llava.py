"""Where the visual tokens are in a LLaVA-OneVision prompt, read from the real model config.

A video of F frames is ``F * ppf + 1`` copies of the video token: ``ppf = ceil(n / 2)^2`` pooled tokens per frame
(``n = image_size // patch_size``: 27 -> 196 for the released checkpoints) and one newline token after the last frame.
An anyres image is one run of image tokens (base view, crops, row newlines). Text, padding and the video newline are
never in a window: they stay in the dense residual.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..core.search import Windows
from ..core.windows import make_windows


@dataclass(frozen=True)
class VisualLayout:
    """Token ids and per-frame size of a LLaVA-OneVision-style model."""

    video_token_id: int | None
    image_token_id: int | None
    tokens_per_frame: int

    @classmethod
    def from_config(cls, config: object) -> "VisualLayout":
        """Read ids and frame size from a ``LlavaOnevisionConfig`` (or any config with the same fields)."""
        vision = getattr(config, "vision_config", None)
        if vision is not None and getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
            n = vision.image_size // vision.patch_size
            ppf = math.ceil(n / 2) ** 2
        else:
            ppf = 196
        return cls(getattr(config, "video_token_id", None), getattr(config, "image_token_id", None), ppf)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, length)`` of every run of True in a 1-D bool tensor."""
    m = mask.to(torch.int8)
    d = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _video_spans(start: int, n: int, ppf: int) -> list[tuple[int, int]]:
    """The frame runs of a run of ``n`` video tokens, each video's trailing newline left out.

    One video is ``F * ppf + 1`` tokens; ``k`` videos back to back with equal frame counts are
    ``k * (F * ppf + 1)``. A run that fits neither (videos of different lengths with no text between them) cannot
    be cut into frames from token ids alone: it is windowed as one span, with a warning."""
    for k in range(1, min(n, ppf) + 1):
        if n % k == 0 and (n // k - 1) % ppf == 0 and n // k > 1:
            per = n // k
            return [(start + i * per, per - 1) for i in range(k)]
    warnings.warn(f"video tokens at {start}..{start + n}: {n} tokens is not k videos of F*{ppf}+1; windows may "
                  "straddle video boundaries (put text between videos to avoid this)", stacklevel=3)
    return [(start, n)]


@dataclass(frozen=True)
class SampleLayout:
    """One prompt of the batch: its windows, which tokens are text (for scoring) and which are padding."""

    windows: Windows
    text_mask: torch.Tensor  # [T] bool: the question (text after the last visual run; all text if none after)
    valid: torch.Tensor  # [T] bool: not padding


def locate(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layout: VisualLayout,
           window: str | int = "frame") -> list[SampleLayout]:
    """Windows of every sample of ``input_ids [B, T]``: one per frame (``window="frame"``) or per ``window`` tokens."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, tokens], got shape {tuple(input_ids.shape)}")
    if window != "frame" and (not isinstance(window, int) or window <= 0):
        raise ValueError(f"window: must be 'frame' or a positive token count, got {window!r}")
    size = layout.tokens_per_frame if window == "frame" else int(window)
    valid_all = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = []
    for b in range(input_ids.shape[0]):
        ids, valid = input_ids[b].cpu(), valid_all[b].cpu()
        spans: list[tuple[int, int]] = []
        visual = torch.zeros_like(valid)
        if layout.video_token_id is not None:
            for s, n in _runs((ids == layout.video_token_id) & valid):
                visual[s : s + n] = True
                spans += _video_spans(s, n, layout.tokens_per_frame)
        if layout.image_token_id is not None:
            for s, n in _runs((ids == layout.image_token_id) & valid):
                visual[s : s + n] = True
                spans.append((s, n))
        spans.sort()
        text = valid & ~visual
        if spans:
            last = max(s + n for s, n in spans)
            after = text.clone()
            after[:last] = False
            if bool(after.any()):
                text = after
        out.append(SampleLayout(make_windows(spans, size), text, valid))
    return out
