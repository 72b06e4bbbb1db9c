"""The MetaSchedule task of one kernel: its design space (``ScheduleFn`` over the schedule module's protocol) and the
``TuneContext`` with the evolutionary search, shared by the local tuner (:mod:`wq_compile.tuning.tune`, which measures) and
the offline export (:mod:`wq_compile.tuning.offline`, which only samples), so both search the same space the same way.

``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` on construction: hundreds of TVMScript functions, each of which
makes the parser call ``inspect.stack()``. That resolves the source file, module and source line of *every* frame
on the stack; frames of the import machinery (``<frozen importlib._bootstrap>``) are never cached and each one scans
all of ``sys.modules``, so with torch loaded the import takes most of a minute of CPU (the 35-47 s of
docs/TVM_NOTES.md). :func:`import_tensor_intrin` does that import once with a stack whose first three frames are
complete and whose deeper frames carry no source line: the parser reads the source line of the third frame only
(is the function defined in a class body?) and the locals of the others, so it parses exactly the same.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import TYPE_CHECKING, Any

from ..compiler.build import KernelDef
from ..compiler.device import Device

if TYPE_CHECKING:
    from .settings import TuneSettings


def _shallow_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack(context)`` with source context for the three innermost frames only (see module doc)."""
    infos = []
    frame = sys._getframe(1)
    while frame is not None:
        if len(infos) < 3:
            tb = inspect.getframeinfo(frame, context)
            infos.append(inspect.FrameInfo(frame, *tb, positions=tb.positions))
        else:
            infos.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                           None, None, positions=None))
        frame = frame.f_back
    return infos


def import_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (which every ``TuneContext`` needs) with :func:`_shallow_stack` in place
    of ``inspect.stack`` for the import only; a no-op once imported."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _shallow_stack  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original  # type: ignore[assignment]


def design_space(kdef: KernelDef, sch: Any) -> None:
    """The target's design space (one trace format for tuning, export and replay)."""
    kdef.schedules.design_space(sch, kdef.spec)


def tune_context(kdef: KernelDef, device: Device, workload: Any, settings: "TuneSettings", rand_state: int,
                 logger: logging.Logger) -> Any:
    """A cloned ``TuneContext`` over ``workload``: the kernel's design space, postprocessors and mutators, and an
    evolutionary search sized by ``settings``."""
    from tvm.s_tir import meta_schedule as ms

    import_tensor_intrin()
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
