"""CUDA schedules: a hand default and a design space per kernel kind.

- split-KV decode (the decode loop's kernel on GPUs): :mod:`.cuda_split` (grid batch x KV heads x token splits,
  one warp per query head, warp-shuffle reductions, state in registers, 16-byte staging loads);
- split-KV multi-token kernel (several new tokens, :mod:`wq_compile.kernels.multi_token_split`): the split
  schedule on its row spec (a block's rows are (token, head) pairs instead of the GQA group, one warp each);
- merge of the split partials: one launch, one thread block per (batch, query head) (:func:`_merge`);
- the one-block-per-(batch, KV head) decode / fused kernels (a comparison on GPUs): every stage of a chunk spreads
  its spatial iterations over ``threadIdx.x``, reductions run per thread, dequantization is inlined;
- quantize: element-wise blocks over blockIdx.x / threadIdx.x.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from wq_compile.kernels.attention import pieces
from wq_compile.kernels.multi_token_split import rows_spec
from wq_compile.kernels.split_decode import is_split
from wq_compile.kernels.quantize import quantize_blocks
from wq_compile.core.spec import KernelSpec

from .cuda_split import DEFAULT_DL, DL_CANDIDATES, annotate_unroll, schedule_split
from .llvm import work_on_kernel

#: Threads per block of the element-wise kernels (merge, quantize) and the candidates of their design space.
DEFAULT_THREADS = 128
THREAD_CANDIDATES = [32, 64, 128, 256]
_UNROLL_STEPS = [0, 16, 64, 512]
#: The split kernel's: 512 unrolls a loop around a warp all-reduce, which TVM's LowerThreadAllreduce refuses.
_SPLIT_UNROLL_STEPS = [0, 16, 64]
#: int32 code words per thread and global load when staging a chunk (4 = 128-bit loads, the default).
_CODE_VECTORS = [1, 2, 4]
DEFAULT_CODE_VECTOR = 4


def attention_threads(spec: KernelSpec) -> list[int]:
    """Thread counts of the attention kernels: ``group_size * chunk / f``.

    Every stage's spatial extent (group x chunk, group x head_dim, group) is then a whole multiple of the thread
    count or below it, so no split leaves a serial loop around a predicated shared-memory update (ThreadSync cannot
    place a barrier inside a condition).
    """
    full = spec.group_size * spec.chunk
    out = [full // f for f in (1, 2, 4, 8) if full % f == 0 and full // f <= 1024 and (spec.head_dim * f) % spec.chunk == 0]
    if not out:
        raise ValueError(f"cuda: no thread count fits group {spec.group_size} x chunk {spec.chunk} in 1024 threads")
    return out


def target():
    """The CUDA target these schedules are written for (H100/H200 class, sm_90a)."""
    import tvm

    return tvm.target.Target("nvidia/nvidia-h100")


def postprocs() -> list:
    return [
        ms.postproc.RewriteUnboundBlock(max_threadblocks=1024),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteParallelVectorizeUnroll(),  # lowers the sampled unroll (annotate_unroll)
        ms.postproc.VerifyGPUCode(),
    ]


def mutator_probs() -> dict:
    return {ms.mutator.MutateThreadBinding(): 0.5, ms.mutator.MutateUnroll(): 0.5}


def default_schedule(sch: s_tir.Schedule, spec: KernelSpec) -> None:
    """Hand schedule: attention with ``attention_threads(spec)[0]`` threads per block, others ``DEFAULT_THREADS``."""
    if spec.kind in ("decode", "fused") and is_split(spec):
        work_on_kernel(sch)
        schedule_split(sch, spec, DEFAULT_DL, None, DEFAULT_CODE_VECTOR)
        return
    if spec.kind == "multi" and is_split(spec):  # the split body with (token, head) rows: the same schedule
        work_on_kernel(sch)
        schedule_split(sch, rows_spec(spec), DEFAULT_DL, None, DEFAULT_CODE_VECTOR)
        return
    if spec.kind in ("decode", "fused"):
        threads = attention_threads(spec)[0]
    else:
        threads = min(spec.head_dim, 1024) if spec.kind == "merge" else DEFAULT_THREADS
    _schedule(sch, spec, threads, None)


def design_space(sch: s_tir.Schedule, spec: KernelSpec) -> None:
    """ScheduleFn body: samples the thread count (one categorical feeding every threadIdx.x split) and unrolling."""
    if is_split(spec) and spec.kind in ("decode", "fused", "multi"):
        # the split between head_dim lanes and token lanes of a warp, unrolling, code vector width
        work_on_kernel(sch)
        spec = rows_spec(spec) if spec.kind == "multi" else spec
        dl = sch.sample_categorical(DL_CANDIDATES, [1.0 / len(DL_CANDIDATES)] * len(DL_CANDIDATES))
        unroll = sch.sample_categorical(_SPLIT_UNROLL_STEPS, [1.0 / len(_SPLIT_UNROLL_STEPS)] * len(_SPLIT_UNROLL_STEPS))
        vec = sch.sample_categorical(_CODE_VECTORS, [1.0 / len(_CODE_VECTORS)] * len(_CODE_VECTORS))
        schedule_split(sch, spec, dl, unroll, vec)
        return
    cands = attention_threads(spec) if spec.kind in ("decode", "fused") else THREAD_CANDIDATES
    threads = sch.sample_categorical(cands, [1.0 / len(cands)] * len(cands))
    unroll = sch.sample_categorical(_UNROLL_STEPS, [0.25] * 4)
    _schedule(sch, spec, threads, unroll)


def _bind_spatial(sch: s_tir.Schedule, block, n_outer: int, n_spatial: int, threads) -> None:
    """Fuse the ``n_spatial`` loops after the first ``n_outer`` ones and spread them over threadIdx.x."""
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops[n_outer : n_outer + n_spatial]) if n_spatial > 1 else loops[n_outer]
    _, tx = sch.split(fused, [None, threads])
    sch.bind(tx, "threadIdx.x")


def _schedule(sch: s_tir.Schedule, spec: KernelSpec, threads, unroll) -> None:
    work_on_kernel(sch)
    if spec.kind in ("decode", "fused"):
        _attention(sch, spec, threads, unroll)
    elif spec.kind == "merge":
        _merge(sch, threads)
    elif spec.kind == "quantize":
        _elementwise_blocks(sch, quantize_blocks(spec), threads)
    else:  # pragma: no cover
        raise ValueError(f"kind: no cuda schedule for {spec.kind!r}")


def _merge(sch: s_tir.Schedule, threads) -> None:
    """The merge in one launch: blockIdx.x = (batch, query head), channels and splits over threadIdx.x; the max and
    the weight sum over splits are cross-thread reductions (warp shuffles), the weights are recomputed by their two
    consumers (``merge_w`` inlined: nothing of symbolic size ``P`` lives in shared memory)."""
    cast = sch.get_sblock("merge_cast")
    b, h, d = sch.get_loops(cast)
    bx = sch.fuse(b, h)
    sch.bind(bx, "blockIdx.x")
    _, tx = sch.split(d, [None, threads])
    sch.bind(tx, "threadIdx.x")
    sch.compute_inline(sch.get_sblock("merge_w"))
    for name in ("merge_out", "merge_wsum", "merge_max"):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, bx, preserve_unit_loops=True)
        loops = sch.get_loops(blk)  # bx, unit loops of (b, h), then (d, p) or (p)
        # merge_out: channels over threads, splits serial; max / weight sum: splits over threads, then across them
        _, tx = sch.split(loops[-2] if name == "merge_out" else loops[-1], [None, threads])
        sch.bind(tx, "threadIdx.x")
        sch.set_scope(blk, 0, "local")


def _elementwise_blocks(sch: s_tir.Schedule, names, threads) -> None:
    """Each block: its spatial loops fused, split over blockIdx.x / threadIdx.x; reductions serial per thread."""
    for name in names:
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        iters = sch.get(blk).iter_vars
        n_spatial = sum(1 for iv in iters if iv.iter_type == 0)  # spatial iters come first in these kernels
        fused = sch.fuse(*loops[:n_spatial])
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")


def _attention(sch: s_tir.Schedule, spec: KernelSpec, threads, unroll) -> None:
    """The one-block-per-(batch, KV head) attention kernels (decode / fused without split)."""
    ps = pieces(spec)
    # blockIdx.x = (b, kv head); ``o`` = outer loops of every block (bx)
    outer = sch.get_loops(sch.get_sblock("qscale"))
    o = 1
    bx = sch.fuse(outer[0], outer[1])
    sch.bind(bx, "blockIdx.x")
    if unroll is not None:
        annotate_unroll(sch, unroll)
    qscale = sch.get_sblock("qscale")
    _bind_spatial(sch, qscale, o, 2, threads)
    sch.set_scope(qscale, 0, "shared")
    for p in ps:
        sch.compute_inline(sch.get_sblock(p.block("kdeq")))
        sch.compute_inline(sch.get_sblock(p.block("vdeq")))
        # scores: (g, t) over threads; the lane partial sums stay in registers of that thread
        qk = sch.get_sblock(p.block("qk"))
        loops = sch.get_loops(qk)  # bx, (by,) c, g, t, lane
        fused = sch.fuse(loops[o + 1], loops[o + 2])
        _, tx = sch.split(fused, [None, threads])
        sch.bind(tx, "threadIdx.x")
        fold = sch.get_sblock(p.block("qk_fold"))
        sch.compute_at(fold, tx, preserve_unit_loops=True)
        sch.set_scope(fold, 0, "local")
        part = sch.get_sblock(p.block("qk_part"))
        sch.compute_at(part, tx, preserve_unit_loops=True)
        sch.set_scope(part, 0, "local")
        sch.set_scope(qk, 0, "shared")
        stages = [("cmax_part", 2), ("cmax", 1), ("prob", 2), ("lsum", 1)]
        if p.quantized:
            stages += [("vscale", 3), ("vzero_part", 3), ("vzero", 2)]
        for stage, n_spatial in (*stages, ("pv", 2)):
            blk = sch.get_sblock(p.block(stage))
            _bind_spatial(sch, blk, o + 1, n_spatial, threads)
            sch.set_scope(blk, 0, "shared")
        # running state (m, l, acc[d]) of query head g lives in registers of thread g; the final blocks use the
        # same head -> thread map, so no shared-memory read-modify-write sits inside a thread predicate.
        state = sch.get_sblock(p.block("state"))
        _bind_spatial(sch, state, o + 1, 1, threads)
        for i in range(3):
            sch.set_scope(state, i, "local")
        if unroll is None:  # the design space leaves this to RewriteReductionBlock
            sch.decompose_reduction(state, sch.get_loops(state)[o])
    finals = ["final_o", "final_lse"] if len(ps) == 1 else ["final_m", *[p.block("final_w") for p in ps], "final_l", "final_o"]
    for name in finals:
        blk = sch.get_sblock(name)
        _bind_spatial(sch, blk, o, 1, threads)  # head -> thread; the channel loop of final_o stays serial
        if name == "final_m" or name == "final_l" or name == ps[0].block("final_w"):
            sch.set_scope(blk, 0, "local")
