"""Running the analysis over workloads and reporting it: tables, CSV and PNG scatter plots."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ...core.quant_fit import DEFAULT_FIT
from .measurements import SCORERS, SENS_BITS, CorrRow, PolicyRow, Sensitivity, compare_policies, correlations, measure
from .model_workloads import build_workload
from .workloads import Workload


@dataclass
class AnalysisResult:
    workloads: list[Workload]
    sensitivities: list[Sensitivity]
    correlations: list[CorrRow]
    policies: list[PolicyRow]
    equal_bytes: list[PolicyRow] = field(default_factory=list)  # equal_bytes_rows: policies next to their controls

def run_analysis(names: Sequence[str], budgets: Sequence[float] = (2.5, 3.0, 3.5, 4.0), model: str | None = None,
                 frames: int = 8, out_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None, fit: str = DEFAULT_FIT,
                 width_sets: Sequence[Sequence[int]] = ((16, 8, 4, 2, 0),), meta_bits: int = 16) -> AnalysisResult:
    """Measure every workload, correlate, compare policies (every window quantized with the scale/zero ``fit``, in
    the storage format of ``meta_bits``: costs and errors), and the equal-bytes table once per set of
    ``width_sets``; write CSVs and PNGs into ``out_dir`` if given."""
    from .equal_bytes import equal_bytes_rows

    torch.set_grad_enabled(False)
    res = AnalysisResult([], [], [], [])
    for name in names:
        if progress:
            progress(name)
        w = build_workload(name, model, frames)
        w.meta_bits = meta_bits
        s = measure(w, fit=fit)
        res.workloads.append(w)
        res.sensitivities.append(s)
        res.correlations += correlations(w, s)
        res.policies += compare_policies(w, s, budgets)
        for widths in width_sets:
            res.equal_bytes += equal_bytes_rows(w, s, budgets, widths)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "correlations.csv", [r.__dict__ for r in res.correlations])
        _write_csv(out / "policies.csv", [r.__dict__ for r in res.policies])
        _write_csv(out / "equal_bytes.csv", [r.__dict__ for r in res.equal_bytes])
        _write_csv(out / "windows.csv", _window_rows(res))
        for scorer in SCORERS:
            scatter(res, scorer, out / f"scatter_{scorer}.png")
    return res

def _window_rows(res: AnalysisResult) -> list[dict[str, Any]]:
    rows = []
    for w, s in zip(res.workloads, res.sensitivities):
        for li in range(len(w.layers)):
            for wi in range(len(w.windows)):
                row: dict[str, Any] = {"workload": w.name, "layer": li, "window": wi,
                                       "answer": bool(w.answer[wi]) if w.answer is not None else ""}
                row.update({f"score_{k}": float(v[li, wi]) for k, v in s.scores.items()})
                row.update({f"out_err_{b}": float(s.out_err[li, wi, j]) for j, b in enumerate(SENS_BITS)})
                row["kl_2"] = float(s.kl[li, wi, 0])
                rows.append(row)
    return rows

def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)

def scatter(res: AnalysisResult, scorer: str, path: Path) -> None:
    """One panel per workload: the scorer's value (x) against the 2-bit attention-output sensitivity (y, log),
    colour = layer, ground-truth answer windows ringed; the title gives the mean Spearman over layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res.workloads)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, w, s in zip(axes[0], res.workloads, res.sensitivities):
        sc = s.scores[scorer]
        nl = sc.shape[0]
        cmap = plt.get_cmap("viridis")
        for li in range(nl):
            y = s.out_err[li, :, 0].clamp_min(1e-12)
            ax.scatter(sc[li].numpy(), y.numpy(), s=12, color=cmap(li / max(nl - 1, 1)),
                       label=f"layer {li}" if nl <= 8 else None)
            if w.answer is not None:
                ax.scatter(sc[li][w.answer].numpy(), y[w.answer].numpy(), s=60, facecolors="none",
                           edgecolors="red", linewidths=0.8)
        rho = [r.rho_out2 for r in res.correlations if r.workload == w.name and r.scorer == scorer and r.layer == -1]
        ax.set_yscale("log")
        ax.set_title(f"{w.name}: rho={rho[0]:.2f}\n{w.label}", fontsize=8)
        ax.set_xlabel(f"{scorer} score", fontsize=8)
        ax.set_ylabel("rel. attn-output change, window at 2 bits", fontsize=7)
        ax.tick_params(labelsize=7)
        if nl <= 8:
            ax.legend(fontsize=6)
    fig.suptitle(f"scorer '{scorer}' vs measured sensitivity (red rings: answer windows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def _f(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)

def format_correlations(rows: Sequence[CorrRow]) -> str:
    """Mean Spearman over layers per workload and scorer (per-layer values are in correlations.csv)."""
    names = list(dict.fromkeys(r.workload for r in rows))
    labels = {r.workload: r.label for r in rows}
    lines = ["Spearman rho (mean over layers) of each scorer vs measured sensitivity of the window at 2 bits:",
             "out = relative change of the layer's attention output; kl = KL of the final output distribution",
             f"{'workload':<11} {'what it is':<38} " + " ".join(f"{s + ' out/kl':>22}" for s in SCORERS)]
    for n in names:
        cells = []
        for sc in SCORERS:
            r = [x for x in rows if x.workload == n and x.scorer == sc and x.layer == -1][0]
            cells.append(f"{_f(r.rho_out2, '+.2f'):>10} / {_f(r.rho_kl2, '+.2f'):>9}")
        lines.append(f"{n:<11} {labels[n][:38]:<38} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)

def format_policies(rows: Sequence[PolicyRow], workloads: Sequence[Workload] | None = None) -> str:
    """Per workload and budget: each policy's effective bits, attention-output error, KL and error vs uniform (only
    where the two use bytes within 1% of each other: other ratios would compare different memory)."""
    metric = {w.name: w.final_metric for w in workloads or []}
    lines = []
    for n in dict.fromkeys(r.workload for r in rows):
        lines.append(f"{n} (final metric: {metric.get(n, 'KL')})")
        lines.append(f"  {'budget':>6} {'policy':<22} {'eff bits':>8} {'out err':>8} {'vs unif':>7} {'KL':>9} "
                     f"{'vs unif':>7} {'answer bits':>11}")
        for ab in dict.fromkeys(r.avg_bits for r in rows if r.workload == n):
            sel = [r for r in rows if r.workload == n and r.avg_bits == ab]
            uni = [r for r in sel if r.policy == "uniform"]
            if sel and sel[0].note.startswith("infeasible"):
                lines.append(f"  {ab:>6g} {sel[0].note}")
                continue
            for r in sel:  # a ratio only between rows within 1% of the same bytes (else n/a)
                same = bool(uni) and abs(r.eff_bits - uni[0].eff_bits) <= 0.01 * uni[0].eff_bits
                ue = uni[0].out_err if same else float("nan")
                uk = uni[0].kl if same else float("nan")
                lines.append(f"  {ab:>6g} {r.policy:<22} {r.eff_bits:>8.2f} {r.out_err:>8.4f} "
                             f"{_f(r.out_err / ue if ue else float('nan'), '.2f'):>7} {r.kl:>9.2e} "
                             f"{_f(r.kl / uk if uk else float('nan'), '.2f'):>7} {_f(r.answer_bits, '.1f'):>11}  "
                             f"{r.note}")
    return "\n".join(lines)
