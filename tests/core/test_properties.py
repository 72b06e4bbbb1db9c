"""Property-based tests (hypothesis): the quantizer's half-step bound, key and value pack/unpack round trips,
bucket reordering never changes attention, every plan meets its budget, and the compiled quantizer agrees bit-exactly
with the reference on every input both accept. Few examples each, so the file stays well under a minute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wq_compile.core.layout import LayerCache
from wq_compile.core.windows import WindowAssignment
from wq_compile.core.quant import FP16_MAX, dequantize_keys, dequantize_values, error_bound, fake_quant, pack, pack_keys, quantize_keys, quantize_values, unpack, unpack_keys
from wq_compile.core.reference import decode_attention
from wq_compile.core.search import Plan, Windows
from wq_compile.core.allocation import allocate_bits, min_avg_bits
from wq_compile.core.spec import QuantSpec

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BITS = st.sampled_from((2, 4, 8))


@st.composite
def kv_case(draw: st.DrawFn) -> tuple[torch.Tensor, QuantSpec]:
    bits = draw(BITS)
    d = draw(st.sampled_from((16, 32, 64)))
    v_group = draw(st.sampled_from([g for g in (4, 8, 16, 32, 64) if d % g == 0]))
    spec = QuantSpec(bits, draw(st.integers(1, 40)), v_group)
    n = draw(st.integers(1, 70))
    scale = draw(st.sampled_from((1e-3, 1.0, 300.0)))
    x = torch.randn(draw(st.integers(1, 2)), n, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    x = x * scale
    if draw(st.booleans()):  # constant groups must not give NaN
        x[..., : min(n, spec.k_group), :] = 0.5
    return x, spec


@FEW
@given(kv_case())
def test_error_within_half_a_step(case: tuple[torch.Tensor, QuantSpec]) -> None:
    x, spec = case
    qk = quantize_keys(x, spec)
    idx = torch.arange(x.shape[-2]) // spec.k_group
    ks, kz = qk.scale[..., idx, :], qk.zero[..., idx, :]
    assert bool(((dequantize_keys(qk, x.shape[-2]) - x.float()).abs() <= error_bound(x, ks, kz)).all())
    qv = quantize_values(x, spec)
    vs = qv.scale.repeat_interleave(spec.v_group, -1)
    vz = qv.zero.repeat_interleave(spec.v_group, -1)
    assert bool(((dequantize_values(qv) - x.float()).abs() <= error_bound(x, vs, vz)).all())


@FEW
@given(BITS, st.integers(1, 40), st.integers(1, 90), st.sampled_from((16, 32, 64)), st.integers(0, 99))
def test_pack_unpack_round_trip(bits: int, k_group: int, n: int, d: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (2, n, d), generator=gen)
    assert torch.equal(unpack_keys(pack_keys(codes, bits, k_group), bits, k_group, n), codes)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)


@st.composite
def windows_case(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    lengths = draw(st.lists(st.integers(1, 70), min_size=1, max_size=5))
    bits = draw(st.lists(st.sampled_from((16, 8, 4, 2)), min_size=len(lengths), max_size=len(lengths)))
    return lengths, bits


@FEW
@given(windows_case(), st.permutations(range(5)), st.integers(0, 99))
def test_reordering_windows_never_changes_attention(case: tuple[list[int], list[int]], perm: list[int],
                                                     seed: int) -> None:
    """The bucketed cache (windows regrouped by width, listed in any order) attends exactly like dense attention over
    the same quantized tokens in prompt order."""
    lengths, bits = case
    k_group, text = 7, 5
    gen = torch.Generator().manual_seed(seed)
    t = text + sum(lengths) + text
    k, v, q = torch.randn(2, t, 64, generator=gen), torch.randn(2, t, 64, generator=gen), torch.randn(1, 4, 64,
                                                                                                    generator=gen)
    starts = torch.tensor([text + sum(lengths[:i]) for i in range(len(lengths))])
    order = [i for i in perm if i < len(lengths)]
    assign = WindowAssignment(starts[order], torch.tensor(lengths)[order], torch.tensor(bits)[order])
    layer = LayerCache.empty(1, 2, 64, torch.float32, k_group=k_group, v_group=16, residual=1000)
    layer.fill_sample(0, k, v, assign)
    kq, vq = k.clone().float(), v.clone().float()
    for s, n, b in zip(starts.tolist(), lengths, bits):
        whole = n // k_group * k_group
        if b != 16 and whole:
            spec = QuantSpec(b, k_group, 16)
            kq[:, s : s + whole] = fake_quant(k[:, s : s + whole], spec, "k")
            vq[:, s : s + whole] = fake_quant(v[:, s : s + whole], spec, "v")
    p = torch.softmax(torch.einsum("hd,htd->ht", q[0].double(), kq.double().repeat_interleave(2, 0)) * 0.125, -1)
    want = torch.einsum("ht,htd->hd", p, vq.double().repeat_interleave(2, 0))
    got = decode_attention(q, layer, 0.125)[0].double()
    assert (got - want).abs().max() < 1e-5


@FEW
@given(st.lists(st.integers(1, 200), min_size=1, max_size=12), st.floats(0.0, 1.0), st.integers(0, 99),
       st.sampled_from([(16, 8, 4, 2), (8, 4, 2), (16, 4), (8,), (4, 2)]))
def test_every_plan_meets_its_budget(lengths: list[int], slack: float, seed: int, widths: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = Windows(torch.tensor([sum(lengths[:i]) for i in range(len(lengths))]), torch.tensor(lengths))
    floor = min_avg_bits(w, widths, 28, 64)
    budget = floor + slack * (16.5 - floor)
    scores = torch.rand(len(lengths), generator=gen)
    errors = torch.rand(len(lengths), len(widths), generator=gen).sort(-1).values  # wider: smaller error
    bits = allocate_bits(scores, errors, w.lengths, budget, widths, 28, 64)
    assert set(bits.tolist()) <= set(widths)
    plan = Plan(w, bits[None], scores[None], 28, 64)
    assert plan.effective_avg_bits() <= budget * (1 + 1e-6)
    ranked = bits[torch.argsort(-scores, stable=True)]
    assert bool((ranked[:-1] >= ranked[1:]).all())  # more similar never gets fewer bits


@pytest.fixture(scope="module")
def compiled_quantizer():
    from wq_compile.runtime.backend import CompiledQuantizer
    from wq_compile.runtime.library import shared_library

    return CompiledQuantizer(shared_library("llvm"), 4, 2, 64, torch.float32, 64, "minmax")


@pytest.fixture(scope="module")
def fitted_quantizer():
    from wq_compile.runtime.backend import CompiledQuantizer
    from wq_compile.runtime.library import shared_library

    return CompiledQuantizer(shared_library("llvm"), 4, 2, 64, torch.float32, 64, "lsq-zs")


def _property_case(bits: int, groups: int, scale: float, constant: bool, seed: int):
    """``k, v [2, groups * 28, 64]`` at ``scale`` (a constant key group and value token when ``constant``), spec."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(2, groups * 28, 64, generator=gen) * scale
    v = torch.randn(2, groups * 28, 64, generator=gen) * scale
    if constant:
        k[:, :28] = 3.0
        v[:, 5] = -2.0
    return k, v, QuantSpec(bits, 28, 64)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(BITS, st.integers(1, 4), st.sampled_from((1e-3, 1.0, 2e4, FP16_MAX / 3)), st.booleans(), st.integers(0, 99))
@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_compiled_and_reference_quantizers_agree_bit_exactly(compiled_quantizer, bits: int, groups: int,
                                                             scale: float, constant: bool, seed: int) -> None:
    k, v, spec = _property_case(bits, groups, scale, constant, seed)
    if k.abs().max() > FP16_MAX or v.abs().max() > FP16_MAX:  # neither accepts it: both refuse, naming the input
        for quantize in (compiled_quantizer, lambda s, a, b: (quantize_keys(a, s), quantize_values(b, s))):
            with pytest.raises(ValueError, match="NaN/inf or values beyond"):
                quantize(spec, k, v)
        return
    ck, cv = compiled_quantizer(spec, k, v)
    rk, rv = quantize_keys(k, spec), quantize_values(v, spec)
    for a, b in ((ck.codes, rk.codes), (ck.scale, rk.scale), (ck.zero, rk.zero), (cv.codes, rv.codes),
                 (cv.scale, rv.scale), (cv.zero, rv.zero)):
        assert torch.equal(a, b)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(BITS, st.integers(1, 4), st.sampled_from((1e-3, 1.0, 2e4, FP16_MAX / 3)), st.booleans(), st.integers(0, 99))
@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_compiled_fit_keeps_its_promise_at_every_scale(fitted_quantizer, bits: int, groups: int, scale: float,
                                                       constant: bool, seed: int) -> None:
    """The default fit compiled (keys least squares, values zero search): each within the reference fit's error,
    never above min/max's, codes equal but near rounding boundaries; tiny and near-fp16-max scales included."""
    from wq_compile.compiler.check import _check_fit

    k, v, spec = _property_case(bits, groups, scale, constant, seed)
    if k.abs().max() > FP16_MAX or v.abs().max() > FP16_MAX:
        with pytest.raises(ValueError, match="NaN/inf or values beyond"):
            fitted_quantizer(spec, k, v)
        return
    ck, cv = fitted_quantizer(spec, k, v)
    named = {"k": k, "k_codes": ck.codes, "k_scale": ck.scale, "k_zero": ck.zero,
             "v": v, "v_codes": cv.codes, "v_scale": cv.scale, "v_zero": cv.zero}
    _check_fit("fitted quantizer", "k", named, quantize_keys(k, spec, "lsq-zs"))
    _check_fit("fitted quantizer", "v", named, quantize_values(v, spec, "lsq-zs"))
