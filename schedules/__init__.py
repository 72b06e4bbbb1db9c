"""Per-target schedules of the WindowQuant kernels, installed as ``wq_compile.schedules``.

Each target module (``llvm``, ``cuda``) follows one fixed protocol (dlight style), used by
:mod:`wq_compile.compiler.build` and :mod:`wq_compile.tuning.tune` and described in docs/kernel_pipeline.md:

- ``default_schedule(sch, spec)``: the untuned baseline and fallback;
- ``design_space(sch, spec)``: a MetaSchedule ``ScheduleFn`` body with sampled knobs;
- ``postprocs()`` and ``mutator_probs()``: what goes with that design space.

The module source is part of every module-cache key: editing a schedule rebuilds its modules.
"""

TARGET_KINDS = ("llvm", "cuda")
