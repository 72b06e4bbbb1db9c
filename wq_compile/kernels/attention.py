"""Decode attention over quantized buckets and a dense piece: ``kind="decode"`` (one piece -> partial o, lse) and
``kind="fused"`` (all pieces of a layer in one launch -> final normalized output).

Structure (one work item per batch sample x KV head; every query head of the GQA group shares the dequantized
K/V chunk)::

    for b, kh:                          # parallel (llvm) / blockIdx (cuda)
      qf = q * sm_scale
      for piece in pieces:              # quant buckets in spec.bits order, then the dense piece
        for c in range(N_piece // chunk):          # dynamic count of fixed chunks: one module, every length
          kdeq    Kd[t, w, j] = dequant(k_codes, k_scale, k_zero)      (chunk x D, d = w * per + j)
          qk_part sp[g, t, l] = sum_do qf[g, do*L + l] * Kd[t, do*L + l]   (L = qk_lanes: the vector axis)
          qk_fold sf[g, t, l] = sp[g, t, l] + sp[g, t, l + L/2]
          qk      S[g, t]     = sum_l sf[g, t, l]
          cmax_part mp[g, l]  = max_to (t valid ? S : NEG_BIG)   (t = to * M + l, M = max_lanes: the vector axis)
          cmax    mc[g]       = max_l mp[g, l]
          prob    P[g, t]     = t valid ? exp(S - mc) : 0;     lsum lc[g] = sum_t P
          quantized V (scale / zero per token and v_group channels folded into P):
            vscale  Ps[g, t, vg] = t valid ? P * v_scale[t, vg] : 0;   vzero(_part) Pz[g, vg] = sum_t (t valid ? P * v_zero : 0)
            vdeq    Vd[t, w, j]  = float(code)                          (always finite: garbage codes times Ps = 0)
            pv      pvc[g, d]    = sum_t Ps[g, t, d // v_group] * Vd[t, d]
          dense V:  vdeq Vd[t, d] = t valid ? v : 0;  pv pvc[g, d] = sum_t P[g, t] * Vd[t, d]
          state   (m, l, acc) <- merge with (mc, lc, pvc + Pz)     # reduction over chunks, the only writer of the state
      final: decode -> o = acc / l, lse = m + log(l);  fused -> log-sum-exp merge of the pieces' states

Every block is a complete block or a reduction block and no block reads a buffer that a later block of the same
scope writes, so the scope is a stage pipeline (parallel, compute_at, compute_inline, decompose_reduction work).
Intermediates are declared full-size at the root block (``T.sblock_alloc_buffer``) and indexed by global token;
lowering compacts them to one chunk per work item.
Empty samples (``lens[b] == 0``) give ``o = 0`` and ``lse = -inf`` exactly.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.quant import key_lane_bytes
from ..core.spec import KernelSpec
from .common import NEG_BIG, alloc, declare_params, emit_state_update, f32, fast_exp, signature_params
from .signatures import Piece, pieces  # the argument description lives there (importable without TVM)
from .signatures import attention_signature as signature

_F32 = "float32"
_I32 = "int32"
_F16 = "float16"


def qk_lanes(head_dim: int) -> int:
    """Channel lanes of the partial dot products (the vectorizable axis of the score computation)."""
    return math.gcd(head_dim, 16)


def qk_fold_lanes(head_dim: int) -> int:
    """Lanes left after folding the upper half of the partial sums onto the lower half (a vector add; LLVM turns
    the final lane sum of up to 8 lanes into register transposes, wider ones into gathers)."""
    lanes = qk_lanes(head_dim)
    return lanes // 2 if lanes % 2 == 0 else lanes


def max_lanes(chunk: int) -> int:
    """Token lanes of the partial chunk maxima (the vectorizable axis of the max; a serial max chain otherwise)."""
    return math.gcd(chunk, 16)


def _unpack(word: tirx.PrimExpr, j: tirx.PrimExpr, bits: int) -> tirx.PrimExpr:
    """Code ``j`` of an int32 word as fp32; the mask drops the sign extension of the arithmetic shift."""
    shifted = tirx.shift_right(word, j * bits)
    return tirx.bitwise_and(shifted, tirx.const((1 << bits) - 1, _I32)).astype(_F32)


def key_code(k_codes, b, kh, tok: tirx.PrimExpr, dd: tirx.PrimExpr, bits: int, k_group: int) -> tirx.PrimExpr:
    """Code of token ``tok``, channel ``dd`` in the token-packed key format (see :mod:`wq_compile.core.quant`), as fp32."""
    lb = key_lane_bytes(bits, k_group)
    grp, slot = tirx.floordiv(tok, k_group), tirx.floormod(tok, k_group)
    byte, field = tirx.floormod(slot, lb), tirx.floordiv(slot, lb)
    word = k_codes[b, kh, grp, dd, tirx.floordiv(byte, 4)]
    shifted = tirx.shift_right(word, tirx.floormod(byte, 4) * 8 + field * bits)
    return tirx.bitwise_and(shifted, tirx.const((1 << bits) - 1, _I32)).astype(_F32)


def build_attention(spec: KernelSpec) -> tirx.PrimFunc:
    """TIR of a decode (one piece -> o, lse) or fused (all pieces -> out) attention kernel."""
    ps = pieces(spec)
    sig = signature(spec)
    hq, hkv, d, gs = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.group_size

    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(spec.uri)
            T.func_attr({"tirx.noalias": True})
            bufs, syms = declare_params(signature_params(sig))
            bsz = syms["B"]
            q, sm_scale = bufs["q"], bufs["sm_scale"]
            with T.sblock("root"):
                qf = alloc("qf", (bsz, hq, d))
                states = []
                for p in ps:
                    n = syms[p.n_sym]
                    nc = tirx.floordiv(n, spec.chunk)
                    t = p.tag
                    per = spec.quant(p.bits).per_word if p.quantized else d
                    states.append(
                        {
                            "acc": alloc(f"{t}_acc", (bsz, hq, d)),
                            "m": alloc(f"{t}_m", (bsz, hq)),
                            "l": alloc(f"{t}_l", (bsz, hq)),
                            "kd": alloc(f"{t}_kd", (bsz, hkv, n, d // per, per)),
                            "vd": alloc(f"{t}_vd", (bsz, hkv, n, d // per, per)),
                            "s": alloc(f"{t}_s", (bsz, hq, n)),
                            "sp": alloc(f"{t}_sp", (bsz, hkv, gs, n, qk_lanes(d))),
                            "sf": alloc(f"{t}_sf", (bsz, hkv, gs, n, qk_fold_lanes(d))),
                            "p": alloc(f"{t}_p", (bsz, hq, n)),
                            "mc": alloc(f"{t}_mc", (bsz, hq, nc)),
                            "mp": alloc(f"{t}_mp", (bsz, hq, nc, max_lanes(spec.chunk))),
                            "lc": alloc(f"{t}_lc", (bsz, hq, nc)),
                            # quantized V: P scaled by the per-token V scale, and the chunk's zero-point term
                            "ps": alloc(f"{t}_ps", (bsz, hq, n, d // spec.v_group)),
                            "pz": alloc(f"{t}_pz", (bsz, hq, nc, d // spec.v_group)),
                            "pzp": alloc(f"{t}_pzp", (bsz, hq, nc, d // spec.v_group, max_lanes(spec.chunk))),
                            "pvc": alloc(f"{t}_pvc", (bsz, nc, hq, d)),
                        }
                    )
                if len(ps) > 1:
                    m_all = alloc("m_all", (bsz, hq))
                    w_all = alloc("w_all", (bsz, hq, len(ps)))
                    l_all = alloc("l_all", (bsz, hq))
                with T.grid(bsz, hkv) as (b, kh):
                    IRBuilder.name_many(["b", "kh"], [b, kh])
                    with T.grid(gs, d) as (g, dd):
                        with T.sblock("qscale"):
                            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
                            h = vkh * gs + vg
                            T.buffer_store(qf, q[vb, h, vd].astype(_F32) * sm_scale, [vb, h, vd])
                    for p, st in zip(ps, states):
                        _emit_piece(spec, p, bufs, st, qf, syms, b, kh)
                    if len(ps) == 1:
                        _emit_final_single(spec, ps[0], bufs, states[0], syms, b, kh)
                    else:
                        _emit_final_merge(spec, ps, bufs, states, syms, b, kh, m_all, w_all, l_all)
    return ib.get()


def _present(spec: KernelSpec, p: Piece, syms) -> tirx.PrimExpr:
    """True when the piece has at least one chunk (else its reduction states were never initialized)."""
    return tirx.floordiv(syms[p.n_sym], spec.chunk) > 0


def _emit_final_single(spec, p, bufs, st, syms, b, kh) -> None:
    gs, d = spec.group_size, spec.head_dim
    o, lse = bufs["o"], bufs["lse"]
    acc, m_st, l_st = st["acc"], st["m"], st["l"]
    present = _present(spec, p, syms)
    with T.grid(gs, d) as (g, dd):
        with T.sblock("final_o"):
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            lv = l_st[vb, h]
            ok = tirx.all(present, lv > f32(0.0))
            T.buffer_store(o, tirx.Select(ok, acc[vb, h, vd] / lv, f32(0.0)), [vb, h, vd])
    with T.grid(gs) as g:
        with T.sblock("final_lse"):
            vb, vkh, vg = T.axis.remap("SSS", [b, kh, g])
            h = vkh * gs + vg
            lv = l_st[vb, h]
            ok = tirx.all(present, lv > f32(0.0))
            val = tirx.Select(ok, m_st[vb, h] + tirx.log(lv), f32(float("-inf")))
            T.buffer_store(lse, val, [vb, h])


def _emit_final_merge(spec, ps, bufs, states, syms, b, kh, m_all, w_all, l_all) -> None:
    """Combine the pieces' (m, l, acc) states: out = sum_p acc_p e^(m_p - M) / sum_p l_p e^(m_p - M)."""
    gs, d = spec.group_size, spec.head_dim
    out = bufs["out"]
    with T.grid(gs) as g:
        with T.sblock("final_m"):
            vb, vkh, vg = T.axis.remap("SSS", [b, kh, g])
            h = vkh * gs + vg
            mx = f32(NEG_BIG)
            for p, st in zip(ps, states):
                mx = tirx.max(mx, tirx.Select(_present(spec, p, syms), st["m"][vb, h], f32(NEG_BIG)))
            T.buffer_store(m_all, mx, [vb, h])
    for i, (p, st) in enumerate(zip(ps, states)):
        with T.grid(gs) as g:
            with T.sblock(p.block("final_w")):
                vb, vkh, vg = T.axis.remap("SSS", [b, kh, g])
                h = vkh * gs + vg
                w = tirx.Select(_present(spec, p, syms), tirx.exp(st["m"][vb, h] - m_all[vb, h]), f32(0.0))
                T.buffer_store(w_all, w, [vb, h, i])
    with T.grid(gs) as g:
        with T.sblock("final_l"):
            vb, vkh, vg = T.axis.remap("SSS", [b, kh, g])
            h = vkh * gs + vg
            tot = f32(0.0)
            for i, st in enumerate(states):
                tot = tot + tirx.Select(w_all[vb, h, i] > f32(0.0), st["l"][vb, h] * w_all[vb, h, i], f32(0.0))
            T.buffer_store(l_all, tot, [vb, h])
    with T.grid(gs, d) as (g, dd):
        with T.sblock("final_o"):
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg
            num = f32(0.0)
            for i, st in enumerate(states):
                num = num + tirx.Select(w_all[vb, h, i] > f32(0.0), st["acc"][vb, h, vd] * w_all[vb, h, i], f32(0.0))
            lv = l_all[vb, h]
            val = tirx.Select(lv > f32(0.0), num / lv, f32(0.0))
            T.buffer_store(out, val.astype(spec.tvm_dtype), [vb, h, vd])


def _emit_piece(spec, p: Piece, bufs, st, qf, syms, b, kh) -> None:
    """The chunk loop of one piece (see the module docstring); every block is complete or a reduction block."""
    hkv, d, gs, c = spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk
    bsz = syms["B"]
    nc = tirx.floordiv(syms[p.n_sym], c)
    pre = "" if spec.kind == "decode" else f"{p.tag}_"
    lens = bufs[f"{pre}lens"]
    acc, m_st, l_st = st["acc"], st["m"], st["l"]
    kd, vd_buf, s_buf, p_buf = st["kd"], st["vd"], st["s"], st["p"]
    mc, lc, pvc, sp_buf = st["mc"], st["lc"], st["pvc"], st["sp"]

    # dequantized tiles are [token, word, code-in-word]: atomic store indices keep the dequant blocks inlinable
    per = spec.quant(p.bits).per_word if p.quantized else d

    def axes_tok(ci, t):
        vb = T.axis.spatial(bsz, b)
        vkh = T.axis.spatial(hkv, kh)
        tok = T.axis.spatial(syms[p.n_sym], ci * c + t)
        return vb, vkh, tok

    def axes(ci, chunk_kind: str = "S"):
        vb = T.axis.spatial(bsz, b)
        vkh = T.axis.spatial(hkv, kh)
        vc = T.axis.spatial(nc, ci) if chunk_kind == "S" else T.axis.reduce(nc, ci)
        return vb, vkh, vc

    with T.serial(0, nc) as ci:
        IRBuilder.name(f"{p.tag}_c", ci)
        # ---- K dequant: Kd[t, d] ----
        if p.quantized:
            qs = spec.quant(p.bits)
            per = qs.per_word
            kc, ksc, kze = bufs[f"{pre}k_codes"], bufs[f"{pre}k_scale"], bufs[f"{pre}k_zero"]
            with T.grid(c, d // per, per) as (t, w, j):
                with T.sblock(p.block("kdeq")):
                    vb, vkh, tok = axes_tok(ci, t)
                    vw, vj = T.axis.remap("SS", [w, j])
                    dd = vw * per + vj
                    grp = tirx.floordiv(tok, spec.k_group)
                    scale = ksc[vb, vkh, grp, dd].astype(_F32)
                    code = key_code(kc, vb, vkh, tok, dd, p.bits, spec.k_group)
                    val = code * scale + kze[vb, vkh, grp, dd].astype(_F32)
                    T.buffer_store(kd, val, [vb, vkh, tok, vw, vj])
        else:
            kin = bufs[f"{pre}k"]
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block("kdeq")):
                    vb, vkh, tok = axes_tok(ci, t)
                    vdd = T.axis.spatial(d, dd_)
                    T.buffer_store(kd, kin[vb, vkh, tok, vdd].astype(_F32), [vb, vkh, tok, vdd // per, vdd % per])
        # ---- scores and chunk softmax statistics ----
        # partial dot products over QK_LANES channel lanes (vectorizable), then the lane sum
        lanes = qk_lanes(d)
        with T.grid(gs, c, lanes, d // lanes) as (g, t, ln, do):
            with T.sblock(p.block("qk_part")):
                vb, vkh, tok = axes_tok(ci, t)
                vg, vl, vdo = T.axis.remap("SSR", [g, ln, do])
                h = vkh * gs + vg
                dd = vdo * lanes + vl
                with T.init():
                    T.buffer_store(sp_buf, f32(0.0), [vb, vkh, vg, tok, vl])
                val = sp_buf[vb, vkh, vg, tok, vl] + qf[vb, h, dd] * kd[vb, vkh, tok, dd // per, dd % per]
                T.buffer_store(sp_buf, val, [vb, vkh, vg, tok, vl])
        fl = qk_fold_lanes(d)
        sf_buf = st["sf"]
        with T.grid(gs, c, fl) as (g, t, ln):
            with T.sblock(p.block("qk_fold")):
                vb, vkh, tok = axes_tok(ci, t)
                vg, vl = T.axis.remap("SS", [g, ln])
                val = sp_buf[vb, vkh, vg, tok, vl]
                if fl != lanes:
                    val = val + sp_buf[vb, vkh, vg, tok, vl + fl]
                T.buffer_store(sf_buf, val, [vb, vkh, vg, tok, vl])
        with T.grid(gs, c, fl) as (g, t, ln):
            with T.sblock(p.block("qk")):
                vb, vkh, tok = axes_tok(ci, t)
                vg, vl = T.axis.remap("SR", [g, ln])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(s_buf, f32(0.0), [vb, h, tok])
                T.buffer_store(s_buf, s_buf[vb, h, tok] + sf_buf[vb, vkh, vg, tok, vl], [vb, h, tok])
        # chunk max in two steps: partial maxima over token lanes (vectorizable), then over the lanes
        ml = max_lanes(c)
        mp = st["mp"]
        with T.grid(gs, ml, c // ml) as (g, ln, to):
            with T.sblock(p.block("cmax_part")):
                vb, vkh, vc = axes(ci)
                vg, vl, vto = T.axis.remap("SSR", [g, ln, to])
                h = vkh * gs + vg
                tok = vc * c + vto * ml + vl
                with T.init():
                    T.buffer_store(mp, f32(NEG_BIG), [vb, h, vc, vl])
                masked = tirx.Select(tok < lens[vb], s_buf[vb, h, tok], f32(NEG_BIG))
                T.buffer_store(mp, tirx.max(mp[vb, h, vc, vl], masked), [vb, h, vc, vl])
        with T.grid(gs, ml) as (g, ln):
            with T.sblock(p.block("cmax")):
                vb, vkh, vc = axes(ci)
                vg, vl = T.axis.remap("SR", [g, ln])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(mc, f32(NEG_BIG), [vb, h, vc])
                T.buffer_store(mc, tirx.max(mc[vb, h, vc], mp[vb, h, vc, vl]), [vb, h, vc])
        with T.grid(gs, c) as (g, t):
            with T.sblock(p.block("prob")):
                vb, vkh, vc = axes(ci)
                vg, vt = T.axis.remap("SS", [g, t])
                h = vkh * gs + vg
                tok = vc * c + vt
                val = tirx.Select(tok < lens[vb], fast_exp(s_buf[vb, h, tok] - mc[vb, h, vc]), f32(0.0))
                T.buffer_store(p_buf, val, [vb, h, tok])
        with T.grid(gs, c) as (g, t):
            with T.sblock(p.block("lsum")):
                vb, vkh, vc = axes(ci)
                vg, vt = T.axis.remap("SR", [g, t])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(lc, f32(0.0), [vb, h, vc])
                T.buffer_store(lc, lc[vb, h, vc] + p_buf[vb, h, vc * c + vt], [vb, h, vc])
        # ---- V: quantized pieces fold the per-token scale / zero into P (sum_t P v = sum_t (P s) code + sum_t P z),
        # so the dequant feeding P @ V is only the code -> float conversion; masking happens on P s and P z (garbage
        # scales past lens never reach acc; codes are always finite). The dense piece masks V itself.
        if p.quantized:
            qs = spec.quant(p.bits)
            per = qs.per_word
            nvg = d // qs.v_group
            ps_buf, pz_buf = st["ps"], st["pz"]
            vcodes, vsc, vze = bufs[f"{pre}v_codes"], bufs[f"{pre}v_scale"], bufs[f"{pre}v_zero"]
            with T.grid(gs, nvg, c) as (g, vg_, t):
                with T.sblock(p.block("vscale")):
                    vb, vkh, tok = axes_tok(ci, t)
                    vg, vgi = T.axis.remap("SS", [g, vg_])
                    h = vkh * gs + vg
                    val = p_buf[vb, h, tok] * vsc[vb, vkh, tok, vgi].astype(_F32)
                    T.buffer_store(ps_buf, tirx.Select(tok < lens[vb], val, f32(0.0)), [vb, h, tok, vgi])
            # zero-point term in two steps like the chunk max: token lanes (vector), then over the lanes
            ml = max_lanes(c)
            pzp = st["pzp"]
            with T.grid(gs, nvg, ml, c // ml) as (g, vg_, ln, to):
                with T.sblock(p.block("vzero_part")):
                    vb, vkh, vc = axes(ci)
                    vg, vgi, vl, vto = T.axis.remap("SSSR", [g, vg_, ln, to])
                    h = vkh * gs + vg
                    tok = vc * c + vto * ml + vl
                    with T.init():
                        T.buffer_store(pzp, f32(0.0), [vb, h, vc, vgi, vl])
                    val = tirx.Select(tok < lens[vb], p_buf[vb, h, tok] * vze[vb, vkh, tok, vgi].astype(_F32), f32(0.0))
                    T.buffer_store(pzp, pzp[vb, h, vc, vgi, vl] + val, [vb, h, vc, vgi, vl])
            with T.grid(gs, nvg, ml) as (g, vg_, ln):
                with T.sblock(p.block("vzero")):
                    vb, vkh, vc = axes(ci)
                    vg, vgi, vl = T.axis.remap("SSR", [g, vg_, ln])
                    h = vkh * gs + vg
                    with T.init():
                        T.buffer_store(pz_buf, f32(0.0), [vb, h, vc, vgi])
                    T.buffer_store(pz_buf, pz_buf[vb, h, vc, vgi] + pzp[vb, h, vc, vgi, vl], [vb, h, vc, vgi])
            with T.grid(c, d // per, per) as (t, w, j):
                with T.sblock(p.block("vdeq")):
                    vb, vkh, tok = axes_tok(ci, t)
                    vw, vj = T.axis.remap("SS", [w, j])
                    T.buffer_store(vd_buf, _unpack(vcodes[vb, vkh, tok, vw], vj, p.bits), [vb, vkh, tok, vw, vj])
        else:
            vin = bufs[f"{pre}v"]
            with T.grid(c, d) as (t, dd_):
                with T.sblock(p.block("vdeq")):
                    vb, vkh, tok = axes_tok(ci, t)
                    vdd = T.axis.spatial(d, dd_)
                    val = tirx.Select(tok < lens[vb], vin[vb, vkh, tok, vdd].astype(_F32), f32(0.0))
                    T.buffer_store(vd_buf, val, [vb, vkh, tok, vdd // per, vdd % per])
        # ---- P @ V of the chunk, then acc = acc * alpha + pv ----
        with T.grid(gs, d, c) as (g, dd_, t):
            with T.sblock(p.block("pv")):
                vb, vkh, vc = axes(ci)
                vg, vdd, vt = T.axis.remap("SSR", [g, dd_, t])
                h = vkh * gs + vg
                tok = vc * c + vt
                with T.init():
                    T.buffer_store(pvc, f32(0.0), [vb, vc, h, vdd])
                if p.quantized:
                    weight = st["ps"][vb, h, tok, vdd // spec.v_group]
                else:
                    weight = p_buf[vb, h, tok]
                T.buffer_store(pvc, pvc[vb, vc, h, vdd] + weight * vd_buf[vb, vkh, tok, vdd // per, vdd % per], [vb, vc, h, vdd])
        # ---- merge the chunk into the running state: the only block touching (m, l, acc) of this piece ----
        vc_cell: list = []

        def state_axes():
            vb, vkh, vc = axes(ci, "R")
            vg = T.axis.spatial(gs, g)
            vc_cell[:] = [vc]
            return (vb, vkh * gs + vg), None

        def chunk_acc(row, dd_):
            val = pvc[row[0], vc_cell[0], row[1], dd_]
            if p.quantized:
                val = val + st["pz"][row[0], row[1], vc_cell[0], dd_ // spec.v_group]
            return val

        with T.grid(gs) as g:
            emit_state_update(p.block("state"), state_axes, m_st, l_st, acc,
                              lambda row: mc[(*row, vc_cell[0])], lambda row: lc[(*row, vc_cell[0])], chunk_acc, d)
