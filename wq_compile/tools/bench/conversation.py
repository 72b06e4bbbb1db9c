"""A conversation, turn by turn: a clip and a question, a follow-up question, a second clip and a question.

Each cache kind (DynamicCache, transformers' StaticCache, WindowQuantCache) holds the whole conversation; per turn
the time to its first new token (the turn's prefill on the cached conversation) and the median ms per later token,
from a ``generate`` streamer that timestamps every token. WindowQuant's second clip goes through
``cache.extend``; its row says how many several-token steps ran the torch reference. One process, one run per
turn, random weights: these rows measure cost, not quality. A cache kind that cannot serve the model gets a row
saying why instead of numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from .e2e import MODELS, StepClock


@dataclass(frozen=True)
class TurnRow:
    cache: str  # "dynamic", "static" or "windowquant"
    turn: str
    turn_tokens: int  # ids this turn adds to the conversation
    ttft_ms: float
    decode_ms: float
    reference_calls: int = 0  # WindowQuant: several-token steps that ran the torch reference, this turn
    note: str = ""


def _turns(model: Any, frames: int, second_frames: int, question: int, seed: int = 0) -> tuple[dict, Any]:
    """The first turn's inputs and a builder of the later turns (from the conversation so far)."""
    import torch

    from ...integrations.tiny import VIDEO_TOKEN, video_prompt

    first = video_prompt(model, [frames], seed=seed, question=question).inputs
    gen = torch.Generator().manual_seed(seed + 1)
    size = model.config.vision_config.image_size
    follow_q = torch.randint(3, 990, (1, question), generator=gen)
    clip_q = torch.randint(3, 990, (question,), generator=gen)
    pixels = torch.randn(1, second_frames, 3, size, size, generator=gen)

    def later(kind: str, seq: torch.Tensor) -> dict:
        if kind == "follow-up":
            ids = torch.cat([seq, follow_q], 1)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        ids = torch.cat([seq[0], torch.tensor([5, 6] + [VIDEO_TOKEN] * (second_frames * 196 + 1)), clip_q])[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}

    return first, later


def measure(model_name: str = "tiny", layers: int | None = None, frames: int = 32, second_frames: int = 8,
            question: int = 40, new_tokens: int = 8, avg_bits: float = 3.0) -> list[TurnRow]:
    """Every cache kind through the three turns; returns one row per kind and turn."""
    import torch
    from transformers import DynamicCache, StaticCache

    from ...integrations.attention import ATTN_IMPLEMENTATION, register
    from ...integrations.transformers import WindowQuantCache
    from ...core.config import WindowQuantConfig
    from ...integrations.tiny import tiny_model

    torch.set_grad_enabled(False)
    register()
    shapes, default_layers = MODELS[model_name]
    model = tiny_model(ATTN_IMPLEMENTATION, layers=layers or default_layers, text_shapes=shapes)
    first, later = _turns(model, frames, second_frames, question)
    # a random-weight model may emit a media placeholder id, which a later turn would then have to re-read as media
    # (a trained model never does): every cache kind generates with them suppressed
    media = [model.config.image_token_index, model.config.video_token_index]
    names = ("1: clip + question", "2: follow-up question", "3: second clip + question")
    rows: list[TurnRow] = []
    for kind in ("dynamic", "static", "windowquant"):
        total = first["input_ids"].shape[1] + 2 * question + (second_frames * 196 + 3) + 3 * new_tokens + 8
        if kind == "dynamic":
            cache: Any = DynamicCache(config=model.config)
        elif kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=total)
        else:
            cache = WindowQuantCache(model.config, WindowQuantConfig(avg_bits=avg_bits)).prepare(**first)
        if kind == "windowquant":  # load the kernels and warm torch up outside the timed turns
            warm = WindowQuantCache(model.config, WindowQuantConfig(avg_bits=avg_bits)).prepare(**first)
            model.generate(**first, cache=warm, max_new_tokens=2, do_sample=False)
        else:
            model.generate(**first, cache=DynamicCache(config=model.config), max_new_tokens=2, do_sample=False)
        seq = None
        for i, name in enumerate(names):
            inputs = first if i == 0 else later("follow-up" if i == 1 else "clip", seq)
            before = getattr(getattr(cache, "stats", None), "reference_calls", 0)
            cached = 0 if seq is None else seq.shape[1] - 1  # the last answer token is not fed back yet
            try:
                if kind == "windowquant" and i == 2:
                    cache.extend(**inputs)
                clock = StepClock()
                out = model.generate(**inputs, cache=cache, max_new_tokens=new_tokens, do_sample=False,
                                     streamer=clock, suppress_tokens=media)
            except Exception as exc:  # a cache kind that cannot serve this model: say why, keep the others
                rows.append(TurnRow(kind, name, inputs["input_ids"].shape[1] - cached, float("nan"), float("nan"),
                                    note=f"{type(exc).__name__}: {str(exc)[:120]}"))
                break
            seq = out
            after = getattr(getattr(cache, "stats", None), "reference_calls", 0)
            rows.append(TurnRow(kind, name, inputs["input_ids"].shape[1] - cached, clock.ttft_ms(),
                                statistics.median(clock.step_ms()) if new_tokens > 1 else float("nan"),
                                after - before))
    return rows


def write_csv(rows: list[TurnRow], path: Any) -> None:
    import csv
    from dataclasses import asdict, fields

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, [x.name for x in fields(TurnRow)])
        w.writeheader()
        w.writerows(asdict(r) for r in rows)


def format_table(rows: list[TurnRow]) -> str:
    head = "| cache | turn | turn tokens | TTFT ms | ms/token | reference steps | note |\n|---|---|---|---|---|---|---|"
    body = [f"| {r.cache} | {r.turn} | {r.turn_tokens} | {r.ttft_ms:.1f} | {r.decode_ms:.2f} | "
            f"{r.reference_calls if r.cache == 'windowquant' else ''} | {r.note} |" for r in rows]
    return "\n".join([head, *body])
