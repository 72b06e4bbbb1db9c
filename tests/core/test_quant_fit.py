"""The least-squares fit of scale/zero (same format as min/max) and width 0 (eviction) in the window search."""

from __future__ import annotations

import itertools

import pytest
import torch

from wq_compile.core.config import WindowQuantConfig
from wq_compile.core.layout import LayerCache
from wq_compile.core.quant import dequantize_keys, dequantize_values, fake_quant, quantize_keys, quantize_values
from wq_compile.core.quant_fit import FITS, check_fit, fit_of, fit_params
from wq_compile.core.allocation import allocate_bits, window_bits, window_errors
from wq_compile.core.windows import make_windows
from wq_compile.core.spec import QuantSpec


def _group_err(g: torch.Tensor, bits: int, fit: str) -> torch.Tensor:
    qmax = (1 << bits) - 1
    s, z = fit_params(g, qmax, fit)
    s, z = s.float().unsqueeze(-1), z.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.where(s > 0, torch.round((g - z) / safe), torch.zeros_like(g)).clamp(0, qmax)
    return (c * s + z - g).square().sum(-1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lsq_never_worse_than_minmax_per_group(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    g = torch.cat([torch.randn(64, 28, generator=gen), torch.rand(64, 28, generator=gen) ** 3,
                   torch.randn(64, 28, generator=gen) * torch.linspace(0.01, 100, 64)[:, None]])
    mm, lsq = _group_err(g, bits, "minmax"), _group_err(g, bits, "lsq")
    assert bool((lsq <= mm * (1 + 1e-6) + 1e-12).all())
    assert float(lsq.sum()) < float(mm.sum())  # and it does lower the total on random data


def test_lsq_wins_on_a_planted_outlier() -> None:
    """27 values near 0 and one at 10: min/max spends its 2-bit grid on the outlier and codes the rest as the
    minimum; least squares puts the zero at their mean."""
    gen = torch.Generator().manual_seed(0)
    g = torch.cat([torch.rand(27, generator=gen) * 0.2 - 0.1, torch.tensor([10.0])])[None]
    mm, lsq = _group_err(g, 2, "minmax"), _group_err(g, 2, "lsq")
    assert float(lsq) < 0.5 * float(mm)


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("n", [7, 13, 196, 300])
def test_fits_roundtrip_irregular_sizes(fit: str, n: int) -> None:
    """Every size (short last key group included): the fit's error is within the per-width tolerance and, summed,
    not above min/max's; the stored format (shapes, dtypes) is the same for every fit."""
    gen = torch.Generator().manual_seed(n)
    k, v = torch.randn(2, n, 64, generator=gen), torch.randn(2, n, 64, generator=gen)
    tol = {2: 0.25, 4: 0.012, 8: 5e-5}  # relative MSE bound per width (min/max on N(0,1): 0.14-0.20 / 6-8e-3 / 3e-5)
    for bits, bound in tol.items():
        spec = QuantSpec(bits)
        qk, qv = quantize_keys(k, spec, fit), quantize_values(v, spec, fit)
        mk, mv = quantize_keys(k, spec), quantize_values(v, spec)
        assert qk.codes.shape == mk.codes.shape and qk.scale.dtype == mk.scale.dtype == torch.float16
        assert qv.codes.shape == mv.codes.shape and qv.zero.dtype == torch.float16
        ek = (dequantize_keys(qk, n) - k).square().mean() / k.square().mean()
        ev = (dequantize_values(qv) - v).square().mean() / v.square().mean()
        assert float(ek) < bound and float(ev) < bound
        if fit_of(fit, "k") != "hqq":  # least squares never raises the squared error (HQQ minimises an lp norm)
            assert float(ek) <= float((dequantize_keys(mk, n) - k).square().mean() / k.square().mean()) * 1.01


@pytest.mark.parametrize("fit", FITS)
def test_constant_groups_are_exact(fit: str) -> None:
    k = torch.full((1, 56, 64), 0.375)
    v = torch.full((1, 5, 64), -2.5)
    for bits in (2, 4, 8):
        assert torch.equal(fake_quant(k, QuantSpec(bits), "k", fit), k)
        assert torch.equal(fake_quant(v, QuantSpec(bits), "v", fit), v)
        assert bool((quantize_keys(k, QuantSpec(bits), fit).scale == 0).all())


def test_fit_names_checked() -> None:
    assert fit_of("lsq-keys", "k") == "lsq" and fit_of("lsq-keys", "v") == "minmax"
    assert fit_of("lsq", "v") == "lsq" and fit_of("minmax", "k") == "minmax"
    with pytest.raises(ValueError, match="fit"):
        check_fit("gptq")
    with pytest.raises(ValueError, match="fit"):
        WindowQuantConfig(fit="max")
    with pytest.raises(ValueError, match="fit_of"):
        fit_params(torch.randn(2, 28), 3, "lsq-keys")


# ---- width 0: eviction -----------------------------------------------------------------------------------------


def test_window_bits_is_the_one_accounting() -> None:
    lengths = torch.tensor([196, 30, 10])
    t = window_bits(lengths, [16, 2, 0], 28, 64)
    assert t[:, 0].tolist() == [16.0 * 196, 16.0 * 30, 16.0 * 10]
    assert t[:, 2].tolist() == [0.0, 0.0, 0.0]  # an evicted window costs nothing, fp16 tail included
    assert float(t[1, 1]) == pytest.approx(28 * window_bits(torch.tensor([28]), [2], 28, 64).item() / 28 + 2 * 16)
    per = window_bits(lengths, torch.tensor([[2, 0, 16]]), 28, 64)  # a plan: one width per window
    assert per.tolist() == [[float(t[0, 1]), 0.0, 16.0 * 10]]


def _weights(s: torch.Tensor) -> torch.Tensor:
    """The allocation's weights: squared relative scores for attention-like scores (all >= 0), min-max for signed
    ones."""
    if bool((s >= 0).all()):
        return (s / s.max()).square() + 1e-3
    return (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12) + 1e-3


def _brute_force(scores: torch.Tensor, err: torch.Tensor, cost: torch.Tensor, widths: tuple[int, ...],
                 budget: float) -> float:
    """Smallest score-weighted error of any allocation monotone in the score that fits the budget."""
    order = torch.argsort(-scores, stable=True)
    w = _weights(scores[order])
    err = err.flip(-1).cummin(-1).values.flip(-1)
    best = float("inf")
    for split in itertools.combinations_with_replacement(range(len(widths)), len(scores)):
        j = torch.tensor(split)  # non-decreasing index = non-increasing width along the score order
        c = float(cost[order, j].sum())
        if c <= budget * (1 + 1e-9):
            best = min(best, float((err[order, j] * w).sum()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocation_with_eviction_is_optimal(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    nw, widths = 6, (16, 8, 4, 2, 0)
    lengths = torch.tensor([196, 196, 56, 196, 84, 196])
    scores = torch.rand(nw, generator=gen) - 0.5 * (seed % 2)  # odd seeds: signed scores (cosines)
    err = torch.sort(torch.rand(nw, len(widths), generator=gen), -1).values  # increasing as the width shrinks
    err[:, 0] = 0
    cost = window_bits(lengths, widths, 28, 64)
    for avg in (0.7, 1.6, 2.5, 3.0, 5.0):
        bits = allocate_bits(scores, err, lengths, avg, widths)
        j = torch.tensor([widths.index(int(b)) for b in bits])
        used = float(cost[torch.arange(nw), j].sum())
        assert used <= avg * float(lengths.sum()) * (1 + 1e-9)
        order = torch.argsort(-scores, stable=True)
        assert bool((bits[order][1:] <= bits[order][:-1]).all())  # monotone in the score
        w = _weights(scores[order])
        got = float((err.flip(-1).cummin(-1).values.flip(-1)[order, j[order]] * w).sum())
        assert got == pytest.approx(_brute_force(scores, err, cost, widths, avg * float(lengths.sum())), rel=1e-9)


def test_eviction_frees_room_at_three_bits_and_the_cache_drops_the_window() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 8 * 196
    k, v = torch.randn(1, 2, n, 64, generator=gen), torch.randn(1, 2, n, 64, generator=gen)
    win = make_windows([(0, n)], 196)
    scores = torch.linspace(0, 1, 8)[None]
    errs = window_errors(k, v, win, (16, 8, 4, 2, 0), 28, 64)
    bits = allocate_bits(scores, errs, win.lengths, 3.0, (16, 8, 4, 2, 0))[0]
    assert 0 in bits.tolist() and 4 in bits.tolist()  # at 3 effective bits the search can mix (int2 alone is 2.96)
    assert int(bits[0]) == 0 and int(bits[-1]) >= 4  # the least relevant window goes first
    cache = LayerCache.empty(1, 2, 64, torch.float32, k_group=28, v_group=64, residual=0)
    cache.fill_sample(0, k[0], v[0], win.with_bits(bits))
    kept = int(sum(int(win.lengths[i]) for i in range(8) if int(bits[i]) != 0))
    assert int(cache.num_tokens()[0]) == kept
    assert cache.stats["evicted_windows"] == int((bits == 0).sum())
    with pytest.raises(ValueError, match="evict every window"):
        WindowQuantConfig(widths=(0,))
    assert WindowQuantConfig(widths=(4, 2, 0)).widths == (4, 2, 0)


def test_hqq_fit_keeps_the_scale_and_lowers_the_lp_error() -> None:
    """HQQ's zero search: min/max's scale unchanged, the zero moved so the p=0.7 error is lower than min/max's."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(256, 64, generator=gen)
    g[:, 0] += 6.0  # one outlier per group: min/max wastes the grid on it
    s_mm, z_mm = fit_params(g, 3, "minmax")
    s_h, z_h = fit_params(g, 3, "hqq")
    assert torch.equal(s_h, s_mm) and not torch.equal(z_h, z_mm)

    def abs_err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # per group, what the search keeps the best of
        s, z = s.float()[:, None], z.float()[:, None]
        c = torch.round((g - z) / s).clamp(0, 3)
        return (c * s + z - g).abs().mean(-1)

    h, mm = abs_err(s_h, z_h), abs_err(s_mm, z_mm)
    assert bool((h <= mm * (1 + 1e-3) + 1e-4).all()) and float(h.sum()) < 0.97 * float(mm.sum())
    assert fit_of("lsq-hqq", "k") == "lsq" and fit_of("lsq-hqq", "v") == "hqq"


# ---- equal-bytes baselines ---------------------------------------------------------------------------------------


def test_shuffled_plan_keeps_the_histogram() -> None:
    from wq_compile.core.baselines import shuffled_plan

    plan = torch.tensor([[16, 8, 4, 2, 2, 0], [4, 4, 2, 2, 0, 0]])
    sh = shuffled_plan(plan, seed=1)
    assert not torch.equal(sh, plan)
    assert torch.equal(torch.sort(sh, -1).values, torch.sort(plan, -1).values)  # same histogram per row


def test_a_fit_reaches_the_cache_through_the_backend() -> None:
    from wq_compile.runtime.backend import make_backend, reference_quantizer
    from wq_compile.core.buckets import torch_quantizer

    assert reference_quantizer("minmax") is torch_quantizer
    b = make_backend(WindowQuantConfig(backend="reference", fit="lsq-hqq"), 4, 2, 64, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 56, 64, generator=gen), torch.randn(2, 56, 64, generator=gen)
    qk, qv = b.quantize(QuantSpec(2), k, v)
    assert torch.equal(qk.scale, quantize_keys(k, QuantSpec(2), "lsq-hqq").scale)
    assert torch.equal(qv.zero, quantize_values(v, QuantSpec(2), "hqq").zero)
    assert not torch.equal(qk.scale, quantize_keys(k, QuantSpec(2)).scale)
