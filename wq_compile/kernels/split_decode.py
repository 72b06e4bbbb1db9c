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

The staging blocks are plain copies: the llvm schedule inlines them, the CUDA schedule
(``wq_compile.schedules.cuda_split``) puts them in shared memory (one load per KV head for the whole query group)
with 16-byte global loads.
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


def build_split_attention(spec: KernelSpec) -> tirx.PrimFunc:
    """TIR of the split-KV decode (decode: one piece; fused: every piece) -> o_parts, lse_parts."""
    if not is_split(spec) or spec.kind not in ("decode", "fused"):
        raise ValueError(f"split: {spec.uri} is not a split-KV decode spec (use split_spec)")
    return build_split_rows(spec, spec.uri, signature(spec), decode_rows)


def build_split_rows(spec: KernelSpec, name: str, sig, rows_of: Callable[[KernelSpec, Any, Any], Rows]
                     ) -> tirx.PrimFunc:
    """The split-KV kernel body for ``spec`` (its group: the rows of a block), arguments ``sig``, rows mapped to
    the arguments by ``rows_of(spec, bufs, syms)``."""
    ps = pieces(spec)
    hq, hkv, d, c = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.chunk

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
                states = []
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
                        ngk = key_groups_per_chunk(spec)
                        st.update(
                            kd=alloc(f"{t}_kd", (bsz, hkv, c, d // per, per)),  # the dequantized K tile
                            ps=alloc(f"{t}_ps", (bsz, hq, c, d // qs.v_group)),
                            pz=alloc(f"{t}_pz", (bsz, hq, d // qs.v_group)),
                            koff=alloc(f"{t}_koff", (bsz, hkv), _I32),
                            ks=alloc(f"{t}_ks", (bsz, hkv, ngk, d, key_words(p.bits, spec.k_group)), _I32),
                            ksc=alloc(f"{t}_ksc", (bsz, hkv, ngk, d), "float16"),
                            kz=alloc(f"{t}_kz", (bsz, hkv, ngk, d), "float16"),
                            vs=alloc(f"{t}_vs", (bsz, hkv, c, d // per), _I32),
                        )
                    else:
                        st.update(vs=alloc(f"{t}_vs", (bsz, hkv, c, d), spec.tvm_dtype),
                                  nvalid=alloc(f"{t}_nvalid", (bsz, hkv), _I32),
                                  ks=alloc(f"{t}_ks", (bsz, hkv, c, d), spec.tvm_dtype))
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
                        _emit_body(spec, ps, bufs, states, state, qf, rows, sm_scale, syms, s, b, kh)
    return ib.get()


def _emit_body(spec, ps, bufs, states, state, qf, rows: Rows, sm_scale, syms, s, b, kh) -> None:
    """One (split, sample, KV head): scale the query group; the split's chunk loop, where each iteration runs the
    piece that owns the chunk (if it has a valid token) and one state update; the split's partial."""
    gs, d = spec.group_size, spec.head_dim
    with T.grid(gs, d) as (g, dd):
        with T.sblock("qscale"):
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            T.buffer_store(qf, rows.query(vb, vkh, vg, vd).astype(_F32) * sm_scale, [vb, h, vd])
    cps = states[0]["cps"]
    with T.serial(0, cps) as ci:
        IRBuilder.name("ci", ci)
        for p, st in zip(ps, states):
            # uniform per GPU thread block (b and s are block indices): every barrier inside is reached by all
            # threads or by none. Marked thread-invariant: TVM's barrier planner refuses to put __syncthreads under
            # any other condition ("Cannot insert syncs inside condition")
            with T.If(tirx.op.tvm_thread_invariant(_valid_chunk(spec, p, bufs, st, s * cps + ci, rows.sample(b)))):
                with T.Then():
                    _emit_chunk(spec, p, bufs, st, qf, syms, b, kh, s, ci, rows)
        _emit_state(spec, ps, bufs, states, state, syms, b, kh, s, ci, rows)
    _emit_final(spec, bufs, state, syms, b, kh, s, rows)


def _valid_chunk(spec, p: Piece, bufs, st, vc, b) -> tirx.PrimExpr:
    """Whether global chunk ``vc`` is a chunk of piece ``p`` with at least one valid token of sample ``b``."""
    chunk = vc - st["off"]
    lens = bufs["lens" if spec.kind == "decode" else f"{p.tag}_lens"]
    return tirx.all(chunk >= 0, chunk < st["nc"], chunk * spec.chunk < lens[b])


def _emit_state(spec, ps, bufs, states, state, syms, b, kh, s, ci, rows: Rows) -> None:
    """The split's online-softmax state after global chunk ``s * cps + ci``: a reduction over the loop (init
    ``m = NEG_BIG, l = 0, acc = 0``) reading the chunk statistics of the piece that owns the chunk. A chunk without
    valid tokens (past ``lens``, or past every piece) reads ``NEG_BIG, 0, 0``: an exact no-op (``alpha = 1``,
    ``acc * 1 + 0``). ``(m, l)`` and the factors are per query head (two exps per chunk, computed by every thread of
    the head), ``acc`` per channel."""
    gs, d = spec.group_size, spec.head_dim
    bsz, npart, cps = syms["B"], splits_extent(syms["P"]), states[0]["cps"]
    m, l_, al, be, acc = (state[k] for k in ("m", "l", "al", "be", "acc"))

    def pick(vs_, vci, vb, value, default):
        """``value(piece, st)`` of the piece owning the chunk, else ``default``."""
        out = default
        for p, st in reversed(list(zip(ps, states))):
            out = tirx.Select(_valid_chunk(spec, p, bufs, st, vs_ * cps + vci, rows.sample(vb)), value(p, st), out)
        return out

    def axes():
        vb, vkh = T.axis.spatial(bsz, b), T.axis.spatial(spec.num_kv_heads, kh)
        vs_ = T.axis.spatial(npart, s)
        vci = T.axis.reduce(cps, ci)
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


def _emit_chunk(spec, p: Piece, bufs, st, qf, syms, b, kh, s, ci, rows: Rows) -> None:
    """One chunk of a piece (at least one valid token): staging, scores, softmax, P @ V (the state update follows
    in :func:`_emit_state`)."""
    hkv, d, gs, c, kg = spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk, spec.k_group
    bsz = syms["B"]
    nc, cps, off = st["nc"], st["cps"], st["off"]
    pre = "" if spec.kind == "decode" else f"{p.tag}_"
    lens = bufs[f"{pre}lens"]
    kd, s_buf, p_buf = st.get("kd"), st["s"], st["p"]
    mc, lc, pvc = st["mc"], st["lc"], st["pvc"]
    per = spec.quant(p.bits).per_word if p.quantized else d
    smp = rows.sample  # the inputs' sample of a block batch index

    def limit(vb, vg):
        """Tokens of the piece row ``vg`` of block batch ``vb`` may see (the multi-token kernel's dense piece:
        the row's causal bound)."""
        if rows.dense_limit is not None and not p.quantized:
            return rows.dense_limit(vb, vg)
        return lens[smp(vb)]

    def rchunk(vc_):
        """The piece's chunk read for global chunk ``vc_`` (clamped: in bounds whenever the piece has a chunk)."""
        return tirx.min(tirx.max(vc_ - off, 0), nc - 1)

    def bk():
        return T.axis.spatial(bsz, b), T.axis.spatial(hkv, kh)

    def vchunk(ci):
        """The global chunk ``s * cps + ci``, from two iter vars bound to the loops themselves (bound to the sum,
        TVM canonicalizes the loop extent and the binding differently, and the binding is no longer affine)."""
        vs_ = T.axis.spatial(splits_extent(syms["P"]), s)
        return vs_ * cps + T.axis.spatial(cps, ci)

    # ---- staging: the chunk's codes (plain copies; shared memory on CUDA) ----
    if p.quantized:
        ngk, kw = key_groups_per_chunk(spec), key_words(p.bits, kg)
        kc, ksc, kze = bufs[f"{pre}k_codes"], bufs[f"{pre}k_scale"], bufs[f"{pre}k_zero"]
        gmax = syms[p.g_sym] - 1
        ks, ksc_s, kz_s, vs_buf, koff = st["ks"], st["ksc"], st["kz"], st["vs"], st["koff"]
        with T.sblock(p.block("koff")):
            vb, vkh = bk()
            vc_ = vchunk(ci)
            # token offset of the chunk inside its first key group
            T.buffer_store(koff, tirx.floormod(rchunk(vc_) * c, kg), [vb, vkh])
        with T.grid(ngk, d, kw) as (gi, dd_, w):
            with T.sblock(p.block("kload")):
                vb, vkh = bk()
                vc_ = vchunk(ci)
                vgi, vd, vw = T.axis.remap("SSS", [gi, dd_, w])
                grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                T.buffer_store(ks, kc[smp(vb), vkh, grp, vd, vw], [vb, vkh, vgi, vd, vw])
        for stage, src, dst in (("kscale", ksc, ksc_s), ("kzero", kze, kz_s)):
            with T.grid(ngk, d) as (gi, dd_):
                with T.sblock(p.block(stage)):
                    vb, vkh = bk()
                    vc_ = vchunk(ci)
                    vgi, vd = T.axis.remap("SS", [gi, dd_])
                    grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                    T.buffer_store(dst, src[smp(vb), vkh, grp, vd], [vb, vkh, vgi, vd])
        vcodes = bufs[f"{pre}v_codes"]
        with T.grid(c, d // per) as (t, w):
            with T.sblock(p.block("vload")):
                vb, vkh = bk()
                vc_ = vchunk(ci)
                vt, vw = T.axis.remap("SS", [t, w])
                T.buffer_store(vs_buf, vcodes[smp(vb), vkh, rchunk(vc_) * c + vt, vw], [vb, vkh, vt, vw])
        # ---- K dequant from the staged codes (token-packed, see wq_compile.core.quant) ----
        lb = key_lane_bytes(p.bits, kg)
        with T.grid(c, d // per, per) as (t, w, j):
            with T.sblock(p.block("kdeq")):
                vb, vkh = bk()
                vt, vw, vj = T.axis.remap("SSS", [t, w, j])
                dd = vw * per + vj
                slot0 = koff[vb, vkh] + vt
                gi, slot = tirx.floordiv(slot0, kg), tirx.floormod(slot0, kg)
                byte, field = tirx.floormod(slot, lb), tirx.floordiv(slot, lb)
                word = ks[vb, vkh, gi, dd, tirx.floordiv(byte, 4)]
                shifted = tirx.shift_right(word, tirx.floormod(byte, 4) * 8 + field * p.bits)
                code = tirx.bitwise_and(shifted, tirx.const((1 << p.bits) - 1, _I32)).astype(_F32)
                val = code * ksc_s[vb, vkh, gi, dd].astype(_F32) + kz_s[vb, vkh, gi, dd].astype(_F32)
                T.buffer_store(kd, val, [vb, vkh, vt, vw, vj])
    else:
        kin, vin = bufs[f"{pre}k"], bufs[f"{pre}v"]
        ks, vs_buf = st["ks"], st["vs"]
        for name, src, dst in (("kload", kin, ks), ("vload", vin, vs_buf)):
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block(name)):
                    vb, vkh = bk()
                    vc_ = vchunk(ci)
                    vt, vd = T.axis.remap("SS", [t, dd_])
                    T.buffer_store(dst, src[smp(vb), vkh, rchunk(vc_) * c + vt, vd], [vb, vkh, vt, vd])
        nvalid = st["nvalid"]
        with T.sblock(p.block("nvalid")):
            vb, vkh = bk()
            vc_ = vchunk(ci)
            T.buffer_store(nvalid, lens[smp(vb)] - (vc_ - off) * c, [vb, vkh])  # valid tokens of the chunk (may be <= 0)

    def key(vb, vkh, vt, vdd):
        """The dequantized key (quantized: the ``kdeq`` tile; dense: the staged element, read in place -- no block
        to inline: compute_inline under the chunk condition leaves the emptied block behind)."""
        if p.quantized:
            return kd[vb, vkh, vt, vdd // per, vdd % per]
        return st["ks"][vb, vkh, vt, vdd].astype(_F32)

    def value(vb, vkh, vt, vdd):
        """The value code (quantized: unpacked in place; its scale and zero point are folded into P) or the dense
        value. Not a tile: a second fp32 tile would take the 7B block past the 48 KB of static shared memory sm_80
        allows (58.5 KB), and unpacking costs no load (one code word serves ``per`` channels)."""
        if p.quantized:
            return _unpack(st["vs"][vb, vkh, vt, vdd // per], vdd % per, p.bits)
        # V past lens may be garbage (NaN): P = 0 there, but 0 * NaN is NaN
        return tirx.Select(vt < st["nvalid"][vb, vkh], st["vs"][vb, vkh, vt, vdd].astype(_F32), f32(0.0))

    # ---- scores: one reduction over head_dim per (query head, token) ----
    with T.grid(gs, c, d) as (g, t, dd_):
        with T.sblock(p.block("qk")):
            vb, vkh = bk()
            vg, vt, vdd = T.axis.remap("SSR", [g, t, dd_])
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(s_buf, f32(0.0), [vb, h, vt])
            val = s_buf[vb, h, vt] + qf[vb, h, vdd] * key(vb, vkh, vt, vdd)
            T.buffer_store(s_buf, val, [vb, h, vt])
    # ---- chunk max / probabilities / sum (virtual tokens past lens are masked): reductions over tokens ----
    with T.grid(gs, c) as (g, t):
        with T.sblock(p.block("cmax")):
            vb, vkh = bk()
            vc_ = vchunk(ci)
            vg, vt = T.axis.remap("SR", [g, t])
            h = vkh * gs + vg
            with T.init():  # the max reducer's identity (TVM matches it to lower to shuffles); >= 1 token
                T.buffer_store(mc, tirx.min_value(_F32), [vb, h])
            masked = tirx.Select((vc_ - off) * c + vt < limit(vb, vg), s_buf[vb, h, vt], f32(NEG_BIG))
            T.buffer_store(mc, tirx.max(mc[vb, h], masked), [vb, h])
    with T.grid(gs, c) as (g, t):
        with T.sblock(p.block("prob")):
            vb, vkh = bk()
            vc_ = vchunk(ci)
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
                vc_ = vchunk(ci)
                vg, vgi, vt = T.axis.remap("SSS", [g, vg_, t])
                h = vkh * gs + vg
                val = p_buf[vb, h, vt] * vsc[smp(vb), vkh, rchunk(vc_) * c + vt, vgi].astype(_F32)
                T.buffer_store(ps_buf, tirx.Select((vc_ - off) * c + vt < lens[smp(vb)], val, f32(0.0)), [vb, h, vt, vgi])
        with T.grid(gs, nvg, c) as (g, vg_, t):
            with T.sblock(p.block("vzero")):
                vb, vkh = bk()
                vc_ = vchunk(ci)
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
            vg, vdd, vt = T.axis.remap("SSR", [g, dd_, t])
            h = vkh * gs + vg
            with T.init():
                T.buffer_store(pvc, f32(0.0), [vb, h, vdd])
            weight = st["ps"][vb, h, vt, vdd // spec.v_group] if p.quantized else p_buf[vb, h, vt]
            T.buffer_store(pvc, pvc[vb, h, vdd] + weight * value(vb, vkh, vt, vdd), [vb, h, vdd])
