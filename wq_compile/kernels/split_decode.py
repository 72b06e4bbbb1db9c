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
    kscale  Ksc[gi, d]    = k_scale[min(g0 + gi, G - 1), d]      (kzero: the same for k_zero)
    vload   Vs[t, w]      = v_codes[t0 + t, w]
    kdeq .. state          as in :mod:`wq_compile.kernels.attention` (scores, chunk max / sum, V scale / zero folded
                           into P, P @ V, running (m, l, acc)), reading the staged codes
    final   (m, l, acc) of the pieces -> o_parts[s], lse_parts[s]

How the runtime calls it (plan once per step, run per layer)::

    spec = split_spec(KernelSpec("fused", (8, 4, 2, 16), head_dim, hq, hkv, k_group, v_group, dtype, chunk=32))
    P = choose_splits(sm_count, n_tokens, batch, hkv, spec.chunk)   # n_tokens: the longest piece (capacity)
    o_parts = torch.empty(P, B, Hq, D, float32); lse_parts = torch.empty(P, B, Hq, float32)
    split_kernel(q, *pieces..., sm_scale, o_parts, lse_parts)      # grid: blockIdx.x = B * Hkv, blockIdx.y = P
    merge_kernel(o_parts, lse_parts, out)                           # make_kernel(merge_spec(spec)), P symbolic

Both modules serve every length, batch and ``P`` (``P <= MAX_SPLITS``). Capacities must be whole chunks (the
layout's 64-token capacities are whole 32-token chunks).

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

#: Stages of one piece of the split kernel (block names ``f"{piece.tag}_{stage}"``); ``kload``/``kscale``/``kzero`` and the
#: V scale / zero stages exist for quantized pieces only.
SPLIT_STAGES = ("koff", "kload", "kscale", "kzero", "vload", "nvalid", "kdeq", "qk_part", "qk_fold", "qk", "cmax_part", "cmax", "prob", "lsum",
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


#: Resident blocks per SM the split kernel is compiled for (a launch-bounds hint on GPU targets).
MIN_BLOCKS_PER_SM = 2

#: Most splits one launch computes (``o_parts`` rows past it are not written); :func:`choose_splits` never exceeds
#: it. It also bounds ``P`` for TVM's integer bound analysis (an unbounded int32 ``P`` times the chunk overflows it).
MAX_SPLITS = 4096


def splits_extent(p: tirx.PrimExpr) -> tirx.PrimExpr:
    """The split loop's extent: ``min(P, MAX_SPLITS)``."""
    return tirx.min(p, MAX_SPLITS)


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
    return max(1, min(want, chunks // min_chunks_per_split, MAX_SPLITS))


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
            bsz = syms["B"]
            npart = splits_extent(syms["P"])
            q, sm_scale = bufs["q"], bufs["sm_scale"]
            with T.sblock("root"):
                # intermediates hold one chunk of one (b, kv head); every split and chunk reuses them
                qf = alloc("qf", (bsz, hq, d))
                states = []
                for p in ps:
                    # chunks of the piece, bounded so that virtual token indices provably fit in int32
                    nc = tirx.min(tirx.floordiv(syms[p.n_sym], c), (2**31 - 1) // c - MAX_SPLITS)
                    cps = tirx.truncdiv(nc + npart - 1, npart)  # all non-negative: no sign fix-up code
                    t = p.tag
                    per = spec.quant(p.bits).per_word if p.quantized else d
                    st = {
                        "nc": nc, "cps": cps,
                        "acc": alloc(f"{t}_acc", (bsz, hq, d)),
                        "m": alloc(f"{t}_m", (bsz, hq)),
                        "l": alloc(f"{t}_l", (bsz, hq)),
                        "kd": alloc(f"{t}_kd", (bsz, hkv, c, d // per, per)),
                        "vd": alloc(f"{t}_vd", (bsz, hkv, c, d // per, per)),
                        "s": alloc(f"{t}_s", (bsz, hq, c)),
                        "sp": alloc(f"{t}_sp", (bsz, hkv, gs, c, qk_lanes(d))),
                        "sf": alloc(f"{t}_sf", (bsz, hkv, gs, c, qk_fold_lanes(d))),
                        "p": alloc(f"{t}_p", (bsz, hq, c)),
                        "mc": alloc(f"{t}_mc", (bsz, hq)),
                        "mp": alloc(f"{t}_mp", (bsz, hq, max_lanes(c))),
                        "lc": alloc(f"{t}_lc", (bsz, hq)),
                        "pvc": alloc(f"{t}_pvc", (bsz, hq, d)),
                    }
                    if p.quantized:
                        qs = spec.quant(p.bits)
                        ngk = key_groups_per_chunk(spec)
                        st.update(
                            ps=alloc(f"{t}_ps", (bsz, hq, c, d // qs.v_group)),
                            pz=alloc(f"{t}_pz", (bsz, hq, d // qs.v_group)),
                            pzp=alloc(f"{t}_pzp", (bsz, hq, d // qs.v_group, max_lanes(c))),
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
                m_all = alloc("m_all", (bsz, hq))
                w_all = alloc("w_all", (bsz, hq, len(ps)))
                l_all = alloc("l_all", (bsz, hq))
                with T.grid(npart, bsz, hkv) as (s, b, kh):
                    IRBuilder.name_many(["s", "b", "kh"], [s, b, kh])
                    # GPU targets: __launch_bounds__(threads, MIN_BLOCKS_PER_SM) (with the thread count alone, ptxas
                    # of CUDA 13 holds this kernel at 72 registers and spills); CPU targets ignore it
                    with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", MIN_BLOCKS_PER_SM):
                        _emit_body(spec, ps, bufs, states, qf, q, sm_scale, syms, s, b, kh, m_all, w_all, l_all)
    return ib.get()


def _emit_body(spec, ps, bufs, states, qf, q, sm_scale, syms, s, b, kh, m_all, w_all, l_all) -> None:
    """One (split, sample, KV head): scale the query group, every piece's chunk loop, the split's final merge."""
    gs, d = spec.group_size, spec.head_dim
    with T.grid(gs, d) as (g, dd):
        with T.sblock("qscale"):
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            T.buffer_store(qf, q[vb, h, vd].astype(_F32) * sm_scale, [vb, h, vd])
    for p, st in zip(ps, states):
        _emit_piece(spec, p, bufs, st, qf, syms, b, kh, s)
    _emit_final(spec, ps, bufs, states, syms, b, kh, s, m_all, w_all, l_all)

def _emit_final(spec, ps, bufs, states, syms, b, kh, s, m_all, w_all, l_all) -> None:
    """Merge the pieces' states of this split: o = sum_p acc_p e^(m_p - M) / L, lse = M + log L (L = sum_p l_p e^..)."""
    gs, d = spec.group_size, spec.head_dim
    o_parts, lse_parts = bufs["o_parts"], bufs["lse_parts"]
    npart = splits_extent(syms["P"])

    def present(st):
        return st["nc"] > 0

    def axes(g):
        vb, vkh, vg = T.axis.remap("SSS", [b, kh, g])
        return vb, vkh * gs + vg

    with T.grid(gs) as g:
        with T.sblock("final_m"):
            vb, h = axes(g)
            mx = f32(NEG_BIG)
            for st in states:
                mx = tirx.max(mx, tirx.Select(present(st), st["m"][vb, h], f32(NEG_BIG)))
            T.buffer_store(m_all, mx, [vb, h])
    for i, (p, st) in enumerate(zip(ps, states)):
        with T.grid(gs) as g:
            with T.sblock(p.block("final_w")):
                vb, h = axes(g)
                w = tirx.Select(present(st), fast_exp(st["m"][vb, h] - m_all[vb, h]), f32(0.0))
                T.buffer_store(w_all, w, [vb, h, i])
    with T.grid(gs) as g:
        with T.sblock("final_l"):
            vb, h = axes(g)
            tot = f32(0.0)
            for i, st in enumerate(states):
                tot = tot + tirx.Select(w_all[vb, h, i] > f32(0.0), st["l"][vb, h] * w_all[vb, h, i], f32(0.0))
            T.buffer_store(l_all, tot, [vb, h])
    with T.grid(gs, d) as (g, dd):
        with T.sblock("final_o"):
            vs_ = T.axis.spatial(npart, s)
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            num = f32(0.0)
            for i, st in enumerate(states):
                wi = w_all[vb, h, i]
                num = num + tirx.Select(wi > f32(0.0), st["acc"][vb, h, vd] * wi, f32(0.0))
            lv = l_all[vb, h]
            T.buffer_store(o_parts, tirx.Select(lv > f32(0.0), num / lv, f32(0.0)), [vs_, vb, h, vd])
    with T.grid(gs) as g:
        with T.sblock("final_lse"):
            vs_ = T.axis.spatial(npart, s)
            vb, h = axes(g)
            lv = l_all[vb, h]
            val = tirx.Select(lv > f32(0.0), m_all[vb, h] + tirx.log(lv), f32(float("-inf")))
            T.buffer_store(lse_parts, val, [vs_, vb, h])


def _emit_piece(spec, p: Piece, bufs, st, qf, syms, b, kh, s) -> None:
    """The chunk loop of one piece in split ``s``: virtual chunk ``s * cps + ci`` (reads clamp to the last chunk).

    Intermediates are indexed by the token of the chunk (``t < chunk``); blocks that need the chunk (staging,
    masks) carry it as the iter var ``vc`` (binding ``s * cps + ci``)."""
    hkv, d, gs, c, kg = spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk, spec.k_group
    bsz, npart = syms["B"], splits_extent(syms["P"])
    nc, cps = st["nc"], st["cps"]
    vcn = nc + npart - 1  # extent of the virtual chunk s * cps + ci (P * cps <= nc + P - 1)
    pre = "" if spec.kind == "decode" else f"{p.tag}_"
    lens = bufs[f"{pre}lens"]
    acc, m_st, l_st = st["acc"], st["m"], st["l"]
    kd, vd_buf, s_buf, p_buf = st["kd"], st["vd"], st["s"], st["p"]
    mc, lc, pvc, sp_buf = st["mc"], st["lc"], st["pvc"], st["sp"]
    per = spec.quant(p.bits).per_word if p.quantized else d

    def rchunk(vc_):
        """The chunk actually read for virtual chunk ``vc_`` (always in bounds)."""
        return tirx.min(vc_, nc - 1)

    def bk():
        return T.axis.spatial(bsz, b), T.axis.spatial(hkv, kh)

    def vchunk(ci):
        return T.axis.spatial(vcn, s * cps + ci)

    with T.serial(0, cps) as ci:
        IRBuilder.name(f"{p.tag}_c", ci)
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
                    T.buffer_store(ks, kc[vb, vkh, grp, vd, vw], [vb, vkh, vgi, vd, vw])
            for stage, src, dst in (("kscale", ksc, ksc_s), ("kzero", kze, kz_s)):
                with T.grid(ngk, d) as (gi, dd_):
                    with T.sblock(p.block(stage)):
                        vb, vkh = bk()
                        vc_ = vchunk(ci)
                        vgi, vd = T.axis.remap("SS", [gi, dd_])
                        grp = tirx.min(tirx.floordiv(rchunk(vc_) * c, kg) + vgi, gmax)
                        T.buffer_store(dst, src[vb, vkh, grp, vd], [vb, vkh, vgi, vd])
            vcodes = bufs[f"{pre}v_codes"]
            with T.grid(c, d // per) as (t, w):
                with T.sblock(p.block("vload")):
                    vb, vkh = bk()
                    vc_ = vchunk(ci)
                    vt, vw = T.axis.remap("SS", [t, w])
                    T.buffer_store(vs_buf, vcodes[vb, vkh, rchunk(vc_) * c + vt, vw], [vb, vkh, vt, vw])
            # ---- K dequant from the staged codes (token-packed, see wq_compile.quant) ----
            lb = key_lane_bytes(p.bits, kg)
            with T.grid(c, d // per, per) as (t, w, j):
                with T.sblock(p.block("kdeq")):
                    vb, vkh = bk()
                    vt, vw, vj = T.axis.remap("SSS", [t, w, j])
                    dd = vw * per + vj
                    off = koff[vb, vkh] + vt
                    gi, slot = tirx.floordiv(off, kg), tirx.floormod(off, kg)
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
                        T.buffer_store(dst, src[vb, vkh, rchunk(vc_) * c + vt, vd], [vb, vkh, vt, vd])
            nvalid = st["nvalid"]
            with T.sblock(p.block("nvalid")):
                vb, vkh = bk()
                vc_ = vchunk(ci)
                T.buffer_store(nvalid, lens[vb] - vc_ * c, [vb, vkh])  # valid tokens of the chunk (may be <= 0)
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block("kdeq")):
                    vb, vkh = bk()
                    vt, vdd = T.axis.remap("SS", [t, dd_])
                    T.buffer_store(kd, ks[vb, vkh, vt, vdd].astype(_F32), [vb, vkh, vt, vdd // per, vdd % per])
        # ---- scores: partial dot products over qk_lanes channel lanes, fold, lane sum ----
        lanes = qk_lanes(d)
        with T.grid(gs, c, lanes, d // lanes) as (g, t, ln, do):
            with T.sblock(p.block("qk_part")):
                vb, vkh = bk()
                vg, vt, vl, vdo = T.axis.remap("SSSR", [g, t, ln, do])
                h = vkh * gs + vg
                dd = vdo * lanes + vl
                with T.init():
                    T.buffer_store(sp_buf, f32(0.0), [vb, vkh, vg, vt, vl])
                val = sp_buf[vb, vkh, vg, vt, vl] + qf[vb, h, dd] * kd[vb, vkh, vt, dd // per, dd % per]
                T.buffer_store(sp_buf, val, [vb, vkh, vg, vt, vl])
        fl = qk_fold_lanes(d)
        sf_buf = st["sf"]
        with T.grid(gs, c, fl) as (g, t, ln):
            with T.sblock(p.block("qk_fold")):
                vb, vkh = bk()
                vg, vt, vl = T.axis.remap("SSS", [g, t, ln])
                val = sp_buf[vb, vkh, vg, vt, vl]
                if fl != lanes:
                    val = val + sp_buf[vb, vkh, vg, vt, vl + fl]
                T.buffer_store(sf_buf, val, [vb, vkh, vg, vt, vl])
        with T.grid(gs, c, fl) as (g, t, ln):
            with T.sblock(p.block("qk")):
                vb, vkh = bk()
                vg, vt, vl = T.axis.remap("SSR", [g, t, ln])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(s_buf, f32(0.0), [vb, h, vt])
                T.buffer_store(s_buf, s_buf[vb, h, vt] + sf_buf[vb, vkh, vg, vt, vl], [vb, h, vt])
        # ---- chunk max / probabilities / sum (virtual tokens past lens are masked) ----
        ml = max_lanes(c)
        mp = st["mp"]
        with T.grid(gs, ml, c // ml) as (g, ln, to):
            with T.sblock(p.block("cmax_part")):
                vb, vkh = bk()
                vc_ = vchunk(ci)
                vg, vl, vto = T.axis.remap("SSR", [g, ln, to])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(mp, f32(NEG_BIG), [vb, h, vl])
                valid = vc_ * c + vto * ml + vl < lens[vb]
                masked = tirx.Select(valid, s_buf[vb, h, vto * ml + vl], f32(NEG_BIG))
                T.buffer_store(mp, tirx.max(mp[vb, h, vl], masked), [vb, h, vl])
        with T.grid(gs, ml) as (g, ln):
            with T.sblock(p.block("cmax")):
                vb, vkh = bk()
                vg, vl = T.axis.remap("SR", [g, ln])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(mc, f32(NEG_BIG), [vb, h])
                T.buffer_store(mc, tirx.max(mc[vb, h], mp[vb, h, vl]), [vb, h])
        with T.grid(gs, c) as (g, t):
            with T.sblock(p.block("prob")):
                vb, vkh = bk()
                vc_ = vchunk(ci)
                vg, vt = T.axis.remap("SS", [g, t])
                h = vkh * gs + vg
                val = tirx.Select(vc_ * c + vt < lens[vb], fast_exp(s_buf[vb, h, vt] - mc[vb, h]), f32(0.0))
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
            ps_buf, pz_buf, pzp = st["ps"], st["pz"], st["pzp"]
            vsc, vze = bufs[f"{pre}v_scale"], bufs[f"{pre}v_zero"]
            with T.grid(gs, nvg, c) as (g, vg_, t):
                with T.sblock(p.block("vscale")):
                    vb, vkh = bk()
                    vc_ = vchunk(ci)
                    vg, vgi, vt = T.axis.remap("SSS", [g, vg_, t])
                    h = vkh * gs + vg
                    val = p_buf[vb, h, vt] * vsc[vb, vkh, rchunk(vc_) * c + vt, vgi].astype(_F32)
                    T.buffer_store(ps_buf, tirx.Select(vc_ * c + vt < lens[vb], val, f32(0.0)), [vb, h, vt, vgi])
            with T.grid(gs, nvg, ml, c // ml) as (g, vg_, ln, to):
                with T.sblock(p.block("vzero_part")):
                    vb, vkh = bk()
                    vc_ = vchunk(ci)
                    vg, vgi, vl, vto = T.axis.remap("SSSR", [g, vg_, ln, to])
                    h = vkh * gs + vg
                    tl = vto * ml + vl
                    with T.init():
                        T.buffer_store(pzp, f32(0.0), [vb, h, vgi, vl])
                    z = vze[vb, vkh, rchunk(vc_) * c + tl, vgi].astype(_F32)
                    val = tirx.Select(vc_ * c + tl < lens[vb], p_buf[vb, h, tl] * z, f32(0.0))
                    T.buffer_store(pzp, pzp[vb, h, vgi, vl] + val, [vb, h, vgi, vl])
            with T.grid(gs, nvg, ml) as (g, vg_, ln):
                with T.sblock(p.block("vzero")):
                    vb, vkh = bk()
                    vg, vgi, vl = T.axis.remap("SSR", [g, vg_, ln])
                    h = vkh * gs + vg
                    with T.init():
                        T.buffer_store(pz_buf, f32(0.0), [vb, h, vgi])
                    T.buffer_store(pz_buf, pz_buf[vb, h, vgi] + pzp[vb, h, vgi, vl], [vb, h, vgi])
            vs_buf = st["vs"]
            with T.grid(c, d // per, per) as (t, w, j):
                with T.sblock(p.block("vdeq")):
                    vb, vkh = bk()
                    vt, vw, vj = T.axis.remap("SSS", [t, w, j])
                    T.buffer_store(vd_buf, _unpack(vs_buf[vb, vkh, vt, vw], vj, p.bits), [vb, vkh, vt, vw, vj])
        else:
            vs_buf = st["vs"]
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block("vdeq")):
                    vb, vkh = bk()
                    vt, vdd = T.axis.remap("SS", [t, dd_])
                    # V past lens may be garbage (NaN): P = 0 there, but 0 * NaN is NaN
                    val = tirx.Select(vt < st["nvalid"][vb, vkh], vs_buf[vb, vkh, vt, vdd].astype(_F32), f32(0.0))
                    T.buffer_store(vd_buf, val, [vb, vkh, vt, vdd // per, vdd % per])
        # ---- P @ V of the chunk ----
        with T.grid(gs, d, c) as (g, dd_, t):
            with T.sblock(p.block("pv")):
                vb, vkh = bk()
                vg, vdd, vt = T.axis.remap("SSR", [g, dd_, t])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(pvc, f32(0.0), [vb, h, vdd])
                weight = st["ps"][vb, h, vt, vdd // spec.v_group] if p.quantized else p_buf[vb, h, vt]
                T.buffer_store(pvc, pvc[vb, h, vdd] + weight * vd_buf[vb, vkh, vt, vdd // per, vdd % per], [vb, h, vdd])
        # ---- running state of this split: reduction over its cps chunks ----
        with T.grid(gs) as g:
            with T.sblock(p.block("state")):
                vb, vkh = bk()
                vci = T.axis.reduce(cps, ci)
                vg = T.axis.spatial(gs, g)
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(m_st, f32(NEG_BIG), [vb, h])
                    T.buffer_store(l_st, f32(0.0), [vb, h])
                    with T.serial(0, d) as dd_:
                        T.buffer_store(acc, f32(0.0), [vb, h, dd_])

                def m_new():
                    return tirx.max(m_st[vb, h], mc[vb, h])

                def e_old():
                    return fast_exp(m_st[vb, h] - m_new())

                def e_chunk():
                    return fast_exp(mc[vb, h] - m_new())

                with T.serial(0, d) as dd_:
                    chunk = pvc[vb, h, dd_]
                    if p.quantized:
                        chunk = chunk + st["pz"][vb, h, dd_ // spec.v_group]
                    T.buffer_store(acc, acc[vb, h, dd_] * e_old() + chunk * e_chunk(), [vb, h, dd_])
                T.buffer_store(l_st, l_st[vb, h] * e_old() + lc[vb, h] * e_chunk(), [vb, h])
                T.buffer_store(m_st, m_new(), [vb, h])
