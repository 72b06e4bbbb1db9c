"""Quantize / pack / unpack / dequantize in plain torch: the independent reference every kernel is checked against.

Format (see docs/DESIGN.md): asymmetric, ``x ~ code * scale + zero`` computed in fp32 from fp16 scale and zero; scale
and zero from min/max (the default, and the compiled quantize kernel's) or least squares (``fit="lsq"``,
:mod:`wq_compile.core.quant_fit`).
Keys: per channel over groups of ``k_group`` tokens (the last group of a run may be shorter).
Values: per token over groups of ``v_group`` channels.

Value codes: packed along the channel axis, little-endian, ``32 // bits`` codes per int32 word (``[..., n, D/per]``).
Viewed as bytes, byte ``j`` of a token holds channels ``j*F .. j*F+F-1`` (``F = 8 // bits``), lowest bits first.

Key codes: packed along *tokens*, per key group and channel (KIVI packs keys along tokens):
``[..., G, D, W]`` int32 with ``W = key_words(bits, k_group)``. A group has ``S = key_slots(k_group)`` token slots
(``k_group`` rounded up to 32; slots past ``k_group`` hold code 0); viewed as ``L = S * bits / 8`` bytes per
(group, channel), slot ``s`` is field ``s // L`` (bits ``bits * (s // L)``) of byte ``s % L``. So one contiguous
load of ``L`` bytes, zero-extended to ``L`` lanes, gives ``F`` vectors of consecutive tokens after a constant
shift and mask: the CPU kernel's dot products run over tokens, never across SIMD lanes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant_fit import codes_of, fit_of, fit_params, minmax_params
from .spec import QuantSpec, WORD_BITS, elems_per_word

_FP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest finite fp16: scale and zero are fp16, so an element beyond it (or NaN/inf) cannot be coded.
FP16_MAX = 65504.0


def quantizable_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bool: the token's elements (last axis) are all finite and within +-65504 (fp16 scale/zero).

    One vectorized pass (``NaN <= m`` is False, so NaN and inf fail the same comparison). The one rule that the
    reference and the compiled quantizers and the cache share: a window or residual block with any such token is
    not quantized (the cache keeps it dense), and the quantizers refuse it (:func:`check_quantizable`).
    """
    if x.shape[-1] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return x.abs().amax(-1) <= FP16_MAX  # amax propagates NaN, and NaN <= m is False


def check_quantizable(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN/inf or values beyond +-65504 (no code would be right)."""
    if not bool(quantizable_tokens(x).all()):
        raise ValueError(f"{name}: contains NaN/inf or values beyond +-{FP16_MAX:g} (the fp16 range of scale/zero), "
                         f"which no code represents; WindowQuantCache keeps such windows and residual blocks dense "
                         f"(unquantized) instead of calling the quantizer")


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


def key_slots(k_group: int) -> int:
    """Token slots of one packed key group: ``k_group`` rounded up to a multiple of 32 (whole words at 2/4/8 bits)."""
    return -(-k_group // WORD_BITS) * WORD_BITS


def key_words(bits: int, k_group: int) -> int:
    """int32 words per (key group, channel) in the token-packed key format."""
    return key_slots(k_group) * bits // WORD_BITS


def key_lane_bytes(bits: int, k_group: int) -> int:
    """Bytes per (key group, channel): slot ``s`` lives in byte ``s % L`` at field ``s // L``."""
    return key_slots(k_group) * bits // 8


def pack_keys(codes: torch.Tensor, bits: int, k_group: int) -> torch.Tensor:
    """Key codes ``[..., n, D]`` in ``[0, 2**bits)`` -> token-packed words ``[..., ceil(n/k_group), D, W]`` int32.

    Token ``t`` is slot ``t % k_group`` of group ``t // k_group``; unused slots (the short last group, the padding
    up to :func:`key_slots`) hold code 0.
    """
    elems_per_word(bits)  # validates bits
    n, d = codes.shape[-2], codes.shape[-1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes: values must lie in [0, {1 << bits}) for {bits} bits")
    g = -(-n // k_group)
    slots, lb = key_slots(k_group), key_lane_bytes(bits, k_group)
    lead = codes.shape[:-2]
    c = torch.zeros(*lead, g * k_group, d, dtype=torch.int64, device=codes.device)
    c[..., :n, :] = codes.to(torch.int64)
    c = c.reshape(*lead, g, k_group, d)
    c = torch.cat([c, c.new_zeros(*lead, g, slots - k_group, d)], dim=-2)  # [..., G, S, D]
    c = c.transpose(-1, -2).reshape(*lead, g, d, slots // lb, lb)  # slot = field * L + byte
    shifts = (torch.arange(slots // lb, dtype=torch.int64, device=codes.device) * bits)[:, None]
    byte = (c << shifts).sum(-2)  # [..., G, D, L]: disjoint bit ranges, sum == or
    byte = byte.reshape(*lead, g, d, lb // 4, 4) << (torch.arange(4, dtype=torch.int64, device=codes.device) * 8)
    words = byte.sum(-1)
    words = torch.where(words >= 2**31, words - 2**WORD_BITS, words)
    return words.to(torch.int32)


def unpack_keys(words: torch.Tensor, bits: int, k_group: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: ``[..., G, D, W]`` int32 -> codes ``[..., n, D]`` int64 (``n`` <= G*k_group)."""
    if words.dtype != torch.int32:
        raise TypeError(f"words: expected int32, got {words.dtype}")
    g, d, w = words.shape[-3], words.shape[-2], words.shape[-1]
    if w != key_words(bits, k_group):
        raise ValueError(f"words: expected {key_words(bits, k_group)} words per (group, channel), got {w}")
    n = g * k_group if n is None else n
    slots, lb = key_slots(k_group), key_lane_bytes(bits, k_group)
    lead = words.shape[:-3]
    x = words.to(torch.int64) & 0xFFFFFFFF
    byte = (x.unsqueeze(-1) >> (torch.arange(4, dtype=torch.int64, device=words.device) * 8)) & 0xFF
    byte = byte.reshape(*lead, g, d, 1, lb)
    shifts = (torch.arange(slots // lb, dtype=torch.int64, device=words.device) * bits)[:, None]
    c = (byte >> shifts) & ((1 << bits) - 1)  # [..., G, D, F, L] -> slot = f * L + byte
    c = c.reshape(*lead, g, d, slots)[..., :k_group].transpose(-1, -2)  # [..., G, k_group, D]
    return c.reshape(*lead, g * k_group, d)[..., :n, :]


_minmax_params = minmax_params


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return codes_of(x, scale, zero, qmax).to(torch.int64)


@dataclass(frozen=True)
class QuantizedKeys:
    """Keys of ``n`` tokens: codes ``[..., G, d, key_words]`` int32 (token-packed), scale/zero ``[..., G, d]`` fp16,
    ``G = ceil(n / k_group)``."""

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


def quantize_keys(k: torch.Tensor, spec: QuantSpec, fit: str = "minmax") -> QuantizedKeys:
    """Per-channel quantization of ``k [..., n, d]`` over groups of ``spec.k_group`` tokens; ``fit`` chooses each
    group's scale and zero (:mod:`wq_compile.core.quant_fit`: ``minmax``, the compiled kernel's, or ``lsq``)."""
    check_float("k", k)
    check_quantizable("k", k)
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
    scale, zero = fit_params(grouped.transpose(-1, -2), spec.qmax, fit_of(fit, "k"))
    idx = torch.arange(n, device=k.device) // spec.k_group
    codes = _codes(kf, scale[..., idx, :], zero[..., idx, :], spec.qmax)
    return QuantizedKeys(pack_keys(codes, spec.bits, spec.k_group), scale, zero, spec)


def quantize_values(v: torch.Tensor, spec: QuantSpec, fit: str = "minmax") -> QuantizedValues:
    """Per-token quantization of ``v [..., n, d]`` over groups of ``spec.v_group`` channels (``fit`` as for keys)."""
    check_float("v", v)
    check_quantizable("v", v)
    d = v.shape[-1]
    spec.check_head_dim(d)
    vf = v.float()
    grouped = vf.reshape(*vf.shape[:-1], d // spec.v_group, spec.v_group)
    scale, zero = fit_params(grouped, spec.qmax, fit_of(fit, "v"))
    codes = _codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.qmax).reshape(vf.shape)
    return QuantizedValues(pack(codes, spec.bits), scale, zero, spec)


def dequantize_keys(qk: QuantizedKeys, n: int | None = None) -> torch.Tensor:
    """fp32 keys ``[..., n, d]`` from a :class:`QuantizedKeys` (``n`` defaults to ``G * k_group``; a larger ``n``
    is padded with zero-code tokens of the last group's scale/zero, or zeros if that group does not exist)."""
    g = qk.codes.shape[-3]
    n = g * qk.spec.k_group if n is None else n
    codes = unpack_keys(qk.codes, qk.spec.bits, qk.spec.k_group, min(n, g * qk.spec.k_group)).float()
    if n > codes.shape[-2]:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-2], n - codes.shape[-2], codes.shape[-1])], dim=-2)
    scale, zero = qk.scale, qk.zero
    ng = -(-n // qk.spec.k_group)
    if ng > scale.shape[-2]:
        pad = (*scale.shape[:-2], ng - scale.shape[-2], scale.shape[-1])
        scale, zero = torch.cat([scale, scale.new_zeros(pad)], -2), torch.cat([zero, zero.new_zeros(pad)], -2)
    idx = torch.arange(n, device=codes.device) // qk.spec.k_group
    return codes * scale[..., idx, :].float() + zero[..., idx, :].float()


def dequantize_values(qv: QuantizedValues) -> torch.Tensor:
    """fp32 values ``[..., n, d]`` from a :class:`QuantizedValues`."""
    codes = unpack(qv.codes, qv.spec.bits).float()
    d = codes.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], d // qv.spec.v_group, qv.spec.v_group)
    out = grouped * qv.scale.float().unsqueeze(-1) + qv.zero.float().unsqueeze(-1)
    return out.reshape(codes.shape)


def fake_quant(x: torch.Tensor, spec: QuantSpec, kind: str, fit: str = "minmax") -> torch.Tensor:
    """Quantize then dequantize keys (``kind="k"``) or values (``"v"``): the error the cache will see."""
    if kind == "k":
        return dequantize_keys(quantize_keys(x, spec, fit), x.shape[-2])
    if kind == "v":
        return dequantize_values(quantize_values(x, spec, fit))
    raise ValueError(f"kind: must be 'k' or 'v', got {kind!r}")


def error_bound(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Largest error a correct quantizer may make on ``x``: half a step, plus the fp16 rounding of ``zero``.

    ``scale``/``zero`` are already broadcast to ``x``'s shape.
    """
    half_ulp_zero = zero.float().abs() * 2.0**-11 + 2.0**-25
    return 0.5 * scale.float() + half_ulp_zero + 1e-6 * x.float().abs()
