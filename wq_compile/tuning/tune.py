"""MetaSchedule driver: one JSON database per kernel under ``<logs>/<device-tag>/<kernel-uri>/``.

Each kernel is tuned on its static workload (:meth:`wq_compile.compiler.build.KernelDef.workload`) with the target's
design space (``ScheduleFn`` over the schedule module's protocol), an XGBoost cost model, and a build function that
skips the slow ``tensor_intrin`` import in every build worker. Records are appended one per measured candidate (an
interrupted run loses nothing finished); logs are read and written through :mod:`wq_compile.compiler.tuning_log` only.

Re-running continues: records already in the log count towards the requested trials. A run with zero valid trials
raises :class:`NoValidTrialsError`; a CUDA target is never measured without a GPU here unless an RPC tracker is given.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..compiler import tuning_log
from ..compiler.build import KernelDef, kernel_def
from ..compiler.device import Device, resolve_device
from ..compiler.measure import require_measurable
from .metaschedule import build_candidate, evaluator_config, progress_callback, task_logger
from .ms_task import samples_anything, tune_context
from .settings import NoValidTrialsError, TuneSettings
from .versus_default import Bought, drop_records, measure_records
from ..core.spec import KernelSpec
from ..compiler.tuning_log import Provenance, TuningLogError


@dataclass(frozen=True)
class Measurers:
    """MetaSchedule builder and runner to reuse across kernels (starting a LocalBuilder costs seconds)."""

    builder: Any = None
    runner: Any = None


@dataclass(frozen=True)
class TuneResult:
    """Outcome for one kernel (latencies in seconds, at the kernel's tuning sizes)."""

    spec: KernelSpec
    log_dir: Path | None
    valid_trials: int
    new_trials: int
    untuned_s: float | None
    tuned_s: float | None
    bytes_read: int
    provenance: Provenance
    bought: Bought | None = None  # default vs best vs worst candidate, same measurement (None: not measured)

    @property
    def speedup(self) -> float | None:
        if self.untuned_s is None or self.tuned_s is None or self.tuned_s <= 0:
            return None
        return self.untuned_s / self.tuned_s

    @property
    def gbps(self) -> float | None:
        """Effective bandwidth: bytes of the inputs (the cache read) per second / 1e9."""
        if not self.tuned_s:
            return None
        return self.bytes_read / self.tuned_s / 1e9


# ---------------------------------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------------------------------
def _sizes_and_meta(kdef: KernelDef, device: Device, folder: Path, settings: TuneSettings) -> tuple[dict, dict]:
    """The tuning sizes (the log's own when it exists, so a resumed run tunes the same workload) and its meta."""
    fix = f"re-tune into an empty folder or delete {folder}"
    if (folder / tuning_log.META_FILE).exists():
        for path in tuning_log.repair_log(folder):
            warnings.warn(f"{path}: removed a torn last line (interrupted write)", tuning_log.TornLogWarning,
                          stacklevel=3)
        meta = tuning_log.read_meta(folder, device)
        sizes = {str(k): int(x) for k, x in meta.get("tuning_sizes", {}).items()}
        if set(sizes) != set(kdef.signature.symbols):
            raise TuningLogError(f"{folder / tuning_log.META_FILE}: tuning sizes {sizes} do not fit the kernel's "
                                 f"symbols {kdef.signature.symbols}; {fix}")
        return sizes, meta
    if (folder / tuning_log.RECORD_FILE).exists():
        raise TuningLogError(f"{folder}: records without meta.json cannot be version-checked; {fix}")
    return dict(kdef.sizes), {}


def tune_kernel(kernel: KernelSpec | KernelDef, device: Device | str = "llvm",
                settings: TuneSettings = TuneSettings(), *, measurers: Measurers = Measurers(),
                on_progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Tune until the kernel's log holds ``settings.trials_for(spec)`` valid records (existing ones count), then
    time the default and the tuned schedule. Raises :class:`NoValidTrialsError` when the log has no valid record."""
    device = resolve_device(device)
    require_measurable(device, settings.rpc)
    kdef = kernel if isinstance(kernel, KernelDef) else kernel_def(kernel, device, settings.n_tokens)
    spec = kdef.spec
    trials = settings.trials_for(spec)
    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    folder = tuning_log.log_dir(settings.logs_dir, device.tag, spec.uri)
    sizes, meta = _sizes_and_meta(kdef, device, folder, settings)
    meta.update(tuning_log.new_meta(device, spec.uri, tuning_log.spec_fields(spec), sizes, kdef.scalars,
                                    settings.seed))
    tuning_log.write_meta(folder, meta)  # before any record: a crash leaves a checkable log

    db = tuning_log.open_database(folder, device)
    workload = kdef.workload(sizes)
    before = len(tuning_log.valid_records(db, workload))
    remaining = 0
    if before < trials:  # a space that samples nothing has one schedule: one record is all there is
        remaining = trials - before if samples_anything(workload, kdef) else max(0, 1 - before)
    new_valid = 0
    if remaining > 0:
        new_valid = _run_search(kdef, device, settings, workload, db, before, remaining, measurers, on_progress)
        db = tuning_log.open_database(folder, device)
    records = tuning_log.valid_records(db, workload)
    if new_valid:  # an earlier verdict (default_wins, times) does not judge the new records
        for stale in ("default_wins", "bought", "untuned_ms", "tuned_ms"):
            meta.pop(stale, None)
    meta.update({"trials_requested": trials, "valid_trials": len(records), "timestamp": tuning_log.timestamp()})
    tuning_log.write_meta(folder, meta)
    if not records:
        raise NoValidTrialsError(
            f"{spec.uri}: tuning measured 0 valid candidates (log: {folder}). Usually every build timed out "
            f"(builder timeout {settings.builder_timeout:.0f} s; MetaSchedule's default build worker imports "
            "tvm.s_tir.tensor_intrin for 35-47 s) or every run failed; raise --builder-timeout and see the "
            f"task log under {settings.work_dir_for(device, spec)}/logs"
        )
    untuned_s = tuned_s = bought = None
    here = Provenance("here", device.tag, tuning_log.median(records[0].run_secs))
    if settings.measure:  # the default is a candidate too: a record is kept only if it beat it (same run)
        bought = measure_records(kdef, device, sizes, records, folder, settings)
        untuned_s, tuned_s = bought.default_s, bought.best_s
        meta.update({"untuned_ms": untuned_s * 1e3, "tuned_ms": tuned_s * 1e3, "bought": bought.to_json(),
                     "default_wins": not bought.kept, "timestamp": tuning_log.timestamp()})
        if not bought.kept:
            drop_records(folder)
            here = tuning_log.UNTUNED
        tuning_log.write_meta(folder, meta)
    return TuneResult(spec, folder, len(records), new_valid, untuned_s, tuned_s, kdef.signature.nbytes(sizes), here,
                      bought)


def _run_search(kdef: KernelDef, device: Device, settings: TuneSettings, workload: Any, db: Any, before: int,
                remaining: int, measurers: Measurers, on_progress: Callable[[int, int], None] | None) -> int:
    """One MetaSchedule run of ``remaining`` trials; returns the number of valid new records."""
    from tvm.s_tir import meta_schedule as ms

    spec = kdef.spec
    wd = settings.work_dir_for(device, spec)
    wd.mkdir(parents=True, exist_ok=True)
    logger, log_handler = task_logger(wd, spec.uri)
    # a resumed run explores from another random state
    ctx = tune_context(kdef, device, workload, settings, settings.seed + before, logger)
    counts = {"valid": 0}

    def _count(measured: int, valid: int) -> None:
        counts["valid"] += valid
        if on_progress is not None:
            on_progress(measured, valid)

    builder = measurers.builder or ms.builder.LocalBuilder(f_build=build_candidate,
                                                            timeout_sec=settings.builder_timeout)
    runner = measurers.runner
    if runner is None and settings.rpc is not None:
        runner = ms.runner.RPCRunner(rpc_config=settings.rpc.config(), evaluator_config=evaluator_config())
    elif runner is None:
        runner = ms.runner.LocalRunner(timeout_sec=settings.runner_timeout, evaluator_config=evaluator_config())
    try:
        ms.tune_tasks(
            tasks=[ctx], task_weights=[1.0], work_dir=str(wd), max_trials_global=remaining,
            num_trials_per_iter=min(settings.num_trials_per_iter, remaining), builder=builder, runner=runner,
            database=db, cost_model="xgb",
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [progress_callback(_count)],
            task_scheduler="round-robin",
        )
    finally:
        logger.removeHandler(log_handler)
        log_handler.close()
    return counts["valid"]


def tune_kernels(specs: Sequence[KernelSpec], device: Device | str = "llvm",
                 settings: TuneSettings = TuneSettings(), *, progress: bool = True,
                 measurers: Measurers = Measurers()) -> list[TuneResult]:
    """Tune every spec in turn (a tqdm bar over kernels and one over trials)."""
    from tqdm.auto import tqdm

    device = resolve_device(device)
    require_measurable(device, settings.rpc)
    results = []
    bar = tqdm(specs, desc="kernels", unit="kernel", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.uri)
        with tqdm(total=settings.trials_for(spec), desc="  trials", unit="trial", leave=False,
                  disable=not progress) as tbar:
            def on_progress(measured: int, valid: int, _b: Any = tbar) -> None:
                _b.update(measured)
                _b.set_postfix(valid=valid)

            if _has_knobs(spec, device.kind):
                results.append(tune_knobs(spec, device, settings))
            else:
                results.append(tune_kernel(spec, device, settings, measurers=measurers, on_progress=on_progress))
    return results


def _has_knobs(spec: KernelSpec, target_kind: str) -> bool:
    from ..kernels.knobs import has_knobs

    return has_knobs(spec, target_kind)


def tune_knobs(spec: KernelSpec, device: Device | str = "llvm", settings: TuneSettings = TuneSettings()
               ) -> TuneResult:
    """A plain-TIR kernel (no blocks for MetaSchedule): sweep its structure knobs (:mod:`wq_compile.tuning.knob_tune`)
    and record the winner; the result names the winning spec (knobs in its URI)."""
    from .knob_tune import KnobSweepSettings, sweep_knobs

    device = resolve_device(device)
    res = sweep_knobs(spec, device, KnobSweepSettings(logs_dir=settings.logs_dir, n_tokens=settings.knob_tokens,
                                                      rounds=settings.knob_rounds))
    meta = tuning_log.read_meta(res.log_dir, device)
    untuned = meta.get("untuned_ms")
    sizes = {str(k): int(v) for k, v in meta["tuning_sizes"].items()}
    kept = res.bought is None or res.bought.kept  # the factory's knobs won: no record is used (record_rule)
    return TuneResult(res.best_spec, res.log_dir, len(res.candidates), res.new_samples,
                      None if untuned is None else untuned / 1e3, res.best.median_s,
                      kernel_def(res.best_spec, device).signature.nbytes(sizes),
                      Provenance("here", device.tag, res.best.median_s) if kept else tuning_log.UNTUNED, res.bought)


def build_only(specs: Sequence[KernelSpec], device: Device | str = "llvm", *,
               logs_dir: str | os.PathLike = "tuning_logs",
               cache_dir: str | os.PathLike | None = None) -> list[TuneResult]:
    """Load or compile every spec into the module cache (a log of this or a compatible device, else the default
    schedule); no measurement. Each result says where its schedule came from."""
    from ..compiler.knob_lookup import resolve as knob_resolve
    from ..compiler.module_cache import ensure_module

    device = resolve_device(device)
    results = []
    for spec in specs:
        folder = tuning_log.log_dir(logs_dir, device.tag, spec.uri)
        for path in tuning_log.repair_log(folder) if folder.is_dir() else []:
            warnings.warn(f"{path}: removed a torn last line (interrupted write)", tuning_log.TornLogWarning,
                          stacklevel=2)
        spec = knob_resolve(spec, device, logs_dir)  # plain-TIR kernels: the knobs of their record
        _, provenance, _ = ensure_module(spec, device, logs_dir, cache_dir)
        valid = 0
        if (folder / tuning_log.META_FILE).exists():
            meta = tuning_log.read_meta(folder, device)
            valid = int(meta.get("valid_trials", meta.get("num_candidates", 0)))
        results.append(TuneResult(spec, folder, valid, 0, None, None, 0, provenance))
    return results
