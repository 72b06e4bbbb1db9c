"""Per-target schedules of the WindowQuant kernels, installed as ``wq_compile.schedules``.

Each target module (``llvm``, ``cuda``) exposes ``default_schedule(sch, spec)`` (the untuned baseline and fallback),
``design_space(sch, spec)`` (a MetaSchedule ``ScheduleFn`` body with sampled knobs), ``postprocs()`` and
``mutator_probs()``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TARGET_KINDS = ("llvm", "cuda")


def for_target(kind: str) -> ModuleType:
    """The schedule module of a target kind (``"llvm"`` or ``"cuda"``)."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"target kind: no schedules for {kind!r}; expected one of {TARGET_KINDS}")
    return importlib.import_module(f"{__name__}.{kind}")
