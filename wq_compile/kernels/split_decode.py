"""Split-KV decode attention (flash-decoding): the work is ``batch x KV heads x P token splits``, ``P`` a run-time size.

A decode/fused :class:`~wq_compile.spec.KernelSpec` with ``("split", 1)`` in ``spec.extra`` (see :func:`split_spec`).
Split ``s`` of ``P`` handles the contiguous chunks ``[s * cps, (s + 1) * cps)`` of *every* piece
(``cps = ceil(n_chunks / P)`` per piece), merges its pieces' online-softmax states and writes its normalized partial
output and log-sum-exp; the ``merge`` kernel (:mod:`wq_compile.kernels.merge`) combines the ``P`` partials::

    o_parts [P, B, Hq, D] f32, lse_parts [P, B, Hq] f32   ->   merge   ->   out [B, Hq, D] dtype

One compiled module serves every length, batch and split count: ``P`` is the leading size of ``o_parts``
(choose it with :func:`choose_splits`). Chunks past the end of a piece (``s * cps + i >= n_chunks``) read the last
chunk again (clamped index, always in bounds) and are masked like tokens past ``lens`` (their virtual token index is
``>= N >= lens``): no predicate, every split runs ``cps`` iterations, and an all-masked chunk leaves the running
state unchanged. A split with no valid token writes ``o = 0, lse = -inf`` (the merge weighs it 0).

Per split and piece (``t`` = token of the chunk, ``g`` = query head of the GQA group)::

    kload   Ks[gi, d, w]  = k_codes[min(g0 + gi, G - 1), d, w]     (the chunk's key groups; 128-bit copies on CUDA)
    kmeta   Kz/Ksc[gi, d] = k_zero / k_scale[min(g0 + gi, G - 1), d]
    vload   Vs[t, w]      = v_codes[t0 + t, w]
    kdeq .. state          as in :mod:`wq_compile.kernels.attention` (scores, chunk max / sum, V scale / zero folded
                           into P, P @ V, running (m, l, acc)), reading the staged codes
    final   (m, l, acc) of the pieces -> o_parts[s], lse_parts[s]

The staging blocks are plain copies: the llvm schedule inlines them, the CUDA schedule puts them in shared memory
(one load per KV head for the whole query group) with vectorized global loads.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..quant import key_lane_bytes, key_words
from ..signature import ArgDesc, KernelSignature
from ..spec import KernelSpec
from .attention import Piece, _unpack, max_lanes, piece_args, pieces, qk_fold_lanes, qk_lanes
from .common import NEG_BIG, f32, fast_exp

_F32 = "float32"
_I32 = "int32"

#: Stages of one piece of the split kernel (block names ``f"{piece.tag}_{stage}"``); ``kload``/``kmeta`` and the
#: V scale / zero stages exist for quantized pieces only.
SPLIT_STAGES = ("kload", "kmeta", "vload", "kdeq", "qk_part", "qk_fold", "qk", "cmax_part", "cmax", "prob", "lsum",
                "vscale", "vzero_part", "vzero", "vdeq", "pv", "state")


def is_split(spec: KernelSpec) -> bool:
    """True for the split-KV form of a decode/fused spec (``("split", 1)`` in ``spec.extra``)."""
    return dict(spec.extra).get("split", 0) == 1


def split_spec(spec: KernelSpec) -> KernelSpec:
    """The split-KV form of a decode/fused spec (its URI ends in ``_split1``)."""
    if spec.kind not in ("decode", "fused"):
        raise ValueError(f"kind: split-KV exists for decode/fused, got {spec.kind!r}")
    if is_split(spec):
        return spec
    return KernelSpec(spec.kind, spec.bits, spec.head_dim, spec.num_q_heads, spec.num_kv_heads, spec.k_group,
                      spec.v_group, spec.dtype, spec.chunk, (*spec.extra, ("split", 1)))


def merge_spec(spec: KernelSpec) -> KernelSpec:
    """The ``merge`` kernel that combines the partials of ``spec`` (P symbolic) into ``out`` in ``spec.dtype``."""
    return KernelSpec("merge", (16,), spec.head_dim, spec.num_q_heads, spec.num_kv_heads, dtype=spec.dtype)


def key_groups_per_chunk(spec: KernelSpec) -> int:
    """Key groups a chunk of ``spec.chunk`` tokens can touch (a chunk need not start on a group boundary)."""
    c, kg = spec.chunk, spec.k_group
    return (c + kg - 2) // kg + 1


def choose_splits(sm_count: int, n_tokens: int, batch: int, kv_heads: int, chunk: int = 64,
                  blocks_per_sm: int = 2, min_chunks_per_split: int = 1) -> int:
    """Number of token splits ``P`` of a split-KV decode launch (``batch * kv_heads * P`` thread blocks).

    Enough blocks for ``blocks_per_sm`` resident blocks on each of ``sm_count`` SMs, never more splits than the
    longest piece has chunks (``ceil(n_tokens / chunk)``, at least ``min_chunks_per_split`` each), at least 1.
    ``n_tokens``: tokens of the longest piece (its capacity, or its longest ``lens``).
    """
    for name, v in (("sm_count", sm_count), ("batch", batch), ("kv_heads", kv_heads), ("chunk", chunk),
                    ("blocks_per_sm", blocks_per_sm), ("min_chunks_per_split", min_chunks_per_split)):
        if int(v) < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens: must be >= 0, got {n_tokens}")
    chunks = -(-int(n_tokens) // chunk)
    work = batch * kv_heads
    want = -(-(blocks_per_sm * sm_count) // work)
    return max(1, min(want, chunks // min_chunks_per_split))


def signature(spec: KernelSpec) -> KernelSignature:
    """Inputs as the decode/fused kernel (:func:`wq_compile.kernels.attention.signature`), outputs the partials."""
    ps = pieces(spec)
    hq, d = spec.num_q_heads, spec.head_dim
    args = [ArgDesc.tensor("q", ("B", hq, d), spec.tvm_dtype)]
    for p in ps:
        args += piece_args(spec, p)
    args.append(ArgDesc.scalar("sm_scale", _F32))
    args.append(ArgDesc.tensor("o_parts", ("P", "B", hq, d), _F32, output=True))
    args.append(ArgDesc.tensor("lse_parts", ("P", "B", hq), _F32, output=True))
    multiple = tuple((p.n_sym, spec.chunk) for p in ps)
    at_least = tuple((p.g_sym, p.n_sym, spec.k_group) for p in ps if p.quantized)
    return KernelSignature(spec.uri, tuple(args), multiple_of=multiple, at_least=at_least)


def build_split_attention(spec: KernelSpec) -> tirx.PrimFunc:
    """TIR of the split-KV decode (decode: one piece; fused: every piece) -> o_parts, lse_parts."""
    if not is_split(spec):
        raise ValueError(f"split: {spec.uri} is not a split-KV spec (use split_spec)")
    ps = pieces(spec)
    sig = signature(spec)
    hq, hkv, d, gs, c = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk
    syms: dict[str, tirx.Var] = {}

    def dim(x):
        return x if isinstance(x, int) else syms.setdefault(x, tirx.Var(x, "int32"))

    def alloc(name: str, shape, dtype: str = _F32):
        return IRBuilder.name(name, T.sblock_alloc_buffer(shape, dtype))

    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(spec.uri)
            T.func_attr({"tirx.noalias": True})
            bufs: dict[str, object] = {}
            for a in sig.args:
                if a.is_scalar:
                    bufs[a.name] = T.arg(a.name, tirx.Var(a.name, a.dtype))
                else:
                    bufs[a.name] = T.arg(a.name, T.buffer(tuple(dim(s) for s in a.shape), a.dtype))
            bsz, npart = syms["B"], syms["P"]
            q, sm_scale = bufs["q"], bufs["sm_scale"]
            with T.sblock("root"):
                qf = alloc("qf", (bsz, npart, hq, d))
                states = []
                for p in ps:
                    nc = tirx.floordiv(syms[p.n_sym], c)
                    cps = tirx.floordiv(nc + npart - 1, npart)
                    vc = npart * cps  # virtual chunks: every split runs cps of them
                    nv = vc * c  # virtual tokens
                    t = p.tag
                    per = spec.quant(p.bits).per_word if p.quantized else d
                    st = {
                        "nc": nc, "cps": cps,
                        "acc": alloc(f"{t}_acc", (bsz, npart, hq, d)),
                        "m": alloc(f"{t}_m", (bsz, npart, hq)),
                        "l": alloc(f"{t}_l", (bsz, npart, hq)),
                        "kd": alloc(f"{t}_kd", (bsz, hkv, nv, d // per, per)),
                        "vd": alloc(f"{t}_vd", (bsz, hkv, nv, d // per, per)),
                        "s": alloc(f"{t}_s", (bsz, hq, nv)),
                        "sp": alloc(f"{t}_sp", (bsz, hkv, gs, nv, qk_lanes(d))),
                        "sf": alloc(f"{t}_sf", (bsz, hkv, gs, nv, qk_fold_lanes(d))),
                        "p": alloc(f"{t}_p", (bsz, hq, nv)),
                        "mc": alloc(f"{t}_mc", (bsz, hq, vc)),
                        "mp": alloc(f"{t}_mp", (bsz, hq, vc, max_lanes(c))),
                        "lc": alloc(f"{t}_lc", (bsz, hq, vc)),
                        "pvc": alloc(f"{t}_pvc", (bsz, vc, hq, d)),
                    }
                    if p.quantized:
                        qs = spec.quant(p.bits)
                        ngk = key_groups_per_chunk(spec)
                        st.update(
                            ps=alloc(f"{t}_ps", (bsz, hq, nv, d // qs.v_group)),
                            pz=alloc(f"{t}_pz", (bsz, hq, vc, d // qs.v_group)),
                            pzp=alloc(f"{t}_pzp", (bsz, hq, vc, d // qs.v_group, max_lanes(c))),
                            ks=alloc(f"{t}_ks", (bsz, hkv, vc, ngk, d, key_words(p.bits, spec.k_group)), _I32),
                            ksc=alloc(f"{t}_ksc", (bsz, hkv, vc, ngk, d), "float16"),
                            kz=alloc(f"{t}_kz", (bsz, hkv, vc, ngk, d), "float16"),
                            vs=alloc(f"{t}_vs", (bsz, hkv, nv, d // per), _I32),
                        )
                    else:
                        st.update(vs=alloc(f"{t}_vs", (bsz, hkv, nv, d), spec.tvm_dtype),
                                  ks=alloc(f"{t}_ks", (bsz, hkv, nv, d), spec.tvm_dtype))
                    states.append(st)
                m_all = alloc("m_all", (bsz, npart, hq))
                w_all = alloc("w_all", (bsz, npart, hq, len(ps)))
                l_all = alloc("l_all", (bsz, npart, hq))
                with T.grid(bsz, hkv, npart) as (b, kh, s):
                    IRBuilder.name_many(["b", "kh", "s"], [b, kh, s])
                    with T.grid(gs, d) as (g, dd):
                        with T.sblock("qscale"):
                            vb, vkh, vs_, vg, vd = T.axis.remap("SSSSS", [b, kh, s, g, dd])
                            h = vkh * gs + vg
                            T.buffer_store(qf, q[vb, h, vd].astype(_F32) * sm_scale, [vb, vs_, h, vd])
                    for p, st in zip(ps, states):
                        _emit_piece(spec, p, bufs, st, qf, syms, b, kh, s)
                    _emit_final(spec, ps, bufs, states, syms, b, kh, s, m_all, w_all, l_all)
    return ib.get()


def _emit_final(spec, ps, bufs, states, syms, b, kh, s, m_all, w_all, l_all) -> None:
    """Merge the pieces' states of this split: o = sum_p acc_p e^(m_p - M) / L, lse = M + log L (L = sum_p l_p e^..)."""
    gs, d = spec.group_size, spec.head_dim
    o_parts, lse_parts = bufs["o_parts"], bufs["lse_parts"]
    npart = syms["P"]

    def present(st):
        return st["nc"] > 0

    def axes(g):
        vb, vkh, vs_, vg = T.axis.remap("SSSS", [b, kh, s, g])
        return vb, vs_, vkh * gs + vg

    with T.grid(gs) as g:
        with T.sblock("final_m"):
            vb, vs_, h = axes(g)
            mx = f32(NEG_BIG)
            for st in states:
                mx = tirx.max(mx, tirx.Select(present(st), st["m"][vb, vs_, h], f32(NEG_BIG)))
            T.buffer_store(m_all, mx, [vb, vs_, h])
    for i, (p, st) in enumerate(zip(ps, states)):
        with T.grid(gs) as g:
            with T.sblock(p.block("final_w")):
                vb, vs_, h = axes(g)
                w = tirx.Select(present(st), tirx.exp(st["m"][vb, vs_, h] - m_all[vb, vs_, h]), f32(0.0))
                T.buffer_store(w_all, w, [vb, vs_, h, i])
    with T.grid(gs) as g:
        with T.sblock("final_l"):
            vb, vs_, h = axes(g)
            tot = f32(0.0)
            for i, st in enumerate(states):
                tot = tot + tirx.Select(w_all[vb, vs_, h, i] > f32(0.0), st["l"][vb, vs_, h] * w_all[vb, vs_, h, i], f32(0.0))
            T.buffer_store(l_all, tot, [vb, vs_, h])
    with T.grid(gs, d) as (g, dd):
        with T.sblock("final_o"):
            vb, vkh, vs_, vg, vd = T.axis.remap("SSSSS", [b, kh, s, g, dd])
            h = vkh * gs + vg
            num = f32(0.0)
            for i, st in enumerate(states):
                wi = w_all[vb, vs_, h, i]
                num = num + tirx.Select(wi > f32(0.0), st["acc"][vb, vs_, h, vd] * wi, f32(0.0))
            lv = l_all[vb, vs_, h]
            T.buffer_store(o_parts, tirx.Select(lv > f32(0.0), num / lv, f32(0.0)), [vs_, vb, h, vd])
    with T.grid(gs) as g:
        with T.sblock("final_lse"):
            vb, vs_, h = axes(g)
            lv = l_all[vb, vs_, h]
            val = tirx.Select(lv > f32(0.0), m_all[vb, vs_, h] + tirx.log(lv), f32(float("-inf")))
            T.buffer_store(lse_parts, val, [vs_, vb, h])
    del npart


def _emit_piece(spec, p: Piece, bufs, st, qf, syms, b, kh, s) -> None:
    """The chunk loop of one piece in split ``s``: chunk ``s * cps + ci`` (virtual; reads clamp to the last chunk)."""
    hkv, d, gs, c, kg = spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk, spec.k_group
    bsz, npart = syms["B"], syms["P"]
    nc, cps = st["nc"], st["cps"]
    vcn = npart * cps
    pre = "" if spec.kind == "decode" else f"{p.tag}_"
    lens = bufs[f"{pre}lens"]
    acc, m_st, l_st = st["acc"], st["m"], st["l"]
    kd, vd_buf, s_buf, p_buf = st["kd"], st["vd"], st["s"], st["p"]
    mc, lc, pvc, sp_buf = st["mc"], st["lc"], st["pvc"], st["sp"]
    per = spec.quant(p.bits).per_word if p.quantized else d

    def rchunk(vc_):
        """The chunk actually read for virtual chunk ``vc_`` (always in bounds)."""
        return tirx.min(vc_, nc - 1)

    def chunk_axes(ci):
        vb = T.axis.spatial(bsz, b)
        vkh = T.axis.spatial(hkv, kh)
        vc_ = T.axis.spatial(vcn, s * cps + ci)
        return vb, vkh, vc_

    def tok_axes(ci, t):
        vb = T.axis.spatial(bsz, b)
        vkh = T.axis.spatial(hkv, kh)
        tok = T.axis.spatial(vcn * c, (s * cps + ci) * c + t)
        return vb, vkh, tok

    def rtok(tok):
        """Memory token of virtual token ``tok``."""
        return rchunk(tirx.floordiv(tok, c)) * c + tirx.floormod(tok, c)

    with T.serial(0, cps) as ci:
        IRBuilder.name(f"{p.tag}_c", ci)
        # ---- staging: the chunk's codes (plain copies; shared memory on CUDA) ----
        if p.quantized:
            qs = spec.quant(p.bits)
            ngk, kw = key_groups_per_chunk(spec), key_words(p.bits, kg)
            kc, ksc, kze = bufs[f"{pre}k_codes"], bufs[f"{pre}k_scale"], bufs[f"{pre}k_zero"]
            gmax = syms[p.g_sym] - 1
            ks, ksc_s, kz_s, vs_buf = st["ks"], st["ksc"], st["kz"], st["vs"]
            with T.grid(ngk, d, kw) as (gi, dd_, w):
                with T.sblock(p.block("kload")):
                    vb, vkh, vc_ = chunk_axes(ci)
                    vgi, vd, vw = T.axis.remap("SSS", [gi, dd_, w])
                    grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                    T.buffer_store(ks, kc[vb, vkh, grp, vd, vw], [vb, vkh, vc_, vgi, vd, vw])
            with T.grid(ngk, d) as (gi, dd_):
                with T.sblock(p.block("kmeta")):
                    vb, vkh, vc_ = chunk_axes(ci)
                    vgi, vd = T.axis.remap("SS", [gi, dd_])
                    grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                    T.buffer_store(ksc_s, ksc[vb, vkh, grp, vd], [vb, vkh, vc_, vgi, vd])
                    T.buffer_store(kz_s, kze[vb, vkh, grp, vd], [vb, vkh, vc_, vgi, vd])
            vcodes = bufs[f"{pre}v_codes"]
            with T.grid(c, d // per) as (t, w):
                with T.sblock(p.block("vload")):
                    vb, vkh, tok = tok_axes(ci, t)
                    vw = T.axis.spatial(d // per, w)
                    T.buffer_store(vs_buf, vcodes[vb, vkh, rtok(tok), vw], [vb, vkh, tok, vw])
            # ---- K dequant from the staged codes (token-packed, see wq_compile.quant) ----
            lb = key_lane_bytes(p.bits, kg)
            with T.grid(c, d // per, per) as (t, w, j):
                with T.sblock(p.block("kdeq")):
                    vb, vkh, tok = tok_axes(ci, t)
                    vw, vj = T.axis.remap("SS", [w, j])
                    dd = vw * per + vj
                    vc_ = tirx.floordiv(tok, c)
                    mt = rtok(tok)
                    gi = tirx.floordiv(mt, kg) - tirx.floordiv(rchunk(vc_) * c, kg)
                    slot = tirx.floormod(mt, kg)
                    byte, field = tirx.floormod(slot, lb), tirx.floordiv(slot, lb)
                    word = ks[vb, vkh, vc_, gi, dd, tirx.floordiv(byte, 4)]
                    shifted = tirx.shift_right(word, tirx.floormod(byte, 4) * 8 + field * p.bits)
                    code = tirx.bitwise_and(shifted, tirx.const((1 << p.bits) - 1, _I32)).astype(_F32)
                    val = code * ksc_s[vb, vkh, vc_, gi, dd].astype(_F32) + kz_s[vb, vkh, vc_, gi, dd].astype(_F32)
                    T.buffer_store(kd, val, [vb, vkh, tok, vw, vj])
        else:
            kin, vin = bufs[f"{pre}k"], bufs[f"{pre}v"]
            ks, vs_buf = st["ks"], st["vs"]
            for name, src, dst in (("kload", kin, ks), ("vload", vin, vs_buf)):
                with T.grid(c, d) as (t, dd_):
                    with T.sblock(p.block(name)):
                        vb, vkh, tok = tok_axes(ci, t)
                        vd = T.axis.spatial(d, dd_)
                        T.buffer_store(dst, src[vb, vkh, rtok(tok), vd], [vb, vkh, tok, vd])
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block("kdeq")):
                    vb, vkh, tok = tok_axes(ci, t)
                    vdd = T.axis.spatial(d, dd_)
                    T.buffer_store(kd, ks[vb, vkh, tok, vdd].astype(_F32), [vb, vkh, tok, vdd // per, vdd % per])
        # ---- scores: partial dot products over qk_lanes channel lanes, fold, lane sum ----
        lanes = qk_lanes(d)
        with T.grid(gs, c, lanes, d // lanes) as (g, t, ln, do):
            with T.sblock(p.block("qk_part")):
                vb, vkh, tok = tok_axes(ci, t)
                vg, vl, vdo = T.axis.remap("SSR", [g, ln, do])
                h = vkh * gs + vg
                dd = vdo * lanes + vl
                vs_ = tirx.floordiv(tirx.floordiv(tok, c), cps)
                with T.init():
                    T.buffer_store(sp_buf, f32(0.0), [vb, vkh, vg, tok, vl])
                val = sp_buf[vb, vkh, vg, tok, vl] + qf[vb, vs_, h, dd] * kd[vb, vkh, tok, dd // per, dd % per]
                T.buffer_store(sp_buf, val, [vb, vkh, vg, tok, vl])
        fl = qk_fold_lanes(d)
        sf_buf = st["sf"]
        with T.grid(gs, c, fl) as (g, t, ln):
            with T.sblock(p.block("qk_fold")):
                vb, vkh, tok = tok_axes(ci, t)
                vg, vl = T.axis.remap("SS", [g, ln])
                val = sp_buf[vb, vkh, vg, tok, vl]
                if fl != lanes:
                    val = val + sp_buf[vb, vkh, vg, tok, vl + fl]
                T.buffer_store(sf_buf, val, [vb, vkh, vg, tok, vl])
        with T.grid(gs, c, fl) as (g, t, ln):
            with T.sblock(p.block("qk")):
                vb, vkh, tok = tok_axes(ci, t)
                vg, vl = T.axis.remap("SR", [g, ln])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(s_buf, f32(0.0), [vb, h, tok])
                T.buffer_store(s_buf, s_buf[vb, h, tok] + sf_buf[vb, vkh, vg, tok, vl], [vb, h, tok])
        # ---- chunk max / probabilities / sum (virtual tokens past lens are masked) ----
        ml = max_lanes(c)
        mp = st["mp"]
        with T.grid(gs, ml, c // ml) as (g, ln, to):
            with T.sblock(p.block("cmax_part")):
                vb, vkh, vc_ = chunk_axes(ci)
                vg, vl, vto = T.axis.remap("SSR", [g, ln, to])
                h = vkh * gs + vg
                tok = vc_ * c + vto * ml + vl
                with T.init():
                    T.buffer_store(mp, f32(NEG_BIG), [vb, h, vc_, vl])
                masked = tirx.Select(tok < lens[vb], s_buf[vb, h, tok], f32(NEG_BIG))
                T.buffer_store(mp, tirx.max(mp[vb, h, vc_, vl], masked), [vb, h, vc_, vl])
        with T.grid(gs, ml) as (g, ln):
            with T.sblock(p.block("cmax")):
                vb, vkh, vc_ = chunk_axes(ci)
                vg, vl = T.axis.remap("SR", [g, ln])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(mc, f32(NEG_BIG), [vb, h, vc_])
                T.buffer_store(mc, tirx.max(mc[vb, h, vc_], mp[vb, h, vc_, vl]), [vb, h, vc_])
        with T.grid(gs, c) as (g, t):
            with T.sblock(p.block("prob")):
                vb, vkh, vc_ = chunk_axes(ci)
                vg, vt = T.axis.remap("SS", [g, t])
                h = vkh * gs + vg
                tok = vc_ * c + vt
                val = tirx.Select(tok < lens[vb], fast_exp(s_buf[vb, h, tok] - mc[vb, h, vc_]), f32(0.0))
                T.buffer_store(p_buf, val, [vb, h, tok])
        with T.grid(gs, c) as (g, t):
            with T.sblock(p.block("lsum")):
                vb, vkh, vc_ = chunk_axes(ci)
                vg, vt = T.axis.remap("SR", [g, t])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(lc, f32(0.0), [vb, h, vc_])
                T.buffer_store(lc, lc[vb, h, vc_] + p_buf[vb, h, vc_ * c + vt], [vb, h, vc_])
        # ---- V (quantized: scale / zero folded into P, as in the attention kernel) ----
        if p.quantized:
            qs = spec.quant(p.bits)
            nvg = d // qs.v_group
            ps_buf, pz_buf, pzp = st["ps"], st["pz"], st["pzp"]
            vsc, vze = bufs[f"{pre}v_scale"], bufs[f"{pre}v_zero"]
            with T.grid(gs, nvg, c) as (g, vg_, t):
                with T.sblock(p.block("vscale")):
                    vb, vkh, tok = tok_axes(ci, t)
                    vg, vgi = T.axis.remap("SS", [g, vg_])
                    h = vkh * gs + vg
                    val = p_buf[vb, h, tok] * vsc[vb, vkh, rtok(tok), vgi].astype(_F32)
                    T.buffer_store(ps_buf, tirx.Select(tok < lens[vb], val, f32(0.0)), [vb, h, tok, vgi])
            with T.grid(gs, nvg, ml, c // ml) as (g, vg_, ln, to):
                with T.sblock(p.block("vzero_part")):
                    vb, vkh, vc_ = chunk_axes(ci)
                    vg, vgi, vl, vto = T.axis.remap("SSSR", [g, vg_, ln, to])
                    h = vkh * gs + vg
                    tok = vc_ * c + vto * ml + vl
                    with T.init():
                        T.buffer_store(pzp, f32(0.0), [vb, h, vc_, vgi, vl])
                    z = vze[vb, vkh, rchunk(vc_) * c + vto * ml + vl, vgi].astype(_F32)
                    val = tirx.Select(tok < lens[vb], p_buf[vb, h, tok] * z, f32(0.0))
                    T.buffer_store(pzp, pzp[vb, h, vc_, vgi, vl] + val, [vb, h, vc_, vgi, vl])
            with T.grid(gs, nvg, ml) as (g, vg_, ln):
                with T.sblock(p.block("vzero")):
                    vb, vkh, vc_ = chunk_axes(ci)
                    vg, vgi, vl = T.axis.remap("SSR", [g, vg_, ln])
                    h = vkh * gs + vg
                    with T.init():
                        T.buffer_store(pz_buf, f32(0.0), [vb, h, vc_, vgi])
                    T.buffer_store(pz_buf, pz_buf[vb, h, vc_, vgi] + pzp[vb, h, vc_, vgi, vl], [vb, h, vc_, vgi])
            vs_buf = st["vs"]
            with T.grid(c, d // per, per) as (t, w, j):
                with T.sblock(p.block("vdeq")):
                    vb, vkh, tok = tok_axes(ci, t)
                    vw, vj = T.axis.remap("SS", [w, j])
                    T.buffer_store(vd_buf, _unpack(vs_buf[vb, vkh, tok, vw], vj, p.bits), [vb, vkh, tok, vw, vj])
        else:
            vs_buf = st["vs"]
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block("vdeq")):
                    vb, vkh, tok = tok_axes(ci, t)
                    vdd = T.axis.spatial(d, dd_)
                    val = tirx.Select(tok < lens[vb], vs_buf[vb, vkh, tok, vdd].astype(_F32), f32(0.0))
                    T.buffer_store(vd_buf, val, [vb, vkh, tok, vdd // per, vdd % per])
        # ---- P @ V of the chunk ----
        with T.grid(gs, d, c) as (g, dd_, t):
            with T.sblock(p.block("pv")):
                vb, vkh, vc_ = chunk_axes(ci)
                vg, vdd, vt = T.axis.remap("SSR", [g, dd_, t])
                h = vkh * gs + vg
                tok = vc_ * c + vt
                with T.init():
                    T.buffer_store(pvc, f32(0.0), [vb, vc_, h, vdd])
                weight = st["ps"][vb, h, tok, vdd // spec.v_group] if p.quantized else p_buf[vb, h, tok]
                T.buffer_store(pvc, pvc[vb, vc_, h, vdd] + weight * vd_buf[vb, vkh, tok, vdd // per, vdd % per],
                               [vb, vc_, h, vdd])
        # ---- running state of this split: reduction over its cps chunks ----
        with T.grid(gs) as g:
            with T.sblock(p.block("state")):
                vb = T.axis.spatial(bsz, b)
                vkh = T.axis.spatial(hkv, kh)
                vs_ = T.axis.spatial(npart, s)
                vci = T.axis.reduce(cps, ci)
                vg = T.axis.spatial(gs, g)
                h = vkh * gs + vg
                vc_ = vs_ * cps + vci
                with T.init():
                    T.buffer_store(m_st, f32(NEG_BIG), [vb, vs_, h])
                    T.buffer_store(l_st, f32(0.0), [vb, vs_, h])
                    with T.serial(0, d) as dd_:
                        T.buffer_store(acc, f32(0.0), [vb, vs_, h, dd_])

                def m_new():
                    return tirx.max(m_st[vb, vs_, h], mc[vb, h, vc_])

                def e_old():
                    return fast_exp(m_st[vb, vs_, h] - m_new())

                def e_chunk():
                    return fast_exp(mc[vb, h, vc_] - m_new())

                with T.serial(0, d) as dd_:
                    chunk = pvc[vb, vc_, h, dd_]
                    if p.quantized:
                        chunk = chunk + st["pz"][vb, h, vc_, dd_ // spec.v_group]
                    T.buffer_store(acc, acc[vb, vs_, h, dd_] * e_old() + chunk * e_chunk(), [vb, vs_, h, dd_])
                T.buffer_store(l_st, l_st[vb, vs_, h] * e_old() + lc[vb, h, vc_] * e_chunk(), [vb, vs_, h])
                T.buffer_store(m_st, m_new(), [vb, vs_, h])
