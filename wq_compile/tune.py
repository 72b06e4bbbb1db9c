"""MetaSchedule driver: one JSON database per kernel under ``<logs>/<device-tag>/<kernel-uri>/``.

Each kernel is tuned on a static copy (symbols fixed at its tuning sizes, scalar parameters folded, see
:func:`wq_compile.build.tuning_workload`) with the target's hand design space (``ScheduleFn``), an XGBoost cost
model, and a build function that skips the slow ``tensor_intrin`` import in every build worker. The log folder holds
``database_workload.json``, ``database_tuning_record.json`` (appended one record per measured candidate, so an
interrupted run loses nothing finished) and ``meta.json`` (versions, device, trials, seed, latencies).

Re-running continues: records already in the log count towards the requested trials. A run with zero valid trials
raises :class:`NoValidTrialsError`; a CUDA target is never measured without a GPU here unless an RPC tracker is given.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .build import (
    META_FILE,
    RECORD_FILE,
    BuiltKernel,
    KernelProvider,
    TuningLogError,
    apply_trace,
    build_kernel,
    cache_root,
    compile_schedule,
    default_provider,
    default_schedule,
    kernel_sizes,
    log_dir_for,
    make_func,
    open_database,
    read_meta,
    tuning_workload,
    valid_records,
)
from .device import Device, has_local_gpu, resolve_device, versions
from .signature import KernelSignature
from .spec import KernelSpec

#: Token capacity per piece that kernels are tuned and timed at (a 32-frame video is ~6300 tokens over 3 buckets).
DEFAULT_N_TOKENS = 2048
DEFAULT_BUILDER_TIMEOUT = 180.0
DEFAULT_RUNNER_TIMEOUT = 60.0
DEFAULT_TRIALS: dict[str, int] = {"fused": 40, "decode": 24, "merge": 8, "quantize": 8}


class NoValidTrialsError(RuntimeError):
    """Tuning measured no candidate successfully (builds timed out, runs failed)."""


class MeasurementUnavailableError(RuntimeError):
    """Latency cannot be measured for this target here (e.g. CUDA without a GPU and without RPC)."""


def default_work_dir(device: Device, spec: KernelSpec) -> Path:
    """MetaSchedule's scratch folder (task logs, RPC uploads): under the cache root, never in the logs folder
    that goes into git."""
    return cache_root().parent / "tune-work" / device.tag / spec.uri


def default_trials(spec: KernelSpec) -> int:
    """Trials per kernel sized so the default llvm run of a model fits ~10 minutes on 2 cores."""
    return DEFAULT_TRIALS[spec.kind]


@dataclass(frozen=True)
class RPCSettings:
    """A TVM RPC tracker and the device key that serves the target's device (``--rpc HOST:PORT --rpc-key KEY``)."""

    host: str
    port: int
    key: str
    session_timeout_sec: int = 60

    @classmethod
    def parse(cls, address: str, key: str) -> "RPCSettings":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"rpc: expected HOST:PORT, got {address!r}")
        if not key:
            raise ValueError("rpc-key: a device key is required with --rpc")
        return cls(host, int(port), key)

    def config(self) -> Any:
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.RPCConfig(
            tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
            session_timeout_sec=self.session_timeout_sec,
        )


@dataclass(frozen=True)
class TuneResult:
    """Outcome for one kernel (latencies in seconds, at the kernel's tuning sizes)."""

    spec: KernelSpec
    log_dir: Path
    valid_trials: int
    new_trials: int
    untuned_s: float | None
    tuned_s: float | None
    bytes_read: int
    tuned: bool

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
# Build worker function (imported by MetaSchedule's popen build workers: keep it light and module-level)
# ---------------------------------------------------------------------------------------------------------------------
def build_candidate(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule build function without the ``tvm.s_tir.tensor_intrin`` import of the default one (35-47 s
    per worker here, which makes every build time out). Valid for design spaces without tensor intrinsics."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.driver.build(mod, target=target)


def _progress_callback(on_result: Callable[[int, int], None]) -> Any:
    """A MeasureCallback that reports (measured, valid) after each batch of candidates."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            valid = 0
            for b, r in zip(builder_results, runner_results):
                secs = list(r.run_secs or []) if r.error_msg is None else []
                if b.error_msg is None and secs and max(float(s) for s in secs) < 1e9:
                    valid += 1
            on_result(len(runner_results), valid)

    return _Progress()


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------
def time_function(fn: Callable[[], Any], *, sync: Callable[[], None] | None = None, repeat: int = 7,
                  min_sample_s: float = 0.02) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` samples, each long enough to time (``min_sample_s``)."""
    sync = sync or (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def _measure_local(module: Any, spec: KernelSpec, sig: KernelSignature, sizes: Mapping[str, int], device: Device) -> float:
    import torch

    dev = "cpu" if device.kind == "llvm" else "cuda"
    args = sig.example_args(sizes, device=dev)
    sig.bind(*args, device_type=dev)
    f = module.get_function(spec.uri)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    return time_function(lambda: f(*args), sync=sync)


def _measure_rpc(built: BuiltKernel, sizes: Mapping[str, int], rpc: RPCSettings, workdir: Path) -> float:
    """Upload the module to the tracker's device and time it there (TVM's time_evaluator, median of runs)."""
    import numpy as np
    import tvm
    from tvm import rpc as tvm_rpc

    path = workdir / f"{built.spec.uri}.rpc.so"
    built.module.export_library(str(path))
    tracker = tvm_rpc.connect_tracker(rpc.host, rpc.port)
    sess = tracker.request(rpc.key, priority=1, session_timeout=rpc.session_timeout_sec)
    sess.upload(str(path))
    rmod = sess.load_module(path.name)
    dev = sess.device(built.device.kind, 0)
    args = []
    for value in built.signature.example_args(sizes):
        args.append(tvm.runtime.tensor(value.numpy(), dev) if hasattr(value, "numpy") else value)
    evaluator = rmod.time_evaluator(built.spec.uri, dev, number=10, repeat=7, min_repeat_ms=20)
    return float(np.median(evaluator(*args).results))


def can_measure(device: Device, rpc: RPCSettings | None) -> bool:
    return rpc is not None or device.kind == "llvm" or (device.kind == "cuda" and has_local_gpu())


def _require_measurable(device: Device, rpc: RPCSettings | None) -> None:
    if not can_measure(device, rpc):
        raise MeasurementUnavailableError(
            f"target {device.tag}: no {device.kind} device on this machine, so nothing can be measured here "
            "(MetaSchedule would record failed runs of 1e10 s). Tune on the GPU machine, pass "
            "--rpc HOST:PORT --rpc-key KEY to measure on a remote device through a TVM RPC tracker, "
            "or use --build-only to compile (from existing logs or the default schedule) without measuring."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------------------------------
def _write_meta(log_dir: Path, meta: Mapping[str, Any]) -> None:
    tmp = log_dir / f".{META_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, log_dir / META_FILE)


def _num_sampling_instructions(sch: Any) -> int:
    return sum(1 for inst in sch.trace.insts if str(inst.kind.name).startswith("Sample"))


def tune_kernel(
    spec: KernelSpec,
    device: Device | str = "llvm",
    *,
    trials: int | None = None,
    logs_dir: str | os.PathLike = "tuning_logs",
    seed: int = 0,
    provider: KernelProvider | None = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    rpc: RPCSettings | None = None,
    builder: Any = None,
    runner: Any = None,
    builder_timeout: float = DEFAULT_BUILDER_TIMEOUT,
    runner_timeout: float = DEFAULT_RUNNER_TIMEOUT,
    num_trials_per_iter: int = 16,
    population_size: int = 128,
    genetic_iters: int = 3,
    measure: bool = True,
    work_dir: str | os.PathLike | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Tune ``spec`` until its log holds ``trials`` valid records (existing records count), then time the default
    and the tuned schedule. Raises :class:`NoValidTrialsError` when the log ends with no valid record."""
    from tvm.s_tir import meta_schedule as ms

    device = resolve_device(device)
    provider = provider or default_provider()
    trials = default_trials(spec) if trials is None else int(trials)
    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    _require_measurable(device, rpc)

    func = make_func(spec, provider)
    sig = provider.signature(spec, func)
    log_dir = log_dir_for(logs_dir, device, spec)
    fix = f"re-tune into an empty folder or delete {log_dir}"
    v = versions()
    if (log_dir / META_FILE).exists():
        meta = read_meta(log_dir, device)
        sizes = {str(k): int(x) for k, x in meta.get("tuning_sizes", {}).items()}
        if set(sizes) != set(sig.symbols):
            raise TuningLogError(f"{log_dir / META_FILE}: tuning sizes {sizes} do not fit the kernel's symbols "
                                 f"{sig.symbols}; {fix}")
    else:
        if (log_dir / RECORD_FILE).exists():
            raise TuningLogError(f"{log_dir}: records without meta.json cannot be version-checked; {fix}")
        sizes = kernel_sizes(spec, sig, provider, n_tokens)
        meta = {}
    log_dir.mkdir(parents=True, exist_ok=True)
    meta.update(
        {
            "uri": spec.uri,
            "spec": {k: (list(x) if isinstance(x, tuple) else x) for k, x in vars(spec).items()},
            "versions": v,
            "device_tag": device.tag,
            "device_name": device.name,
            "target": device.target_json,
            "tuning_sizes": sizes,
            "tuning_scalars": {},
            "seed": seed,
        }
    )
    _write_meta(log_dir, meta)  # before any record: a crash leaves a checkable log

    db = open_database(log_dir, device)
    workload = tuning_workload(func, sig, sizes)
    before = len(valid_records(db, workload))
    new_valid = 0
    schedules = provider.schedules(device.kind)
    space_fn = functools.partial(_design_space, schedules.design_space, spec)
    if before < trials:
        probe = _space_probe(workload, schedules.design_space, spec)
        remaining = trials - before if _num_sampling_instructions(probe) else max(0, 1 - before)
    else:
        remaining = 0
    if remaining > 0:
        wd = Path(work_dir) if work_dir is not None else default_work_dir(device, spec)
        wd.mkdir(parents=True, exist_ok=True)
        task_logger, log_handler = _task_logger(wd, spec.uri)
        space = ms.space_generator.ScheduleFn(
            space_fn,
            sch_rules=[],
            postprocs=provider.postprocs(device.kind, spec),
            mutator_probs=provider.mutator_probs(device.kind, spec),
        )
        ctx = ms.TuneContext(
            mod=workload,
            target=device.target,
            space_generator=space,
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population_size, init_min_unmeasured=min(50, population_size // 2),
                genetic_num_iters=genetic_iters,
            ),
            task_name=spec.uri,
            rand_state=seed + before,  # a resumed run explores from another random state
            num_threads="physical",
            logger=task_logger,
        ).clone()
        counts = {"measured": 0, "valid": 0}

        def _count(measured: int, valid: int) -> None:
            counts["measured"] += measured
            counts["valid"] += valid
            if on_progress is not None:
                on_progress(measured, valid)

        callbacks = ms.measure_callback.MeasureCallback.create("default") + [_progress_callback(_count)]
        if builder is None:
            builder = ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=builder_timeout)
        if runner is not None:
            pass
        elif rpc is not None:
            runner = ms.runner.RPCRunner(rpc_config=rpc.config(), evaluator_config=_evaluator_config())
        else:
            runner = ms.runner.LocalRunner(timeout_sec=runner_timeout, evaluator_config=_evaluator_config())
        try:
            ms.tune_tasks(
                tasks=[ctx],
                task_weights=[1.0],
                work_dir=str(wd),
                max_trials_global=remaining,
                num_trials_per_iter=min(num_trials_per_iter, remaining),
                builder=builder,
                runner=runner,
                database=db,
                cost_model="xgb",
                measure_callbacks=callbacks,
                task_scheduler="round-robin",
            )
        finally:
            task_logger.removeHandler(log_handler)
            log_handler.close()
        new_valid = counts["valid"]
        db = open_database(log_dir, device)
    after = len(valid_records(db, workload))
    meta.update({"trials_requested": trials, "valid_trials": after, "timestamp": _now()})
    _write_meta(log_dir, meta)
    if after == 0:
        raise NoValidTrialsError(
            f"{spec.uri}: tuning measured 0 valid candidates (log: {log_dir}). Usually every build timed out "
            f"(builder timeout {builder_timeout:.0f} s; MetaSchedule's default build worker imports "
            "tvm.s_tir.tensor_intrin for 35-47 s) or every run failed; raise --builder-timeout and see the "
            f"task log under {Path(work_dir) if work_dir else default_work_dir(device, spec)}/logs"
        )

    untuned_s = tuned_s = None
    if measure:
        untuned_s, tuned_s = _measure_pair(spec, device, func, sig, sizes, db, workload, provider, rpc, log_dir)
        meta.update({"untuned_ms": untuned_s * 1e3, "tuned_ms": tuned_s * 1e3, "timestamp": _now()})
        _write_meta(log_dir, meta)
    return TuneResult(spec, log_dir, after, new_valid, untuned_s, tuned_s, sig.nbytes(sizes), True)


def _task_logger(work_dir: Path, name: str) -> tuple[logging.Logger, logging.Handler]:
    """A file logger for the task (``<work_dir>/logs/<name>.log``), not TVM's process-wide logging config
    (``get_loggers_from_work_dir`` breaks on a second work dir in one process)."""
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"wq_compile.tune.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(work_dir / "logs" / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    logger.addHandler(handler)
    return logger, handler


def _evaluator_config() -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)


def _design_space(design_space: Callable[[Any, KernelSpec], None], spec: KernelSpec, sch: Any) -> None:
    design_space(sch, spec)


def _space_probe(workload: Any, design_space: Callable[[Any, KernelSpec], None], spec: KernelSpec) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(workload)
    design_space(sch, spec)
    return sch


def _measure_pair(spec, device, func, sig, sizes, db, workload, provider, rpc, log_dir) -> tuple[float, float]:
    records = valid_records(db, workload, limit=1)
    untuned_mod = compile_schedule(default_schedule(spec, device, func, provider), device)
    tuned_mod = compile_schedule(apply_trace(func, records[0].trace, str(log_dir)), device)
    if rpc is not None:
        wd = default_work_dir(device, spec)
        wd.mkdir(parents=True, exist_ok=True)

        def run(mod: Any) -> float:
            return _measure_rpc(BuiltKernel(spec, device, mod, sig, False, {}), sizes, rpc, wd)
    else:
        def run(mod: Any) -> float:
            return _measure_local(mod, spec, sig, sizes, device)
    return run(untuned_mod), run(tuned_mod)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tune_kernels(
    specs: Sequence[KernelSpec],
    device: Device | str = "llvm",
    *,
    trials: int | Mapping[str, int] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> list[TuneResult]:
    """Tune every spec in turn (a tqdm bar over kernels and one over trials); ``trials`` is a count for all
    kernels, a mapping kind -> count, or None for :func:`default_trials`."""
    device = resolve_device(device)
    _require_measurable(device, kwargs.get("rpc"))

    def count(spec: KernelSpec) -> int:
        if trials is None:
            return default_trials(spec)
        if isinstance(trials, Mapping):
            return int(trials.get(spec.kind, default_trials(spec)))
        return int(trials)

    from tqdm.auto import tqdm

    results = []
    bar = tqdm(specs, desc="kernels", unit="kernel", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.uri)
        n = count(spec)
        with tqdm(total=n, desc="  trials", unit="trial", leave=False, disable=not progress) as tbar:
            def on_progress(measured: int, valid: int, _b=tbar) -> None:
                _b.update(measured)
                _b.set_postfix(valid=valid)

            results.append(tune_kernel(spec, device, trials=n, on_progress=on_progress, **kwargs))
    return results


def build_only(
    specs: Sequence[KernelSpec],
    device: Device | str = "llvm",
    *,
    logs_dir: str | os.PathLike = "tuning_logs",
    provider: KernelProvider | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[TuneResult]:
    """Compile every spec (tuned record if any, else default schedule) into the module cache; no measurement."""
    from .build import export_kernel

    device = resolve_device(device)
    provider = provider or default_provider()
    results = []
    for spec in specs:
        built = build_kernel(spec, device, logs_dir=logs_dir, provider=provider)
        export_kernel(built, cache_dir)
        log_dir = log_dir_for(logs_dir, device, spec)
        valid = 0
        if (log_dir / META_FILE).exists():
            valid = int(read_meta(log_dir, device).get("valid_trials", 0))
        results.append(TuneResult(spec, log_dir, valid, 0, None, None, 0, built.tuned))
    return results
