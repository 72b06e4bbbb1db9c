"""Knob sweep for plain-TIR kernels (the CPU fused decode and multi-token kernels): MetaSchedule cannot tune a
kernel without blocks, so ``wq-tune`` measures a small grid of its structure knobs instead and records the winner.

Every candidate is built and checked against the torch reference (:mod:`wq_compile.compiler.check`) before it is timed; one
that fails is reported and never recorded. Timing is interleaved (round r measures every candidate once, in a
rotated order) so the noise of a shared machine falls on all candidates alike; the recorded time of a candidate
is the median of its rounds. Each sample is appended to ``knob_samples.json`` as it is measured, so an interrupted
sweep resumes where it stopped (finished rounds are not measured again); the winner and every candidate's median go
into ``meta.json`` (kind ``knobs``) through :mod:`wq_compile.compiler.tuning_log`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..compiler import cache_files, cpu_threads, tuning_log
from ..kernels import knobs as knob_lib
from ..compiler.check import ReferenceMismatch, check_against_reference
from ..compiler.build import KernelDef, build_module, default_schedule, kernel_def
from ..compiler.device import Device, isa_class, resolve_device
from ..kernels import example_sizes
from ..kernels.attention_cpu import CpuKnobs
from ..kernels.multi_token_cpu import MultiKnobs
from ..compiler.measure import example_args, time_function
from ..core.spec import KernelSpec
from .settings import NoValidTrialsError
from .versus_default import Bought, judge
from ..compiler.tuning_log import Provenance, TuningLogError

#: Tokens per quantized piece the knobs are timed at (a 32-frame video is ~6300 tokens; long videos are longer).
KNOB_TOKENS = 8192
#: Interleaved rounds per candidate (the recorded time is their median).
KNOB_ROUNDS = 7
#: The factory's knobs (:class:`CpuKnobs` defaults), a candidate of every sweep.
DEFAULT_KNOBS: Mapping[str, int] = {"splits": CpuKnobs().splits, "pvc": CpuKnobs().pv_channels,
                                    "qkh": CpuKnobs().qk_heads}
#: P @ V channel tiles (bytes of V per pass; the factory halves one that does not divide a piece's value bytes).
PVC_CANDIDATES: tuple[int, ...] = (8, 16, 32)
#: Query rows per work item of the multi-token kernel (its sweep keeps qkh at 8: a pass covers 8 rows).
ROWS_CANDIDATES: tuple[int, ...] = (4, 8, 16)


def default_knobs(spec: KernelSpec) -> dict[str, int]:
    """The factory's knobs of ``spec``'s kind (a candidate of every sweep)."""
    if spec.kind == "multi":
        return {**DEFAULT_KNOBS, "rows": MultiKnobs().rows}
    return dict(DEFAULT_KNOBS)


class NoValidKnobsError(NoValidTrialsError):
    """Every knob candidate failed its reference check (nothing was recorded)."""


@dataclass(frozen=True)
class KnobSweepSettings:
    """How to sweep: where the record goes, the sizes it is timed at, and how long each sample runs."""

    logs_dir: Path = Path("tuning_logs")
    n_tokens: int = KNOB_TOKENS
    rounds: int = KNOB_ROUNDS
    min_sample_s: float = 0.05  # each sample repeats the call until it lasts this long (timer resolution)
    grid: Sequence[Mapping[str, int]] | None = None  # None: knob_grid(spec, cores)
    #: time the factory's knobs as a candidate too (added to the grid when missing): the record is kept only if it
    #: beats them (wq_compile.tuning.versus_default); False only to test the sweep's machinery on a fixed grid
    include_default: bool = True

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens: expected a positive token count, got {self.n_tokens}")
        if self.rounds < 1:
            raise ValueError(f"rounds: expected at least 1 round, got {self.rounds}")


@dataclass(frozen=True)
class KnobCandidate:
    knobs: Mapping[str, int]
    samples: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)


@dataclass(frozen=True)
class KnobSweepResult:
    """One sweep: every measured candidate, the winner, the candidates that failed the reference check."""

    spec: KernelSpec  # the spec without knobs (the record's URI)
    log_dir: Path
    candidates: tuple[KnobCandidate, ...]
    best: KnobCandidate
    new_samples: int
    failed: Mapping[str, str] = field(default_factory=dict)  # knob key -> reference-check error
    bought: Bought | None = None  # the factory's knobs vs the best and worst candidate (None: not measured)

    @property
    def best_spec(self) -> KernelSpec:
        return knob_lib.with_knobs(self.spec, self.best.knobs)


def knob_key(knobs: Mapping[str, int]) -> str:
    return ",".join(f"{k}={knobs[k]}" for k in sorted(knobs))


def knob_grid(spec: KernelSpec, num_cores: int, isa: str | None = None) -> list[dict[str, int]]:
    """Candidates: splits 1, 2, 4, ... up to 2 x cores (and :data:`knobs.MAX_SPLITS`), P @ V tiles
    :data:`PVC_CANDIDATES` up to a piece's value bytes, query heads per QK pass 8 (the whole group of a
    qwen2 GQA group) plus 4 when the group is larger than 4 (fewer live accumulators; on AVX2, ``x86_64-avx2``,
    the factory already caps a pass at what 16 registers hold, so 1 instead), and on AVX-512 targets
    (``isa`` ``x86_64-avx512``) with a 4-bit bucket the table unpack ``lut`` 0 and 1. The multi-token kernel
    sweeps ``rows`` (:data:`ROWS_CANDIDATES`) x splits x P @ V tiles instead (its QK passes cover 8 rows)."""
    if num_cores < 1:
        raise ValueError(f"num_cores: expected a positive core count, got {num_cores}")
    splits, s = [], 1
    while s <= min(2 * num_cores, knob_lib.MAX_SPLITS):
        splits.append(s)
        s *= 2
    vbytes = max(spec.head_dim * b // 8 for b in spec.bits if b != 16)
    pvcs = [p for p in PVC_CANDIDATES if p <= vbytes] or [min(PVC_CANDIDATES)]
    if spec.kind == "multi":
        return [{"splits": sp, "pvc": p, "qkh": 8, "rows": r} for sp in splits for p in pvcs for r in ROWS_CANDIDATES]
    qkhs = [8] + ([1] if isa == "x86_64-avx2" else [4] if spec.group_size > 4 else [])
    luts = [0, 1] if isa == "x86_64-avx512" and 4 in spec.bits else [0]
    return [{"splits": sp, "pvc": p, "qkh": q, "lut": lt} if lt else {"splits": sp, "pvc": p, "qkh": q}
            for sp in splits for p in pvcs for q in qkhs for lt in luts]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _prepare_log(folder: Path, device: Device, base: KernelSpec, sizes: Mapping[str, int],
                 scalars: Mapping[str, float], settings: KnobSweepSettings) -> dict[str, Any]:
    """meta.json of the record (an existing one is version-checked and must be of the same sizes: a sweep resumes
    only the measurement it started)."""
    fix = f"sweep into another logs folder or delete {folder}"
    meta: dict[str, Any] = {}
    if (folder / tuning_log.META_FILE).exists():
        if tuning_log.repair_knob_log(folder):
            import warnings

            warnings.warn(f"{folder / tuning_log.KNOB_FILE}: removed a torn last line (interrupted write)",
                          tuning_log.TornLogWarning, stacklevel=3)
        meta = tuning_log.read_meta(folder, device)
        if meta.get("kind") != tuning_log.KNOB_KIND:
            raise TuningLogError(f"{folder}: not a knob record (kind {meta.get('kind')!r}); {fix}")
        if {str(k): int(v) for k, v in (meta.get("tuning_sizes") or {}).items()} != dict(sizes):
            raise TuningLogError(f"{folder}: measured at sizes {meta.get('tuning_sizes')}, this sweep times "
                                 f"{dict(sizes)}; {fix}")
    elif (folder / tuning_log.KNOB_FILE).exists():
        raise TuningLogError(f"{folder}: knob samples without meta.json cannot be version-checked; {fix}")
    spec_fields = {k: (list(x) if isinstance(x, tuple) else x) for k, x in vars(base).items()}
    meta.update(tuning_log.new_meta(device, base.uri, spec_fields, sizes, scalars, seed=0))
    meta.update({"kind": tuning_log.KNOB_KIND, "rounds": settings.rounds, "timestamp": _now(),
                 "measure": f"median of {settings.rounds} interleaved rounds, each >= {settings.min_sample_s} s "
                            "of back-to-back calls; " + " ".join(
                                f"{k}={os.environ.get(k)}" for k in ("TVM_NUM_THREADS", "TVM_BIND_THREADS",
                                                                     "TVM_THREAD_POOL_SPIN_COUNT"))})
    tuning_log.write_meta(folder, meta)  # before any sample: a crash leaves a checkable log
    return meta


def sweep_knobs(spec: KernelSpec, device: Device | str = "llvm", settings: KnobSweepSettings = KnobSweepSettings(),
                *, on_progress: Callable[[str], None] | None = None) -> KnobSweepResult:
    """Check, time and record every knob candidate of ``spec`` (a plain-TIR kernel); returns the sweep.

    Raises :class:`NoValidKnobsError` when no candidate passes the reference check."""
    # TVM's pool as the runtime runs it (every physical core, yielding between launches); takes effect when the
    # pool starts (the first parallel call of this process).
    from ..compiler.cpu_threads import share_cores_with_torch

    share_cores_with_torch()
    device = resolve_device(device)
    if not knob_lib.has_knobs(spec, device.kind):
        raise ValueError(f"spec: {spec.uri} on {device.kind} has no structure knobs (only the llvm fused and "
                         "multi-token kernels have); tune it with MetaSchedule (wq-tune)")
    # a precision or storage mode (int8 dots, 8-bit scale/zero) shares the knob record of the kernel without it:
    # that kernel is the one swept, and its record serves both
    base = knob_lib.base_spec(spec)
    base = replace(base, extra=tuple((k, v) for k, v in base.extra if k not in knob_lib.MODE_KEYS))
    cores = device.num_cores or os.cpu_count() or 1
    isa = isa_class(device.target)
    grid = [dict(g) for g in (settings.grid if settings.grid is not None else knob_grid(base, cores, isa))]
    if settings.include_default and knob_key(default_knobs(base)) not in {knob_key(g) for g in grid}:
        grid.append(default_knobs(base))
    if not grid:
        raise ValueError("grid: no knob candidates to measure")
    folder = tuning_log.log_dir(settings.logs_dir, device.tag, base.uri)
    probe = kernel_def(base, device, settings.n_tokens)
    sizes = example_sizes(base, settings.n_tokens)
    meta = _prepare_log(folder, device, base, sizes, probe.scalars, settings)
    done: dict[str, list[float]] = {}
    for s in tuning_log.read_knob_samples(folder):
        done.setdefault(knob_key(s["knobs"]), []).append(float(s["secs"]))

    args = example_args(probe.signature, sizes, scalars=probe.scalars)
    probe.signature.bind(*args, device_type="cpu")
    funcs: dict[str, Callable[[], Any]] = {}
    failed: dict[str, str] = {}
    # candidates run as the runtime runs them: loaded from a file, parallel loops on torch's OpenMP threads
    scratch = tempfile.TemporaryDirectory(prefix="wq-knobs-")
    for knobs in grid:
        key = knob_key(knobs)
        if len(done.get(key, [])) >= settings.rounds:
            continue  # finished before an interruption: not built or measured again
        kdef: KernelDef = kernel_def(knob_lib.with_knobs(base, knobs), device, settings.n_tokens)
        module, threads = cpu_threads.load_attached(build_module(default_schedule(kdef), device), scratch.name,
                                              cache_files.cache_root())
        try:
            check_against_reference(kdef, module, device)
        except ReferenceMismatch as exc:
            failed[key] = str(exc)
            if on_progress:
                on_progress(f"{key}: fails the reference check, not measured ({exc})")
            continue
        f = module.get_function(kdef.spec.uri)
        funcs[key] = lambda f=f: f(*args)
    by_key = {knob_key(k): k for k in grid}
    new = 0
    for r in range(settings.rounds):
        order = list(funcs)
        order = order[r % len(order):] + order[:r % len(order)] if order else order
        for key in order:
            if len(done.get(key, [])) > r:
                continue
            secs = time_candidate(key, funcs[key], settings)
            tuning_log.append_knob_sample(folder, by_key[key], r, secs)
            done.setdefault(key, []).append(secs)
            new += 1
        if on_progress:
            on_progress(f"round {r + 1}/{settings.rounds} done")
    measured = [KnobCandidate(by_key[k], tuple(done[k])) for k in by_key if k in done and k not in failed]
    if not measured:
        raise NoValidKnobsError(f"{base.uri}: every knob candidate failed the reference check ({failed}); "
                                "nothing recorded; fix the kernel factory (wq_compile/kernels/attention_cpu.py, "
                                "multi_token_cpu.py)")
    best = min(measured, key=lambda c: c.median_s)
    meta.update({
        "best": {"knobs": dict(best.knobs), "median_ms": best.median_s * 1e3, "uri": knob_lib.with_knobs(
            base, best.knobs).uri},
        "candidates": [{"knobs": dict(c.knobs), "median_ms": c.median_s * 1e3, "min_ms": min(c.samples) * 1e3,
                        "rounds": len(c.samples)}
                       for c in sorted(measured, key=lambda c: c.median_s)],
        "failed_reference_check": sorted(failed), "num_candidates": len(measured), "timestamp": _now(),
        "tuned_ms": best.median_s * 1e3,
    })
    default = knob_key(default_knobs(base))
    bought = None
    meta.pop("default_wins", None)  # a resumed sweep's earlier verdict is replaced (or dropped: no default timed)
    meta.pop("bought", None)
    if default in done and default not in failed:
        meta["untuned_ms"] = statistics.median(done[default]) * 1e3  # the factory's defaults
        others = [c.samples for c in measured if knob_key(c.knobs) != default]
        bought = judge(done[default], others or [done[default]])  # alone: the default, nothing bought
        meta.update({"bought": bought.to_json(), "default_wins": not bought.kept})
    meta["threads"] = threads if funcs else None  # what ran the candidates' parallel loops
    tuning_log.write_meta(folder, meta)
    scratch.cleanup()
    return KnobSweepResult(base, folder, tuple(measured), best, new, failed, bought)


def time_candidate(key: str, fn: Callable[[], Any], settings: KnobSweepSettings) -> float:
    """One sample of candidate ``key`` (seconds per call; a seam the tests replace with planted times)."""
    return time_function(fn, repeat=1, min_sample_s=settings.min_sample_s)


def provenance_here(result: KnobSweepResult, device: Device) -> Provenance:
    return Provenance("here", device.tag, result.best.median_s)
