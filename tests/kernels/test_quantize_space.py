"""The quantize kernels' llvm design space has real choices (the default schedule alone gave a tuning run one
candidate): draws differ, build, and quantize exactly as the reference; fixed knobs give the tuned schedule."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("tvm")

from tvm import s_tir  # noqa: E402

from wq_compile.compiler.build import build_module, kernel_def  # noqa: E402
from wq_compile.compiler.check import check_against_reference  # noqa: E402
from wq_compile.compiler.device import host_device  # noqa: E402
from wq_compile.core.spec import KernelSpec  # noqa: E402


def _decisions(sch) -> tuple[str, ...]:
    return tuple(str(sch.trace.get_decision(i)) for i in sch.trace.insts if sch.trace.get_decision(i) is not None)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_design_space_draws_differ_and_match_the_reference(bits):
    spec = KernelSpec("quantize", (bits,), head_dim=64, num_q_heads=4, num_kv_heads=2)
    kdef = kernel_def(spec, "llvm")
    device = host_device()
    seen = set()
    for seed in (1, 2, 3, 4):
        sch = s_tir.Schedule(kdef.func, seed=seed)
        kdef.schedules.design_space(sch, spec)
        seen.add(_decisions(sch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            check_against_reference(kdef, build_module(sch, device), device)
    assert all(len(d) == 2 for d in seen) and len(seen) >= 2, seen  # unroll depth and channel tile, sampled
    sch = s_tir.Schedule(kdef.func)
    kdef.schedules.tuned_schedule(sch, spec, {"q_unroll": 16, "q_kc": 8})
    check_against_reference(kdef, build_module(sch, device), device)
