from __future__ import annotations

import pytest
import torch

from wq_compile.core.quant import dequantize_keys, dequantize_values, error_bound, key_lane_bytes, key_words, pack, pack_keys, quantize_keys, quantize_values, unpack, unpack_keys
from wq_compile.core.spec import KernelSpec, QuantSpec

SIZES = [7, 13, 196, 300]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_bit_exact(bits: int, gen: torch.Generator) -> None:
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=gen)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 5, 64 * bits // 32)
    assert torch.equal(unpack(words, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [7, 13, 28, 196, 300])
def test_pack_keys_unpack_keys_bit_exact(bits: int, n: int, gen: torch.Generator) -> None:
    codes = torch.randint(0, 1 << bits, (2, 3, n, 64), generator=gen)
    words = pack_keys(codes, bits, 28)
    assert words.dtype == torch.int32 and words.shape == (2, 3, -(-n // 28), 64, key_words(bits, 28))
    assert torch.equal(unpack_keys(words, bits, 28, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_keys_byte_layout(bits: int) -> None:
    """Token slot s of a (group, channel) is field s // L of byte s % L (L = 32 * bits / 8 bytes): the kernel's
    vector unpack depends on exactly this order."""
    lb = key_lane_bytes(bits, 28)
    codes = torch.zeros(28, 2, dtype=torch.int64)
    codes[:, 1] = torch.arange(28) % (1 << bits)  # channel 1 = slot index (mod 2**bits)
    raw = pack_keys(codes, bits, 28).view(torch.uint8).reshape(2, lb)  # little-endian words as bytes
    assert not raw[0].any()
    for s in range(32):
        want = s % (1 << bits) if s < 28 else 0  # slots past k_group are code 0
        assert (int(raw[1, s % lb]) >> (bits * (s // lb))) & ((1 << bits) - 1) == want, s


def test_pack_is_little_endian() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]])
    assert int(pack(codes, 4)[0, 0]) == 1 | (2 << 4) | (3 << 8)
    top = torch.tensor([[0, 0, 0, 255]])  # sets bit 31: stored as a negative int32, unpacked intact
    assert int(pack(top, 8)[0, 0]) < 0 and torch.equal(unpack(pack(top, 8), 8), top)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", SIZES)
def test_keys_within_half_step(bits: int, n: int, gen: torch.Generator) -> None:
    spec = QuantSpec(bits, k_group=28, v_group=32)
    k = torch.randn(2, n, 64, generator=gen) * 3 + torch.randn(1, 1, 64, generator=gen) * 5  # channel outliers
    qk = quantize_keys(k, spec)
    groups = -(-n // 28)
    assert qk.scale.shape == (2, groups, 64) and qk.scale.dtype == torch.float16
    idx = torch.arange(n) // 28
    err = (dequantize_keys(qk, n) - k).abs()
    assert (err <= error_bound(k, qk.scale[:, idx, :], qk.zero[:, idx, :])).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", SIZES)
def test_values_within_half_step(bits: int, n: int, gen: torch.Generator) -> None:
    spec = QuantSpec(bits, k_group=28, v_group=32)
    v = torch.randn(2, n, 64, generator=gen) * 2
    qv = quantize_values(v, spec)
    assert qv.scale.shape == (2, n, 2)
    s = qv.scale.float().repeat_interleave(32, -1)
    z = qv.zero.float().repeat_interleave(32, -1)
    assert ((dequantize_values(qv) - v).abs() <= error_bound(v, s, z)).all()


def test_error_shrinks_with_width(gen: torch.Generator) -> None:
    k = torch.randn(1, 196, 64, generator=gen)
    errs = [(dequantize_keys(quantize_keys(k, QuantSpec(b))) - k).square().mean().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    # uniform quantizer: MSE ~ step^2 / 12, step ~ range / qmax; 4 -> 8 bits is ~ (255/15)^2 = 289x
    assert 100 < errs[1] / errs[2] < 600


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_and_tiny_groups_are_finite(bits: int) -> None:
    spec = QuantSpec(bits, k_group=4, v_group=32)
    k = torch.full((1, 9, 32), 0.3)
    qk = quantize_keys(k, spec)
    assert torch.isfinite(dequantize_keys(qk)).all()
    assert (qk.scale == 0).all()
    assert (dequantize_keys(qk, 9) - k).abs().max() <= 0.3 * 2**-11
    tiny = torch.full((1, 1, 32), -2.0)
    tiny[..., 0] = -2.0 + 1e-7
    for qx in (dequantize_keys(quantize_keys(tiny, spec), 1), dequantize_values(quantize_values(tiny, spec))):
        assert torch.isfinite(qx).all() and (qx - tiny).abs().max() < 1e-3


def test_fp16_input_round_trip(gen: torch.Generator) -> None:
    k = torch.randn(1, 13, 64, generator=gen).half()
    assert (dequantize_keys(quantize_keys(k, QuantSpec(8)), 13) - k.float()).abs().max() < 0.05


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(bits=3), ValueError, "bits"),
        (dict(bits=16), ValueError, "bits"),
        (dict(bits=4.0), TypeError, "bits"),
        (dict(bits=4, k_group=0), ValueError, "k_group"),
        (dict(bits=4, v_group="8"), TypeError, "v_group"),
    ],
)
def test_spec_validation(kwargs: dict, exc: type, name: str) -> None:
    with pytest.raises(exc, match=name):
        QuantSpec(**kwargs)


def test_bad_inputs_name_the_argument() -> None:
    spec = QuantSpec(4, v_group=48)
    with pytest.raises(ValueError, match="v_group"):
        quantize_values(torch.randn(3, 64), spec)
    with pytest.raises(ValueError, match="head_dim"):
        quantize_keys(torch.randn(3, 60), QuantSpec(2))
    with pytest.raises(TypeError, match="k: "):
        quantize_keys(torch.randint(0, 3, (3, 64)), QuantSpec(4))
    with pytest.raises(TypeError, match="k: "):
        quantize_keys([[1.0]], QuantSpec(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k: "):
        quantize_keys(torch.randn(64), QuantSpec(4))
    with pytest.raises(ValueError, match="codes"):
        pack(torch.full((1, 8), 16), 4)
    with pytest.raises(TypeError, match="words"):
        unpack(torch.zeros(1, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="k: .*NaN/inf or values beyond"):
        quantize_keys(torch.full((1, 4, 64), 1e6), QuantSpec(4))


def test_kernel_spec_uri_and_validation() -> None:
    spec = KernelSpec("decode", (4,), head_dim=128, num_q_heads=28, num_kv_heads=4, k_group=32, v_group=64, dtype="f16")
    assert spec.uri == "decode_k4v4_kg32_vg64_d128_h28kv4_f16_c64"
    assert spec.group_size == 7
    with pytest.raises(ValueError, match="num_q_heads"):
        KernelSpec("decode", (4,), head_dim=64, num_q_heads=14, num_kv_heads=4)
    with pytest.raises(ValueError, match="kind"):
        KernelSpec("prefill", (4,), head_dim=64, num_q_heads=14, num_kv_heads=2)
    with pytest.raises(ValueError, match="dtype"):
        KernelSpec("decode", (4,), head_dim=64, num_q_heads=14, num_kv_heads=2, dtype="f8")
    with pytest.raises(TypeError, match="bits"):
        KernelSpec("decode", [4], head_dim=64, num_q_heads=14, num_kv_heads=2)  # type: ignore[arg-type]


def test_quantizable_tokens_matches_the_elementwise_rule() -> None:
    """``|x| <= 65504`` for every element of the token: NaN, +-inf and out-of-range values fail, the bound passes."""
    from wq_compile.core.quant import FP16_MAX, quantizable_tokens

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 40, 16).to(dtype)
        x[0, 1, 2], x[1, 2, 3], x[2, 3, 4], x[0, 4, 0] = float("nan"), float("inf"), float("-inf"), -FP16_MAX
        if dtype != torch.float16:
            x[1, 5, 7] = 7e4
        want = (x.abs() <= FP16_MAX).all(-1)
        assert torch.equal(quantizable_tokens(x), want)
        assert not bool(want[0, 1]) and not bool(want[1, 2]) and not bool(want[2, 3]) and bool(want[0, 4])
    assert quantizable_tokens(torch.zeros(2, 5, 0)).shape == (2, 5)
