"""Token-granularity baseline with per-key-group dispatch (CPU): the strongest straightforward kernel for a cache
whose widths stay *in place*, in token order, without reordering into buckets.

Token-level mixed precision keeps every token where it is and gives it its own width; with per-channel key groups
the finest unit the key format allows is a key group (``k_group`` tokens), so the width is per group. Where
:mod:`wq_compile.kernels.token_granular` reads a token's width in the inner loop (variable shifts), this kernel
reads it once per key group and branches to a tile body compiled for that width: the same SIMD tiles as the fused
bucket kernel (:class:`~wq_compile.kernels.attention_cpu.QuantTiles`: constant shifts, vector unpacks, the query
group in registers). What is left of the difference to reordered buckets is what reordering is for: one width per
loop (no branch per group, one online-softmax state per width live at a time, keys and values of one width
streamed contiguously) and no offset tables.

In-place format, per (sample, KV head) row, batch first (:func:`pack_group_dispatch` builds it)::

    q [B,Hq,D] f32, k_stream [B,Hkv,KB] u8, k_scale [B,Hkv,G,D] f16, k_zero [B,Hkv,G,D] f16,
    v_stream [B,Hkv,VB] u8, v_scale [B,Hkv,N,D/vg] f16, v_zero [B,Hkv,N,D/vg] f16,
    gbits [B,G] i32, koff [B,G] i32, voff [B,G] i32, lens [B] i32,
    dense_k [B,Hkv,Nd,D] f32, dense_v [B,Hkv,Nd,D] f32, dense_lens [B] i32, sm_scale f32, out [B,Hq,D] f32

Key group ``g`` of width ``w = gbits[b, g]``: its key bytes start at ``koff[b, g]`` of the row (channel-major,
``key_lane_bytes(w)`` per channel, the bucket format of one group); its tokens' value bytes start at ``voff[b, g]``
(``D * w / 8`` per token); scales and zeros are in token order. ``N = G * k_group``; ``lens <= N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.quant import dequantize_keys, dequantize_values, key_lane_bytes, quantize_keys, quantize_values
from ..core.reference import attend_piece, merge_states
from .signature import ArgDesc
from ..core.spec import KernelSpec
from .attention import pieces
from .attention_cpu import CpuKnobs, QuantTiles, _dense_piece, _split_range, decode_frame

#: Widths the kernel dispatches to (one tile body each).
WIDTHS: tuple[int, ...] = (8, 4, 2, 1)
_U8, _I32, _F32, _F16 = "uint8", "int32", "float32", "float16"


def dispatch_spec(head_dim: int, num_q_heads: int, num_kv_heads: int, knobs: CpuKnobs = CpuKnobs()) -> KernelSpec:
    """The fused spec whose shapes, quantization groups and knobs the dispatch kernel shares."""
    extra = (("splits", knobs.splits), ("pvc", knobs.pv_channels), ("qkh", knobs.qk_heads)) + (
        (("lut", 1),) if knobs.lut else ())
    return KernelSpec("fused", WIDTHS + (16,), head_dim, num_q_heads, num_kv_heads, extra=extra)


def arguments(spec: KernelSpec) -> list[ArgDesc]:
    hq, hkv, d = spec.num_q_heads, spec.num_kv_heads, spec.head_dim
    nvg = d // spec.v_group
    return [
        ArgDesc.tensor("q", ("B", hq, d), _F32),
        ArgDesc.tensor("k_stream", ("B", hkv, "KB"), _U8),
        ArgDesc.tensor("k_scale", ("B", hkv, "G", d), _F16),
        ArgDesc.tensor("k_zero", ("B", hkv, "G", d), _F16),
        ArgDesc.tensor("v_stream", ("B", hkv, "VB"), _U8),
        ArgDesc.tensor("v_scale", ("B", hkv, "N", nvg), _F16),
        ArgDesc.tensor("v_zero", ("B", hkv, "N", nvg), _F16),
        ArgDesc.tensor("gbits", ("B", "G"), _I32),
        ArgDesc.tensor("koff", ("B", "G"), _I32),
        ArgDesc.tensor("voff", ("B", "G"), _I32),
        ArgDesc.tensor("lens", ("B",), _I32),
        ArgDesc.tensor("dense_k", ("B", hkv, "Nd", d), _F32),
        ArgDesc.tensor("dense_v", ("B", hkv, "Nd", d), _F32),
        ArgDesc.tensor("dense_lens", ("B",), _I32),
        ArgDesc.scalar("sm_scale", _F32),
        ArgDesc.tensor("out", ("B", hq, d), _F32, output=True),
    ]


def build_group_dispatch(spec: KernelSpec) -> tirx.PrimFunc:
    """Plain TIR of the dispatch kernel (see the module docstring); ``spec`` from :func:`dispatch_spec`."""
    knobs = CpuKnobs.of(spec)
    hkv, kg = spec.num_kv_heads, spec.k_group
    dense = next(p for p in pieces(spec) if not p.quantized)

    def body(bufs, b, kh, sp, qf, m_all, l_all, acc, scratch) -> None:
        ks, vs = bufs["k_stream"], bufs["v_stream"]
        row_k, row_v = (b * hkv + kh) * ks.shape[2], (b * hkv + kh) * vs.shape[2]
        kb = T.decl_buffer((ks.shape[0] * hkv * ks.shape[2],), _U8, data=ks.data)
        vb = T.decl_buffer((vs.shape[0] * hkv * vs.shape[2],), _U8, data=vs.data)
        IRBuilder.name_many(["kb", "vb"], [kb, vb])
        nv = bufs["lens"][b]
        states = {w: QuantTiles(spec, w, knobs, {"pacc": scratch["pacc" if i == 0 else f"pacc{i}"],
                                                 "qs": scratch["qs"]}, tirx.min(nv, 0))
                  for i, w in enumerate(WIDTHS)}
        g0, g1 = _split_range(tirx.floordiv(nv + kg - 1, kg), sp, knobs.splits)
        k_scale, k_zero, v_scale, v_zero = (bufs[n] for n in ("k_scale", "k_zero", "v_scale", "v_zero"))
        gbits, koff, voff = bufs["gbits"], bufs["koff"], bufs["voff"]
        with T.serial(g0, g1) as g:
            tok0 = g * kg

            def tok(s):
                return tok0 + tirx.min(s, kg - 1)

            for w, st in states.items():
                with T.If(gbits[b, g] == w):
                    with T.Then():
                        st.tile(qf, tirx.min(kg, nv - tok0), kb, row_k + koff[b, g],
                                lambda dd: k_scale[b, kh, g, dd], lambda dd: k_zero[b, kh, g, dd],
                                vb, lambda t, st=st: row_v + voff[b, g] + t * st.vbytes,
                                lambda s, vg: v_scale[b, kh, tok(s), vg], lambda s, vg: v_zero[b, kh, tok(s), vg])
        for st in states.values():
            st.finish(m_all, l_all, acc)
        _dense_piece(spec, dense, bufs, b, kh, sp, qf, m_all, l_all, acc, scratch)

    name = "granular_dispatch" + spec.uri[len("fused"):]
    return decode_frame(spec, name, arguments(spec), knobs.splits, len(WIDTHS), body)


@dataclass(frozen=True)
class GroupDispatchCache:
    """One layer in the in-place format (batch 1), plus the dequantized keys/values in token order (the
    reference's inputs)."""

    tensors: dict[str, torch.Tensor]
    k_deq: torch.Tensor
    v_deq: torch.Tensor
    n: int

    def args(self) -> list[torch.Tensor]:
        names = [a.name for a in _ARG_NAMES]
        return [self.tensors[n] for n in names]

    def bytes_read(self) -> int:
        return sum(self.tensors[n].numel() * self.tensors[n].element_size()
                   for n in ("k_stream", "k_scale", "k_zero", "v_stream", "v_scale", "v_zero", "gbits", "koff",
                             "voff"))


_ARG_NAMES = [a for a in arguments(KernelSpec("fused", (16,), 64, 1, 1)) if a.name not in ("q", "sm_scale", "out")]


def pack_group_dispatch(spec: KernelSpec, k: torch.Tensor, v: torch.Tensor, group_bits: torch.Tensor,
                        dense_k: torch.Tensor, dense_v: torch.Tensor) -> GroupDispatchCache:
    """``k, v [Hkv, n, D]`` with width ``group_bits[g]`` per key group (token order) -> the in-place format;
    ``dense_k/v [Hkv, Nd, D]`` the residual. Codes equal the bucket quantizer's (per-group keys, per-token
    values are independent of which other tokens share a width)."""
    hkv, n, d = k.shape
    kg = spec.k_group
    ng = -(-n // kg)
    if group_bits.numel() != ng:
        raise ValueError(f"group_bits: expected {ng} widths (one per key group of {kg} tokens), got "
                         f"{group_bits.numel()}")
    bad = sorted(set(int(b) for b in group_bits.unique()) - set(WIDTHS))
    if bad:
        raise ValueError(f"group_bits: widths {bad} are not among {WIDTHS}")
    npad = ng * kg
    kp = torch.cat([k, k[:, -1:].expand(hkv, npad - n, d)], 1) if npad > n else k
    vp = torch.cat([v, v[:, -1:].expand(hkv, npad - n, d)], 1) if npad > n else v
    kgr, vgr = kp.view(hkv, ng, kg, d), vp.view(hkv, ng, kg, d)
    nvg = d // spec.v_group
    k_scale = torch.empty(hkv, ng, d, dtype=torch.float16)
    k_zero = torch.empty_like(k_scale)
    v_scale = torch.empty(hkv, npad, nvg, dtype=torch.float16)
    v_zero = torch.empty_like(v_scale)
    k_deq, v_deq = torch.empty(hkv, npad, d), torch.empty(hkv, npad, d)
    k_rec: list[torch.Tensor | None] = [None] * ng
    v_rec: list[torch.Tensor | None] = [None] * ng
    for w in WIDTHS:
        idx = torch.nonzero(group_bits == w).flatten()
        if idx.numel() == 0:
            continue
        qs = spec.quant(w)
        qk = quantize_keys(kgr[:, idx].reshape(hkv, -1, d), qs)
        qv = quantize_values(vgr[:, idx].reshape(hkv, -1, d), qs)
        kbytes = qk.codes.contiguous().view(torch.uint8).reshape(hkv, idx.numel(), d * key_lane_bytes(w, kg))
        vbytes = qv.codes.contiguous().view(torch.uint8).reshape(hkv, idx.numel(), kg * d * w // 8)
        kd = dequantize_keys(qk).view(hkv, idx.numel(), kg, d)
        vd = dequantize_values(qv).view(hkv, idx.numel(), kg, d)
        for j, g in enumerate(idx.tolist()):
            k_rec[g], v_rec[g] = kbytes[:, j], vbytes[:, j]
            k_scale[:, g], k_zero[:, g] = qk.scale[:, j], qk.zero[:, j]
            sl = slice(g * kg, (g + 1) * kg)
            v_scale[:, sl], v_zero[:, sl] = qv.scale[:, j * kg:(j + 1) * kg], qv.zero[:, j * kg:(j + 1) * kg]
            k_deq[:, sl], v_deq[:, sl] = kd[:, j], vd[:, j]
    koff = torch.tensor([0] + [r.shape[1] for r in k_rec[:-1]], dtype=torch.int64).cumsum(0)
    voff = torch.tensor([0] + [r.shape[1] for r in v_rec[:-1]], dtype=torch.int64).cumsum(0)
    one = {
        "k_stream": torch.cat(k_rec, 1), "k_scale": k_scale, "k_zero": k_zero,
        "v_stream": torch.cat(v_rec, 1), "v_scale": v_scale, "v_zero": v_zero,
        "gbits": group_bits.to(torch.int32).view(ng), "koff": koff.to(torch.int32), "voff": voff.to(torch.int32),
        "lens": torch.tensor([n], dtype=torch.int32),
        # an empty residual keeps one (masked) row: a zero-size dimension is not a compact array to TVM
        "dense_k": _at_least_one_row(dense_k), "dense_v": _at_least_one_row(dense_v),
        "dense_lens": torch.tensor([dense_k.shape[1]], dtype=torch.int32),
    }
    tensors = {name: (t if name.endswith("lens") else t.unsqueeze(0)).contiguous() for name, t in one.items()}
    return GroupDispatchCache(tensors, k_deq[:, :n], v_deq[:, :n], n)


def _at_least_one_row(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.shape[1] else torch.zeros(x.shape[0], 1, x.shape[2])


def reference_group_dispatch(q: torch.Tensor, cache: GroupDispatchCache, sm_scale: float) -> torch.Tensor:
    """Attention over the dequantized in-place tokens and the residual, in torch (the oracle of the kernel)."""
    t = cache.tensors
    o1, l1 = attend_piece(q, cache.k_deq[None], cache.v_deq[None], t["lens"], sm_scale)
    o2, l2 = attend_piece(q, t["dense_k"], t["dense_v"], t["dense_lens"], sm_scale)
    return merge_states([o1, o2], [l1, l2])[0]
