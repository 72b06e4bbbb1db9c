"""CUDA codegen of every kernel kind for an H100-class target (no GPU needed), and nvcc to a cubin when present."""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm.support import nvcc

from wq_compile.kernels import make_kernel
from wq_compile.kernels.signatures import quantize_spec
from wq_compile.schedules import cuda as sched
from wq_compile.core.spec import KernelSpec

SPECS = [
    KernelSpec("decode", (4,), 64, 14, 2),
    KernelSpec("decode", (2,), 128, 28, 4),
    KernelSpec("decode", (16,), 128, 28, 4, dtype="f16"),
    KernelSpec("fused", (8, 4, 2, 16), 64, 14, 2),
    KernelSpec("merge", (16,), 128, 28, 4, dtype="f16"),
    KernelSpec("quantize", (4,), 64, 14, 2),
    quantize_spec(2, "lsq-zs", head_dim=64, num_q_heads=14, num_kv_heads=2),  # the default fit's blocks
]


def _cuda_source(sch: tvm.s_tir.Schedule) -> str:
    ex = tvm.compile(sch.mod, target=sched.target())
    return ex.mod.imports[0].inspect_source()


def _nvcc_cubin(src: str) -> bytes:
    with sched.target():
        return nvcc.compile_cuda(src, target_format="cubin", arch="sm_90a", compiler="nvcc")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.uri)
def test_default_schedule_builds_for_h100(spec: KernelSpec) -> None:
    sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}))
    sched.default_schedule(sch, spec)
    src = _cuda_source(sch)
    assert spec.uri in src
    assert "__global__" in src
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc absent: CUDA source generated, cubin not checked")
    assert len(_nvcc_cubin(src)) > 1000


@pytest.mark.parametrize("seed", [1, 2])
def test_design_space_builds_for_h100(seed: int) -> None:
    spec = KernelSpec("fused", (4, 16), 64, 14, 2)
    sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}), seed=seed)
    sched.design_space(sch, spec)
    decisions = [sch.trace.decisions[i] for i in sch.trace.insts if i.kind.name == "SampleCategorical"]
    assert decisions, "the CUDA design space samples no knob"
    src = _cuda_source(sch)
    assert spec.uri in src
    if shutil.which("nvcc") is not None:
        assert len(_nvcc_cubin(src)) > 1000
