"""Where the visual tokens are in a Qwen2-VL / Qwen2.5-VL prompt, read from the config and the processor's grids.

Resolution is dynamic: a video of ``T`` frames at ``H x W`` pixels is ``video_grid_thw = (T/2, H/14, W/14)`` (two
frames per temporal patch, patch 14) and ``t * h * w / 4`` video tokens (2x2 spatial merge), in order temporal
patch by temporal patch, wrapped in ``<|vision_start|>``/``<|vision_end|>``. An image is the same with ``t = 1``.
So tokens per window differ per video and only the grids say where one temporal patch ends: they are consumed in
prompt order across the batch, as transformers' ``get_rope_index`` does. Text, padding and the start/end markers
are never in a window (dense residual). The M-RoPE positions are the model's business: the cache only stores the
rotated K/V and reports its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..core.windows import make_windows
from .llava import SampleLayout, _runs

#: ``model_type`` of the configs this locator reads.
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class QwenVisualLayout:
    """Token ids and spatial merge of a Qwen2-VL-style model (tokens per window come from the grids)."""

    video_token_id: int
    image_token_id: int
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    spatial_merge_size: int

    @classmethod
    def from_config(cls, config: object) -> "QwenVisualLayout":
        """Read ids and merge size from a ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``."""
        vision = getattr(config, "vision_config", None)
        merge = getattr(vision, "spatial_merge_size", None)
        video, image = getattr(config, "video_token_id", None), getattr(config, "image_token_id", None)
        if video is None or image is None or not merge:
            raise ValueError(f"config: a Qwen2-VL config needs video_token_id, image_token_id and "
                             f"vision_config.spatial_merge_size (got {video!r}, {image!r}, {merge!r})")
        return cls(int(video), int(image), getattr(config, "vision_start_token_id", None),
                   getattr(config, "vision_end_token_id", None), int(merge))


def _grids(name: str, grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    g = torch.as_tensor(grid)
    if g.dim() != 2 or g.shape[1] != 3:
        raise ValueError(f"{name}: expected [num, 3] (t, h, w) rows, got shape {tuple(g.shape)}")
    return [tuple(int(x) for x in row) for row in g.tolist()]  # type: ignore[misc]


def _split_run(start: int, n: int, grids: Iterator[tuple[int, int, int]], merge: int, kind: str, b: int,
               per_patch: bool) -> list[tuple[int, int]]:
    """Spans of one run of ``n`` same-kind tokens: whole inputs from ``grids`` until the run is used up (inputs
    back to back without a marker between them share a run), one span per temporal patch or per input."""
    spans: list[tuple[int, int]] = []
    pos, end = start, start + n
    while pos < end:
        try:
            t, h, w = next(grids)
        except StopIteration:
            raise ValueError(f"{kind}_grid_thw: sample {b} has more {kind} tokens (run of {n} at {start}) than "
                             f"the grids describe; pass the processor's {kind}_grid_thw to prepare()") from None
        if h % merge or w % merge:
            raise ValueError(f"{kind}_grid_thw: ({t}, {h}, {w}) is not a multiple of spatial_merge_size {merge}")
        per = h * w // merge**2
        if pos + t * per > end:
            raise ValueError(f"{kind}_grid_thw: grid ({t}, {h}, {w}) needs {t * per} tokens but sample {b}'s run of "
                             f"{kind} tokens at {start} has {end - pos} left; input_ids and grids disagree")
        spans += [(pos + i * per, per) for i in range(t)] if per_patch else [(pos, t * per)]
        pos += t * per
    return spans


def locate_qwen(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layout: QwenVisualLayout,
                window: str | int = "frame", video_grid_thw: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> list[SampleLayout]:
    """Windows of every sample of ``input_ids [B, T]`` (left or right padding).

    ``window="frame"``: one window per temporal patch of a video (two frames, ``h * w / 4`` tokens) and one per
    image; ``window=n``: every video and image cut into ``n``-token windows (a window never spans two inputs)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, tokens], got shape {tuple(input_ids.shape)}")
    if window != "frame" and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window: must be 'frame' or a positive token count, got {window!r}")
    valid_all = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if valid_all.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(valid_all.shape)} differs from input_ids "
                         f"{tuple(input_ids.shape)}")
    kinds = {"video": (layout.video_token_id, _grids("video_grid_thw", video_grid_thw)),
             "image": (layout.image_token_id, _grids("image_grid_thw", image_grid_thw))}
    iters = {k: iter(g) for k, (_, g) in kinds.items()}
    markers = [i for i in (layout.vision_start_token_id, layout.vision_end_token_id) if i is not None]
    out = []
    for b in range(input_ids.shape[0]):
        ids, valid = input_ids[b].cpu(), valid_all[b].cpu()
        visual = torch.zeros_like(valid)
        spans: list[tuple[int, int]] = []
        for kind, (tok, grids) in kinds.items():
            for s, n in _runs((ids == tok) & valid):
                visual[s : s + n] = True
                if not grids and window != "frame":  # a token count needs no grid
                    spans.append((s, n))
                    continue
                if not grids:
                    raise ValueError(f"{kind}_grid_thw: sample {b} holds {kind} tokens but no grids were given; "
                                     f"pass the processor's outputs (prepare(**inputs)) or a token-count window")
                spans += _split_run(s, n, iters[kind], layout.spatial_merge_size, kind, b, window == "frame")
        spans.sort()
        size = max((n for _, n in spans), default=1) if window == "frame" else int(window)
        marker = torch.isin(ids, torch.tensor(markers, dtype=ids.dtype)) if markers else torch.zeros_like(valid)
        text = valid & ~visual & ~marker
        if spans:
            last = max(s + n for s, n in spans)
            after = text.clone()
            after[:last] = False
            if bool(after.any()):
                text = after
        out.append(SampleLayout(make_windows(spans, size), text, valid))
    for kind, (_, grids) in kinds.items():
        left = sum(1 for _ in iters[kind])
        if grids and left:
            raise ValueError(f"{kind}_grid_thw: {left} of {len(grids)} grids have no {kind} tokens in input_ids")
    return out
