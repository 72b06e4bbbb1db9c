"""Helpers shared by test_tune / test_build / test_runtime: a tiny spec, a real (measured) tuning log without a
MetaSchedule run, and a toy kernel for the MetaSchedule driver tests of test_tune."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from wq_compile.build import KernelProvider, default_provider, kernel_sizes, log_dir_for, make_func, tuning_workload
from wq_compile.device import Device, versions
from wq_compile.spec import KernelSpec
from wq_compile.tune import time_function

TINY_DECODE = KernelSpec("decode", (4,), head_dim=64, num_q_heads=4, num_kv_heads=2)
N_TOKENS = 128


def measured_log(spec: KernelSpec, device: Device, logs_dir: Path, provider: KernelProvider | None = None,
                 seed: int = 1) -> Path:
    """A tuning log with one record: a design-space sample, measured here (its time is real)."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    provider = provider or default_provider()
    func = make_func(spec, provider)
    sig = provider.signature(spec, func)
    sizes = kernel_sizes(spec, sig, provider, N_TOKENS)
    workload = tuning_workload(func, sig, sizes)
    sch = s_tir.Schedule(workload, seed=seed)
    provider.schedules(device.kind).design_space(sch, spec)
    with device.target:
        lib = tvm.driver.build(sch.mod, target=device.target)
    args = sig.example_args(sizes)
    static_args = [a for a, d in zip(args, sig.args) if not d.is_scalar]
    f = lib.get_function("main")
    secs = time_function(lambda: f(*static_args), repeat=3)
    log_dir = log_dir_for(logs_dir, device, spec)
    log_dir.mkdir(parents=True, exist_ok=True)
    meta = {"uri": spec.uri, "versions": versions(), "device_tag": device.tag, "target": device.target_json,
            "tuning_sizes": sizes, "tuning_scalars": {}, "seed": seed}
    (log_dir / "meta.json").write_text(json.dumps(meta))
    db = ms.database.JSONDatabase(str(log_dir / "database_workload.json"), str(log_dir / "database_tuning_record.json"))
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(workload), run_secs=[secs], target=device.target,
        args_info=ArgInfo.from_prim_func(workload["main"]),
    ))
    return log_dir


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


def _toy_schedules(kind: str) -> SimpleNamespace:
    if kind != "llvm":
        raise ValueError(f"the toy kernel has llvm schedules only, not {kind!r}: CUDA builds use the real kernels")
    from tvm.s_tir import meta_schedule as ms

    return SimpleNamespace(
        default_schedule=_toy_llvm_default,
        design_space=_toy_llvm_space,
        postprocs=lambda: [ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()],
        mutator_probs=lambda: {ms.mutator.MutateTileSize(): 0.5, ms.mutator.MutateUnroll(): 0.5},
    )


#: A toy kernel with llvm schedules, for the MetaSchedule driver tests of test_tune only (real tunes, resume, zero
#: trials, broken logs). Kept because those tests run several real tunes: a toy candidate builds and runs in well under
#: a second, a decode/fused candidate takes seconds each (TVM_NOTES: ~7 s a candidate on llvm), which would put the
#: suite far past its time budget; they also must not depend on the attention kernels evolving. Every build, runtime
#: and CUDA test uses the real kernels. Its signature is read off the PrimFunc (no ``describe``).
TOY_PROVIDER = KernelProvider(make_kernel=_toy_kernel, schedules_for=_toy_schedules)
TOY_SPEC = KernelSpec("decode", (16,), head_dim=64, num_q_heads=4, num_kv_heads=2)
