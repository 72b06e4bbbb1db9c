"""One check of a compiled kernel against the torch reference, on small random inputs.

Used before a record tuned on *another* device is cached here (:func:`wq_compile.compiler.build.choose_schedule`): a trace
that replays may still compute something else on this target, and a wrong module in the cache would be reused on
every later load. The references are the project's oracles (:mod:`wq_compile.core.quant`, :mod:`wq_compile.core.reference`),
never another kernel.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..kernels import example_sizes, piece_fields
from ..kernels.signatures import spec_fit
from ..core.quant_fit import fit_of
from .measure import example_args
from ..core.quant import (QuantizedKeys, QuantizedValues, dequantize_keys, dequantize_values, quantize_keys,
                          quantize_values, unpack, unpack_keys)
from ..core.reference import attend_piece, merge_states

#: Absolute/relative tolerance of a kernel output vs the reference over the same inputs: fp32 accumulation in both,
#: only the summation order differs; fp16/bf16 outputs round to their mantissa.
TOLERANCE: dict[str, tuple[float, float]] = {"f32": (1e-3, 1e-3), "f16": (2e-2, 2e-2), "bf16": (5e-2, 5e-2)}


class ReferenceMismatch(AssertionError):
    """A compiled kernel disagrees with the torch reference."""


_OUTPUTS = ("q", "sm_scale", "o", "lse", "out", "o_parts", "lse_parts")


def _pieces(spec: Any, named: Mapping[str, Any]) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(bits, k, v, lens)`` of every piece in argument order, quantized ones dequantized by the reference; K and V
    past ``lens`` zeroed (whatever a cache holds there, NaN included, is no token: the kernels mask it)."""
    pieces: dict[str, dict[str, Any]] = {}
    for name, value in named.items():
        tag, fld = piece_fields(name)
        if fld not in _OUTPUTS:
            pieces.setdefault(tag, {})[fld] = value
    out = []
    for tag, p in pieces.items():
        bits = 16 if "k" in p else (int(tag[1:]) if tag else spec.bits[0])
        if bits == 16:
            k, v = p["k"], p["v"]
        else:
            qs = spec.quant(bits)
            k = dequantize_keys(QuantizedKeys(p["k_codes"], p["k_scale"], p["k_zero"], qs), p["v_codes"].shape[-2])
            v = dequantize_values(QuantizedValues(p["v_codes"], p["v_scale"], p["v_zero"], qs))
        keep = (torch.arange(v.shape[2], device=v.device)[None, :] < p["lens"].long()[:, None])[:, None, :, None]
        out.append((bits, torch.where(keep, k.float(), 0.0), torch.where(keep, v.float(), 0.0), p["lens"]))
    return out


def _attention(spec: Any, named: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference output and lse of a decode/fused kernel, from its arguments by name; of a multi-token kernel
    (``q [B, S, Hq, D]``, the dense piece ending with the ``S`` new tokens) output ``[B, S, Hq, D]``."""
    q = named["q"]
    steps = q.shape[1] if spec.kind == "multi" else 0
    if steps:
        q = q.transpose(1, 2)
    outs, lses = [], []
    for bits, k, v, lens in _pieces(spec, named):
        o, lse = attend_piece(q, k, v, lens, float(named["sm_scale"]), causal_tail=steps if bits == 16 else 0)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_states(outs, lses)
    return (out.transpose(1, 2), lse) if steps else (out, lse)


def _split_partials(spec: Any, named: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Reference ``o_parts, lse_parts`` of a split-KV kernel: split ``s`` of ``P`` attends to global chunks
    ``[s * cps, (s + 1) * cps)`` of the pieces' chunks in order (``cps = ceil(total / P)``, as
    :mod:`wq_compile.kernels.split_decode` cuts them); a split without a valid token gives ``o = 0, lse = -inf``."""
    q, c = named["q"], spec.chunk
    steps = q.shape[1] if spec.kind == "multi" else 0
    qh = q.transpose(1, 2) if steps else q
    parts = named["o_parts"].shape[0]
    pieces = _pieces(spec, named)
    total = sum(v.shape[2] // c for _, _, v, _ in pieces)
    cps = -(-total // parts)
    o_parts, lse_parts = [], []
    for s in range(parts):
        outs, lses, off = [], [], 0
        for bits, k, v, lens in pieces:
            nc = v.shape[2] // c
            lo, hi = max(s * cps - off, 0), min((s + 1) * cps - off, nc)
            off += nc
            if lo >= hi:
                continue
            # the piece's tokens [lo * c, hi * c), lens shifted by the cut (negative: nothing valid; the causal
            # bound of the dense piece shifts with it)
            sl = slice(lo * c, hi * c)
            o, lse = attend_piece(qh, k[:, :, sl], v[:, :, sl], lens.long() - lo * c, float(named["sm_scale"]),
                                  causal_tail=steps if bits == 16 else 0)
            outs.append(o)
            lses.append(lse)
        if outs:
            o, lse = merge_states(outs, lses)
        else:
            o = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
            lse = torch.full(qh.shape[:-1], float("-inf"), device=q.device)
        o_parts.append(o.transpose(1, 2) if steps else o)
        lse_parts.append(lse.transpose(1, 2) if steps else lse)
    return {"o_parts": torch.stack(o_parts), "lse_parts": torch.stack(lse_parts)}


def _close(what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    try:
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, equal_nan=False)
    except AssertionError as exc:
        raise ReferenceMismatch(f"{what}: {str(exc).splitlines()[0]}") from None


def check_against_reference(kdef: Any, module: Any, device: Any, n_tokens: int | None = None) -> None:
    """Run ``module`` (built for ``device``, a CPU target) on random inputs and compare every output with the
    reference; raises :class:`ReferenceMismatch`. Kernels without a reference (test kernels) pass unchecked."""
    spec = kdef.spec
    if device.kind != "llvm" or spec.kind not in ("decode", "fused", "quantize", "merge", "multi"):
        return
    sizes = example_sizes(spec, n_tokens or 2 * spec.chunk)
    args = example_args(kdef.signature, sizes, scalars={"sm_scale": spec.head_dim**-0.5}, seed=7)
    names = kdef.signature.names
    if spec.kind == "quantize":  # inputs are the dense k, v: give them a realistic spread
        args[0].normal_()
        args[1].normal_()
    module.get_function(spec.uri)(*args)
    named = dict(zip(names, args))
    atol, rtol = TOLERANCE.get(spec.dtype, TOLERANCE["f32"])
    if "o_parts" in named and spec.kind != "merge":  # a split-KV kernel: its partials per split range
        for name, want in _split_partials(spec, named).items():
            _close(f"{spec.uri} {name}", named[name], want, atol, rtol)
    elif spec.kind in ("decode", "fused", "multi"):
        out, lse = _attention(spec, named)
        _close(f"{spec.uri} output", named["o" if spec.kind == "decode" else "out"], out, atol, rtol)
        if spec.kind == "decode":
            _close(f"{spec.uri} lse", named["lse"], lse, atol, rtol)
    elif spec.kind == "merge":
        out, _ = merge_states(list(named["o_parts"]), list(named["lse_parts"]))
        _close(f"{spec.uri} output", named["out"], out, atol, rtol)
    else:
        _check_quantize(spec, named)


def _check_quantize(spec: Any, named: Mapping[str, Any]) -> None:
    """Min/max parts bit-exact: scales, zeros and packed code words equal the torch reference's. A fitted part (the
    keys' least squares, the values' zero search) is checked by what the fit promises (:func:`_check_fit`)."""
    qs = spec.quant(spec.bits[0])
    fit = spec_fit(spec)
    for kind, want in (("k", quantize_keys(named["k"], qs, fit)), ("v", quantize_values(named["v"], qs, fit))):
        if fit_of(fit, kind) != "minmax":
            _check_fit(spec.uri, kind, named, want)
            continue
        for part in ("scale", "zero", "codes"):
            got, ref = named[f"{kind}_{part}"], getattr(want, part)
            if not torch.equal(got, ref):
                bad = int((got != ref).sum()) if got.shape == ref.shape else "shape"
                raise ReferenceMismatch(f"{spec.uri}: {kind}_{part} differs from the reference ({bad} of "
                                        f"{ref.numel()} entries)")


#: A fitted part may differ from the reference's in an fp16 ulp of scale or zero, or pick another candidate on a near
#: tie (fp32 sums in another order, FMA contraction), which can move a code near a rounding boundary: at most this
#: share of codes may differ, and the squared reconstruction error may exceed the reference's by at most this much.
FIT_CODE_SHARE = 1e-3
FIT_ERR_RTOL = 1e-3


def _check_fit(uri: str, kind: str, named: Mapping[str, Any], want: QuantizedKeys | QuantizedValues) -> None:
    """The kernel's fitted keys (``kind="k"``) or values (``"v"``): squared error within :data:`FIT_ERR_RTOL` of
    the reference fit's, never above min/max's (a fit keeps min/max where nothing is better), codes equal but for
    :data:`FIT_CODE_SHARE`."""
    x = named[kind]
    qs = want.spec
    n = x.shape[-2]
    if kind == "k":
        got: QuantizedKeys | QuantizedValues = QuantizedKeys(named["k_codes"], named["k_scale"], named["k_zero"], qs)
        minmax: QuantizedKeys | QuantizedValues = quantize_keys(x, qs)

        def deq(q):
            return dequantize_keys(q, n)

        def codes(words):
            return unpack_keys(words, qs.bits, qs.k_group, n)
    else:
        got, minmax = QuantizedValues(named["v_codes"], named["v_scale"], named["v_zero"], qs), quantize_values(x, qs)
        deq = dequantize_values

        def codes(words):
            return unpack(words, qs.bits)

    def sq_err(q) -> float:
        return float((deq(q) - x.float()).double().square().sum())

    what = "keys" if kind == "k" else "values"
    e_got, e_ref, e_mm = sq_err(got), sq_err(want), sq_err(minmax)
    if not e_got <= e_ref * (1 + FIT_ERR_RTOL) + 1e-12:
        raise ReferenceMismatch(f"{uri}: fitted {what}' squared error {e_got:.6g} exceeds the reference fit's "
                                f"{e_ref:.6g} by more than {FIT_ERR_RTOL:g}")
    if not e_got <= e_mm * (1 + 1e-6) + 1e-12:
        raise ReferenceMismatch(f"{uri}: fitted {what}' squared error {e_got:.6g} exceeds min/max's {e_mm:.6g}")
    c_got, c_ref = codes(got.codes), codes(want.codes)
    share = float((c_got != c_ref).float().mean()) if c_ref.numel() else 0.0
    if share > FIT_CODE_SHARE:
        raise ReferenceMismatch(f"{uri}: {share:.2%} of fitted {what} codes differ from the reference's "
                                f"(at most {FIT_CODE_SHARE:.2%} may: near-boundary rounding)")


def reference_outputs(spec: Any, named: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The reference value of every output argument of a decode/fused/merge/quantize kernel, by name, from its
    inputs by name: what an offline measurement compares a candidate against without any reference code there."""
    if "o_parts" in named and spec.kind != "merge":  # a split-KV kernel
        return _split_partials(spec, named)
    if spec.kind in ("decode", "fused", "multi"):
        out, lse = _attention(spec, named)
        return {"o": out, "lse": lse} if spec.kind == "decode" else {"out": out}
    if spec.kind == "merge":
        out, _ = merge_states(list(named["o_parts"]), list(named["lse_parts"]))
        return {"out": out}
    if spec.kind == "quantize":
        qs = spec.quant(spec.bits[0])
        fit = spec_fit(spec)
        want = {"k": quantize_keys(named["k"], qs, fit), "v": quantize_values(named["v"], qs, fit)}
        out = {f"{kind}_{part}": getattr(want[kind], part) for kind in ("k", "v") for part in ("scale", "zero", "codes")}
        for kind in ("k", "v"):  # fitted codes follow from scale and zero, which may differ by an ulp: not compared
            if fit_of(fit, kind) != "minmax":
                del out[f"{kind}_codes"]
        return out
    raise ValueError(f"spec.kind: no reference for kernel kind {spec.kind!r}")
