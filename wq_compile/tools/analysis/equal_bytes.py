"""Allocation policies next to their equal-bytes controls (the last table of ``wq-eval --analyze``).

A ratio between two allocations means something only when they spend the same bytes. Each policy row here is
paired with the same histogram of widths placed at random, and with the KIVI-style uniform scheme given the same
budget (the widest uniform width that fits, the rest spent on fp16 recent windows); every row carries its effective
bits (:func:`wq_compile.core.allocation.window_bits`), and a ratio is printed only between rows within 1% of the same bytes.
Width 0 (eviction) may be allowed, which :func:`wq_compile.tools.analysis.evaluate_plan` cannot express (it replaces K/V
of the prompt's shape), hence :func:`evaluate_plan_evicting`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ...core.allocation import allocate_bits, window_bits, window_errors
from ...core.spec import QUANT_BITS
from ...core.baselines import kivi_recent_plan, recent_plan_bits, shuffled_plan
from ...core.policy import allocate_min_error, attend, window_output_errors
from .measurements import PolicyRow, Sensitivity, evaluate_plan
from .workloads import Workload


def evaluate_plan_evicting(w: Workload, s: Sensitivity, bits: torch.Tensor) -> tuple[float, float]:
    """:func:`evaluate_plan` for plans that may evict windows (width 0): their tokens leave the attention. The
    readout KL needs K/V of the prompt's shape, so it is NaN for a plan that evicts."""
    if not bool((bits == 0).any()):
        return evaluate_plan(w, s, bits)
    errs = []
    pos, wid = w.windows.token_index()
    for li, lc in enumerate(w.layers):
        kq, vq = s.fq[li].apply(torch.where(bits[li] == 0, torch.full_like(bits[li], 16), bits[li]))
        keep = torch.ones(lc.k.shape[-2], dtype=torch.bool)
        keep[pos[bits[li][wid] == 0]] = False
        o = attend(lc.q_dec, lc.k, lc.v, lc.sm_scale)
        oq = attend(lc.q_dec, kq[:, keep], vq[:, keep], lc.sm_scale)
        errs.append(float((oq - o).norm() / o.norm().clamp_min(1e-30)))
    return sum(errs) / len(errs), float("nan")


def equal_bytes_rows(w: Workload, s: Sensitivity, budgets: Sequence[float], widths: Sequence[int] = (16, 8, 4, 2, 0),
                     policies: Sequence[str] = ("similarity:attention", "sensitivity"), seeds: int = 5
                     ) -> list[PolicyRow]:
    """Each allocation policy next to its equal-bytes controls: the same histogram of widths placed at random
    (median of ``seeds``) and the best KIVI-style uniform scheme at the policy's bytes (:func:`kivi_recent_plan`: one
    stored width for every window, the rest on fp16 recent tokens; every width of the format that fits is tried, 1
    bit included whatever the policy's widths, and the lowest error kept). ``widths`` may include 0 (eviction) and
    1. Every row carries its effective bits (:func:`window_bits`)."""
    rows = []
    lengths = w.windows.lengths
    widths = tuple(sorted({int(x) for x in widths}, reverse=True))

    def row(policy: str, ab: float, bits: torch.Tensor, note: str = "") -> PolicyRow:
        err, kl = evaluate_plan_evicting(w, s, bits)
        eff = float(window_bits(lengths, bits, w.k_group, w.v_group, w.meta_bits).sum()
                    / (lengths.sum() * bits.shape[0]))
        ans = float(bits[:, w.answer].float().mean()) if w.answer is not None and bool(w.answer.any()) else float("nan")
        return PolicyRow(w.name, policy, ab, eff, err, kl, ans, note)

    def kivi_row(ab: float, spend: float | None = None) -> PolicyRow:
        """The best uniform scheme filed under the budget ``ab``: spending ``ab`` (recent tokens as many as fit), or
        a plan's ``spend`` (the nearest count of recent tokens)."""
        nearest, spend = spend is not None, ab if spend is None else spend
        rows_u = []
        for u in sorted(QUANT_BITS):  # any stored width of the format, whatever the policy may use
            bits, recent = kivi_recent_plan(lengths, spend, (u,), w.k_group, w.v_group, nearest=nearest,
                                            meta_bits=w.meta_bits)
            eff = recent_plan_bits(lengths, bits, recent, w.k_group, w.v_group, w.meta_bits) / float(lengths.sum())
            if rows_u and eff > spend * 1.01:
                break  # int u alone exceeds the budget (the narrowest is kept even then, marked by its bits)
            err, kl = evaluate_plan(w, s, bits.expand(len(w.layers), -1), recent)
            rows_u.append(PolicyRow(w.name, "uniform + fp16 recent", ab, eff, err, kl, float("nan"),
                                    f"KIVI-style: int{u} + {recent} fp16 recent tokens"))
        return min(rows_u, key=lambda r: r.out_err)

    for ab in budgets:
        floor = float(window_bits(lengths, [min(widths)], w.k_group, w.v_group, w.meta_bits).sum() / lengths.sum())
        if ab < floor:  # no plan: the baseline at the budget, once, above every policy's "infeasible" row
            rows.append(kivi_row(ab))
        for policy in policies:
            if ab < floor:
                rows.append(PolicyRow(w.name, policy, ab, float("nan"), float("nan"), float("nan"), float("nan"),
                                      f"infeasible: widths {widths} need >= {floor:.2f} effective bits"))
                continue
            plans = []
            for li, lc in enumerate(w.layers):
                if policy == "sensitivity":
                    errs = window_output_errors(lc.q_text, lc.k, lc.v, w.windows, widths, lc.sm_scale, w.k_group,
                                                w.v_group, s.fit, w.meta_bits)
                    plans.append(allocate_min_error(errs, lengths, ab, widths, w.k_group, w.v_group, w.meta_bits))
                else:
                    errs = window_errors(lc.k[None], lc.v[None], w.windows, widths, w.k_group, w.v_group)[0]
                    plans.append(allocate_bits(s.scores["attention"][li].float(), errs.float(), lengths, ab, widths,
                                               w.k_group, w.v_group, w.meta_bits))
            bits = torch.stack(plans)
            mine = row(policy, ab, bits, f"widths {widths}")
            rows += [kivi_row(ab, mine.eff_bits), mine]  # the baseline at the bytes this plan spends
            rnd = [row(policy + " shuffled", ab, shuffled_plan(bits, seed)) for seed in range(seeds)]
            rnd.sort(key=lambda r: r.out_err)
            rows.append(dataclasses.replace(rnd[len(rnd) // 2], note=f"same histogram at random, median of {seeds}"))
    return rows


def format_equal_bytes(rows: Sequence[PolicyRow]) -> str:
    """Rows of :func:`equal_bytes_rows` with their effective bits; a ratio to the uniform row above (the baseline
    at the bytes of the policy that follows it) only where the two use bytes within 1% of each other (else "n/a:
    bytes differ")."""
    lines = []
    for n in dict.fromkeys(r.workload for r in rows):
        lines.append(f"{n}:")
        lines.append(f"  {'budget':>6} {'policy':<34} {'eff bits':>8} {'out err':>8} {'KL':>9} {'vs unif+recent':>15}")
        for ab in dict.fromkeys(r.avg_bits for r in rows if r.workload == n):
            sel = [r for r in rows if r.workload == n and r.avg_bits == ab]
            u = sel[0]
            for r in sel:
                if r.policy == "uniform + fp16 recent":
                    u = r  # the baseline of the rows below it, at the bytes of the first of them
                same = abs(r.eff_bits - u.eff_bits) <= 0.01 * u.eff_bits
                ratio = f"{r.out_err / u.out_err:.2f}x" if same and u.out_err > 0 else "n/a: bytes differ"
                lines.append(f"  {ab:>6g} {r.policy:<34} {r.eff_bits:>8.2f} {r.out_err:>8.4f} {r.kl:>9.2e} "
                             f"{ratio:>15}  {r.note}")
    return "\n".join(lines)
