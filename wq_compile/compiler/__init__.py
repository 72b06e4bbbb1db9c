"""From PrimFunc to a loaded module: targets and ISA classes, schedule + build (+ nvcc), the tuning-log lookup a build
needs, the module cache (key, lock, atomic export, integrity check), warm loads without TVM, and the CPU launcher
that runs a loaded module's parallel loops on torch's threads.

May import: ``kernels`` (and ``schedules``), ``core``.
"""
