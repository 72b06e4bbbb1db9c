"""8-bit scale/zero on a per-run grid (``meta_bits=8``, issue 22): the grid, the error it adds, the bucket, the bytes."""

from __future__ import annotations

import pytest
import torch

from wq_compile.core.allocation import effective_bits
from wq_compile.core.buckets import QuantBucket
from wq_compile.core.config import WindowQuantConfig
from wq_compile.core.layout import LayerCache
from wq_compile.core.meta8 import RUN_GROUPS, bucket_meta_bits, constrain, decode, encode, runs_of
from wq_compile.core.quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from wq_compile.core.spec import QuantSpec
from wq_compile.core.windows import WindowAssignment

#: Largest growth of the relative reconstruction error (keys and values) that the 8-bit grid may cause, per width.
GROWTH = {2: 1.01, 1: 1.01}


def _kv(h: int = 2, groups: int = 19, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with outlier channels, biased channels and a slow drift (the cases a shared grid could hurt)."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * 28
    k = torch.randn(h, n, d, generator=gen)
    k[..., :4] *= 8
    k[..., 4:8] += 5
    k[..., 8:16] += 3 * torch.sin(torch.arange(n) / 300.0)[None, :, None]
    v = torch.randn(h, n, d, generator=gen) * torch.linspace(0.2, 3, n)[None, :, None]
    return k, v


def test_grid_round_trips_and_stays_near_the_fitted_scale_and_zero() -> None:
    k, v = _kv()
    qk = quantize_keys(k, QuantSpec(2, 28, 64), "lsq-zs")
    run_of = runs_of(qk.scale.shape[-2])
    sc, zc, base = encode(qk.scale, qk.zero, run_of)
    assert sc.dtype == torch.uint8 and base.shape == (2, -(-19 // RUN_GROUPS), 3, 64) and base.dtype == torch.float16
    s, z = decode(sc, zc, base, run_of)
    # the codes (and the scale base and zero low end) are a fixed point of the grid; saves and moves copy the
    # stored base as it is, since the zero step rounded again may move by an fp16 ulp
    again = encode(s, z, run_of)
    assert torch.equal(again[0], sc) and torch.equal(again[1], zc)
    assert torch.equal(again[2][..., :2, :], base[..., :2, :])
    b = base.float()[:, run_of.long()]
    ulp = 2.0**-10 * torch.maximum(s.float().abs(), qk.scale.float().abs()) + 2.0**-24
    assert bool(((s.float() - qk.scale.float()).abs() <= b[..., 0, :] / 510 + ulp).all())
    zulp = 2.0**-10 * torch.maximum(z.float().abs(), qk.zero.float().abs()) + 2.0**-24
    assert bool(((z.float() - qk.zero.float()).abs() <= b[..., 2, :] / 2 + zulp).all())


@pytest.mark.parametrize("bits", [2, 1])
def test_constrained_codes_cost_almost_no_error(bits: int) -> None:
    k, v = _kv()
    spec = QuantSpec(bits, 28, 64)
    qk, qv = quantize_keys(k, spec, "lsq-zs"), quantize_values(v, spec, "lsq-zs")
    qk8, qv8, rm = constrain(k, v, qk, qv)
    for x, a, b in ((k, dequantize_keys(qk), dequantize_keys(qk8)), (v, dequantize_values(qv), dequantize_values(qv8))):
        e16, e8 = float((a - x).norm() / x.norm()), float((b - x).norm() / x.norm())
        assert e8 <= GROWTH[bits] * e16, (bits, e16, e8)
    assert torch.equal(decode(rm.k_scale, rm.k_zero, rm.k_base, rm.run_of)[0], qk8.scale)


def test_bucket_stores_codes_counts_bytes_and_decodes_like_the_fp16_view() -> None:
    k, v = _kv(groups=11)
    spec = QuantSpec(2, 28, 64)
    bk = QuantBucket.empty(spec, 2, 2, 64, chunk=64, meta_bits=8)
    bk.append(1, k[:, : 3 * 28], v[:, : 3 * 28])  # two appends: the second starts new runs
    bk.append(1, k[:, 3 * 28 :], v[:, 3 * 28 :])
    assert bk.k_scale.dtype == torch.uint8 and bk.runs is not None and bk.runs.tolist() == [0, 1 + 1]
    assert bk.run_of is not None and bk.run_of[1, :11].tolist() == [0] * 3 + [1] * 8
    want_k = torch.cat([dequantize_keys(constrain(k[:, a:b], v[:, a:b], quantize_keys(k[:, a:b], spec, "minmax"),
                                                  quantize_values(v[:, a:b], spec, "minmax"))[0])
                        for a, b in ((0, 84), (84, 308))], 1)
    got_k, got_v = bk.dequantize()
    torch.testing.assert_close(got_k[1, :, :308], want_k, rtol=0, atol=0)
    view = bk.kernel_view()  # what the kernels read: fp16 scale/zero expanded from the codes
    assert view.k_scale.dtype == torch.float16 and view.v_zero.shape == bk.v_zero.shape
    assert torch.equal(view.k_codes, bk.k_codes) and torch.equal(bk.meta()[2], view.v_scale)
    # bytes: codes, 8-bit scale/zero, one base per run and channel (value group), an int32 run index per group
    n, g = 308, 11
    want = 2 * (g * 64 * 2 * 4 + n * 64 // 16 * 4 + 2 * g * 64 + 2 * n * 1) + 2 * 2 * (64 + 1) * 3 * 2 + g * 4
    assert bk.used_bytes() == want
    full = effective_bits(2, 28, 64, 8) * n * 2 * 64 * 2 / 8  # full runs of 16 groups: the accounting's rate
    assert abs(effective_bits(2, 28, 64, 8) - 2.608) < 1e-3 and effective_bits(4, 28, 64, 8) == effective_bits(
        4, 28, 64)
    assert full < bk.used_bytes() < 1.05 * full  # two short runs (3 and 8 groups) and the index: within 5% here


def test_layer_reorders_samples_and_refuses_codes_without_runs() -> None:
    k, v = _kv(groups=14)
    layer = LayerCache.empty(2, 2, 64, torch.float32, meta_bits=8)
    assert [layer.buckets[w].meta_bits for w in (8, 4, 2)] == [16, 16, 8]
    starts, lengths = torch.tensor([0, 196]), torch.tensor([196, 196])
    layer.fill_sample(0, k, v, WindowAssignment(starts, lengths, torch.tensor([2, 8])))
    before = layer.buckets[2].dequantize()[0][0].clone()
    layer.select_samples(torch.tensor([1, 0]))
    assert torch.equal(layer.buckets[2].dequantize()[0][1], before)
    assert layer.buckets[2].runs is not None and layer.buckets[2].runs.tolist() == [0, 1]
    qk, qv = quantize_keys(k[:, :28], QuantSpec(2, 28, 64)), quantize_values(v[:, :28], QuantSpec(2, 28, 64))
    with pytest.raises(ValueError, match="RunMeta"):
        layer.buckets[2].append_quantized(0, qk, qv)
    with pytest.raises(ValueError, match="meta_bits"):
        WindowQuantConfig(meta_bits=12)
    assert bucket_meta_bits(4, 8) == 16 and bucket_meta_bits(1, 8) == 8


@pytest.mark.parametrize("bits", [2, 1])
def test_analysis_fake_quant_is_the_stored_grid(bits: int) -> None:
    """The analysis' fast fake quantization at ``meta_bits=8`` gives what a bucket stores and dequantizes (same fit,
    same runs of 16 groups, same grid), and at 4 bits it leaves the fp16 format alone."""
    from wq_compile.core.policy import fake_quant_fast

    k, v = _kv(groups=11)
    spec = QuantSpec(bits, 28, 64)
    qk8, qv8, _ = constrain(k, v, quantize_keys(k, spec, "lsq-zs"), quantize_values(v, spec, "lsq-zs"))
    torch.testing.assert_close(fake_quant_fast(k, bits, 28, "k", "lsq-zs", 8), dequantize_keys(qk8), rtol=0, atol=0)
    torch.testing.assert_close(fake_quant_fast(v, bits, 64, "v", "lsq-zs", 8), dequantize_values(qv8), rtol=0, atol=0)
    assert torch.equal(fake_quant_fast(k, 4, 28, "k", "lsq-zs", 8), fake_quant_fast(k, 4, 28, "k", "lsq-zs"))
