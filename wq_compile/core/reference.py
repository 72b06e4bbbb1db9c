"""Attention over a bucketed cache in plain torch: the oracle every compiled kernel is compared with.

It dequantizes each bucket densely (fine for an oracle, never used on the fast path), attends per piece with fp32
accumulation and merges the pieces' (output, log-sum-exp) states exactly as a split-KV kernel does.
"""

from __future__ import annotations

import torch

from .buckets import DensePiece, QuantBucket
from .layout import LayerCache
from .quant import QuantizedKeys, QuantizedValues, dequantize_keys, dequantize_values, unpack, unpack_keys


def attend_piece(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, sm_scale: float, causal_tail: int = 0,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B,Hq,(S,)D]`` over ``k, v [B,Hkv,N,D]``, token ``t`` of sample ``b`` valid iff ``t < lens[b]``.

    Returns the normalized output (fp32, same shape as ``q``) and the natural-log log-sum-exp of the scaled scores
    ``[B,Hq(,S)]``; a sample with no valid token gives output 0 and lse ``-inf``. ``causal_tail`` = S marks the last
    S valid tokens as the queries themselves (query ``i`` sees tail tokens ``<= i``): several-token decode.
    ``scores [B,Hq,N]`` (one query token) replaces ``q k^T * sm_scale`` (e.g. :func:`int8_query_scores`).
    """
    squeeze = q.dim() == 3
    qf = (q.unsqueeze(2) if squeeze else q).float()
    bsz, hq, s, d = qf.shape
    hkv, n = v.shape[1], v.shape[2]
    if hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of {hkv} KV heads")
    if scores is None:
        qg = qf.reshape(bsz, hkv, hq // hkv * s, d)
        scores = torch.einsum("bhqd,bhnd->bhqn", qg, k.float()) * sm_scale
    scores = scores.float().reshape(bsz, hkv, hq // hkv, s, n)
    pos = torch.arange(n, device=q.device)
    lens = lens.to(device=q.device, dtype=torch.long)
    valid = pos[None, :] < lens[:, None]  # [B, N]
    mask = valid[:, None, None, None, :].expand(bsz, hkv, hq // hkv, s, n)
    if causal_tail:
        qi = torch.arange(s, device=q.device)
        # token t is the query (lens - s + i); hide tail tokens later than query i
        later = pos[None, None, :] > (lens[:, None, None] - s + qi[None, :, None])  # [B, S, N]
        mask = mask & ~later[:, None, None, :, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.einsum("bhgsn,bhnd->bhgsd", p, v.float()).reshape(bsz, hq, s, d)
    lse = lse.reshape(bsz, hq, s)
    if squeeze:
        return out.squeeze(2), lse.squeeze(2)
    return out, lse


def int8_query_scores(q: torch.Tensor, qk: QuantizedKeys, n: int, sm_scale: float) -> torch.Tensor:
    """Scores ``[B,Hq,n]`` of the int8-query mode of the CPU kernel, emulated in float64: per key group and head the
    scaled query ``qs = (q sm_scale) * k_scale`` (fp32, as the kernel rounds it) is quantized symmetrically to
    int8 (``qsc = max|qs| / 127``); the codes' dot product uses the int8 query around the code range's middle
    ``c0`` and ``c0 sum(qs)`` exactly; the zero-point term is exact. 8-bit keys keep the fp32 query."""
    bits, kg = qk.spec.bits, qk.spec.k_group
    bsz, hq, d = q.shape
    hkv, g = qk.codes.shape[1], qk.codes.shape[2]
    qf = (q.float() * sm_scale).reshape(bsz, hkv, 1, hq // hkv, d)
    codes = unpack_keys(qk.codes, bits, kg, g * kg).double().reshape(bsz, hkv, g, kg, d)
    ks, kz = qk.scale.float()[:, :, :, None, :], qk.zero.float()[:, :, :, None, :]
    qs = qf * ks  # [B, Hkv, G, group, D], fp32
    zero_term = (qf.double() * kz.double()).sum(-1)
    if bits == 8:
        dot = torch.einsum("bhgqd,bhgtd->bhgqt", qs.double(), codes)
    else:
        amax = qs.abs().amax(-1, keepdim=True)
        qsc = amax * (1.0 / 127.0)
        qi = torch.round(qs * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
        c0 = ((1 << bits) - 1) / 2.0
        dot = torch.einsum("bhgqd,bhgtd->bhgqt", qi.double(), codes - c0) * qsc.double() \
            + c0 * qs.double().sum(-1, keepdim=True)
    scores = dot + zero_term[..., None]  # [B, Hkv, G, group, kg]
    return scores.permute(0, 1, 3, 2, 4).reshape(bsz, hq, g * kg)[..., :n]


def int8_dots_attend_piece(q: torch.Tensor, qk: QuantizedKeys, qv: QuantizedValues, lens: torch.Tensor,
                           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, lse) of one quantized piece in the CPU kernel's int8 dot-product mode, emulated in float64: scores
    from :func:`int8_query_scores`; per head, value group and key group the weights ``p * v_scale`` are quantized
    to uint8 (scale ``max / 255``; the kernel's running max cancels in the ratio) for the codes' sum, while the
    zero-point sum and the softmax denominator use the exact ``p``. 8-bit buckets are exact in this mode."""
    bits, kg, vgrp = qk.spec.bits, qk.spec.k_group, qk.spec.v_group
    n = qv.scale.shape[-2]
    valid = torch.arange(n)[None, :] < lens.long()[:, None]  # [B, n]: scales past lens may be anything (NaN)
    if bits == 8:
        v = torch.where(valid[:, None, :, None], dequantize_values(qv), 0.0)
        return attend_piece(q, dequantize_keys(qk, n), v, lens, sm_scale)
    bsz, hq, d = q.shape
    hkv = qv.scale.shape[1]
    group = hq // hkv
    s = int8_query_scores(q, qk, n, sm_scale)  # [B, Hq, n] float64
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))  # [B, Hq, n]
    codes = unpack(qv.codes, bits).double().repeat_interleave(group, 1)  # [B, Hq, n, D]
    keep = valid[:, None, :, None]
    vs = torch.where(keep, qv.scale.double(), 0.0).repeat_interleave(group, 1)  # [B, Hq, n, nvg]
    vz = torch.where(keep, qv.zero.double(), 0.0).repeat_interleave(group, 1)
    g = -(-n // kg)
    pad = g * kg - n
    num = torch.zeros(bsz, hq, d, dtype=torch.float64)
    for vg in range(d // vgrp):
        w = torch.nn.functional.pad(p * vs[..., vg], (0, pad)).reshape(bsz, hq, g, kg)
        wmax = w.amax(-1, keepdim=True)
        wq = torch.round(w * torch.where(wmax > 0, 255.0 / wmax, torch.zeros_like(wmax))) * (wmax / 255.0)
        wq = wq.reshape(bsz, hq, g * kg)[..., :n]
        ch = slice(vg * vgrp, (vg + 1) * vgrp)
        num[..., ch] = torch.einsum("bhn,bhnc->bhc", wq, codes[..., ch]) + (p * vz[..., vg]).sum(-1, keepdim=True)
    den = p.sum(-1)
    out = torch.where(den[..., None] > 0, num / den[..., None].clamp_min(1e-300), torch.zeros_like(num))
    lse = torch.where(den > 0, m[..., 0] + torch.log(den.clamp_min(1e-300)), torch.full_like(den, float("-inf")))
    return out.float(), lse.float()


def merge_states(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge normalized partial outputs by their log-sum-exp; pieces with ``lse = -inf`` contribute nothing."""
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs/lses: need the same non-zero number of pieces, got {len(outs)} and {len(lses)}")
    lse = torch.stack(lses)  # [P, ...]
    total = torch.logsumexp(lse, dim=0)
    safe_total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    w = torch.exp(lse - safe_total)  # exp(-inf) = 0 for empty pieces
    out = (torch.stack(outs) * w.unsqueeze(-1)).sum(0)
    return out, total


def decode_attention(
    q: torch.Tensor, layer: LayerCache, sm_scale: float, causal_tail: int = 0, return_lse: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the new query tokens over every bucket and the dense piece of one layer, merged split-KV style."""
    outs, lses = [], []
    pieces: list[QuantBucket | DensePiece] = [*layer.buckets.values(), layer.dense]
    for piece in pieces:
        if isinstance(piece, QuantBucket):
            k, v = piece.dequantize()
            tail = 0
        else:
            k, v = piece.k, piece.v
            tail = causal_tail
        o, lse = attend_piece(q, k, v, piece.lens, sm_scale, causal_tail=tail)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_states(outs, lses)
    return (out, lse) if return_lse else out
