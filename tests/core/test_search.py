from __future__ import annotations

import pytest
import torch

from wq_compile.core.allocation import allocate_bits, effective_bits, window_errors
from wq_compile.core.scores import attention_scores, embedding_scores
from wq_compile.core.search import search
from wq_compile.core.windows import make_windows


def _kv(gen: torch.Generator, layers: int = 2, t: int = 40 + 8 * 196) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(layers, 2, t, 64, generator=gen) * (1 + 3 * torch.rand(1, 1, t, 1, generator=gen))
    return k, torch.randn(layers, 2, t, 64, generator=gen)


def test_windows_per_frame_and_fixed_count() -> None:
    w = make_windows([(5, 3 * 196)], 196)
    assert w.starts.tolist() == [5, 201, 397] and w.lengths.tolist() == [196] * 3
    w = make_windows([(0, 300), (400, 13)], 128)
    assert w.starts.tolist() == [0, 128, 256, 400] and w.lengths.tolist() == [128, 128, 44, 13]
    pos, wid = w.token_index()
    assert pos.tolist()[:2] == [0, 1] and pos.tolist()[-1] == 412 and wid.tolist()[-1] == 3
    with pytest.raises(ValueError, match="size"):
        make_windows([(0, 10)], 0)


def test_embedding_scorer_ranks_similar_window_first(gen: torch.Generator) -> None:
    emb = torch.randn(60, 16, generator=gen)
    text = torch.zeros(60, dtype=torch.bool)
    text[50:] = True
    emb[20:30] = emb[50:].mean(0) + 0.01 * torch.randn(10, 16, generator=gen)  # window 2 looks like the prompt
    s = embedding_scores(emb, make_windows([(0, 50)], 10), text)
    assert s.shape == (5,) and int(s.argmax()) == 2


def test_attention_scorer_is_the_mass_on_each_window(gen: torch.Generator) -> None:
    k = torch.randn(2, 50, 8, generator=gen)
    q = torch.zeros(4, 3, 8)
    q[..., :] = k[:, 12].repeat_interleave(2, 0)[:, None, :] * 4  # queries aim at token 12 (window 1)
    s = attention_scores(q, k, make_windows([(0, 40)], 10), 1.0)
    assert int(s.argmax()) == 1 and 0 < float(s.sum()) <= 1.0 + 1e-6


@pytest.mark.parametrize("avg_bits", [2.97, 3.0, 4.5, 6.0, 9.0, 12.0])
def test_budget_met_and_monotone(avg_bits: float, gen: torch.Generator) -> None:
    k, v = _kv(gen)
    w = make_windows([(20, 8 * 196)], 196)
    scores = torch.rand(2, len(w), generator=gen)
    plan = search(scores, k, v, w, avg_bits)
    assert plan.effective_avg_bits() <= avg_bits + 1e-6
    for layer in range(2):
        order = torch.argsort(scores[layer], descending=True)
        b = plan.bits[layer][order]
        assert (b[:-1] >= b[1:]).all(), "a more similar window got fewer bits"


def test_budget_is_used_not_wasted(gen: torch.Generator) -> None:
    k, v = _kv(gen, layers=1)
    w = make_windows([(20, 8 * 196)], 196)
    plan = search(torch.rand(len(w), generator=gen), k, v, w, 6.0)
    slack = 6.0 - plan.effective_avg_bits()
    # one more step up for any window would cost at least (8.66 - 4.66) * 196 / (8 * 196) = 0.5 bits/element
    assert 0 <= slack < 0.5 + 1e-6


def test_edge_budgets(gen: torch.Generator) -> None:
    k, v = _kv(gen, layers=1)
    w = make_windows([(20, 8 * 196)], 196)
    s = torch.rand(len(w), generator=gen)
    assert (search(s, k, v, w, 16.0).bits == 16).all()
    cheapest = effective_bits(2, 28, 64)  # 196 = 7 whole groups of 28: no fp16 tail
    assert (search(s, k, v, w, cheapest).bits == 2).all()
    with pytest.raises(ValueError, match="avg_bits.*infeasible"):
        search(s, k, v, w, cheapest - 0.01)
    with pytest.raises(ValueError, match="avg_bits"):
        search(s, k, v, w, -1.0)
    only_4 = search(s, k, v, w, effective_bits(4, 28, 64), widths=(4,))
    assert (only_4.bits == 4).all()


def test_higher_error_windows_get_more_bits_when_scores_tie() -> None:
    scores = torch.ones(4)
    errors = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 100, 200, 300], [0, 1, 2, 3]], dtype=torch.float)
    bits = allocate_bits(scores, errors, torch.full((4,), 28), 5.0)
    assert bits.shape == (4,) and int(bits[2]) == max(bits.tolist())


def test_range_error_model_tracks_exact(gen: torch.Generator) -> None:
    k, v = _kv(gen, layers=1)
    w = make_windows([(20, 4 * 196)], 196)
    fast = window_errors(k, v, w, (8, 4, 2), 28, 64)
    exact = window_errors(k, v, w, (8, 4, 2), 28, 64, exact=True)
    assert ((fast / exact - 1).abs() < 0.25).all()


def test_search_at_full_scale_32_frames_24_layers(gen: torch.Generator) -> None:
    """32 frames x 196 tokens, 24 layers (llava-ov-0.5b shapes): per-layer allocation at full scale (its cost is
    timed by ``wq-bench --search``, not here)."""
    k, v = _kv(gen, layers=24, t=32 * 196 + 60)
    w = make_windows([(30, 32 * 196)], 196)
    scores = torch.rand(24, 32, generator=gen)
    plan = search(scores, k, v, w, 3.1)
    assert plan.bits.shape == (24, 32) and plan.effective_avg_bits() <= 3.1
    hist = plan.histogram()
    assert hist == {b: int((plan.bits == b).sum()) for b in (16, 8, 4, 2)}
    assert sum(1 for n in hist.values() if n) >= 2  # a budget above the floor mixes widths, not one width
    for layer in range(24):
        order = torch.argsort(scores[layer], descending=True)
        b = plan.bits[layer][order]
        assert (b[:-1] >= b[1:]).all()


def test_search_validates_shapes(gen: torch.Generator) -> None:
    k, v = _kv(gen, layers=1)
    w = make_windows([(20, 196)], 196)
    with pytest.raises(ValueError, match="scores"):
        search(torch.rand(3), k, v, w, 3.0)
    with pytest.raises(ValueError, match="k: "):
        search(torch.rand(1), k[0], v[0], w, 3.0)


def test_plan_memory_estimate_matches_layout(gen: torch.Generator) -> None:
    from wq_compile.core.layout import LayerCache

    k, v = _kv(gen, layers=1)
    w = make_windows([(20, 8 * 196)], 196)
    plan = search(torch.rand(len(w), generator=gen), k, v, w, 5.0)
    cache = LayerCache.empty(1, 2, 64, torch.float16, residual=10_000)
    cache.fill_sample(0, k[0], v[0], plan.layer(0))
    used = cache.used_bytes()
    text_bytes = 40 * 2 * 64 * 2 * 2  # 20 tokens before and 20 after the video stay dense
    assert plan.memory_bytes(2, 64) == sum(used.values()) - text_bytes
