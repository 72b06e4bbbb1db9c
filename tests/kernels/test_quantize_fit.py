"""The compiled quantize kernel with the fits against the torch reference: the keys' least squares and the values'
zero search (``fit="lsq-zs"``, the default; ``"lsq-keys"``): a min/max part bit-exact, a fitted part within the
fit's promise (error within 1e-3 of the reference fit's, never above min/max's, codes equal but near rounding
boundaries), and the check that enforces it catches a wrong fit."""

from __future__ import annotations

import pytest
import torch

from wq_compile.compiler.check import FIT_CODE_SHARE, ReferenceMismatch, _check_fit
from wq_compile.core import quant
from wq_compile.core.config import WindowQuantConfig
from wq_compile.core.quant_fit import DEFAULT_FIT, LSQ_ITERS, ZS_SHIFTS
from wq_compile.core.spec import KernelSpec
from wq_compile.kernels.signatures import (FIT_KEY, VALUE_FIT_KEY, compiled_fit, key_fit_iters, quantize_spec,
                                          signature, spec_fit, value_fit_iters, value_zero_search)
from wq_testing import compiled_default

SHAPE = dict(head_dim=64, num_q_heads=14, num_kv_heads=2)


def _run(spec: KernelSpec, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    sig = signature(spec)
    outs = sig.allocate_outputs(sig.bind(k, v, inputs_only=True), "cpu")
    compiled_default(spec)(k, v, *outs)
    return dict(zip(sig.names, [k, v, *outs]))


@pytest.mark.parametrize("bits,dtype,fit", [(2, "f32", "lsq-zs"), (4, "f16", "lsq-zs"), (8, "bf16", "lsq-zs"),
                                            (2, "f32", "lsq-keys"), (1, "f16", "lsq-zs")])
def test_fitted_quantize_matches_the_reference_fit(bits: int, dtype: str, fit: str) -> None:
    """At one bit ``zs`` is least squares on values too (scale and zero fitted; the reference's ``fit_params``)."""
    spec = quantize_spec(bits, fit, dtype=dtype, **SHAPE)
    assert key_fit_iters(spec) == LSQ_ITERS and value_zero_search(spec) == (fit == "lsq-zs") and spec_fit(spec) == fit
    assert value_fit_iters(spec) == (LSQ_ITERS if bits == 1 else 0)
    qs = spec.quant(bits)
    gen = torch.Generator().manual_seed(bits)
    for n in (28, 196):  # one module, every block length (whole key groups)
        k = (torch.randn(2, 2, n, 64, generator=gen) * 3).to(spec.torch_dtype)
        k[1, 0, 5, 9] = 40.0  # a planted outlier: least squares may clip it where that lowers the group's error
        k[0, 0, :28, 5] = 1.5  # a constant key group: scale 0, exact
        v = torch.randn(2, 2, n, 64, generator=gen).to(spec.torch_dtype)
        v[1, 1, 3, :] = -0.25  # a constant value group
        named = _run(spec, k, v)
        _check_fit(spec.uri, "k", named, quant.quantize_keys(k, qs, fit))  # raises on a mismatch
        rv = quant.quantize_values(v, qs, fit)
        if fit == "lsq-keys":  # values min/max: bit-exact
            for part in ("codes", "scale", "zero"):
                assert torch.equal(named[f"v_{part}"], getattr(rv, part)), part
        else:
            _check_fit(spec.uri, "v", named, rv)
        if bits == 1:  # least squares' scale and zero as the reference's (an fp16 ulp apart at most), not min/max's
            for part in ("scale", "zero"):
                got, want = named[f"v_{part}"].float(), getattr(rv, part).float()
                assert float((got != want).float().mean()) < 0.01, part
                assert float(((got - want).abs() > want.abs() * 2e-3).float().mean()) == 0.0, part
            v_mm = quant.quantize_values(v, qs)
            assert float((named["v_scale"] != v_mm.scale).float().mean()) > 0.9  # the scale is fitted too
        assert bool((named["k_scale"][0, 0, 0, 5] == 0).all()) and bool((named["v_scale"][1, 1, 3] == 0).all())
        got = quant.QuantizedKeys(named["k_codes"], named["k_scale"], named["k_zero"], qs)
        deq = quant.dequantize_keys(got, n)
        assert torch.equal(deq[0, 0, :28, 5], k[0, 0, :28, 5].float())
        vq = quant.dequantize_values(quant.QuantizedValues(named["v_codes"], named["v_scale"], named["v_zero"], qs))
        assert torch.equal(vq[1, 1, 3], v[1, 1, 3].float())
        err_fit = float((deq - k.float()).square().sum())
        err_mm = float((quant.dequantize_keys(quant.quantize_keys(k, qs), n) - k.float()).square().sum())
        assert err_fit < (0.9 if bits == 2 else 0.99) * err_mm  # the fit pays: 2-bit keys lose >= 10% error
        if fit == "lsq-zs":
            v_mm = float((quant.dequantize_values(quant.quantize_values(v, qs)) - v.float()).square().sum())
            assert float((vq - v.float()).square().sum()) < (0.95 if bits == 2 else 0.995) * v_mm


@pytest.mark.parametrize("kind", ["k", "v"])
def test_the_check_catches_a_wrong_fit(kind: str) -> None:
    spec = quantize_spec(2, "lsq-zs", **SHAPE)
    qs = spec.quant(2)
    x = torch.randn(1, 2, 56, 64, generator=torch.Generator().manual_seed(3)) * 2
    quantize = quant.quantize_keys if kind == "k" else quant.quantize_values
    want, mm = quantize(x, qs, "lsq-zs"), quantize(x, qs)

    def named(q) -> dict:
        return {kind: x, f"{kind}_codes": q.codes, f"{kind}_scale": q.scale, f"{kind}_zero": q.zero}

    _check_fit(spec.uri, kind, named(want), want)  # the reference passes its own check
    with pytest.raises(ReferenceMismatch, match="exceeds the reference fit"):
        _check_fit(spec.uri, kind, named(mm), want)  # min/max's parameters are not the fit
    codes = want.codes.clone()
    n_bad = int(codes.numel() * FIT_CODE_SHARE * 4) + 1
    codes.view(-1)[:n_bad] ^= 0x5  # flip code bits of a few words: scale/zero right, codes wrong
    with pytest.raises(ReferenceMismatch, match="codes differ|exceeds"):
        _check_fit(spec.uri, kind, named(type(want)(codes, want.scale, want.zero, qs)), want)


def test_quantize_spec_names_the_fit() -> None:
    assert quantize_spec(4, "minmax", **SHAPE).extra == ()
    assert quantize_spec(4, "lsq-keys", **SHAPE).uri.endswith(f"_{FIT_KEY}{LSQ_ITERS}")
    assert quantize_spec(4, "lsq-zs", **SHAPE).uri.endswith(f"_{FIT_KEY}{LSQ_ITERS}_{VALUE_FIT_KEY}{len(ZS_SHIFTS)}")
    assert spec_fit(quantize_spec(4, "zs", **SHAPE)) == "zs"
    one = quantize_spec(1, "zs", **SHAPE)  # one bit: the name stays the config's, the values' fit is least squares
    assert one.uri.endswith(f"_{VALUE_FIT_KEY}{len(ZS_SHIFTS)}") and value_fit_iters(one) == LSQ_ITERS
    assert key_fit_iters(one) == 0 and value_fit_iters(quantize_spec(1, "lsq-keys", **SHAPE)) == 0
    assert DEFAULT_FIT == "lsq-zs" and WindowQuantConfig().fit == DEFAULT_FIT and compiled_fit(DEFAULT_FIT)
    for fit in ("hqq", "lsq", "lsq-hqq"):  # values fitted: the torch reference's job
        assert not compiled_fit(fit)
        with pytest.raises(ValueError, match="torch reference"):
            quantize_spec(4, fit, **SHAPE)
    with pytest.raises(ValueError, match=FIT_KEY):
        signature(KernelSpec("quantize", (4,), extra=((FIT_KEY, -1),), **SHAPE))
    with pytest.raises(ValueError, match=VALUE_FIT_KEY):  # the candidates are the reference's, not a knob
        signature(KernelSpec("quantize", (4,), extra=((VALUE_FIT_KEY, 3),), **SHAPE))
