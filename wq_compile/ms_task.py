"""The MetaSchedule task of one kernel: its design space (``ScheduleFn`` over the schedule module's protocol) and the
``TuneContext`` with the evolutionary search, shared by the local tuner (:mod:`wq_compile.tune`, which measures) and
the offline export (:mod:`wq_compile.offline`, which only samples), so both search the same space the same way."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from .compile import KernelDef
from .device import Device

if TYPE_CHECKING:
    from .tune import TuneSettings


def design_space(kdef: KernelDef, sch: Any) -> None:
    """The target's design space (one trace format for tuning, export and replay)."""
    kdef.schedules.design_space(sch, kdef.spec)


def tune_context(kdef: KernelDef, device: Device, workload: Any, settings: "TuneSettings", rand_state: int,
                 logger: logging.Logger) -> Any:
    """A cloned ``TuneContext`` over ``workload``: the kernel's design space, postprocessors and mutators, and an
    evolutionary search sized by ``settings``."""
    from tvm.s_tir import meta_schedule as ms

    space = ms.space_generator.ScheduleFn(
        functools.partial(design_space, kdef), sch_rules=[], postprocs=kdef.schedules.postprocs(),
        mutator_probs=kdef.schedules.mutator_probs(),
    )
    return ms.TuneContext(
        mod=workload, target=device.target, space_generator=space,
        search_strategy=ms.search_strategy.EvolutionarySearch(
            population_size=settings.population_size, init_min_unmeasured=min(50, settings.population_size // 2),
            genetic_num_iters=settings.genetic_iters,
        ),
        task_name=kdef.spec.uri, rand_state=rand_state, num_threads="physical", logger=logger,
    ).clone()


def samples_anything(workload: Any, kdef: KernelDef) -> bool:
    """Whether the design space samples (a space without sampling instructions has exactly one schedule)."""
    from tvm import s_tir

    sch = s_tir.Schedule(workload)
    design_space(kdef, sch)
    return any(str(inst.kind.name).startswith("Sample") for inst in sch.trace.insts)


def replay(workload: Any, trace: Any) -> Any:
    """``trace`` applied to a fresh schedule of ``workload`` (postprocessors kept)."""
    from tvm import s_tir

    sch = s_tir.Schedule(workload)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch
