"""What tuning bought, measured against the default schedule in the same run, and the rule that follows from it:
a record is kept only when its best candidate beat the default (:mod:`wq_compile.compiler.record_rule` applies the
same rule at run time).

MetaSchedule kernels: the default schedule and the best few records (by MetaSchedule's own run times) are rebuilt
on the symbolic kernel and timed at the tuning sizes in interleaved rounds (round r times every candidate once, in
a rotated order, so a shared machine's noise falls on all alike); each round's number is a median of several
samples. Knob sweeps time the factory's knobs as one of their candidates the same way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..compiler import tuning_log
from ..compiler.build import KernelDef, apply_trace, build_module, default_schedule
from ..compiler.device import Device
from ..compiler.measure import measure_local, measure_rpc

#: Records besides the best one that are timed against the default (the worst of them is reported).
TOP_RECORDS = 3
#: Interleaved rounds per candidate (local measurements; an RPC device is timed once per candidate).
ROUNDS = 5


@dataclass(frozen=True)
class Bought:
    """Medians (seconds) of the default and of the best and worst measured candidate, the largest relative spread
    ((max - min) / median) of any one candidate's rounds, and whether the best beat the default (record kept)."""

    default_s: float
    best_s: float
    worst_s: float
    spread: float
    candidates: int
    rounds: int

    @property
    def kept(self) -> bool:
        return self.best_s < self.default_s

    def line(self, uri: str) -> str:
        verdict = (f"kept: {self.default_s / self.best_s:.2f}x over the default" if self.kept
                   else "default kept (no candidate beat it; no record kept)")
        return (f"{uri}: default {self.default_s * 1e3:.4f} ms, best {self.best_s * 1e3:.4f} ms, worst "
                f"{self.worst_s * 1e3:.4f} ms of {self.candidates} candidate(s), {self.rounds} round(s), spread of "
                f"repeats <= {self.spread * 100:.0f}%; {verdict}")

    def to_json(self) -> dict[str, Any]:
        return {"default_ms": self.default_s * 1e3, "best_ms": self.best_s * 1e3, "worst_ms": self.worst_s * 1e3,
                "spread": self.spread, "candidates": self.candidates, "rounds": self.rounds, "kept": self.kept}


def judge(default: Sequence[float], candidates: Sequence[Sequence[float]]) -> Bought:
    """:class:`Bought` from the samples of the default and of each candidate (same measurement)."""
    if not default or not candidates or not all(candidates):
        raise ValueError("judge: expected samples of the default and of at least one candidate")
    meds = [statistics.median(c) for c in candidates]

    def spread(xs: Sequence[float]) -> float:
        return (max(xs) - min(xs)) / statistics.median(xs)

    return Bought(statistics.median(default), min(meds), max(meds), max(spread(x) for x in [default, *candidates]),
                  len(candidates), len(default))


def interleaved(funcs: Sequence[Callable[[], float]], rounds: int) -> list[list[float]]:
    """``rounds`` samples of each timing function, round r in an order rotated by r."""
    out: list[list[float]] = [[] for _ in funcs]
    n = len(funcs)
    for r in range(rounds):
        for i in [(r + k) % n for k in range(n)]:
            out[i].append(funcs[i]())
    return out


def measure_records(kdef: KernelDef, device: Device, sizes: Mapping[str, int], records: Sequence[Any],
                    folder: Path, settings: Any) -> Bought:
    """The default schedule vs the best :data:`TOP_RECORDS` + 1 records of ``kdef`` (same run, interleaved)."""
    modules = [build_module(default_schedule(kdef), device)]
    modules += [build_module(apply_trace(kdef.func, r.trace, str(folder)), device) for r in records[:TOP_RECORDS + 1]]
    if settings.rpc is not None:
        wd = settings.work_dir_for(device, kdef.spec)
        timers = [lambda m=m: measure_rpc(m, kdef.spec, kdef.signature, sizes, device, settings.rpc, wd)
                  for m in modules]
        samples = interleaved(timers, 1)
    else:
        timers = [lambda m=m: measure_local(m, kdef.spec, kdef.signature, sizes, device) for m in modules]
        samples = interleaved(timers, ROUNDS)
    return judge(samples[0], samples[1:])


def drop_records(folder: Path) -> None:
    """Keep no record: empty the log's record file (its workload file and meta stay, so the run is documented
    and a later run tunes again)."""
    path = folder / tuning_log.RECORD_FILE
    if path.exists():
        path.write_text("")
