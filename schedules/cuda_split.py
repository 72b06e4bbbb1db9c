"""CUDA schedule of the split-KV decode kernel (:mod:`wq_compile.kernels.split_decode`).

Grid: ``blockIdx.x`` = (batch, KV head), ``blockIdx.y`` = token split. Block: one warp per query head of the GQA
group, ``blockDim = (dl, 32 / dl, group)``; a warp's 32 lanes are ``lane = ty * dl + tx``:

- scores: lanes split ``32 / dl`` tokens (``threadIdx.y``) x ``dl`` head_dim slices (``threadIdx.x``); each lane
  sums ``head_dim / dl`` products, the ``dl`` slices are added with warp shuffles (``__shfl_*`` of width ``dl``);
- chunk max, sum and the value zero-point term: one token per lane, reduced across the warp with shuffles;
- P @ V, the running state (m, l, acc) and the split's output: each lane owns ``head_dim / 32`` consecutive
  channels, kept in registers for the whole chunk loop;
- staging: the chunk's key/value codes (and key scale / zero, dense K/V) are copied once per KV head for the whole
  query group into shared memory with 16-byte (``int4``/``uint4``) loads, dequantized in registers by the consumers.

``dl`` (head_dim lanes of the score reduction) is the knob of the split between tokens and head_dim; the group is
always one warp per query head.
"""

from __future__ import annotations

from tvm import s_tir

from wq_compile.kernels.attention import pieces
from wq_compile.kernels.gpu_limits import check_split_spec
from wq_compile.core.spec import KernelSpec

WARP = 32
#: head_dim lanes of the score reduction (threadIdx.x extent); tokens take the other 32 / dl lanes of the warp.
DL_CANDIDATES = [1, 2, 4, 8]
DEFAULT_DL = 4


def annotate_unroll(sch: s_tir.Schedule, unroll) -> None:
    """Ask for unrolling of up to ``unroll`` steps below the kernel's outer loops: an annotation on the root block,
    which ``RewriteParallelVectorizeUnroll`` (in :func:`wq_compile.schedules.cuda.postprocs`) lowers to
    ``pragma_auto_unroll_max_step`` on the outer loop of every block. (On a loop the same annotation was never read:
    unroll 0 and 512 gave byte-identical CUDA.)"""
    sch.annotate(sch.get_sblock("root"), "meta_schedule.unroll_explicit", unroll)


def split_threads(spec: KernelSpec) -> int:
    """Threads per block of the split kernel: one warp per query head of the group."""
    return WARP * spec.group_size


def check(spec: KernelSpec) -> None:
    if spec.chunk % WARP or spec.head_dim % WARP:
        raise ValueError(f"cuda split: chunk ({spec.chunk}) and head_dim ({spec.head_dim}) must be multiples of {WARP}")
    check_split_spec(spec)  # threads per block <= 1024 and registers enough (refused at decoder construction too)


def schedule_split(sch: s_tir.Schedule, spec: KernelSpec, dl, unroll, code_vec: int) -> None:
    """Schedule the split kernel with ``dl`` head_dim lanes (an int or a sampled categorical)."""
    check(spec)
    d, gs = spec.head_dim, spec.group_size

    def warp_lanes(loop):
        """Split a loop of 32 into (threadIdx.y, threadIdx.x) = (32 / dl, dl)."""
        y, x = sch.split(loop, [None, dl])
        sch.bind(y, "threadIdx.y")
        sch.bind(x, "threadIdx.x")
        return y, x

    def token_lanes(loop):
        """Split a token loop into (serial, threadIdx.y, threadIdx.x): one token per lane."""
        outer, lane = sch.split(loop, [None, WARP])
        return (outer, *warp_lanes(lane))

    def channel_lanes(loop):
        """Split a channel loop into (threadIdx.y, threadIdx.x, serial j): d / 32 consecutive channels per lane."""
        lane, j = sch.split(loop, [None, d // WARP])
        sch.unroll(j)  # constant register indices (a rolled loop over a local array puts it on the stack)
        return (*warp_lanes(lane), j)

    # grid: blockIdx.y = split, blockIdx.x = (b, kv head); every block's loops start with (by, bx)
    outer = sch.get_loops(sch.get_sblock("qscale"))
    sch.bind(outer[0], "blockIdx.y")
    bx = sch.fuse(outer[1], outer[2])
    sch.bind(bx, "blockIdx.x")
    if unroll is not None:
        annotate_unroll(sch, unroll)
    o = 2

    qscale = sch.get_sblock("qscale")
    _, _, g, dd = sch.get_loops(qscale)
    sch.bind(g, "threadIdx.z")
    channel_lanes(dd)
    sch.set_scope(qscale, 0, "shared")

    def stage_copy(name: str, vec: int, serial: int = 0) -> None:
        """A staging copy; its first ``serial`` loops (the key groups of a chunk) stay serial, so the clamped group
        index is one value per vector and the 16-byte load survives (fused in, TVM cannot prove it at head_dim
        128 with 2 words per channel)."""
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        fused = sch.fuse(*loops[o + 1 + serial:])
        # vector lanes split off first: a partial last step is then predicated on the vector index only, never on
        # the lane inside the vector (else TVM drops the 16-byte load)
        outer, lanes = sch.split(fused, [None, vec])
        sch.vectorize(lanes)
        _, z, lane = sch.split(outer, [None, gs, WARP])
        sch.bind(z, "threadIdx.z")
        warp_lanes(lane)
        sch.set_scope(blk, 0, "shared")

    for p in pieces(spec):
        vec16 = 8 if spec.dtype != "f32" else 4  # 16 bytes of the dense piece / key scale and zero
        stage_copy(p.block("kload"), code_vec if p.quantized else vec16, serial=1 if p.quantized else 0)
        if p.quantized:
            sch.set_scope(sch.get_sblock(p.block("koff")), 0, "local")
            stage_copy(p.block("kscale"), 8, serial=1)
            stage_copy(p.block("kzero"), 8, serial=1)
        stage_copy(p.block("vload"), code_vec if p.quantized else vec16)
        if not p.quantized:
            sch.set_scope(sch.get_sblock(p.block("nvalid")), 0, "local")
        sch.compute_inline(sch.get_sblock(p.block("kdeq")))
        sch.compute_inline(sch.get_sblock(p.block("vdeq")))

        # scores: (head -> z, token -> (serial, y), head_dim -> (x lanes, serial)); shuffles over the x lanes
        qk = sch.get_sblock(p.block("qk"))
        _, _, _, g, t, r = sch.get_loops(qk)
        t_c, t_w = sch.split(t, [None, WARP])
        t_o, t_y = sch.split(t_w, [dl, None])
        r_o, r_x = sch.split(r, [None, dl])
        sch.reorder(g, t_c, t_o, t_y, r_x, r_o)
        sch.bind(g, "threadIdx.z")
        sch.bind(t_y, "threadIdx.y")
        sch.bind(r_x, "threadIdx.x")
        sch.set_scope(qk, 0, "shared")

        # token reductions and element-wise stages: one token per lane (serial part innermost for reductions)
        reductions = ["cmax", "lsum"] + (["vzero"] if p.quantized else [])
        elementwise = ["prob"] + (["vscale"] if p.quantized else [])
        for stage in reductions + elementwise:
            blk = sch.get_sblock(p.block(stage))
            loops = sch.get_loops(blk)
            g, t = loops[o + 1], loops[-1]
            sch.bind(g, "threadIdx.z")
            t_o, y, x = token_lanes(t)
            if stage in reductions:
                sch.reorder(y, x, t_o)
                # the zero-point term per value group: with several groups a lane reads the one of its channels,
                # an index that depends on the lane: shared memory, not a local array (which would go to the stack)
                several = stage == "vzero" and spec.head_dim // spec.quant(p.bits).v_group > 1
                sch.set_scope(blk, 0, "shared" if several else "local")
            else:
                sch.set_scope(blk, 0, "shared")

        # P @ V: head -> z, channels -> lanes (d / 32 each), tokens serial; partial sums in registers
        pv = sch.get_sblock(p.block("pv"))
        _, _, _, g, dd, t = sch.get_loops(pv)
        sch.bind(g, "threadIdx.z")
        y, x, j = channel_lanes(dd)
        sch.reorder(y, x, t, j)
        sch.set_scope(pv, 0, "local")

        # running state: same (head, channel) -> thread map as P @ V and the final blocks: registers throughout
        state = sch.get_sblock(p.block("state"))
        loops = sch.get_loops(state)
        sch.bind(loops[o + 1], "threadIdx.z")
        channel_lanes(loops[o + 2])
        for i in range(3):
            sch.set_scope(state, i, "local")
        sch.decompose_reduction(state, sch.get_loops(state)[o])

    for name in ("final_o", "final_lse"):
        blk = sch.get_sblock(name)
        _, _, g, dd = sch.get_loops(blk)
        sch.bind(g, "threadIdx.z")
        channel_lanes(dd)
