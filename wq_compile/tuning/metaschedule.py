"""MetaSchedule plumbing of the tuner: the build-worker function, a progress callback, a per-task file logger.

``build_candidate`` is imported by MetaSchedule's popen build workers, which import this package: keep this module
and ``wq_compile/__init__`` light (no transformers, no registration).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable


def build_candidate(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule build function without the ``tvm.s_tir.tensor_intrin`` import of the default one (35-47 s
    per worker here, which makes every build time out). Valid for design spaces without tensor intrinsics."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from ..compiler.build import pass_config

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with tvm.transform.PassContext(config=pass_config(tvm.target.Target(target).kind.name)):
        return tvm.driver.build(mod, target=target)


def progress_callback(on_result: Callable[[int, int], None]) -> Any:
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


def task_logger(work_dir: Path, name: str) -> tuple[logging.Logger, logging.Handler]:
    """A file logger for the task (``<work_dir>/logs/<name>.log``), not TVM's process-wide logging config
    (``get_loggers_from_work_dir`` breaks on a second work dir in one process)."""
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"wq_compile.tuning.tune.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(work_dir / "logs" / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    logger.addHandler(handler)
    return logger, handler


def evaluator_config() -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)
