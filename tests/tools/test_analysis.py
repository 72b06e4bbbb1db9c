"""Similarity-vs-sensitivity analysis and allocation policies: the measurements are exact, the allocators honour
the budget, the synthetic ground truth is recovered, and the command writes what it promises."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch

from wq_compile.tools.analysis.measurements import SCORERS, correlations, measure, rankdata, spearman
from wq_compile.tools.analysis.workloads import synthetic_workload
from wq_compile.tools.analysis.model_workloads import tiny_workload
from wq_compile.tools.cli.wq_eval import main_eval
from wq_compile.core.allocation import window_bits
from wq_compile.core.baselines import uniform_bits
from wq_compile.core.policy import WindowFakeQuant, allocate_min_error, attend, fake_quant_fast, plan_layer, window_output_errors
from wq_compile.core.quant import fake_quant
from wq_compile.core.reference import attend_piece
from wq_compile.core.search import Plan
from wq_compile.core.allocation import effective_bits
from wq_compile.core.windows import make_windows
from wq_compile.core.spec import DEFAULT_WIDTHS, QuantSpec


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_fast_matches_the_format(bits: int, gen: torch.Generator) -> None:
    x = torch.randn(2, 56, 64, generator=gen) * 3
    x[:, :28, 5] = 1.25  # a constant key group in one channel
    x[0, 3] = -0.5  # a constant value group (whole token)
    spec = QuantSpec(bits, 28, 32)
    for fit in ("minmax", "lsq-keys", "lsq-hqq", "lsq-zs"):  # every fit: the analysis quantizes as the cache would
        assert torch.equal(fake_quant_fast(x, bits, 28, "k", fit), fake_quant(x, spec, "k", fit)), fit
        assert torch.equal(fake_quant_fast(x, bits, 32, "v", fit), fake_quant(x, spec, "v", fit)), fit
    assert not torch.equal(fake_quant_fast(x, bits, 28, "k", "lsq-keys"), fake_quant_fast(x, bits, 28, "k"))
    assert not torch.equal(fake_quant_fast(x, bits, 32, "v", "lsq-zs"), fake_quant_fast(x, bits, 32, "v"))


def test_attend_matches_reference(gen: torch.Generator) -> None:
    q, k, v = torch.randn(4, 3, 64, generator=gen), torch.randn(2, 77, 64, generator=gen), torch.randn(2, 77, 64,
                                                                                                      generator=gen)
    want, _ = attend_piece(q[None], k[None], v[None], torch.tensor([77]), 0.125)
    assert torch.allclose(attend(q, k, v, 0.125), want[0], atol=1e-5)


def _windows() -> tuple:
    # unequal windows, one with a partial key group (its tail stays exact), one too short to quantize at all
    return make_windows([(3, 84), (90, 70), (165, 20)], 56)


def test_window_output_errors_equal_brute_force(gen: torch.Generator) -> None:
    w = _windows()
    t = 200
    q, k, v = torch.randn(4, 5, 64, generator=gen), torch.randn(2, t, 64, generator=gen), torch.randn(2, t, 64,
                                                                                                     generator=gen)
    k[:, 100:130] += 2.0  # one window draws more attention
    widths = (16, 8, 4, 2)
    got = window_output_errors(q, k, v, w, widths, 0.125, 28, 64)
    fq = WindowFakeQuant(k, v, w, 28, 64)
    o = attend(q, k, v, 0.125)
    for wi, (j, bits) in itertools.product(range(len(w)), enumerate(widths)):
        only = torch.full((len(w),), 16)
        only[wi] = bits
        kq, vq = fq.apply(only)
        want = ((attend(q, kq, vq, 0.125) - o).double().square().sum() / o.double().square().sum())
        assert float(got[wi, j]) == pytest.approx(float(want), rel=1e-3, abs=1e-12), (wi, bits)
    assert bool((got[:, 0] == 0).all())  # 16 bits: nothing changes
    assert w.lengths.tolist() == [56, 28, 56, 14, 20]
    assert float(got[3:].abs().max()) < 1e-12  # 14 and 20 tokens: no whole key group, nothing changes (rounding)
    assert bool((got[:3, 3] > got[:3, 2]).all())  # 2 bits hurt more than 4


def test_window_fake_quant_keeps_tails_and_text_exact(gen: torch.Generator) -> None:
    w = _windows()
    k, v = torch.randn(2, 200, 64, generator=gen), torch.randn(2, 200, 64, generator=gen)
    kq, vq = WindowFakeQuant(k, v, w, 28, 64).apply(torch.tensor([2, 4, 8, 2, 2]))
    changed = (kq != k).any(0).any(-1) | (vq != v).any(0).any(-1)
    quantized = torch.zeros(200, dtype=torch.bool)
    for s, n in [(3, 56), (59, 28), (90, 56)]:  # whole groups only: 84 = 56 + 28, 70 = 56 + 14 (tail exact)
        quantized[s:s + n] = True
    assert torch.equal(changed, quantized)


def _objective(errors: torch.Tensor, bits: torch.Tensor, widths: tuple) -> float:
    idx = torch.tensor([widths.index(int(b)) for b in bits])
    return float(errors[torch.arange(len(bits)), idx].sum())


@pytest.mark.parametrize("seed", range(8))
def test_allocate_min_error_near_brute_force_and_in_budget(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    widths = DEFAULT_WIDTHS
    nw = 6
    lengths = torch.tensor([196, 196, 168, 196, 100, 196])
    sens = torch.rand(nw, generator=gen) ** 3 * 10
    per_width = torch.tensor([0.0, 1 / 255**2, 1 / 15**2, 1 / 3**2])
    errors = sens[:, None] * per_width[None] * (1 + 0.3 * torch.rand(nw, 4, generator=gen))
    budget = 3.3 + 2.0 * float(torch.rand(1, generator=gen))  # above the floor of the two fp16 tails
    bits = allocate_min_error(errors, lengths, budget, widths)
    cost = window_bits(lengths, widths, 28, 64)
    used = float(cost[torch.arange(nw), torch.tensor([widths.index(int(b)) for b in bits])].sum())
    assert used <= budget * float(lengths.sum()) * (1 + 1e-9)
    best = min(
        sum(float(errors[i, j]) for i, j in enumerate(c))
        for c in itertools.product(range(4), repeat=nw)
        if sum(float(cost[i, j]) for i, j in enumerate(c)) <= budget * float(lengths.sum()) * (1 + 1e-9)
    )
    assert _objective(errors, bits, widths) <= best * 1.25 + 1e-12


def test_allocate_min_error_rejects_infeasible_budget() -> None:
    with pytest.raises(ValueError, match="below"):
        allocate_min_error(torch.rand(3, 4), torch.tensor([196, 196, 196]), 2.5)


def test_uniform_bits_is_the_widest_width_that_fits() -> None:
    lengths = torch.tensor([196, 196])
    assert uniform_bits(lengths, 3.0).tolist() == [2, 2]
    assert uniform_bits(lengths, effective_bits(4, 28, 64)).tolist() == [4, 4]
    assert uniform_bits(lengths, 16.0).tolist() == [16, 16]


def test_rank_and_spearman() -> None:
    assert rankdata(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(4)) != spearman(a, torch.ones(4))  # NaN for a constant side


@pytest.fixture(scope="module")
def needle():
    torch.set_grad_enabled(False)
    w = synthetic_workload("needle", layers=2, frames=8)
    return w, measure(w)


def test_needle_ground_truth_is_recovered(needle) -> None:
    w, s = needle
    for li in range(len(w.layers)):
        top = torch.argsort(s.out_err[li, :, 0], descending=True)[: int(w.answer.sum())]
        assert set(top.tolist()) == set(torch.nonzero(w.answer).flatten().tolist())  # the answer is what breaks
        top_kl = torch.argsort(s.kl[li, :, 0], descending=True)[: int(w.answer.sum())]
        assert set(top_kl.tolist()) == set(torch.nonzero(w.answer).flatten().tolist())
    rows = {(r.scorer, r.layer): r for r in correlations(w, s)}
    assert set(SCORERS) == {sc for sc, _ in rows}
    assert rows[("attention", -1)].rho_out2 > 0.4 and rows[("prompt-error", -1)].rho_out2 > 0.4


def test_policies_at_equal_memory_on_the_needle(needle) -> None:
    from wq_compile.tools.analysis.measurements import compare_policies

    w, s = needle
    rows = {(r.policy, r.avg_bits): r for r in compare_policies(w, s, [2.5, 4.0])}
    assert rows[("uniform", 2.5)].note.startswith("infeasible")
    for p in ("sensitivity", "similarity:attention", "oracle", "random"):
        assert rows[(p, 4.0)].eff_bits <= 4.0 + 1e-6
    assert rows[("sensitivity", 4.0)].out_err < 0.5 * rows[("uniform", 4.0)].out_err
    assert rows[("sensitivity", 4.0)].kl < rows[("uniform", 4.0)].kl
    assert rows[("sensitivity", 4.0)].answer_bits > 2.0


def test_plan_layer_policies_meet_the_budget(needle) -> None:
    w, s = needle
    lc = w.layers[0]
    for policy in ("uniform", "random", "similarity:attention", "similarity:embedding", "sensitivity", "oracle"):
        bits = plan_layer(policy, q_text=lc.q_text, k=lc.k, v=lc.v, windows=w.windows, avg_bits=3.5,
                          sm_scale=lc.sm_scale, k_group=28, v_group=64, embedding=w.embedding,
                          oracle_errors=s.oracle[0])
        plan = Plan(w.windows, bits[None], torch.zeros(1, len(w.windows)), 28, 64)
        assert plan.effective_avg_bits() <= 3.5 + 1e-6, policy
    with pytest.raises(ValueError, match="policy"):
        plan_layer("nope", q_text=lc.q_text, k=lc.k, v=lc.v, windows=w.windows, avg_bits=3.5,
                   sm_scale=lc.sm_scale, k_group=28, v_group=64)


def test_tiny_model_readout_is_the_models_next_token() -> None:
    torch.set_grad_enabled(False)
    w = tiny_workload(frames=2)
    assert w.label.startswith("machinery only")
    assert w.kl({}) == pytest.approx(0.0, abs=1e-12)
    same = {i: (lc.k.clone(), lc.v.clone()) for i, lc in enumerate(w.layers)}
    assert w.kl(same) == pytest.approx(0.0, abs=1e-9)
    noisy = {0: (w.layers[0].k + 5 * torch.randn_like(w.layers[0].k), w.layers[0].v)}
    assert w.kl(noisy) > 1e-6
    s = measure(w)
    assert bool(torch.isfinite(s.kl[..., 0]).all()) and bool((s.out_err > 0).all())


def test_wq_eval_analyze_writes_tables_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main_eval(["--analyze", "--workloads", "needle", "--budgets", "3,4", "--widths", "16/8/4/2/1", "--out",
                    str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Spearman" in text and "sensitivity" in text and "uniform" in text
    rows = list(csv.DictReader(open(tmp_path / "policies.csv")))
    assert {r["policy"] for r in rows} >= {"uniform", "random", "similarity:attention", "sensitivity", "oracle"}
    corr = list(csv.DictReader(open(tmp_path / "correlations.csv")))
    assert {r["scorer"] for r in corr} == set(SCORERS)
    for scorer in SCORERS:
        assert (tmp_path / f"scatter_{scorer}.png").stat().st_size > 5_000
    eq = list(csv.DictReader(open(tmp_path / "equal_bytes.csv")))
    assert {r["policy"] for r in eq} >= {"uniform + fp16 recent", "similarity:attention",
                                         "similarity:attention shuffled"}
    assert "at equal bytes" in text
    # at 3 bits with 1 bit allowed the search mixes widths: on the needle, at most 0.7x the output error of the best
    # KIVI-style uniform scheme given the same bytes (the row just above it)
    i = next(i for i, r in enumerate(eq) if float(r["avg_bits"]) == 3.0 and r["policy"] == "similarity:attention")
    base, mine = eq[i - 1], eq[i]
    assert "widths (16, 8, 4, 2, 1)" in mine["note"] and "KIVI-style" in base["note"]
    assert abs(float(mine["eff_bits"]) - float(base["eff_bits"])) <= 0.01 * float(base["eff_bits"])
    assert float(mine["out_err"]) <= 0.7 * float(base["out_err"])


def test_wq_eval_analyze_refuses_unknown_workload() -> None:
    with pytest.raises(SystemExit):
        main_eval(["--analyze", "--workloads", "nope"])
    with pytest.raises(SystemExit):
        main_eval(["--analyze", "--widths", "16/8/4/2/1/0"])  # six widths: the allocation enumerates five runs


def test_search_sensitivity_policy_is_the_policy_module(needle) -> None:
    from wq_compile.core.policy import window_output_errors as woe
    from wq_compile.core.search import search

    w, _ = needle
    k = torch.stack([lc.k for lc in w.layers])
    v = torch.stack([lc.v for lc in w.layers])
    q = torch.stack([lc.q_text for lc in w.layers])
    scores = torch.rand(len(w.layers), len(w.windows))
    plan = search(scores, k, v, w.windows, 3.5, q_text=q, sm_scale=w.layers[0].sm_scale)
    for i, lc in enumerate(w.layers):
        errs = woe(lc.q_text, lc.k, lc.v, w.windows, DEFAULT_WIDTHS, lc.sm_scale, 28, 64)
        assert torch.equal(plan.bits[i], allocate_min_error(errs, w.windows.lengths, 3.5))
    assert plan.effective_avg_bits() <= 3.5 + 1e-6
    similarity = search(scores, k, v, w.windows, 3.5)  # no queries: the similarity search, unchanged
    assert torch.equal(similarity.bits, search(scores, k, v, w.windows, 3.5, policy="similarity").bits)
    with pytest.raises(ValueError, match="q_text"):
        search(scores, k, v, w.windows, 3.5, policy="sensitivity")


def test_format_plan_shows_widths_scores_and_why_uniform() -> None:
    from wq_compile.core.policy import format_plan

    lengths = torch.full((8,), 196)
    mixed = torch.tensor([[4, 2, 2, 4, 2, 2, 2, 2], [2, 2, 4, 4, 2, 2, 2, 2]])
    scores = torch.arange(16, dtype=torch.float32).reshape(2, 8)
    text = format_plan(mixed, scores, lengths, 4.0)
    lines = text.splitlines()
    eff = (4 * effective_bits(4, 28, 64) + 12 * effective_bits(2, 28, 64)) / 16
    assert lines[0].startswith(f"plan (effective {eff:.2f} bits/element under a 4-bit budget")
    assert lines[2].startswith("  layer  0:   4  2  2  4") and "▁▂▃▄▅▆▇█" in lines[2] and "(0..7)" in lines[2]
    assert len(lines[1]) == len(lines[2].split("  |")[0])  # frame numbers above their widths
    assert "every window got" not in text
    flat = format_plan(torch.full((2, 8), 2), scores, lengths, 3.0)
    step = (effective_bits(4, 28, 64) - effective_bits(2, 28, 64)) / 8
    assert "every window got int2" in flat and f"costs {step:.2f}" in flat
