"""Helpers shared by the compiler-layer tests: a tiny spec, a real (measured) tuning log without a MetaSchedule run
(under this device's tag or another one), and a toy kernel for the MetaSchedule driver tests of test_tune."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from wq_compile import tuning_log
from wq_compile.compile import KernelDef, kernel_def
from wq_compile.device import Device
from wq_compile.measure import example_args, time_function
from wq_compile.signature import KernelSignature
from wq_compile.spec import KernelSpec

TINY_DECODE = KernelSpec("decode", (4,), head_dim=64, num_q_heads=4, num_kv_heads=2)
N_TOKENS = 128


def measured_log(spec: KernelSpec | KernelDef, device: Device, logs_dir: Path, seed: int = 1,
                 as_device: dict | None = None) -> Path:
    """A tuning log with one record: a design-space sample, measured here (its time is real).

    ``as_device`` (``{"tag": ..., "target": {...}}``) files it as another device's log (same record, another tag and
    target in meta.json), as a log committed from another machine would be.
    """
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    kdef = spec if isinstance(spec, KernelDef) else kernel_def(spec, device.kind, N_TOKENS)
    workload = kdef.workload()
    sch = s_tir.Schedule(workload, seed=seed)
    kdef.schedules.design_space(sch, kdef.spec)
    with device.target:
        lib = tvm.driver.build(sch.mod, target=device.target)
    args = example_args(kdef.signature, kdef.sizes)
    static_args = [a for a, d in zip(args, kdef.signature.args) if not d.is_scalar]
    f = lib.get_function("main")
    secs = time_function(lambda: f(*static_args), repeat=3)
    tag = as_device["tag"] if as_device else device.tag
    folder = tuning_log.log_dir(logs_dir, tag, kdef.spec.uri)
    meta = tuning_log.new_meta(device, kdef.spec.uri, {}, kdef.sizes, kdef.scalars, seed)
    if as_device:
        target = tvm.target.Target(as_device["target"])
        meta.update(device_tag=tag, target=str(target), isa=None, num_cores=as_device["target"].get("num-cores"))
    tuning_log.write_meta(folder, meta)
    db = ms.database.JSONDatabase(str(folder / tuning_log.WORKLOAD_FILE), str(folder / tuning_log.RECORD_FILE))
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(workload), run_secs=[secs], target=device.target,
        args_info=ArgInfo.from_prim_func(workload["main"]),
    ))
    return folder


def _toy_kernel(spec: KernelSpec):
    """scores[b, h, n] = sum_d q[b, h, d] * k[b, h // group, n, d] * sm_scale, n symbolic."""
    from tvm.script import tirx as T

    hq, hkv, d, g = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.group_size

    @T.prim_func(s_tir=True)
    def toy(q: T.Buffer((1, hq, d), "float32"), k_handle: T.handle, sm_scale: T.float32, o_handle: T.handle):
        n = T.int32()
        k = T.match_buffer(k_handle, (1, hkv, n, d), "float32")
        o = T.match_buffer(o_handle, (1, hq, n), "float32")
        for b, h, i, j in T.grid(1, hq, n, d):
            with T.sblock("s"):
                vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                with T.init():
                    o[vb, vh, vi] = T.float32(0)
                o[vb, vh, vi] = o[vb, vh, vi] + q[vb, vh, vj] * k[vb, vh // g, vi, vj] * sm_scale

    return toy.with_attr("global_symbol", spec.uri)


def _toy_llvm_default(sch, spec: KernelSpec) -> None:
    sch.parallel(sch.get_loops(sch.get_sblock("s"))[1])


def _toy_llvm_space(sch, spec: KernelSpec) -> None:
    """Token loop in fixed chunks of 64 (replays on symbolic n); tile and unroll sampled inside the chunk."""
    blk = sch.get_sblock("s")
    b, h, i, j = sch.get_loops(blk)
    io, ii = sch.split(i, [None, 64])
    i1, i2 = sch.split(ii, sch.sample_perfect_tile(ii, n=2, max_innermost_factor=16))
    sch.reorder(b, h, io, i1, i2, j)
    sch.parallel(h)
    sch.annotate(h, "meta_schedule.unroll_explicit", sch.sample_categorical([0, 16, 64], [1 / 3] * 3))


def toy_kernel(spec: KernelSpec | None = None) -> KernelDef:
    """A toy kernel with llvm schedules following the schedule-module protocol, for the MetaSchedule driver tests
    of test_tune only: those run several real tunes, and a toy candidate builds and runs in well under a second
    (a decode/fused candidate takes seconds each). Every build, runtime and CUDA test uses the real kernels."""
    from tvm.s_tir import meta_schedule as ms

    spec = spec or TOY_SPEC
    func = _toy_kernel(spec)
    schedules = SimpleNamespace(
        default_schedule=_toy_llvm_default,
        design_space=_toy_llvm_space,
        postprocs=lambda: [ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()],
        mutator_probs=lambda: {ms.mutator.MutateTileSize(): 0.5, ms.mutator.MutateUnroll(): 0.5},
    )
    sig = KernelSignature.from_prim_func(func, spec.uri)
    return KernelDef(spec, func, sig, schedules, {"n": N_TOKENS}, {"sm_scale": 0.125})


TOY_SPEC = KernelSpec("decode", (16,), head_dim=64, num_q_heads=4, num_kv_heads=2)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
