"""Quantize / pack / unpack / dequantize in plain torch: the independent reference every kernel is checked against.

Format (see DESIGN.md): asymmetric min/max, ``x ~ code * scale + zero`` computed in fp32 from fp16 scale and zero.
Keys: per channel over groups of ``k_group`` tokens (the last group of a run may be shorter).
Values: per token over groups of ``v_group`` channels.
Codes: packed along the channel axis, little-endian, ``32 // bits`` codes per int32 word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import SCALE_DTYPE, QuantSpec, WORD_BITS, elems_per_word

_FP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(name: str, x: object, min_dim: int = 2) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``x`` is a float tensor of >= ``min_dim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FP_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype in {_FP_DTYPES}, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims [..., tokens, head_dim], got shape {tuple(x.shape)}")
    return x


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into int32 words, little-endian."""
    per = elems_per_word(bits)
    if codes.shape[-1] % per:
        raise ValueError(f"codes: last dim {codes.shape[-1]} is not a multiple of {per} ({bits}-bit codes per word)")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes: values must lie in [0, {1 << bits}) for {bits} bits")
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (c << shifts).sum(-1)  # disjoint bit ranges: sum == bitwise or
    words = torch.where(words >= 2**31, words - 2**WORD_BITS, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> int64 codes, last axis grows by ``32 // bits``."""
    if words.dtype != torch.int32:
        raise TypeError(f"words: expected int32, got {words.dtype}")
    per = elems_per_word(bits)
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per)


def _minmax_params(mn: torch.Tensor, mx: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) with ``zero + qmax * scale >= max`` so codes never clip; constant groups get scale 0."""
    zero = mn.to(SCALE_DTYPE)
    if not torch.isfinite(zero).all() or not torch.isfinite(mx.to(SCALE_DTYPE)).all():
        raise ValueError("x: values are not finite or exceed the fp16 range of scale/zero")
    span = mx.float() - zero.float()
    scale = (span / qmax).to(SCALE_DTYPE)
    short = scale.float() * qmax < span  # fp16 rounding made the range too small: bump one ulp
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(span > 0, scale, torch.zeros_like(scale))
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x.float() - zero.float()) / safe)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return q.clamp_(0, qmax).to(torch.int64)


@dataclass(frozen=True)
class QuantizedKeys:
    """Keys of ``n`` tokens: codes ``[..., n, d/per_word]`` int32, scale/zero ``[..., ceil(n/k_group), d]`` fp16."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec


@dataclass(frozen=True)
class QuantizedValues:
    """Values of ``n`` tokens: codes ``[..., n, d/per_word]`` int32, scale/zero ``[..., n, d/v_group]`` fp16."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec


def quantize_keys(k: torch.Tensor, spec: QuantSpec) -> QuantizedKeys:
    """Per-channel quantization of ``k [..., n, d]`` over groups of ``spec.k_group`` tokens."""
    check_float("k", k)
    n, d = k.shape[-2], k.shape[-1]
    spec.check_head_dim(d)
    g = -(-n // spec.k_group)
    pad = g * spec.k_group - n
    kf = k.float()
    # Pad the short last group with a copy of its own first token: min/max stay those of the real tokens.
    if pad:
        last = kf[..., (g - 1) * spec.k_group : (g - 1) * spec.k_group + 1, :]
        kf_p = torch.cat([kf, last.expand(*kf.shape[:-2], pad, d)], dim=-2)
    else:
        kf_p = kf
    grouped = kf_p.reshape(*kf.shape[:-2], g, spec.k_group, d)
    scale, zero = _minmax_params(grouped.amin(-2), grouped.amax(-2), spec.qmax)
    idx = torch.arange(n, device=k.device) // spec.k_group
    codes = _codes(kf, scale[..., idx, :], zero[..., idx, :], spec.qmax)
    return QuantizedKeys(pack(codes, spec.bits), scale, zero, spec)


def quantize_values(v: torch.Tensor, spec: QuantSpec) -> QuantizedValues:
    """Per-token quantization of ``v [..., n, d]`` over groups of ``spec.v_group`` channels."""
    check_float("v", v)
    d = v.shape[-1]
    spec.check_head_dim(d)
    vf = v.float()
    grouped = vf.reshape(*vf.shape[:-1], d // spec.v_group, spec.v_group)
    scale, zero = _minmax_params(grouped.amin(-1), grouped.amax(-1), spec.qmax)
    codes = _codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.qmax).reshape(vf.shape)
    return QuantizedValues(pack(codes, spec.bits), scale, zero, spec)


def dequantize_keys(qk: QuantizedKeys, n: int | None = None) -> torch.Tensor:
    """fp32 keys ``[..., n, d]`` from a :class:`QuantizedKeys` (``n`` defaults to the packed token count)."""
    n = qk.codes.shape[-2] if n is None else n
    codes = unpack(qk.codes[..., :n, :], qk.spec.bits).float()
    idx = torch.arange(n, device=codes.device) // qk.spec.k_group
    return codes * qk.scale[..., idx, :].float() + qk.zero[..., idx, :].float()


def dequantize_values(qv: QuantizedValues) -> torch.Tensor:
    """fp32 values ``[..., n, d]`` from a :class:`QuantizedValues`."""
    codes = unpack(qv.codes, qv.spec.bits).float()
    d = codes.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], d // qv.spec.v_group, qv.spec.v_group)
    out = grouped * qv.scale.float().unsqueeze(-1) + qv.zero.float().unsqueeze(-1)
    return out.reshape(codes.shape)


def fake_quant(x: torch.Tensor, spec: QuantSpec, kind: str) -> torch.Tensor:
    """Quantize then dequantize keys (``kind="k"``) or values (``"v"``): the error the cache will see."""
    if kind == "k":
        return dequantize_keys(quantize_keys(x, spec))
    if kind == "v":
        return dequantize_values(quantize_values(x, spec))
    raise ValueError(f"kind: must be 'k' or 'v', got {kind!r}")


def error_bound(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Largest error a correct quantizer may make on ``x``: half a step, plus the fp16 rounding of ``zero``.

    ``scale``/``zero`` are already broadcast to ``x``'s shape.
    """
    half_ulp_zero = zero.float().abs() * 2.0**-11 + 2.0**-25
    return 0.5 * scale.float() + half_ulp_zero + 1e-6 * x.float().abs()
