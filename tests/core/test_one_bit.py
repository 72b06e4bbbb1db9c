"""The 1-bit width: its fit (a 2-means), its cost, what the config and the cache do with it, the allocation's
weights (flat attention stays uniform), and the token-granular KIVI baseline it is compared against."""

from __future__ import annotations

import pytest
import torch

from wq_compile.core.allocation import allocate_bits, effective_bits, window_bits, window_errors
from wq_compile.core.config import WindowQuantConfig
from wq_compile.core.layout import LayerCache
from wq_compile.core.baselines import kivi_recent_plan, recent_plan_bits
from wq_compile.core.quant import fake_quant, quantize_values
from wq_compile.core.quant_fit import fit_params
from wq_compile.core.spec import QuantSpec
from wq_compile.core.windows import make_windows


def test_one_bit_zero_search_is_least_squares_and_beats_minmax() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 64, generator=gen) * 2 + 0.3
    assert all(torch.equal(a, b) for a, b in zip(fit_params(g, 1, "zs"), fit_params(g, 1, "lsq")))
    assert not torch.equal(fit_params(g, 3, "zs")[1], fit_params(g, 3, "lsq")[1])  # only at one bit
    v = torch.randn(2, 56, 64, generator=gen)
    err = {fit: float((fake_quant(v, QuantSpec(1), "v", fit) - v).square().mean()) for fit in ("minmax", "lsq-zs")}
    assert err["lsq-zs"] < 0.5 * err["minmax"]  # two levels at the range's ends are a poor 2-means
    codes = quantize_values(v, QuantSpec(1), "lsq-zs").codes
    assert codes.shape == (2, 56, 2)  # 32 one-bit codes per int32 word


def test_one_bit_cost_and_config() -> None:
    assert effective_bits(1, 28, 64) == pytest.approx((32 / 28 + 1) / 2 + 16 / 28 + 16 / 64)  # 1.89
    assert WindowQuantConfig().bucket_widths == (8, 4, 2)  # the default holds no int1 bucket
    wq = WindowQuantConfig(widths=(16, 8, 4, 2, 1))
    assert wq.bucket_widths == (8, 4, 2, 1)
    with pytest.raises(ValueError, match="drop 1 from widths"):
        wq.for_model(4, 2, 48)  # 48 channels do not fill 1-bit words
    assert WindowQuantConfig().for_model(4, 2, 48).v_group == 48  # without 1 bit they do (2-bit words)
    with pytest.raises(ValueError, match="at most five widths"):
        WindowQuantConfig(widths=(16, 8, 4, 2, 1, 0))
    layer = LayerCache.empty(1, 2, 64, torch.float32, widths=wq.bucket_widths)
    assert sorted(layer.buckets) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="must hold"):
        LayerCache.empty(1, 2, 64, torch.float32, widths=(8, 1))


def test_flat_attention_gives_a_uniform_allocation_and_focus_mixes_down_to_one_bit() -> None:
    """Weights from attention masses (squared, relative to the largest): scores that barely differ give uniform int2
    at 3 bits (min-max normalisation would make the least attended window's error free and mix int1 with wider
    widths); a prompt that attends to two frames gets them wider than int2 and the least attended down to 1 bit."""
    gen = torch.Generator().manual_seed(1)
    n, widths = 12 * 196, (16, 8, 4, 2, 1)
    k, v = torch.randn(1, 2, n, 64, generator=gen), torch.randn(1, 2, n, 64, generator=gen)
    win = make_windows([(0, n)], 196)
    errs = window_errors(k, v, win, widths, 28, 64)
    flat = 1.0 / 12 + 1e-4 * torch.rand(1, 12, generator=gen)
    bits = allocate_bits(flat, errs, win.lengths, 3.0, widths)
    assert bits.tolist() == [[2] * 12]
    focus = torch.full((1, 12), 0.01)
    focus[0, 3], focus[0, 7] = 0.5, 0.39
    bits = allocate_bits(focus, errs, win.lengths, 3.0, widths)[0]
    assert int(bits[3]) >= 4 and int(bits[7]) >= 4 and 1 in bits.tolist() and bits.tolist().count(2) > 0
    used = float(window_bits(win.lengths, bits, 28, 64).sum() / win.lengths.sum())
    assert used <= 3.0 + 1e-9


def test_kivi_baseline_spends_the_rest_on_recent_tokens() -> None:
    lengths = torch.full((8,), 196)
    int2 = effective_bits(2, 28, 64)
    budget = int2 + 2.5 * (16 - int2) / 8  # two and a half windows' worth of fp16
    bits, recent = kivi_recent_plan(lengths, budget, (16, 2))
    assert bits.tolist() == [2] * 8
    assert recent == 490  # 2.5 windows of 196 tokens, token granular
    used = recent_plan_bits(lengths, bits, recent) / float(lengths.sum())
    assert used <= budget * (1 + 1e-9) and recent_plan_bits(lengths, bits, recent + 1) / float(lengths.sum()) > budget
    _, near = kivi_recent_plan(lengths, budget + 0.6 * (16 - int2) / float(lengths.sum()), (2,), nearest=True)
    assert near == 491  # the nearest count, just above the budget
    bits, recent = kivi_recent_plan(lengths, 2.0, (2,))  # below int2's cost: nothing left to spend
    assert bits.tolist() == [2] * 8 and recent == 0
