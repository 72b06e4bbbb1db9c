"""CUDA schedule of the split-KV decode kernel (:mod:`wq_compile.kernels.split_decode`).

Grid: ``blockIdx.x`` = (batch, KV head), ``blockIdx.y`` = token split. Block: one warp per query head of the GQA
group, ``blockDim = (dl, 32 / dl, group)``; a warp's 32 lanes are ``lane = ty * dl + tx``:

- scores: lanes split ``32 / dl`` tokens (``threadIdx.y``) x ``dl`` head_dim slices (``threadIdx.x``); each lane
  sums ``head_dim / dl`` products, the ``dl`` slices are added with warp shuffles (``__shfl_*`` of width ``dl``);
- chunk max, sum and the value zero-point term: one token per lane, reduced across the warp with shuffles;
- P @ V, the accumulator and the split's output: each lane owns ``head_dim / 32`` consecutive channels, kept in
  registers for the whole chunk loop; the per-head softmax state ``(m, l)``, the chunk's rescale factors and the
  final weights are computed by every lane of the head's warp (two exps per chunk, not two per channel);
- staging: the chunk's key/value codes (and key scale / zero, dense K/V) are copied once per KV head for the whole
  query group into shared memory with 16-byte (``int4``/``uint4``) loads, dequantized in registers by the consumers;
  dense K rows padded by 16 bytes (no bank conflicts in the score loop). With two staging buffers (the kernel's
  ``stages``, default) the copies are ``cp.async`` of 16 bytes into the slot of the next chunk while the block
  computes the current one, and every tile is in dynamic shared memory (:func:`smem_scope`).

``dl`` (head_dim lanes of the score reduction) is the knob of the split between tokens and head_dim; the group is
always one warp per query head.
"""

from __future__ import annotations

from tvm import s_tir

from wq_compile.kernels.attention import pieces
from wq_compile.kernels.gpu_limits import check_split_spec
from wq_compile.kernels.signatures import split_stages
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


def smem_scope(spec: KernelSpec) -> str:
    """Storage scope of the split kernel's shared tiles: static with one staging buffer, dynamic with two."""
    return "shared.dyn" if split_stages(spec) > 1 else "shared"


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
    # two staging buffers take the block past the 48 KB of static shared memory: one dynamic allocation (TVM merges
    # the tiles, reusing memory by liveness, and passes its size at launch; its CUDA runtime raises the function's
    # dynamic shared memory limit when the size is 48 KB or more)
    smem = smem_scope(spec)

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
    sch.set_scope(qscale, 0, smem)

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
        sch.set_scope(blk, 0, smem)

    def dequant_tile(name: str, tokens_inner: bool, pad: int) -> None:
        """A dequant block (loops ``t, w, j``) computed into shared memory by every thread of the block."""
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        t, w, j = loops[-3:]
        if tokens_inner:
            sch.reorder(w, j, t)
        fused = sch.fuse(*(loops[-3:] if not tokens_inner else (w, j, t)))
        _, z, lane = sch.split(fused, [None, gs, WARP])
        sch.bind(z, "threadIdx.z")
        warp_lanes(lane)
        sch.set_scope(blk, 0, smem)
        if pad:  # buffer [B, Hkv, chunk, d / per, per]: the token axis' stride (d) becomes d + pad
            sch.storage_align(blk, 0, axis=2, factor=d, offset=pad)

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
        if p.quantized:
            # the K tile dequantized once per KV head into shared fp32 by the whole block, read by every query
            # head's warp (inlined, each of the group's warps unpacked every code again: 7x the ALU work and three
            # loads -- code, scale, zero -- per score FMA instead of one). Lanes over tokens (a channel's codes share
            # words), rows padded by 4 floats so the score loop's 32 / dl tokens x dl channels hit 32 banks. (Not
            # compute_inline: under the chunk condition it leaves the emptied block behind, and the build fails.)
            dequant_tile(p.block("kdeq"), tokens_inner=True, pad=4)

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
        sch.set_scope(qk, 0, smem)

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
                sch.set_scope(blk, 0, smem if several else "local")
            else:
                sch.set_scope(blk, 0, smem)

        # P @ V: head -> z, channels -> lanes (d / 32 each), tokens serial; partial sums in registers
        pv = sch.get_sblock(p.block("pv"))
        _, _, _, g, dd, t = sch.get_loops(pv)
        sch.bind(g, "threadIdx.z")
        y, x, j = channel_lanes(dd)
        sch.reorder(y, x, t, j)
        sch.set_scope(pv, 0, "local")

        if not p.quantized and split_stages(spec) == 1:
            # dense K rows padded by 16 bytes: a warp reads 32 / dl tokens x dl channels of a row, and a row stride of
            # d halves (256 B at d 128) put every token on the same banks (8-way conflicts); d + 8 spreads them (two
            # staging buffers: the factory's union tiles are padded already)
            sch.storage_align(sch.get_sblock(p.block("kload")), 0, axis=2, factor=d, offset=16 // _itemsize(spec))

    # the split's running state, one for all pieces: (m, l) and the chunk's rescale factors per query head, computed
    # by every lane of the head's warp (no lane binding: each keeps them in registers); acc per (head, channel) with
    # the P @ V map; both reductions over the chunk loop, initialised before it
    hstate = sch.get_sblock("hstate")
    sch.bind(sch.get_loops(hstate)[-1], "threadIdx.z")
    _local_writes(sch, hstate)
    sch.decompose_reduction(hstate, sch.get_loops(hstate)[o])
    state = sch.get_sblock("state")
    loops = sch.get_loops(state)
    sch.bind(loops[-2], "threadIdx.z")
    channel_lanes(loops[-1])
    _local_writes(sch, state)
    sch.decompose_reduction(state, sch.get_loops(state)[o])

    blk = sch.get_sblock("final_lse")  # per query head: every lane of its warp stores the same value
    sch.bind(sch.get_loops(blk)[-1], "threadIdx.z")
    blk = sch.get_sblock("final_o")
    _, _, g, dd = sch.get_loops(blk)
    sch.bind(g, "threadIdx.z")
    channel_lanes(dd)


def _itemsize(spec: KernelSpec) -> int:
    return 4 if spec.dtype == "f32" else 2


def _local_writes(sch: s_tir.Schedule, blk) -> None:
    """Every buffer ``blk`` writes in registers (``local``), unless an earlier block already put it there."""
    for i, region in enumerate(sch.get(blk).writes):
        if region.source.scope() != "local":
            sch.set_scope(blk, i, "local")
