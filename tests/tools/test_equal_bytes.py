"""Equal-bytes tables: ratios only within 1% of the same bytes; eviction measured by removing the tokens."""

from __future__ import annotations

import math

import torch

from wq_compile.tools.analysis.measurements import PolicyRow, measure
from wq_compile.tools.analysis.workloads import synthetic_workload
from wq_compile.tools.analysis.equal_bytes import equal_bytes_rows, evaluate_plan_evicting, format_equal_bytes
from wq_compile.core.policy import attend


def _row(policy: str, eff: float, err: float) -> PolicyRow:
    return PolicyRow("w", policy, 3.0, eff, err, float("nan"), float("nan"), "")


def test_ratio_only_within_one_percent_of_the_same_bytes() -> None:
    text = format_equal_bytes([_row("uniform + fp16 recent", 2.96, 0.5), _row("a", 2.98, 0.25),
                               _row("b", 2.90, 0.1)])
    lines = {ln.split()[1]: ln for ln in text.splitlines()[2:]}
    assert "0.50x" in lines["a"]  # 0.7% more bytes: compared
    assert "n/a: bytes differ" in lines["b"] and "x " not in lines["b"].split("0.1000")[1]  # 2% fewer: not compared


def test_eviction_rows_on_a_synthetic_needle() -> None:
    torch.manual_seed(0)
    w = synthetic_workload("needle", layers=1, frames=8)
    s = measure(w, with_kl=False)
    bits = torch.full((1, 8), 2)
    bits[0, 0] = 0
    err, kl = evaluate_plan_evicting(w, s, bits)
    lc = w.layers[0]
    keep = torch.ones(lc.k.shape[-2], dtype=torch.bool)
    keep[int(w.windows.starts[0]) : int(w.windows.starts[0] + w.windows.lengths[0])] = False
    kq, vq = s.fq[0].apply(torch.where(bits[0] == 0, torch.full_like(bits[0], 16), bits[0]))
    o, oq = attend(lc.q_dec, lc.k, lc.v, lc.sm_scale), attend(lc.q_dec, kq[:, keep], vq[:, keep], lc.sm_scale)
    assert math.isclose(err, float((oq - o).norm() / o.norm()), rel_tol=1e-6) and math.isnan(kl)
    rows = equal_bytes_rows(w, s, (3.0,), policies=("similarity:attention",), seeds=3)
    by = {r.policy: r for r in rows}
    assert set(by) == {"uniform + fp16 recent", "similarity:attention", "similarity:attention shuffled"}
    assert abs(by["similarity:attention"].eff_bits - by["similarity:attention shuffled"].eff_bits) < 1e-9
    assert by["similarity:attention"].eff_bits <= 3.0 + 1e-6
    # the needle frames are kept and the rest thinned: the placement beats the same histogram at random
    assert by["similarity:attention"].out_err < by["similarity:attention shuffled"].out_err
