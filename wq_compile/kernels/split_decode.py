"""Split-KV decode attention (flash-decoding): the work is ``batch x KV heads x P token splits``, ``P`` a run-time size.

A decode/fused :class:`~wq_compile.core.spec.KernelSpec` with ``("split", 1)`` in ``spec.extra`` (see :func:`split_spec`).
The chunks of all pieces form one sequence (piece ``i`` at ``[off_i, off_i + n_chunks_i)``, capacities in order);
split ``s`` of ``P`` takes its chunks ``[s * cps, (s + 1) * cps)`` with ``cps = ceil(sum_i n_chunks_i / P)``, so
``P`` can follow the tokens of all pieces together (:func:`choose_splits`), and writes its normalized partial
output and log-sum-exp; the ``merge`` kernel (:mod:`wq_compile.kernels.merge`) combines the ``P`` partials::

    o_parts [P, B, Hq, D] f32, lse_parts [P, B, Hq] f32   ->   merge   ->   out [B, Hq, D] dtype

One compiled module serves every length, batch and split count: ``P`` is the leading size of ``o_parts``.
A split loops over its ``cps`` global chunks; each iteration runs the stages of the piece that owns the chunk inside
one condition (the chunk lies in the piece and starts below ``lens[b]``; it depends only on the block's own ``b`` and
``s``, so it is uniform per GPU thread block and barriers stay uniform): empty buckets, tails of capacity and splits
past the valid tokens cost a comparison. Tokens past ``lens`` inside a chunk are masked. One online-softmax state per
split serves all pieces, updated once per iteration (an iteration without a valid chunk is an exact no-op); a split
with no valid token writes ``o = 0, lse = -inf`` (the merge weighs it 0).

Per split and piece (``t`` = token of the chunk, ``g`` = query head of the GQA group)::

    kload   Ks[gi, d, w]  = k_codes[min(g0 + gi, G - 1), d, w]     (the chunk's key groups; 128-bit copies on CUDA)
    kscale  Ksc[gi, d]    = k_scale[min(g0 + gi, G - 1), d]      (kzero: the same for k_zero)
    vload   Vs[t, w]      = v_codes[t0 + t, w]
    kdeq    Kd[t, d]      = dequant(staged codes)      (CUDA: once per KV head into shared fp32; llvm: inlined)
    qk      S[g, t]       = sum_d qf[g, d] * Kd[t, d]
    cmax    mc[g]         = max_t (t valid ? S : NEG_BIG);   prob P[g, t] = t valid ? exp(S - mc) : 0
    lsum    lc[g]         = sum_t P[g, t]
    vscale  Ps[g, t, vg]  = t valid ? P * v_scale : 0;      vzero pz[g, vg] = sum_t (t valid ? P * v_zero : 0)
    pv      pvc[g, d]     = sum_t Ps[g, t, d // v_group] * code(V[t, d])     (dense: P * V, V masked)
    hstate  (m, l)[g] <- online-softmax merge with the owning piece's (mc, lc); the chunk's alpha, beta [g]
    state   acc[g, d] <- acc * alpha + (pvc + pz)[owning piece] * beta        (hstate, state: once per iteration)
    final   o_parts[s] = acc / l per (g, d);  lse_parts[s] = m + log l per g

Each stage is one plain reduction or element-wise block, so a GPU schedule binds tokens or channels to lanes and
lowers every reduction to warp shuffles. ``hstate`` binds no lane: every thread of a query head computes the same
two exps per chunk and keeps ``(m, l)`` in its registers, so no lane reads another's state and no exp is repeated
per channel or per piece.

How the runtime calls it (plan once per step, run per layer)::

    spec = split_spec(KernelSpec("fused", (8, 4, 2, 16), head_dim, hq, hkv, k_group, v_group, dtype, chunk=32))
    P = choose_splits(sm_count, n_tokens, batch, hkv, spec.chunk)   # n_tokens: all pieces' capacities together
    o_parts = torch.empty(P, B, Hq, D, float32); lse_parts = torch.empty(P, B, Hq, float32)
    split_kernel(q, *pieces..., sm_scale, o_parts, lse_parts)      # grid: blockIdx.x = B * Hkv, blockIdx.y = P
    merge_kernel(o_parts, lse_parts, out)                           # make_kernel(merge_spec(spec)), P symbolic

Both modules serve every length, batch and ``P`` (``P <= MAX_SPLITS``). Capacities must be whole chunks (the
layout's 64-token capacities are whole 32-token chunks).

The staging blocks are plain copies: on llvm they fill the tiles (intermediate buffers), the CUDA schedule
(``wq_compile.schedules.cuda_split``) puts them in shared memory (one load per KV head for the whole query group)
with 16-byte global loads. ``stages`` (``spec.extra``, :func:`~wq_compile.kernels.signatures.split_stages`; default
2 at head_dim >= 128 without an int1 bucket, else 1) sets how many chunks' tiles a block holds: with 2 the chunk loop runs ``cps + 1`` iterations and iteration ``ci``
stages chunk ``ci`` into slot ``ci % 2`` before it computes chunk ``ci - 1`` from the other slot (:class:`Step`);
built for CUDA (``make_kernel(spec, "cuda")``) the copies are one ``cp.async`` commit group per iteration and the
compute waits for all groups but the newest, so chunk ``ci``'s loads are in flight while chunk ``ci - 1`` is
computed. The llvm build runs the same indexing with plain copies (the queue markers have no llvm lowering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.quant import key_lane_bytes, key_words
from ..core.spec import KernelSpec
from .attention import Piece, _unpack, pieces
from .common import NEG_BIG, alloc, declare_params, f32, fast_exp, signature_params
from .signatures import MAX_SPLITS, SPLIT_CHUNK, TUNING_SM_COUNT, choose_splits, is_split, merge_spec, split_spec
from .signatures import split_stages
from .signatures import split_signature as signature
from .gpu_limits import PREFERRED_BLOCKS_PER_SM, min_blocks_per_sm

__all__ = ["MAX_SPLITS", "MIN_BLOCKS_PER_SM", "SPLIT_CHUNK", "SPLIT_STAGES", "TUNING_SM_COUNT",
           "build_split_attention", "choose_splits", "is_split", "key_groups_per_chunk", "merge_spec", "signature",
           "split_spec", "splits_extent"]

_F32 = "float32"
_I32 = "int32"

#: Stages of one piece of the split kernel (block names ``f"{piece.tag}_{stage}"``); ``kload``/``kscale``/``kzero`` and the
#: V scale / zero stages exist for quantized pieces only.
SPLIT_STAGES = ("hinit", "ainit", "koff", "kload", "kscale", "kzero", "vload", "nvalid", "kdeq", "qk", "cmax", "prob",
                "lsum", "vscale", "vzero", "pv", "hstate", "state")


def key_groups_per_chunk(spec: KernelSpec) -> int:
    """Key groups a chunk of ``spec.chunk`` tokens can touch (a chunk need not start on a group boundary)."""
    c, kg = spec.chunk, spec.k_group
    return (c + kg - 2) // kg + 1


#: Resident blocks per SM the split kernel is compiled for at groups up to 8 (a launch-bounds hint on GPU targets;
#: larger groups ask for 1, :func:`~wq_compile.kernels.gpu_limits.min_blocks_per_sm`).
MIN_BLOCKS_PER_SM = PREFERRED_BLOCKS_PER_SM


def splits_extent(p: tirx.PrimExpr) -> tirx.PrimExpr:
    """The split loop's extent: ``min(P, MAX_SPLITS)``."""
    return tirx.min(p, MAX_SPLITS)


@dataclass(frozen=True)
class Tile:
    """A staging tile of one piece: ``shape`` after the block's ``(b, kh)``. One staging buffer: a buffer of its own
    (``(B, Hkv, *shape)``; TVM's storage rewrite gives the pieces' tiles the same memory, as the pieces run one after
    the other). Two: a region of a union buffer ``(B, Hkv, 2, elems)`` (codes, key scales / zero points, dense rows)
    that every piece's tiles of that kind share (row-major from ``base``, rows padded to ``strides``): chunk
    ``i + 1`` may belong to another piece than chunk ``i``, so no planner could see that only the two slots' pieces
    are live at once."""

    buf: Any
    shape: tuple
    base: int = 0
    strides: tuple | None = None  # None: a buffer of its own

    def at(self, vb: Any, vkh: Any, slot: Any, idx: list) -> tuple:
        if self.strides is None:
            return tuple(_at(slot, [vb, vkh, *idx]))
        return (vb, vkh, slot, self.base + sum((i * st for i, st in zip(idx[:-1], self.strides)), idx[-1]))


def _staging_shapes(spec: KernelSpec, p: Piece) -> dict[str, tuple[tuple, str, int, str]]:
    """The staging tiles of a piece's chunk: name -> (shape, dtype, padded row length of the last axis, union: the
    double-buffered buffer it lives in -- ``codes`` int32, ``scales`` fp16 key scales / zero points, ``dense`` the
    activation dtype; :func:`~wq_compile.kernels.gpu_limits.split_shared_bytes` models the same sizes)."""
    d, c = spec.head_dim, spec.chunk
    if p.quantized:
        ngk, per = key_groups_per_chunk(spec), spec.quant(p.bits).per_word
        kw = key_words(p.bits, spec.k_group)
        return {"ks": ((ngk, d, kw), _I32, kw, "codes"), "ksc": ((ngk, d), "float16", d, "scales"),
                "kz": ((ngk, d), "float16", d, "scales"), "vs": ((c, d // per), _I32, d // per, "codes")}
    # dense K rows padded by 16 bytes (no bank conflicts in the score loop; with one buffer the schedule pads them)
    pad = 16 // (4 if spec.dtype == "f32" else 2)
    return {"vs": ((c, d), spec.tvm_dtype, d, "dense"), "ks": ((c, d), spec.tvm_dtype, d + pad, "dense")}


def _tile_elems(shape: tuple, dtype: str, row: int) -> int:
    """Elements a staging tile takes in its union, rounded up to 16 bytes (the next tile's vector copies)."""
    align = 16 // (4 if dtype in (_I32, _F32) else 2)
    return -(-(_prod(shape[:-1]) * row) // align) * align


def staging_union_elems(spec: KernelSpec) -> dict[str, int]:
    """Elements per slot of each double-buffered union buffer (the largest piece's tiles in it)."""
    out: dict[str, int] = {}
    for p in pieces(spec):
        used: dict[str, int] = {}
        for shape, dtype, row, union in _staging_shapes(spec, p).values():
            used[union] = used.get(union, 0) + _tile_elems(shape, dtype, row)
        for union, n in used.items():
            out[union] = max(out.get(union, 0), n)
    return out


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _staging_tiles(spec: KernelSpec, p: Piece, bsz: Any, nst: int, unions: dict[str, Any]) -> dict[str, Tile]:
    """The staging tiles of piece ``p`` (one buffer each, or regions of the per-kind union buffers ``unions``,
    allocated by the first piece that asks)."""
    hkv, tiles = spec.num_kv_heads, {}
    if nst == 1:
        for name, (shape, dtype, _row, _union) in _staging_shapes(spec, p).items():
            tiles[name] = Tile(alloc(f"{p.tag}_{name}", (bsz, hkv, *shape), dtype), shape)
        return tiles
    base: dict[str, int] = {}
    for name, (shape, dtype, row, union) in _staging_shapes(spec, p).items():
        if union not in unions:
            unions[union] = alloc(f"stage_{union}", (bsz, hkv, nst, staging_union_elems(spec)[union]), dtype)
        strides = tuple(_prod(shape[i + 1:-1]) * row for i in range(len(shape) - 1))
        at = base.get(union, 0)
        tiles[name] = Tile(unions[union], shape, at, strides)
        base[union] = at + _tile_elems(shape, dtype, row)
    return tiles


@dataclass(frozen=True)
class Rows:
    """How the ``G`` query rows of a block map to the kernel's arguments. The split-KV decode: the block's batch
    index is the sample, row ``g`` the query head ``kh * G + g`` (:func:`decode_rows`). The multi-token kernel
    (:mod:`.multi_token_split`) runs the same body with (token, head) rows and a row-tile axis folded into the
    batch axis; only the query load, the dense piece's mask and the partials' index differ.

    ``batch``: the block-level batch extent; ``sample(vb)``: the inputs' sample of block batch ``vb``;
    ``query(vb, vkh, vg, vd)``: the row's query element; ``dense_limit(vb, vg)``: the row's bound on the dense
    piece's tokens (None: its ``lens``); ``out(vb, vkh, vg)``: the index of the row in ``o_parts`` / ``lse_parts``
    after the split axis."""

    batch: Any
    sample: Callable[[Any], Any]
    query: Callable[..., Any]
    dense_limit: Callable[[Any, Any], Any] | None
    out: Callable[..., tuple]


def decode_rows(spec: KernelSpec, bufs, syms) -> Rows:
    """One-token decode: a block's rows are the query heads of its KV head."""
    gs, q = spec.group_size, bufs["q"]
    return Rows(syms["B"], lambda vb: vb, lambda vb, vkh, vg, vd: q[vb, vkh * gs + vg, vd], None,
                lambda vb, vkh, vg: (vb, vkh * gs + vg))


def build_split_attention(spec: KernelSpec, async_copy: bool = False) -> tirx.PrimFunc:
    """TIR of the split-KV decode (decode: one piece; fused: every piece) -> o_parts, lse_parts. ``async_copy``
    (CUDA only; with two staging buffers): the staging copies marked as ``cp.async`` commit groups and the compute
    as waiting for all but the newest group; the markers have no llvm lowering, and without them the same
    double-buffered copies are plain loads."""
    if not is_split(spec) or spec.kind not in ("decode", "fused"):
        raise ValueError(f"split: {spec.uri} is not a split-KV decode spec (use split_spec)")
    return build_split_rows(spec, spec.uri, signature(spec), decode_rows, async_copy)


def build_split_rows(spec: KernelSpec, name: str, sig, rows_of: Callable[[KernelSpec, Any, Any], Rows],
                     async_copy: bool = False) -> tirx.PrimFunc:
    """The split-KV kernel body for ``spec`` (its group: the rows of a block), arguments ``sig``, rows mapped to
    the arguments by ``rows_of(spec, bufs, syms)``; ``async_copy``: see :func:`build_split_attention`."""
    ps = pieces(spec)
    hq, hkv, d, c = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.chunk
    nst = split_stages(spec)

    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            bufs, syms = declare_params(signature_params(sig))
            rows = rows_of(spec, bufs, syms)
            syms = {**syms, "B": rows.batch}  # every block-level batch axis below: the rows' batch
            bsz = rows.batch
            npart = splits_extent(syms["P"])
            sm_scale = bufs["sm_scale"]
            with T.sblock("root"):
                # intermediates hold one chunk of one (b, kv head); every split and chunk reuses them
                qf = alloc("qf", (bsz, hq, d))
                states, unions = [], {}
                # chunks of every piece, bounded so that virtual token indices provably fit in int32
                bound = ((2**31 - 1) // c - MAX_SPLITS) // len(ps)
                ncs = [tirx.min(tirx.floordiv(syms[p.n_sym], c), bound) for p in ps]
                total = sum(ncs[1:], ncs[0])
                # one chunk sequence over all pieces (piece i at chunks [off_i, off_i + nc_i)); split s takes
                # [s * cps, (s + 1) * cps) of it (all non-negative: no sign fix-up code)
                cps = tirx.truncdiv(total + npart - 1, npart)
                off = 0
                for p, nc in zip(ps, ncs):
                    t = p.tag
                    per = spec.quant(p.bits).per_word if p.quantized else d
                    st = {
                        "nc": nc, "cps": cps, "off": off,
                        "s": alloc(f"{t}_s", (bsz, hq, c)),
                        "p": alloc(f"{t}_p", (bsz, hq, c)),
                        "mc": alloc(f"{t}_mc", (bsz, hq)),
                        "lc": alloc(f"{t}_lc", (bsz, hq)),
                        "pvc": alloc(f"{t}_pvc", (bsz, hq, d)),
                    }
                    off = off + nc
                    if p.quantized:
                        qs = spec.quant(p.bits)
                        st.update(
                            kd=alloc(f"{t}_kd", (bsz, hkv, c, d // per, per)),  # the dequantized K tile
                            ps=alloc(f"{t}_ps", (bsz, hq, c, d // qs.v_group)),
                            pz=alloc(f"{t}_pz", (bsz, hq, d // qs.v_group)),
                            koff=alloc(f"{t}_koff", (bsz, hkv), _I32),
                        )
                    else:
                        st.update(nvalid=alloc(f"{t}_nvalid", (bsz, hkv), _I32))
                    st.update(_staging_tiles(spec, p, bsz, nst, unions))
                    states.append(st)
                # the split's running state, one for all pieces: (m, l) per query head, acc per channel; the
                # chunk's rescale factors alpha, beta
                state = {name: alloc(name, (bsz, hq)) for name in ("m", "l", "al", "be")}
                state["acc"] = alloc("acc", (bsz, hq, d))
                with T.grid(npart, bsz, hkv) as (s, b, kh):
                    IRBuilder.name_many(["s", "b", "kh"], [s, b, kh])
                    # GPU targets: __launch_bounds__(threads, MIN_BLOCKS_PER_SM) (with the thread count alone, ptxas
                    # of CUDA 13 holds this kernel at 72 registers and spills); CPU targets ignore it
                    with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks_per_sm(spec.group_size)):
                        _emit_body(spec, ps, bufs, states, state, qf, rows, sm_scale, syms, s, b, kh, async_copy)
    return ib.get()


@dataclass(frozen=True)
class Step:
    """Which chunk the blocks of one chunk-loop phase work on. The loop ``ci`` runs ``ext`` iterations; a block of
    the phase reads global chunk ``s * cps + ci - lag``. One staging buffer (``stages == 1``): ``ext = cps``,
    staging and compute of chunk ``ci`` in the same iteration (``lag`` 0). Two (double buffering): ``ext = cps + 1``;
    iteration ``ci`` stages chunk ``ci`` (``lag`` 0, if ``ci < cps``) into slot ``ci % 2`` and computes chunk
    ``ci - 1`` (``lag`` 1, if ``ci >= 1``) from slot ``(ci - 1) % 2``, so chunk ``ci``'s copies are in flight
    while chunk ``ci - 1`` is computed."""

    ci: Any
    ext: Any
    lag: int
    stages: int

    def slot(self, vci: Any) -> Any:
        """The staging slot of iteration ``vci`` (None: one buffer, no slot axis)."""
        return None if self.stages == 1 else tirx.floormod(vci - self.lag, 2)

    def in_range(self, vci: Any) -> Any:
        """Whether iteration ``vci`` has a chunk of this phase (true except the double-buffered loop's ends)."""
        if self.stages == 1:
            return tirx.const(True, "bool")
        return vci >= 1 if self.lag else vci < self.ext - 1


def _at(slot: Any, idx: list) -> list:
    """Index of a staging tile: ``(b, kh, [slot,] ...)``."""
    return idx if slot is None else [*idx[:2], slot, *idx[2:]]


def _emit_body(spec, ps, bufs, states, state, qf, rows: Rows, sm_scale, syms, s, b, kh, async_copy: bool) -> None:
    """One (split, sample, KV head): scale the query group; the split's chunk loop, where each iteration runs the
    piece that owns the chunk (if it has a valid token) and one state update; the split's partial. Double-buffered
    (``stages`` 2, see :class:`Step`): each iteration stages the next chunk's piece into the other slot first --
    one commit group of ``cp.async`` copies on CUDA (``async_scope``, lowered by ``InjectPTXAsyncCopy`` when the
    build sets ``tirx.use_async_copy``; plain copies elsewhere) -- then waits for all but that group and computes
    the chunk staged one iteration earlier. Without ``async_copy`` (llvm) the same loop has no markers."""
    gs, d = spec.group_size, spec.head_dim
    with T.grid(gs, d) as (g, dd):
        with T.sblock("qscale"):
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            T.buffer_store(qf, rows.query(vb, vkh, vg, vd).astype(_F32) * sm_scale, [vb, h, vd])
    cps = states[0]["cps"]
    nst = split_stages(spec)
    ext = cps if nst == 1 else cps + 1
    with T.serial(0, ext) as ci:
        IRBuilder.name("ci", ci)
        stage, comp = Step(ci, ext, 0, nst), Step(ci, ext, nst - 1, nst)

        def pieces_if(step: Step, emit: Callable[..., None]) -> None:
            for p, st in zip(ps, states):
                # uniform per GPU thread block (b and s are block indices): every barrier inside is reached by all
                # threads or by none. Marked thread-invariant: TVM's barrier planner refuses to put __syncthreads
                # under any other condition ("Cannot insert syncs inside condition")
                vc = s * cps + ci - step.lag
                ok = tirx.all(step.in_range(ci), _valid_chunk(spec, p, bufs, st, vc, rows.sample(b)))
                with T.If(tirx.op.tvm_thread_invariant(ok)):
                    with T.Then():
                        emit(spec, p, bufs, st, qf, syms, b, kh, s, step, rows)

        if nst == 1:
            def both(*args):
                _emit_stage(*args)
                _emit_compute(*args)
            pieces_if(stage, both)
            _emit_state(spec, ps, bufs, states, state, syms, b, kh, s, comp, rows)
        elif not async_copy:
            pieces_if(stage, _emit_stage)
            pieces_if(comp, _emit_compute)
            _emit_state(spec, ps, bufs, states, state, syms, b, kh, s, comp, rows)
        else:
            with T.attr(0, "async_commit_queue_scope", 0):
                with T.attr(0, "async_scope", 1):
                    pieces_if(stage, _emit_stage)
            with T.attr(0, "async_wait_queue_scope", 0):
                with T.attr(0, "async_wait_inflight_count", 1):
                    pieces_if(comp, _emit_compute)
                    _emit_state(spec, ps, bufs, states, state, syms, b, kh, s, comp, rows)
    _emit_final(spec, bufs, state, syms, b, kh, s, rows)


def _valid_chunk(spec, p: Piece, bufs, st, vc, b) -> tirx.PrimExpr:
    """Whether global chunk ``vc`` is a chunk of piece ``p`` with at least one valid token of sample ``b``."""
    chunk = vc - st["off"]
    lens = bufs["lens" if spec.kind == "decode" else f"{p.tag}_lens"]
    return tirx.all(chunk >= 0, chunk < st["nc"], chunk * spec.chunk < lens[b])


def _emit_state(spec, ps, bufs, states, state, syms, b, kh, s, step: Step, rows: Rows) -> None:
    """The split's online-softmax state after global chunk ``s * cps + ci``: a reduction over the loop (init
    ``m = NEG_BIG, l = 0, acc = 0``) reading the chunk statistics of the piece that owns the chunk. A chunk without
    valid tokens (past ``lens``, or past every piece) reads ``NEG_BIG, 0, 0``: an exact no-op (``alpha = 1``,
    ``acc * 1 + 0``). ``(m, l)`` and the factors are per query head (two exps per chunk, computed by every thread of
    the head), ``acc`` per channel."""
    gs, d = spec.group_size, spec.head_dim
    bsz, npart, cps = syms["B"], splits_extent(syms["P"]), states[0]["cps"]
    m, l_, al, be, acc = (state[k] for k in ("m", "l", "al", "be", "acc"))

    ci = step.ci

    def pick(vs_, vci, vb, value, default):
        """``value(piece, st)`` of the piece owning the chunk, else ``default``."""
        out = default
        for p, st in reversed(list(zip(ps, states))):
            ok = tirx.all(step.in_range(vci), _valid_chunk(spec, p, bufs, st, vs_ * cps + vci - step.lag,
                                                           rows.sample(vb)))
            out = tirx.Select(ok, value(p, st), out)
        return out

    def axes():
        vb, vkh = T.axis.spatial(bsz, b), T.axis.spatial(spec.num_kv_heads, kh)
        vs_ = T.axis.spatial(npart, s)
        vci = T.axis.reduce(step.ext, ci)
        return vb, vkh, vs_, vci

    with T.serial(0, gs) as g:
        with T.sblock("hstate"):
            vb, vkh, vs_, vci = axes()
            vg = T.axis.spatial(gs, g)
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(m, f32(NEG_BIG), [vb, h])
                T.buffer_store(l_, f32(0.0), [vb, h])
            mc = pick(vs_, vci, vb, lambda p, st: st["mc"][vb, h], f32(NEG_BIG))
            lc = pick(vs_, vci, vb, lambda p, st: st["lc"][vb, h], f32(0.0))
            m_new = tirx.max(m[vb, h], mc)
            T.buffer_store(al, fast_exp(m[vb, h] - m_new), [vb, h])
            T.buffer_store(be, fast_exp(mc - m_new), [vb, h])
            T.buffer_store(l_, l_[vb, h] * al[vb, h] + lc * be[vb, h], [vb, h])
            T.buffer_store(m, m_new, [vb, h])

    with T.grid(gs, d) as (g, dd_):
        with T.sblock("state"):
            vb, vkh, vs_, vci = axes()
            vg, vdd = T.axis.remap("SS", [g, dd_])
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(acc, f32(0.0), [vb, h, vdd])

            def chunk_acc(p, st):
                val = st["pvc"][vb, h, vdd]
                return val + st["pz"][vb, h, vdd // spec.v_group] if p.quantized else val

            val = pick(vs_, vci, vb, chunk_acc, f32(0.0))
            T.buffer_store(acc, acc[vb, h, vdd] * al[vb, h] + val * be[vb, h], [vb, h, vdd])


def _emit_final(spec, bufs, state, syms, b, kh, s, rows: Rows) -> None:
    """The split's partial: ``o = acc / l`` per channel, ``lse = m + log(l)`` per query head; a split without a
    valid token (``l = 0``) writes ``o = 0, lse = -inf`` (the merge weighs it 0)."""
    gs, d = spec.group_size, spec.head_dim
    o_parts, lse_parts = bufs["o_parts"], bufs["lse_parts"]
    npart = splits_extent(syms["P"])
    m, l_, acc = state["m"], state["l"], state["acc"]
    with T.grid(gs, d) as (g, dd):
        with T.sblock("final_o"):
            vs_ = T.axis.spatial(npart, s)
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            T.buffer_store(o_parts, tirx.Select(l_[vb, h] > f32(0.0), acc[vb, h, vd] / l_[vb, h], f32(0.0)),
                           [vs_, *rows.out(vb, vkh, vg), vd])
    with T.serial(0, gs) as g:
        with T.sblock("final_lse"):
            vs_ = T.axis.spatial(npart, s)
            vb, vkh, vg = T.axis.remap("SSS", [b, kh, g])
            h = vkh * gs + vg
            val = tirx.Select(l_[vb, h] > f32(0.0), m[vb, h] + tirx.log(l_[vb, h]), f32(float("-inf")))
            T.buffer_store(lse_parts, val, [vs_, *rows.out(vb, vkh, vg)])


class _Chunk:
    """What the staging and compute blocks of one piece's chunk share: the piece's sizes and index helpers."""

    def __init__(self, spec, p: Piece, bufs, st, syms, b, kh, s, step: Step, rows: Rows) -> None:
        self.spec, self.p, self.bufs, self.st, self.syms, self.rows = spec, p, bufs, st, syms, rows
        self.b, self.kh, self.s, self.step = b, kh, s, step
        self.pre = "" if spec.kind == "decode" else f"{p.tag}_"
        self.per = spec.quant(p.bits).per_word if p.quantized else spec.head_dim

    def rchunk(self, vc_):
        """The piece's chunk read for global chunk ``vc_`` (clamped: in bounds whenever the piece has a chunk)."""
        return tirx.min(tirx.max(vc_ - self.st["off"], 0), self.st["nc"] - 1)

    def bk(self):
        return T.axis.spatial(self.syms["B"], self.b), T.axis.spatial(self.spec.num_kv_heads, self.kh)

    def vchunk(self):
        """(the global chunk ``s * cps + ci - lag``, the staging slot), from iter vars bound to the loops themselves
        (bound to the sum, TVM canonicalizes the loop extent and the binding differently, and the binding is no
        longer affine)."""
        vs_ = T.axis.spatial(splits_extent(self.syms["P"]), self.s)
        vci = T.axis.spatial(self.step.ext, self.step.ci)
        return vs_ * self.st["cps"] + vci - self.step.lag, self.step.slot(vci)

    def slot(self):
        """The staging slot a reading block uses (None with one buffer: no iter vars added to the block)."""
        return None if self.step.stages == 1 else self.vchunk()[1]


def _emit_stage(spec, p: Piece, bufs, st, qf, syms, b, kh, s, step: Step, rows: Rows) -> None:
    """Staging of one chunk of a piece (at least one valid token): its codes (scales, zero points; dense: K and V
    rows) copied into the staging tiles' slot of the chunk (plain copies; shared memory on CUDA)."""
    d, c, kg = spec.head_dim, spec.chunk, spec.k_group
    ch = _Chunk(spec, p, bufs, st, syms, b, kh, s, step, rows)
    pre, per, smp, bk, rchunk = ch.pre, ch.per, rows.sample, ch.bk, ch.rchunk
    if p.quantized:
        ngk, kw = key_groups_per_chunk(spec), key_words(p.bits, kg)
        kc, ksc, kze = bufs[f"{pre}k_codes"], bufs[f"{pre}k_scale"], bufs[f"{pre}k_zero"]
        gmax = syms[p.g_sym] - 1
        ks, ksc_s, kz_s, vs_buf = st["ks"], st["ksc"], st["kz"], st["vs"]
        with T.grid(ngk, d, kw) as (gi, dd_, w):
            with T.sblock(p.block("kload")):
                vb, vkh = bk()
                vc_, slot = ch.vchunk()
                vgi, vd, vw = T.axis.remap("SSS", [gi, dd_, w])
                grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                T.buffer_store(ks.buf, kc[smp(vb), vkh, grp, vd, vw], ks.at(vb, vkh, slot, [vgi, vd, vw]))
        for stage, src, dst in (("kscale", ksc, ksc_s), ("kzero", kze, kz_s)):
            with T.grid(ngk, d) as (gi, dd_):
                with T.sblock(p.block(stage)):
                    vb, vkh = bk()
                    vc_, slot = ch.vchunk()
                    vgi, vd = T.axis.remap("SS", [gi, dd_])
                    grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                    T.buffer_store(dst.buf, src[smp(vb), vkh, grp, vd], dst.at(vb, vkh, slot, [vgi, vd]))
        vcodes = bufs[f"{pre}v_codes"]
        with T.grid(c, d // per) as (t, w):
            with T.sblock(p.block("vload")):
                vb, vkh = bk()
                vc_, slot = ch.vchunk()
                vt, vw = T.axis.remap("SS", [t, w])
                T.buffer_store(vs_buf.buf, vcodes[smp(vb), vkh, rchunk(vc_) * c + vt, vw],
                               vs_buf.at(vb, vkh, slot, [vt, vw]))
    else:
        kin, vin = bufs[f"{pre}k"], bufs[f"{pre}v"]
        for name, src, dst in (("kload", kin, st["ks"]), ("vload", vin, st["vs"])):
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block(name)):
                    vb, vkh = bk()
                    vc_, slot = ch.vchunk()
                    vt, vd = T.axis.remap("SS", [t, dd_])
                    T.buffer_store(dst.buf, src[smp(vb), vkh, rchunk(vc_) * c + vt, vd], dst.at(vb, vkh, slot, [vt, vd]))


def _emit_compute(spec, p: Piece, bufs, st, qf, syms, b, kh, s, step: Step, rows: Rows) -> None:
    """One staged chunk of a piece (at least one valid token): K dequant, scores, softmax, P @ V (the state update
    follows in :func:`_emit_state`)."""
    d, gs, c, kg = spec.head_dim, spec.group_size, spec.chunk, spec.k_group
    off = st["off"]
    ch = _Chunk(spec, p, bufs, st, syms, b, kh, s, step, rows)
    pre, per, smp, bk, rchunk = ch.pre, ch.per, rows.sample, ch.bk, ch.rchunk
    lens = bufs[f"{pre}lens"]
    kd, s_buf, p_buf = st.get("kd"), st["s"], st["p"]
    mc, lc, pvc = st["mc"], st["lc"], st["pvc"]

    def limit(vb, vg):
        """Tokens of the piece row ``vg`` of block batch ``vb`` may see (the multi-token kernel's dense piece:
        the row's causal bound)."""
        if rows.dense_limit is not None and not p.quantized:
            return rows.dense_limit(vb, vg)
        return lens[smp(vb)]

    def vchunk():
        return ch.vchunk()[0]

    if p.quantized:
        ks, ksc_s, kz_s, koff = st["ks"], st["ksc"], st["kz"], st["koff"]
        with T.sblock(p.block("koff")):
            vb, vkh = bk()
            vc_ = vchunk()
            # token offset of the chunk inside its first key group
            T.buffer_store(koff, tirx.floormod(rchunk(vc_) * c, kg), [vb, vkh])
        # ---- K dequant from the staged codes (token-packed, see wq_compile.core.quant) ----
        lb = key_lane_bytes(p.bits, kg)
        with T.grid(c, d // per, per) as (t, w, j):
            with T.sblock(p.block("kdeq")):
                vb, vkh = bk()
                sl = ch.slot()
                vt, vw, vj = T.axis.remap("SSS", [t, w, j])
                dd = vw * per + vj
                slot0 = koff[vb, vkh] + vt
                gi, slot = tirx.floordiv(slot0, kg), tirx.floormod(slot0, kg)
                byte, field = tirx.floormod(slot, lb), tirx.floordiv(slot, lb)
                word = ks.buf[ks.at(vb, vkh, sl, [gi, dd, tirx.floordiv(byte, 4)])]
                shifted = tirx.shift_right(word, tirx.floormod(byte, 4) * 8 + field * p.bits)
                code = tirx.bitwise_and(shifted, tirx.const((1 << p.bits) - 1, _I32)).astype(_F32)
                sc, ze = ksc_s.buf[ksc_s.at(vb, vkh, sl, [gi, dd])], kz_s.buf[kz_s.at(vb, vkh, sl, [gi, dd])]
                val = code * sc.astype(_F32) + ze.astype(_F32)
                T.buffer_store(kd, val, [vb, vkh, vt, vw, vj])
    else:
        nvalid = st["nvalid"]
        with T.sblock(p.block("nvalid")):
            vb, vkh = bk()
            vc_ = vchunk()
            T.buffer_store(nvalid, lens[smp(vb)] - (vc_ - off) * c, [vb, vkh])  # valid tokens of the chunk (may be <= 0)

    def key(vb, vkh, vt, vdd, slot):
        """The dequantized key (quantized: the ``kdeq`` tile; dense: the staged element, read in place -- no block
        to inline: compute_inline under the chunk condition leaves the emptied block behind)."""
        if p.quantized:
            return kd[vb, vkh, vt, vdd // per, vdd % per]
        return st["ks"].buf[st["ks"].at(vb, vkh, slot, [vt, vdd])].astype(_F32)

    def value(vb, vkh, vt, vdd, slot):
        """The value code (quantized: unpacked in place; its scale and zero point are folded into P) or the dense
        value. Not a tile: a second fp32 tile would take the 7B block past the 48 KB of static shared memory sm_80
        allows (58.5 KB), and unpacking costs no load (one code word serves ``per`` channels)."""
        if p.quantized:
            return _unpack(st["vs"].buf[st["vs"].at(vb, vkh, slot, [vt, vdd // per])], vdd % per, p.bits)
        # V past lens may be garbage (NaN): P = 0 there, but 0 * NaN is NaN
        return tirx.Select(vt < st["nvalid"][vb, vkh], st["vs"].buf[st["vs"].at(vb, vkh, slot, [vt, vdd])].astype(_F32),
                           f32(0.0))

    # ---- scores: one reduction over head_dim per (query head, token) ----
    with T.grid(gs, c, d) as (g, t, dd_):
        with T.sblock(p.block("qk")):
            vb, vkh = bk()
            slot = None if p.quantized else ch.slot()
            vg, vt, vdd = T.axis.remap("SSR", [g, t, dd_])
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(s_buf, f32(0.0), [vb, h, vt])
            val = s_buf[vb, h, vt] + qf[vb, h, vdd] * key(vb, vkh, vt, vdd, slot)
            T.buffer_store(s_buf, val, [vb, h, vt])
    # ---- chunk max / probabilities / sum (virtual tokens past lens are masked): reductions over tokens ----
    with T.grid(gs, c) as (g, t):
        with T.sblock(p.block("cmax")):
            vb, vkh = bk()
            vc_ = vchunk()
            vg, vt = T.axis.remap("SR", [g, t])
            h = vkh * gs + vg
            with T.init():  # the max reducer's identity (TVM matches it to lower to shuffles); >= 1 token
                T.buffer_store(mc, tirx.min_value(_F32), [vb, h])
            masked = tirx.Select((vc_ - off) * c + vt < limit(vb, vg), s_buf[vb, h, vt], f32(NEG_BIG))
            T.buffer_store(mc, tirx.max(mc[vb, h], masked), [vb, h])
    with T.grid(gs, c) as (g, t):
        with T.sblock(p.block("prob")):
            vb, vkh = bk()
            vc_ = vchunk()
            vg, vt = T.axis.remap("SS", [g, t])
            h = vkh * gs + vg
            val = tirx.Select((vc_ - off) * c + vt < limit(vb, vg), fast_exp(s_buf[vb, h, vt] - mc[vb, h]),
                              f32(0.0))
            T.buffer_store(p_buf, val, [vb, h, vt])
    with T.grid(gs, c) as (g, t):
        with T.sblock(p.block("lsum")):
            vb, vkh = bk()
            vg, vt = T.axis.remap("SR", [g, t])
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(lc, f32(0.0), [vb, h])
            T.buffer_store(lc, lc[vb, h] + p_buf[vb, h, vt], [vb, h])
    # ---- V (quantized: scale / zero folded into P, as in the attention kernel) ----
    if p.quantized:
        qs = spec.quant(p.bits)
        nvg = d // qs.v_group
        ps_buf, pz_buf = st["ps"], st["pz"]
        vsc, vze = bufs[f"{pre}v_scale"], bufs[f"{pre}v_zero"]
        with T.grid(gs, nvg, c) as (g, vg_, t):
            with T.sblock(p.block("vscale")):
                vb, vkh = bk()
                vc_ = vchunk()
                vg, vgi, vt = T.axis.remap("SSS", [g, vg_, t])
                h = vkh * gs + vg
                val = p_buf[vb, h, vt] * vsc[smp(vb), vkh, rchunk(vc_) * c + vt, vgi].astype(_F32)
                T.buffer_store(ps_buf, tirx.Select((vc_ - off) * c + vt < lens[smp(vb)], val, f32(0.0)), [vb, h, vt, vgi])
        with T.grid(gs, nvg, c) as (g, vg_, t):
            with T.sblock(p.block("vzero")):
                vb, vkh = bk()
                vc_ = vchunk()
                vg, vgi, vt = T.axis.remap("SSR", [g, vg_, t])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(pz_buf, f32(0.0), [vb, h, vgi])
                z = vze[smp(vb), vkh, rchunk(vc_) * c + vt, vgi].astype(_F32)
                val = tirx.Select((vc_ - off) * c + vt < lens[smp(vb)], p_buf[vb, h, vt] * z, f32(0.0))
                T.buffer_store(pz_buf, pz_buf[vb, h, vgi] + val, [vb, h, vgi])
    # ---- P @ V of the chunk ----
    with T.grid(gs, d, c) as (g, dd_, t):
        with T.sblock(p.block("pv")):
            vb, vkh = bk()
            slot = ch.slot()
            vg, vdd, vt = T.axis.remap("SSR", [g, dd_, t])
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(pvc, f32(0.0), [vb, h, vdd])
            weight = st["ps"][vb, h, vt, vdd // spec.v_group] if p.quantized else p_buf[vb, h, vt]
            T.buffer_store(pvc, pvc[vb, h, vdd] + weight * value(vb, vkh, vt, vdd, slot), [vb, h, vdd])
