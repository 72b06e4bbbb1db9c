"""Cost of the window search at the scale of a real prompt (32 frames x 196 tokens, every layer of a model).

Times the three prefill-side steps separately, median of ``repeats`` runs: attention-mass scoring (from the text
queries of the prompt), error measurement + allocation (``search``), and quantize + reorder into buckets.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ...core.layout import LayerCache
from ...core.models import get_preset
from ...core.scores import attention_scores
from ...core.search import search
from ...core.windows import make_windows


@dataclass(frozen=True)
class SearchTiming:
    model: str
    frames: int
    layers: int
    score_ms: float
    search_ms: float
    store_ms: float


def run(model: str = "llava-ov-0.5b", frames: int = 32, text_tokens: int = 40, avg_bits: float = 3.0,
        repeats: int = 5, seed: int = 0) -> SearchTiming:
    p = get_preset(model)
    gen = torch.Generator().manual_seed(seed)
    t = 14 + frames * 196 + 1 + text_tokens
    k = torch.randn(p.num_layers, p.num_kv_heads, t, p.head_dim, generator=gen)
    v = torch.randn(p.num_layers, p.num_kv_heads, t, p.head_dim, generator=gen)
    q_text = torch.randn(p.num_layers, p.num_q_heads, text_tokens, p.head_dim, generator=gen)
    w = make_windows([(14, frames * 196)], 196)
    sm = p.head_dim ** -0.5

    def timed(fn) -> tuple[float, object]:
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), out

    score_ms, scores = timed(lambda: torch.stack([attention_scores(q_text[i], k[i], w, sm)
                                                  for i in range(p.num_layers)]))
    search_ms, plan = timed(lambda: search(scores, k, v, w, avg_bits))

    def store() -> None:
        for i in range(p.num_layers):
            LayerCache.empty(1, p.num_kv_heads, p.head_dim, torch.float32).fill_sample(0, k[i], v[i], plan.layer(i))

    store_ms, _ = timed(store)
    return SearchTiming(p.name, frames, p.num_layers, score_ms, search_ms, store_ms)
