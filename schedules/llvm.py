"""CPU (llvm) schedules: a hand default (the untuned baseline) and a MetaSchedule design space with sampled knobs.

Knob rules (see TVM_NOTES): sampled values only feed schedule instructions; the loop structure never depends on a
decision; tiles are sampled only inside the fixed chunk, never on the dynamic chunk loop.
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from wq_compile.kernels.attention import pieces
from wq_compile.kernels.merge import MERGE_BLOCKS
from wq_compile.kernels.quantize import QUANT_BLOCKS
from wq_compile.spec import KernelSpec

_UNROLL_STEPS = [0, 16, 64, 512]


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """llvm target for this host CPU: plain ``"llvm"`` means generic x86-64 (no AVX/FMA/F16C) and is far slower."""
    cores = num_cores or os.cpu_count() or 1
    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": cores})


def postprocs() -> list:
    """Postprocessors that go with :func:`design_space`."""
    return [ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()]


def mutator_probs() -> dict:
    return {ms.mutator.MutateTileSize(): 0.6, ms.mutator.MutateUnroll(): 0.4}


# ----------------------------------------------------------------------------------------------------------------
# default (untuned) schedules
# ----------------------------------------------------------------------------------------------------------------


def work_on_kernel(sch: s_tir.Schedule) -> None:
    """Point ``sch`` at its only function when that is not called ``main`` (modules name it ``spec.uri``)."""
    names = [gv.name_hint for gv in sch.mod.get_global_vars()]
    if "main" not in names and len(names) == 1:
        sch.work_on(names[0])


def default_schedule(sch: s_tir.Schedule, spec: KernelSpec) -> None:
    """Untuned baseline: parallel over the outer independent loops, nothing else (no vectorization)."""
    work_on_kernel(sch)
    if spec.kind in ("decode", "fused"):
        outer = sch.get_loops(sch.get_sblock("qscale"))[:2]
        sch.parallel(sch.fuse(*outer))
    elif spec.kind == "merge":
        for name in MERGE_BLOCKS:
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(loops[0], loops[1]))
    elif spec.kind == "quantize":
        for name in QUANT_BLOCKS:
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(loops[0], loops[1]))
    else:  # pragma: no cover - KernelSpec validates kind
        raise ValueError(f"kind: no llvm schedule for {spec.kind!r}")




# ----------------------------------------------------------------------------------------------------------------
# design spaces
# ----------------------------------------------------------------------------------------------------------------


def design_space(sch: s_tir.Schedule, spec: KernelSpec) -> None:
    """MetaSchedule ScheduleFn body: the structure of :func:`tuned_schedule` with every knob sampled."""
    if spec.kind in ("decode", "fused"):
        _attention(sch, spec, None)
    else:
        default_schedule(sch, spec)


def tuned_schedule(sch: s_tir.Schedule, spec: KernelSpec, knobs: dict) -> None:
    """The design space with fixed knobs (hand-picked configurations, benchmarks)."""
    if spec.kind in ("decode", "fused"):
        _attention(sch, spec, knobs)
    else:
        default_schedule(sch, spec)


#: Hand-picked knobs for the attention kernels (good on AVX-512 / AVX2 hosts).
HAND_KNOBS = {"qk_tok": 8, "pv_lanes": 32, "pv_tok": 8, "unroll": 64}


def _pick(sch, knobs, key, candidates):
    """A sampled categorical (design space) or the fixed knob value (hand schedule)."""
    if knobs is None:
        return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))
    return knobs[key]


def _tile2(sch, knobs, loop, key, extent, max_inner):
    """Split ``loop`` in two: a sampled perfect tile (design space) or the fixed inner factor."""
    if knobs is None:
        return sch.split(loop, sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_inner))
    inner = min(knobs[key], extent)
    while extent % inner:
        inner //= 2
    return sch.split(loop, [None, inner])


def _attention(sch: s_tir.Schedule, spec: KernelSpec, knobs: dict | None) -> None:
    work_on_kernel(sch)
    d, c = spec.head_dim, spec.chunk
    outer = sch.get_loops(sch.get_sblock("qscale"))[:2]
    fused = sch.fuse(*outer)
    sch.parallel(fused)
    unroll = _pick(sch, knobs, "unroll", _UNROLL_STEPS)
    sch.annotate(fused, "meta_schedule.unroll_explicit", unroll)
    sch.vectorize(sch.get_loops(sch.get_sblock("qscale"))[-1])
    for p in pieces(spec):
        # dequant: the unpack lanes (codes of one word) or the channel axis are contiguous.
        for stage in ("kdeq", "vdeq"):
            blk = sch.get_sblock(p.block(stage))
            if not p.quantized and stage == "kdeq" and spec.dtype == "f32":
                sch.compute_inline(blk)
                continue
            sch.vectorize(sch.get_loops(blk)[-1])
        # scores: lanes of partial dot products innermost (vector), a tile of tokens shares each q load.
        qk = sch.get_sblock(p.block("qk_part"))
        _b, _c, g, t, ln, do = sch.get_loops(qk)
        to, ti = _tile2(sch, knobs, t, "qk_tok", c, 16)
        sch.reorder(g, to, do, ti, ln)
        sch.vectorize(ln)
        sch.unroll(ti)
        sch.decompose_reduction(qk, do)
        # softmax over the chunk: contiguous in tokens.
        sch.vectorize(sch.get_loops(sch.get_sblock(p.block("prob")))[-1])
        # P @ V: channel lanes innermost, token reduction just outside them (acc stays in registers).
        pv = sch.get_sblock(p.block("pv"))
        _b, _c, g, dd, t = sch.get_loops(pv)
        do, di = _tile2(sch, knobs, dd, "pv_lanes", d, 64)
        to, ti = _tile2(sch, knobs, t, "pv_tok", c, 16)
        sch.reorder(g, do, to, ti, di)
        sch.vectorize(di)
        sch.unroll(ti)
    sch.vectorize(sch.get_loops(sch.get_sblock("final_o"))[-1])


def fast_build(mod, target, _params=None):
    """MetaSchedule ``LocalBuilder(f_build=...)`` without the 35-50 s ``tvm.s_tir.tensor_intrin`` import.

    Valid for these design spaces (no tensorize intrinsics). Returns a runtime Module (exportable).
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)
