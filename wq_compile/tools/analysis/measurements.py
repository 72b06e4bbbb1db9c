"""Per-window sensitivity measured by fake-quantizing one window at a time, the scorers' rank correlation with it,
and allocation policies compared at equal memory."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...core.allocation import window_bits, window_errors
from ...core.quant_fit import DEFAULT_FIT
from ...core.policy import POLICIES, WindowFakeQuant, attend, plan_layer, window_output_errors
from ...core.scores import attention_scores
from ...core.search import Plan
from ...core.spec import DEFAULT_WIDTHS
from .workloads import Workload


#: Scorers compared against measured sensitivity. ``prompt-error`` is the attention-output error measured on the
#: prompt's own text queries (what the ``sensitivity`` policy minimises); ``quant-error`` the window's quantization
#: error alone (no prompt at all).
SCORERS = ("attention", "embedding", "prompt-error", "quant-error")

SENS_BITS = (2, 4)

def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` of a 1-D tensor, ties averaged."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    _, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1 if x.numel() else 0, dtype=torch.float64).index_add_(0, inv, ranks)
    return (sums / torch.bincount(inv).double())[inv]

def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties averaged); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")

@dataclass
class Sensitivity:
    """Scores and measured sensitivity of one workload, per layer and window (errors at every width in
    ``DEFAULT_WIDTHS`` order are squared relative attention-output changes)."""

    workload: str
    scores: dict[str, torch.Tensor]  # scorer -> [L, W]
    out_err: torch.Tensor  # [L, W, len(SENS_BITS)] relative attention-output change (reading queries)
    kl: torch.Tensor  # [L, W, len(SENS_BITS)] readout KL (measured at 2 bits; NaN at 4)
    oracle: torch.Tensor  # [L, W, len(DEFAULT_WIDTHS)] squared output errors, reading queries
    prompt_err: torch.Tensor  # [L, W, len(DEFAULT_WIDTHS)] squared output errors, prompt text queries
    quant_err: torch.Tensor  # [L, W, len(DEFAULT_WIDTHS)] K/V quantization MSE (the search's error model)
    fq: list[WindowFakeQuant] = field(repr=False, default_factory=list)
    fit: str = DEFAULT_FIT  # the scale/zero fit every error above was measured with

def measure(w: Workload, with_kl: bool = True, fit: str = DEFAULT_FIT) -> Sensitivity:
    """Scores under every scorer and the sensitivity of every (layer, window) at 2 and 4 bits, with every window
    quantized as the cache would with ``fit`` (the config's scale/zero fit; the default's unless given)."""
    nl, nw = len(w.layers), len(w.windows)
    out_err = torch.zeros(nl, nw, len(SENS_BITS), dtype=torch.float64)
    kl = torch.full((nl, nw, len(SENS_BITS)), float("nan"), dtype=torch.float64)
    oracle, prompt_err, quant_err = (torch.zeros(nl, nw, len(DEFAULT_WIDTHS), dtype=torch.float64) for _ in range(3))
    attn = torch.zeros(nl, nw)
    fqs = []
    for li, lc in enumerate(w.layers):
        fq = WindowFakeQuant(lc.k, lc.v, w.windows, w.k_group, w.v_group, fit, w.meta_bits)
        fqs.append(fq)
        args = (w.windows, DEFAULT_WIDTHS, lc.sm_scale, w.k_group, w.v_group, fit, w.meta_bits)
        oracle[li] = window_output_errors(lc.q_dec, lc.k, lc.v, *args)
        prompt_err[li] = window_output_errors(lc.q_text, lc.k, lc.v, *args)
        quant_err[li] = window_errors(lc.k[None], lc.v[None], w.windows, DEFAULT_WIDTHS, w.k_group, w.v_group)[0]
        attn[li] = attention_scores(lc.q_text, lc.k, w.windows, lc.sm_scale)
        for j, bits in enumerate(SENS_BITS):
            out_err[li, :, j] = oracle[li, :, DEFAULT_WIDTHS.index(bits)].sqrt()
            if not with_kl or bits != SENS_BITS[0]:  # one model run per window: the narrowest width only
                continue
            for wi in range(nw):
                only = torch.full((nw,), 16, dtype=torch.long)
                only[wi] = bits
                kl[li, wi, j] = w.kl({li: fq.apply(only)})
    i2 = DEFAULT_WIDTHS.index(2)
    scores = {"attention": attn, "embedding": w.embedding.float().expand(nl, nw).clone(),
              "prompt-error": prompt_err[..., i2].float(), "quant-error": quant_err[..., i2].float()}
    return Sensitivity(w.name, scores, out_err, kl, oracle, prompt_err, quant_err, fqs, fit)

@dataclass(frozen=True)
class CorrRow:
    workload: str
    label: str
    scorer: str
    layer: int  # -1: mean over layers
    rho_out2: float
    rho_kl2: float
    rho_out4: float

def correlations(w: Workload, s: Sensitivity) -> list[CorrRow]:
    rows = []
    for scorer, sc in s.scores.items():
        per = []
        for li in range(sc.shape[0]):
            r = CorrRow(w.name, w.label, scorer, li, spearman(sc[li], s.out_err[li, :, 0]),
                        spearman(sc[li], s.kl[li, :, 0]) if bool(torch.isfinite(s.kl[li, :, 0]).all()) else
                        float("nan"), spearman(sc[li], s.out_err[li, :, 1]))
            per.append(r)
        rows += per

        def mean(vals: list[float]) -> float:
            good = [x for x in vals if x == x]
            return sum(good) / len(good) if good else float("nan")

        rows.append(CorrRow(w.name, w.label, scorer, -1, mean([r.rho_out2 for r in per]),
                            mean([r.rho_kl2 for r in per]), mean([r.rho_out4 for r in per])))
    return rows

@dataclass(frozen=True)
class PolicyRow:
    workload: str
    policy: str
    avg_bits: float  # the budget
    eff_bits: float  # what the plan uses
    out_err: float  # mean over layers of the relative attention-output error (reading queries)
    kl: float  # readout KL with every layer quantized by the plan
    answer_bits: float  # mean width of the ground-truth answer windows (NaN when unknown)
    note: str = ""

def evaluate_plan(w: Workload, s: Sensitivity, bits: torch.Tensor, recent: int = 0) -> tuple[float, float]:
    """``(mean relative attention-output error over layers, readout KL)`` of a plan ``bits [L, W]`` whose last
    ``recent`` windowed tokens stay exact (KIVI's fp16 recent tokens)."""
    errs, replaced = [], {}
    for li, lc in enumerate(w.layers):
        kq, vq = s.fq[li].apply(bits[li])
        if recent:
            idx = w.windows.token_index()[0][-recent:].to(kq.device)
            kq[:, idx], vq[:, idx] = lc.k[:, idx], lc.v[:, idx]
        o = attend(lc.q_dec, lc.k, lc.v, lc.sm_scale)
        oq = attend(lc.q_dec, kq, vq, lc.sm_scale)
        errs.append(float((oq - o).norm() / o.norm().clamp_min(1e-30)))
        replaced[li] = (kq, vq)
    return sum(errs) / len(errs), w.kl(replaced)

def plan_bits(w: Workload, s: Sensitivity, policy: str, avg_bits: float, seed: int = 0) -> torch.Tensor:
    return torch.stack([
        plan_layer(policy, q_text=lc.q_text, k=lc.k, v=lc.v, windows=w.windows, avg_bits=avg_bits,
                   sm_scale=lc.sm_scale, k_group=w.k_group, v_group=w.v_group, meta_bits=w.meta_bits,
                   embedding=w.embedding,
                   oracle_errors=s.oracle[li], prompt_errors=s.prompt_err[li], quant_errors=s.quant_err[li],
                   attention=s.scores["attention"][li], seed=seed)
        for li, lc in enumerate(w.layers)])

def compare_policies(w: Workload, s: Sensitivity, budgets: Sequence[float], policies: Sequence[str] = POLICIES,
                     random_seeds: int = 5) -> list[PolicyRow]:
    """Every policy at every budget; ``random`` is the median of ``random_seeds`` draws."""
    rows = []
    floor = float(window_bits(w.windows.lengths, [2], w.k_group, w.v_group, w.meta_bits).sum()
                  / w.windows.lengths.sum())
    for ab in budgets:
        if ab < floor:
            rows += [PolicyRow(w.name, p, ab, float("nan"), float("nan"), float("nan"), float("nan"),
                               f"infeasible: the format needs >= {floor:.2f} effective bits") for p in policies]
            continue
        for policy in policies:
            draws = range(random_seeds) if policy == "random" else range(1)
            res = []
            for seed in draws:
                bits = plan_bits(w, s, policy, ab, seed)
                err, kl = evaluate_plan(w, s, bits)
                plan = Plan(w.windows, bits, torch.zeros(bits.shape), w.k_group, w.v_group, w.meta_bits)
                ans = float(bits[:, w.answer].float().mean()) if w.answer is not None and bool(w.answer.any()) \
                    else float("nan")
                res.append((err, kl, plan.effective_avg_bits(), ans))
            med = [statistics.median(x) for x in zip(*res)]
            rows.append(PolicyRow(w.name, policy, ab, med[2], med[0], med[1], med[3],
                                  f"median of {len(res)} seeds" if len(res) > 1 else ""))
    return rows
