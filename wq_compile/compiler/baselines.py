"""Builds of the token-granular baselines (``wq-bench --token-granular``): their factories live in ``kernels`` and
are handed a target; these default it to this host and compile with the baselines' own hand schedules (they are
comparisons, never tuned or cached)."""

from __future__ import annotations

from ..core.spec import KernelSpec
from ..kernels.granular_cpu import build_group_dispatch
from ..kernels.token_granular import TokenGranularSpec, build_token_granular, default_schedule
from .device import host_device


def compile_token_granular(spec: TokenGranularSpec, target=None, schedule: str = "vectorized"):
    """Build for the host CPU (:func:`host_device` unless ``target`` is given) with
    :func:`default_schedule` of kind ``schedule``: a callable module function ``f(*args, out)``."""
    import tvm
    from tvm import s_tir

    target = target or host_device().target
    sch = s_tir.Schedule(tvm.IRModule({spec.uri: build_token_granular(spec)}))
    default_schedule(sch, spec, schedule)
    with target:
        lib = tvm.compile(sch.mod, target=target)
    return lib[spec.uri]


def compile_group_dispatch(spec: KernelSpec, target=None):
    """The dispatch kernel built for ``target`` (default: this host), as a callable."""
    import tvm

    func = build_group_dispatch(spec)
    name = str(func.attrs["global_symbol"])
    target = target or host_device().target
    return tvm.compile(tvm.IRModule({name: func}), target=target)[name]
