"""Token-granularity baseline: decode attention over a cache where every token keeps its own width *in place*
(no reordering into buckets), the approach window-level reordering replaces.

Format (same quantizer as the buckets; :func:`pack_token_granular` builds it from torch tensors):
keys per channel over groups of ``k_group`` tokens, values per token over ``v_group`` channels, fp16 scale/zero.
The width is per token, constant within a key group (per-channel key groups cannot mix widths; a key group is the
finest unit the format allows). Codes of token ``t`` at width ``bits[t]`` occupy ``D * bits[t] / 32`` int32 words
of a per-head word stream starting at ``offset[t]``, little-endian like :func:`wq_compile.core.quant.pack`.

The kernel reads each token's width and offset in the inner loop (``word = stream[offset[t] + (d*bits[t] >> 5)]``,
``code = word >> (d*bits[t] & 31) & mask(bits[t])``): no width is known at compile time, so the unpack has
variable shifts where a bucket kernel has constants. Structure and block style as :mod:`.attention`: one work
item per (sample, KV head), all query heads of the group share the dequantized chunk, fixed chunks of ``chunk``
tokens in a dynamic loop, an online-softmax state merged per chunk, then a dense piece (the residual), then the
final merge. Arguments::

    q [B,Hq,D] f32, k_words [B,Hkv,NW] i32, v_words [B,Hkv,NW] i32, bits [B,N] i32, offset [B,N] i32,
    k_scale [B,Hkv,G,D] f16, k_zero [B,Hkv,G,D] f16, v_scale [B,Hkv,N,D/vg] f16, v_zero [B,Hkv,N,D/vg] f16,
    lens [B] i32, dense_k [B,Hkv,Nd,D] f32, dense_v [B,Hkv,Nd,D] f32, dense_lens [B] i32, sm_scale f32,
    out [B,Hq,D] f32

``N`` and ``Nd`` are multiples of ``chunk``; tokens ``t >= lens[b]`` are masked and must hold in-bounds
``bits``/``offset`` (``pack_token_granular`` pads with width 2, offset 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.quant import pack, quantize_keys, quantize_values, unpack_keys
from ..core.spec import QuantSpec
from .common import NEG_BIG, alloc, declare_params, emit_state_update, f32, fast_exp

_F32, _I32, _F16 = "float32", "int32", "float16"


@dataclass(frozen=True)
class TokenGranularSpec:
    """Shapes of one token-granular decode kernel (token counts stay symbolic)."""

    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    k_group: int = 28
    v_group: int = 64
    chunk: int = 64

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads: {self.num_q_heads} is not a multiple of {self.num_kv_heads}")
        if self.head_dim % 16 or self.head_dim % self.v_group:
            raise ValueError(f"head_dim: {self.head_dim} must be a multiple of 16 and of v_group {self.v_group}")

    @property
    def uri(self) -> str:
        return (f"tokgran_kg{self.k_group}_vg{self.v_group}_d{self.head_dim}_h{self.num_q_heads}kv{self.num_kv_heads}"
                f"_f32_c{self.chunk}")


def build_token_granular(spec: TokenGranularSpec) -> tirx.PrimFunc:
    """TIR of the token-granular decode kernel (unscheduled; :func:`default_schedule` schedules it)."""
    hq, hkv, d, c = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.chunk
    gs, vg = hq // hkv, spec.v_group
    nvg = d // vg
    shapes = [
        ("q", ("B", hq, d), _F32), ("k_words", ("B", hkv, "NW"), _I32), ("v_words", ("B", hkv, "NW"), _I32),
        ("bits", ("B", "N"), _I32), ("offset", ("B", "N"), _I32),
        ("k_scale", ("B", hkv, "G", d), _F16), ("k_zero", ("B", hkv, "G", d), _F16),
        ("v_scale", ("B", hkv, "N", nvg), _F16), ("v_zero", ("B", hkv, "N", nvg), _F16), ("lens", ("B",), _I32),
        ("dense_k", ("B", hkv, "Nd", d), _F32), ("dense_v", ("B", hkv, "Nd", d), _F32), ("dense_lens", ("B",), _I32),
        ("sm_scale", None, _F32), ("out", ("B", hq, d), _F32),
    ]
    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(spec.uri)
            T.func_attr({"tirx.noalias": True})
            buf, syms = declare_params(shapes)
            bsz, n, nd = syms["B"], syms["N"], syms["Nd"]
            sm_scale, out = buf["sm_scale"], buf["out"]

            with T.sblock("root"):
                qf = alloc("qf", (bsz, hq, d))
                st = {}
                for tag, cap in (("mx", n), ("dense", nd)):
                    ncap = tirx.floordiv(cap, c)
                    st[tag] = {
                        "kd": alloc(f"{tag}_kd", (bsz, hkv, cap, d)), "vd": alloc(f"{tag}_vd", (bsz, hkv, cap, d)),
                        "s": alloc(f"{tag}_s", (bsz, hq, cap)), "p": alloc(f"{tag}_p", (bsz, hq, cap)),
                        "mc": alloc(f"{tag}_mc", (bsz, hq, ncap)), "lc": alloc(f"{tag}_lc", (bsz, hq, ncap)),
                        "pvc": alloc(f"{tag}_pvc", (bsz, ncap, hq, d)),
                        "m": alloc(f"{tag}_m", (bsz, hq)), "l": alloc(f"{tag}_l", (bsz, hq)),
                        "acc": alloc(f"{tag}_acc", (bsz, hq, d)),
                    }
                with T.grid(bsz, hkv) as (b, kh):
                    with T.grid(gs, d) as (g, dd):
                        with T.sblock("qscale"):
                            vb, vkh, vgi, vd = T.axis.remap("SSSS", [b, kh, g, dd])
                            h = vkh * gs + vgi
                            T.buffer_store(qf, buf["q"][vb, h, vd] * sm_scale, [vb, h, vd])
                    _emit(spec, "mx", n, buf, st["mx"], qf, bsz, b, kh)
                    _emit(spec, "dense", nd, buf, st["dense"], qf, bsz, b, kh)
                    _emit_final(spec, n, nd, st, out, b, kh)
    return ib.get()


def _emit(spec: TokenGranularSpec, tag: str, cap, buf, st, qf, bsz, b, kh) -> None:
    hq, hkv, d, c = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.chunk
    gs = hq // hkv
    nc = tirx.floordiv(cap, c)
    mixed = tag == "mx"
    lens = buf["lens"] if mixed else buf["dense_lens"]
    kd, vd_buf, s_buf, p_buf = st["kd"], st["vd"], st["s"], st["p"]
    mc, lc, pvc, acc, m_st, l_st = st["mc"], st["lc"], st["pvc"], st["acc"], st["m"], st["l"]

    def axes_tok(ci, t):
        return T.axis.spatial(bsz, b), T.axis.spatial(hkv, kh), T.axis.spatial(cap, ci * c + t)

    def axes(ci, kind: str = "S"):
        vc = T.axis.spatial(nc, ci) if kind == "S" else T.axis.reduce(nc, ci)
        return T.axis.spatial(bsz, b), T.axis.spatial(hkv, kh), vc

    def code(words, vb, vkh, tok, vd):
        bits = buf["bits"][vb, tok]
        pos = vd * bits  # bit position of channel vd in the token's codes
        word = words[vb, vkh, buf["offset"][vb, tok] + tirx.shift_right(pos, 5)]
        mask = tirx.shift_left(tirx.const(1, _I32), bits) - 1
        return tirx.bitwise_and(tirx.shift_right(word, tirx.bitwise_and(pos, 31)), mask).astype(_F32)

    with T.serial(0, nc) as ci:
        with T.grid(c, d) as (t, dd):
            with T.sblock(f"{tag}_kdeq"):
                vb, vkh, tok = axes_tok(ci, t)
                vd = T.axis.spatial(d, dd)
                if mixed:
                    grp = tirx.floordiv(tok, spec.k_group)
                    val = (code(buf["k_words"], vb, vkh, tok, vd) * buf["k_scale"][vb, vkh, grp, vd].astype(_F32)
                           + buf["k_zero"][vb, vkh, grp, vd].astype(_F32))
                else:
                    val = buf["dense_k"][vb, vkh, tok, vd]
                T.buffer_store(kd, val, [vb, vkh, tok, vd])
        with T.grid(gs, c, d) as (g, t, dd):
            with T.sblock(f"{tag}_qk"):
                vb, vkh, tok = axes_tok(ci, t)
                vg, vd = T.axis.remap("SR", [g, dd])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(s_buf, f32(0.0), [vb, h, tok])
                T.buffer_store(s_buf, s_buf[vb, h, tok] + qf[vb, h, vd] * kd[vb, vkh, tok, vd], [vb, h, tok])
        with T.grid(gs, c) as (g, t):
            with T.sblock(f"{tag}_cmax"):
                vb, vkh, vc = axes(ci)
                vg, vt = T.axis.remap("SR", [g, t])
                h = vkh * gs + vg
                tok = vc * c + vt
                with T.init():
                    T.buffer_store(mc, f32(NEG_BIG), [vb, h, vc])
                masked = tirx.Select(tok < lens[vb], s_buf[vb, h, tok], f32(NEG_BIG))
                T.buffer_store(mc, tirx.max(mc[vb, h, vc], masked), [vb, h, vc])
        with T.grid(gs, c) as (g, t):
            with T.sblock(f"{tag}_prob"):
                vb, vkh, vc = axes(ci)
                vg, vt = T.axis.remap("SS", [g, t])
                h = vkh * gs + vg
                tok = vc * c + vt
                val = tirx.Select(tok < lens[vb], fast_exp(s_buf[vb, h, tok] - mc[vb, h, vc]), f32(0.0))
                T.buffer_store(p_buf, val, [vb, h, tok])
        with T.grid(gs, c) as (g, t):
            with T.sblock(f"{tag}_lsum"):
                vb, vkh, vc = axes(ci)
                vg, vt = T.axis.remap("SR", [g, t])
                h = vkh * gs + vg
                with T.init():
                    T.buffer_store(lc, f32(0.0), [vb, h, vc])
                T.buffer_store(lc, lc[vb, h, vc] + p_buf[vb, h, vc * c + vt], [vb, h, vc])
        with T.grid(c, d) as (t, dd):
            with T.sblock(f"{tag}_vdeq"):
                vb, vkh, tok = axes_tok(ci, t)
                vd = T.axis.spatial(d, dd)
                if mixed:
                    gi = tirx.floordiv(vd, spec.v_group)
                    val = (code(buf["v_words"], vb, vkh, tok, vd) * buf["v_scale"][vb, vkh, tok, gi].astype(_F32)
                           + buf["v_zero"][vb, vkh, tok, gi].astype(_F32))
                else:
                    val = buf["dense_v"][vb, vkh, tok, vd]
                # garbage past lens never reaches acc: P is 0 there, and 0 * finite = 0
                T.buffer_store(vd_buf, tirx.Select(tok < lens[vb], val, f32(0.0)), [vb, vkh, tok, vd])
        with T.grid(gs, d, c) as (g, dd, t):
            with T.sblock(f"{tag}_pv"):
                vb, vkh, vc = axes(ci)
                vg, vd, vt = T.axis.remap("SSR", [g, dd, t])
                h = vkh * gs + vg
                tok = vc * c + vt
                with T.init():
                    T.buffer_store(pvc, f32(0.0), [vb, vc, h, vd])
                T.buffer_store(pvc, pvc[vb, vc, h, vd] + p_buf[vb, h, tok] * vd_buf[vb, vkh, tok, vd], [vb, vc, h, vd])
        vc_cell: list = []

        def state_axes():
            vb, vkh, vc = axes(ci, "R")
            vg = T.axis.spatial(gs, g)
            vc_cell[:] = [vc]
            return (vb, vkh * gs + vg), None

        with T.grid(gs) as g:
            emit_state_update(f"{tag}_state", state_axes, m_st, l_st, acc,
                              lambda row: mc[(*row, vc_cell[0])], lambda row: lc[(*row, vc_cell[0])],
                              lambda row, dd_: pvc[row[0], vc_cell[0], row[1], dd_], d)


def _emit_final(spec: TokenGranularSpec, n, nd, st, out, b, kh) -> None:
    """out = (acc_mx e^(m_mx - M) + acc_d e^(m_d - M)) / (l_mx e^(m_mx - M) + l_d e^(m_d - M)); an empty piece
    (no chunk, or no valid token) contributes nothing."""
    gs, d, c = spec.num_q_heads // spec.num_kv_heads, spec.head_dim, spec.chunk
    present = {"mx": tirx.floordiv(n, c) > 0, "dense": tirx.floordiv(nd, c) > 0}
    with T.grid(gs, d) as (g, dd):
        with T.sblock("final_o"):
            vb, vkh, vg, vd = T.axis.remap("SSSS", [b, kh, g, dd])
            h = vkh * gs + vg

            def m_of(tag):
                return tirx.Select(present[tag], st[tag]["m"][vb, h], f32(NEG_BIG))

            mx = tirx.max(m_of("mx"), m_of("dense"))
            num, den = f32(0.0), f32(0.0)
            for tag in ("mx", "dense"):
                w = tirx.Select(present[tag], fast_exp(st[tag]["m"][vb, h] - mx), f32(0.0))
                num = num + tirx.Select(w > f32(0.0), st[tag]["acc"][vb, h, vd] * w, f32(0.0))
                den = den + tirx.Select(w > f32(0.0), st[tag]["l"][vb, h] * w, f32(0.0))
            T.buffer_store(out, tirx.Select(den > f32(0.0), num / den, f32(0.0)), [vb, h, vd])


SCHEDULES = ("vectorized", "parallel")


def default_schedule(sch, spec: TokenGranularSpec, kind: str = "vectorized") -> None:
    """``parallel``: one parallel work item per (sample, KV head) and nothing else, the same effort as the bucket
    kernels' untuned llvm default. ``vectorized`` adds the first steps of their tuned space: dequant inlined into
    its consumers, the chunk softmax and the channel lanes of P @ V vectorized."""
    if kind not in SCHEDULES:
        raise ValueError(f"kind: must be one of {SCHEDULES}, got {kind!r}")
    names = [gv.name_hint for gv in sch.mod.get_global_vars()]
    if "main" not in names and len(names) == 1:
        sch.work_on(names[0])
    outer = sch.get_loops(sch.get_sblock("qscale"))[:2]
    sch.parallel(sch.fuse(*outer))
    if kind == "parallel":
        return
    for tag in ("mx", "dense"):
        sch.compute_inline(sch.get_sblock(f"{tag}_kdeq"))
        sch.compute_inline(sch.get_sblock(f"{tag}_vdeq"))
        sch.vectorize(sch.get_loops(sch.get_sblock(f"{tag}_prob"))[-1])
        pv = sch.get_sblock(f"{tag}_pv")
        *_, g, dd, t = sch.get_loops(pv)
        sch.reorder(g, t, dd)
        sch.vectorize(dd)
        sch.decompose_reduction(pv, t)


@dataclass
class TokenGranularCache:
    """One layer's quantized tokens in place (prompt order) plus a dense residual, as the kernel reads them."""

    k_words: torch.Tensor
    v_words: torch.Tensor
    bits: torch.Tensor
    offset: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    lens: torch.Tensor
    dense_k: torch.Tensor
    dense_v: torch.Tensor
    dense_lens: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.k_words, self.v_words, self.bits, self.offset, self.k_scale, self.k_zero, self.v_scale,
                self.v_zero, self.lens, self.dense_k, self.dense_v, self.dense_lens)


def pack_token_granular(k: torch.Tensor, v: torch.Tensor, group_bits: torch.Tensor, dense_k: torch.Tensor,
                        dense_v: torch.Tensor, k_group: int = 28, v_group: int = 64, chunk: int = 64
                        ) -> TokenGranularCache:
    """Quantize ``k, v [Hkv, n, D]`` (``n`` whole key groups) in place, key group ``i`` at ``group_bits[i]``
    (2/4/8), next to a dense residual ``dense_k, dense_v [Hkv, nd, D]``; batch of one, capacities padded to
    whole chunks."""
    hkv, n, d = k.shape
    if n % k_group or group_bits.numel() != n // k_group:
        raise ValueError(f"k: {n} tokens must be {group_bits.numel()} whole key groups of {k_group}")
    tok_bits = group_bits.to(torch.int32).repeat_interleave(k_group)
    words = d * tok_bits // 32
    offset = torch.zeros(n, dtype=torch.int32)
    offset[1:] = torch.cumsum(words, 0)[:-1].to(torch.int32)
    total = int(words.sum())
    cap = -(-max(n, 1) // chunk) * chunk
    k_words = torch.zeros(hkv, max(total, 1), dtype=torch.int32)
    v_words = torch.zeros_like(k_words)
    k_scale = torch.zeros(hkv, max(-(-cap // k_group), 1), d, dtype=torch.float16)
    k_zero = torch.zeros_like(k_scale)
    v_scale = torch.zeros(hkv, cap, d // v_group, dtype=torch.float16)
    v_zero = torch.zeros_like(v_scale)
    for b in sorted({int(x) for x in group_bits.tolist()}):
        gsel = torch.nonzero(group_bits == b).flatten()
        tsel = (gsel[:, None] * k_group + torch.arange(k_group)[None]).flatten()
        spec = QuantSpec(b, k_group, v_group)
        qk, qv = quantize_keys(k[:, tsel], spec), quantize_values(v[:, tsel], spec)
        k_scale[:, gsel], k_zero[:, gsel] = qk.scale, qk.zero
        v_scale[:, tsel], v_zero[:, tsel] = qv.scale, qv.zero
        per = d * b // 32
        idx = (offset[tsel].long()[:, None] + torch.arange(per)[None]).flatten()
        # this baseline stores every token's key codes in place, packed along channels (per-token widths); the
        # bucket format packs keys along tokens per group, so repack the reference quantizer's codes
        k_tok = pack(unpack_keys(qk.codes, b, k_group, tsel.numel()), b)
        k_words[:, idx] = k_tok.reshape(hkv, -1)
        v_words[:, idx] = qv.codes.reshape(hkv, -1)
    pad_bits = torch.full((cap,), 2, dtype=torch.int32)
    pad_bits[:n] = tok_bits
    pad_off = torch.zeros(cap, dtype=torch.int32)
    pad_off[:n] = offset
    nd = dense_k.shape[1]
    dcap = -(-max(nd, 1) // chunk) * chunk
    dk = torch.zeros(hkv, dcap, d)
    dv = torch.zeros(hkv, dcap, d)
    dk[:, :nd], dv[:, :nd] = dense_k.float(), dense_v.float()
    one = torch.tensor([n], dtype=torch.int32)
    return TokenGranularCache(k_words[None].contiguous(), v_words[None].contiguous(), pad_bits[None], pad_off[None],
                              k_scale[None], k_zero[None], v_scale[None], v_zero[None], one, dk[None], dv[None],
                              torch.tensor([nd], dtype=torch.int32))


def reference_token_granular(q: torch.Tensor, cache: TokenGranularCache, sm_scale: float, k_group: int = 28,
                             v_group: int = 64) -> torch.Tensor:
    """Independent torch oracle: unpack every token with :func:`wq_compile.core.quant.unpack` at its own width,
    dequantize with its group's scale/zero, attend over those and the dense residual (fp32)."""
    from ..core.quant import unpack

    n, nd = int(cache.lens[0]), int(cache.dense_lens[0])
    hkv, d = cache.k_scale.shape[1], cache.k_scale.shape[3]
    ks, vs = [], []
    for t in range(n):
        b, off = int(cache.bits[0, t]), int(cache.offset[0, t])
        w = d * b // 32
        kc = unpack(cache.k_words[0, :, off:off + w], b).float()
        vc = unpack(cache.v_words[0, :, off:off + w], b).float()
        g = t // k_group
        ks.append(kc * cache.k_scale[0, :, g].float() + cache.k_zero[0, :, g].float())
        vsc = cache.v_scale[0, :, t].float().repeat_interleave(v_group, -1)
        vze = cache.v_zero[0, :, t].float().repeat_interleave(v_group, -1)
        vs.append(vc * vsc + vze)
    k = torch.cat([torch.stack(ks, 1) if ks else torch.zeros(hkv, 0, d), cache.dense_k[0, :, :nd]], 1)
    v = torch.cat([torch.stack(vs, 1) if vs else torch.zeros(hkv, 0, d), cache.dense_v[0, :, :nd]], 1)
    hq = q.shape[1]
    qg = q[0].float().reshape(hkv, hq // hkv, d)
    p = torch.softmax(torch.einsum("hgd,htd->hgt", qg, k) * sm_scale, -1)
    return torch.einsum("hgt,htd->hgd", p, v).reshape(1, hq, d)
