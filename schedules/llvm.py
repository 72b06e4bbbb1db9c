"""CPU (llvm) schedules: a hand default (the untuned baseline) and a MetaSchedule design space with sampled knobs.

Knob rules (see docs/TVM_NOTES.md): sampled values only feed schedule instructions; the loop structure never depends on a
decision; tiles are sampled only inside the fixed chunk, never on the dynamic chunk loop.
"""

from __future__ import annotations

import math

from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from wq_compile.kernels.attention import pieces
from wq_compile.kernels.attention_cpu import PLAIN_TIR_ATTR
from wq_compile.kernels.merge import MERGE_BLOCKS
from wq_compile.kernels.quantize import QUANT_BLOCKS, lsq_blocks, quantize_blocks
from wq_compile.kernels.signatures import given_meta, is_split, value_fit_iters
from wq_compile.core.spec import KernelSpec

_UNROLL_STEPS = [0, 16, 64, 512]


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


def is_plain_tir(sch: s_tir.Schedule) -> bool:
    """True for a kernel whose loop structure is written in its TIR (the CPU fused kernel): nothing to schedule."""
    work_on_kernel(sch)
    names = [gv.name_hint for gv in sch.mod.get_global_vars()]
    func = sch.mod[names[0] if len(names) == 1 else "main"]
    return bool(func.attrs is not None and func.attrs.get(PLAIN_TIR_ATTR, False))


def default_schedule(sch: s_tir.Schedule, spec: KernelSpec) -> None:
    """Untuned baseline: parallel over the outer independent loops, nothing else (no vectorization).

    The CPU fused kernel (``make_kernel(spec, "llvm")``) carries its own structure; its knobs (token splits,
    P @ V channel tile, QK head passes) are factory parameters in ``spec.extra`` (see :class:`CpuKnobs`)."""
    if is_plain_tir(sch):
        return
    work_on_kernel(sch)
    if spec.kind in ("decode", "fused") or (spec.kind == "multi" and is_split(spec)):
        outer = sch.get_loops(sch.get_sblock("qscale"))[:2]
        sch.parallel(sch.fuse(*outer))
    elif spec.kind == "merge":
        for name in MERGE_BLOCKS:
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(loops[0], loops[1]))
    elif spec.kind == "quantize":
        names = quantize_blocks(spec)
        for name in names:
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(loops[0], loops[1]))
        _fit_vectors(sch, spec, names)
    else:  # pragma: no cover - KernelSpec validates kind
        raise ValueError(f"kind: no llvm schedule for {spec.kind!r}")




def _fit_vectors(sch: s_tir.Schedule, spec: KernelSpec, names: tuple[str, ...]) -> None:
    """The fits' blocks run over 16-channel vectors: the keys' token reductions with channels innermost (one vector
    accumulation per token instead of a strided serial sum per channel), their per-group maps vectorized; the
    values' normalized elements and per-lane partial errors too. Without it the key fit cost 12x the tuned min/max
    kernel (measured, 0.5B shapes)."""
    d = spec.head_dim
    lanes = math.gcd(d, 16)
    for name in (n for n in names if n == "v_u" or (n.startswith("v_p") and n[3:].isdigit())):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        if name == "v_u":  # par, t, channel: one vector of normalized values
            _co, ci = sch.split(loops[-1], [None, lanes])
            sch.vectorize(ci)
        else:  # par, t, g, lane, chunk: the chunk reduction outside, the lanes one vector
            sch.reorder(loops[-1], loops[-2])
            sch.vectorize(loops[-2])
            init = sch.decompose_reduction(blk, loops[-1])
            sch.vectorize(sch.get_loops(init)[-1])
    for name in (n for n in names if n not in QUANT_BLOCKS and n.startswith("k_")):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        if len(loops) == 4:  # par, g, d, t: a reduction over the group's tokens
            _par, _g, dd, t = loops
            do, di = sch.split(dd, [None, lanes])
            sch.reorder(do, t, di)
            sch.vectorize(di)
            init = sch.decompose_reduction(blk, t)
            sch.vectorize(sch.get_loops(init)[-1])
        else:  # par, g, d: a per-group map
            _do, di = sch.split(loops[-1], [None, lanes])
            sch.vectorize(di)
    vlanes = math.gcd(spec.quant(spec.bits[0]).v_group, 16)
    for name in lsq_blocks("v_", value_fit_iters(spec)):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        if len(loops) == 4:  # par, t, g, channel: a reduction over the group's channels, rfactored into lanes
            _jo, ji = sch.split(loops[-1], [None, vlanes])
            rf = sch.rfactor(ji, factor_axis=len(sch.get(blk).iter_vars) - 1)
            rf_loops = sch.get_loops(rf)  # par, t, g, jo, ji (ji now spatial): one vector of lanes per chunk
            sch.reorder(rf_loops[-2], rf_loops[-1])
            sch.vectorize(rf_loops[-1])
            init = sch.decompose_reduction(rf, rf_loops[-2])
            sch.vectorize(sch.get_loops(init)[-1])


# ----------------------------------------------------------------------------------------------------------------
# design spaces
# ----------------------------------------------------------------------------------------------------------------


def design_space(sch: s_tir.Schedule, spec: KernelSpec) -> None:
    """MetaSchedule ScheduleFn body: the structure of :func:`tuned_schedule` with every knob sampled."""
    if is_plain_tir(sch):
        return
    if spec.kind in ("decode", "fused"):
        _attention(sch, spec, None)
    elif spec.kind == "quantize":
        _quantize(sch, spec, None)
    else:
        default_schedule(sch, spec)


def tuned_schedule(sch: s_tir.Schedule, spec: KernelSpec, knobs: dict) -> None:
    """The design space with fixed knobs (hand-picked configurations, benchmarks)."""
    if spec.kind in ("decode", "fused"):
        _attention(sch, spec, knobs)
    elif spec.kind == "quantize":
        _quantize(sch, spec, knobs)
    else:
        default_schedule(sch, spec)


#: Hand-picked knobs for the attention and quantize kernels (good on AVX-512 / AVX2 hosts).
HAND_KNOBS = {"qk_tok": 2, "qk_g": 7, "pv_lanes": 16, "pv_tok": 4, "pv_g": 7, "unroll": 64,
              "q_unroll": 64, "q_kc": 16}  # q_*: the quantize kernels


def _pick(sch, knobs, key, candidates):
    """A sampled categorical (design space) or the fixed knob value (hand schedule)."""
    if knobs is None:
        return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))
    return knobs[key]


def _tile2(sch, knobs, loop, key, extent, max_inner, shared=None):
    """Split ``loop`` in two: a sampled perfect tile (design space) or the fixed inner factor.

    ``shared`` (design space): one draw per key for loops of the same extent, e.g. the same stage of every piece of
    a fused kernel, so the space does not grow with the number of pieces (a short tuning run would sample 4 pieces'
    tiles independently and rarely find a good combination).
    """
    if knobs is None:
        if shared is not None and (key, extent) in shared:
            return sch.split(loop, shared[(key, extent)])
        factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_inner)
        if shared is not None:
            shared[(key, extent)] = factors
        return sch.split(loop, factors)
    inner = min(knobs[key], extent)
    while extent % inner:
        inner //= 2
    return sch.split(loop, [None, inner])


def _head_tile(sch, knobs, loop, key, group_size, shared=None):
    """Split the query-head loop of a GQA group: the whole group is one register tile when it is small (<= 8
    heads: 7 for qwen2-0.5b / 7b); larger groups sample the tile (the design space stays small for short runs)."""
    if knobs is None and group_size > 8:
        return _tile2(sch, None, loop, key, group_size, 8, shared)
    want = group_size if knobs is None else min(knobs.get(key, group_size), group_size)
    inner = max(f for f in range(1, want + 1) if group_size % f == 0)
    return sch.split(loop, [None, inner])


def _lane_reduction(sch: s_tir.Schedule, block: s_tir.SBlock) -> None:
    """A reduction over tokens into 16 lanes (loops ``..., lane, token``): lanes innermost and vectorized, the
    serial part one short reduction per lane, the init vectorized too."""
    *_, ln, to = sch.get_loops(block)
    sch.reorder(to, ln)
    sch.vectorize(ln)
    init = sch.decompose_reduction(block, to)
    sch.vectorize(sch.get_loops(init)[-1])


def _attention(sch: s_tir.Schedule, spec: KernelSpec, knobs: dict | None) -> None:
    work_on_kernel(sch)
    d, c = spec.head_dim, spec.chunk
    outer = sch.get_loops(sch.get_sblock("qscale"))[:2]
    fused = sch.fuse(*outer)
    sch.parallel(fused)
    unroll = _pick(sch, knobs, "unroll", _UNROLL_STEPS)
    sch.annotate(fused, "meta_schedule.unroll_explicit", unroll)
    sch.vectorize(sch.get_loops(sch.get_sblock("qscale"))[-1])
    shared: dict = {}
    for p in pieces(spec):
        # dequant: inlined into its consumers (the K/V tiles are never materialized); the head tile of the score
        # and P @ V loops (unrolled, innermost above the vector lanes) lets LLVM compute each dequantized vector once
        # and reuse it from registers for every query head of the group.
        sch.compute_inline(sch.get_sblock(p.block("kdeq")))
        sch.compute_inline(sch.get_sblock(p.block("vdeq")))
        # scores: lanes of partial dot products innermost (vector); a tile of tokens x query heads shares each
        # q / K load (register tile of ti * gi accumulators).
        gs = spec.group_size
        qk = sch.get_sblock(p.block("qk_part"))
        _b, _c, g, t, ln, do = sch.get_loops(qk)
        go, gi = _head_tile(sch, knobs, g, "qk_g", gs, shared)
        to, ti = _tile2(sch, knobs, t, "qk_tok", c, 4, shared)
        sch.reorder(go, to, do, ti, gi, ln)
        sch.vectorize(ln)
        sch.unroll(gi)
        sch.unroll(ti)
        sch.decompose_reduction(qk, do)
        sch.vectorize(sch.get_loops(sch.get_sblock(p.block("qk_fold")))[-1])
        # chunk max: token lanes innermost (vector), the serial part is one short max per lane.
        _lane_reduction(sch, sch.get_sblock(p.block("cmax_part")))
        # softmax over the chunk (and the V scale folded into P): contiguous in tokens.
        sch.vectorize(sch.get_loops(sch.get_sblock(p.block("prob")))[-1])
        if p.quantized:
            sch.vectorize(sch.get_loops(sch.get_sblock(p.block("vscale")))[-1])
            _lane_reduction(sch, sch.get_sblock(p.block("vzero_part")))
        # P @ V: channel lanes innermost, query heads and tokens around them (accumulators stay in registers).
        pv = sch.get_sblock(p.block("pv"))
        _b, _c, g, dd, t = sch.get_loops(pv)
        go, gi = _head_tile(sch, knobs, g, "pv_g", gs, shared)
        # one 16-lane vector of channels (fixed in the space: narrower measured 15% slower at 8k tokens but within
        # tuning noise at the tuning sizes; wider stops the inlined dequant from vectorizing)
        lanes = knobs["pv_lanes"] if knobs is not None else math.gcd(d, 16)
        do, di = _tile2(sch, {"pv_lanes": lanes}, dd, "pv_lanes", d, 16)
        to, ti = _tile2(sch, knobs, t, "pv_tok", c, 8, shared)
        sch.reorder(go, do, to, ti, gi, di)
        sch.vectorize(di)
        sch.unroll(gi)
        sch.unroll(ti)
        sch.decompose_reduction(pv, to)
    sch.vectorize(sch.get_loops(sch.get_sblock("final_o"))[-1])


def _quantize(sch: s_tir.Schedule, spec: KernelSpec, knobs: dict | None) -> None:
    """Quantize: the default's parallel (sample, KV head) loops, plus sampled choices (the default has none, so a
    tuning run had one candidate): the unroll depth, and a channel vector tile for the per-channel key min/max
    (channels innermost below the token reduction: one vector min/max per token instead of a serial one per
    channel) and for the per-channel key scale / zero (shared draws). The recode form (given scale/zero: only the
    two pack blocks) has no choice beyond the unroll depth."""
    default_schedule(sch, spec)
    unroll = _pick(sch, knobs, "q_unroll", _UNROLL_STEPS)
    if given_meta(spec):
        for name in quantize_blocks(spec):
            sch.annotate(sch.get_loops(sch.get_sblock(name))[0], "meta_schedule.unroll_explicit", unroll)
        return
    d = spec.head_dim
    shared: dict = {}
    for name in ("k_min", "k_max"):
        blk = sch.get_sblock(name)
        par, _g, dd, t = sch.get_loops(blk)
        sch.annotate(par, "meta_schedule.unroll_explicit", unroll)
        do, di = _tile2(sch, knobs, dd, "q_kc", d, 16, shared)
        sch.reorder(do, t, di)
        sch.vectorize(di)
        sch.decompose_reduction(blk, t)
    for name in ("k_zero", "k_scale"):
        par, _g, dd = sch.get_loops(sch.get_sblock(name))
        sch.annotate(par, "meta_schedule.unroll_explicit", unroll)
        _do, di = _tile2(sch, knobs, dd, "q_kc", d, 16, shared)
        sch.vectorize(di)
