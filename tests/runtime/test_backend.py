"""The backend a cache runs: compiled modules shared per process, or the torch reference; typed config."""

from __future__ import annotations

import sys
import subprocess

import pytest
import torch

from wq_compile.runtime.backend import ReferenceDecoder, make_backend
from wq_compile.core.config import WindowQuantConfig


def test_reference_backend_and_config_validation():
    b = make_backend(WindowQuantConfig(backend="reference"), 4, 2, 64, torch.float32, "cpu")
    assert b.name == "reference" and isinstance(b.decode, ReferenceDecoder)
    assert b.tuning_summary() == "torch reference (no compiled kernels)"
    with pytest.raises(ValueError, match="backend"):
        WindowQuantConfig(backend="fast")
    with pytest.raises(ValueError, match="whole number of key groups"):
        WindowQuantConfig(window=30)


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_compiled_backend_is_shared_and_says_where_kernels_come_from():
    wq = WindowQuantConfig(backend="tvm")
    a = make_backend(wq, 4, 2, 64, torch.float32, "cpu")
    assert make_backend(wq, 4, 2, 64, torch.float32, "cpu") is a  # a second cache loads nothing
    assert make_backend(WindowQuantConfig(backend="tvm", avg_bits=4.0), 4, 2, 64, torch.float32, "cpu") is not a
    # fused, multi-token (both reading the default 8-bit scale/zero of the int2 bucket), quantize x 3, int2 recode
    assert a.name.startswith("tvm:") and len(a.kernels) == 6
    assert a.decode_steps is not None and any(uri.startswith("multi_") for uri in a.kernels)
    assert all(how == "tuned here" or how == "untuned" or how.startswith("tuned on ") for how in a.kernels.values())
    assert a.compiled + a.cached + a.reused == 6 and "from the module cache" in a.tuning_summary()


def test_import_has_no_side_effects():
    code = ("import sys, wq_compile; assert 'transformers' not in sys.modules and 'tvm' not in sys.modules; "
            "from transformers import AttentionInterface; assert 'windowquant' not in AttentionInterface._global_mapping; "
            "from wq_compile import ATTN_IMPLEMENTATION; assert 'windowquant' in AttentionInterface._global_mapping")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_screened_quantize_is_the_checked_call_without_the_check():
    """The cache screens windows once per layer and calls ``screened``; a direct call still refuses NaN."""
    import pytest

    from wq_compile.runtime.backend import CompiledQuantizer
    from wq_compile.core.buckets import screened_quantizer, torch_quantizer
    from wq_compile.runtime.library import shared_library
    from wq_compile.core.spec import QuantSpec

    q = CompiledQuantizer(shared_library("llvm"), 4, 2, 64, torch.float32, 64)
    assert screened_quantizer(q) == q.screened and screened_quantizer(torch_quantizer) is torch_quantizer
    qs = QuantSpec(4, 28, 64)
    k, v = torch.randn(2, 56, 64), torch.randn(2, 56, 64)
    a, b = q(qs, k, v), q.screened(qs, k, v)
    for x, y in zip((a[0].codes, a[0].scale, a[1].codes, a[1].zero), (b[0].codes, b[0].scale, b[1].codes, b[1].zero)):
        assert torch.equal(x, y)
    k[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q(qs, k, v)


def test_int8_dots_mode_is_explicit_and_refused_where_no_kernel_has_it():
    """``int8_dots`` is a typed config switch; a target without the mode is an error at make_backend (also with
    backend="auto": no silent fallback to another precision or to the reference); on a VNNI host the backend's
    fused kernel is the int8-query one, says so, and stays close to the reference over a real layer."""
    from wq_compile.tools.bench.decode import make_layer
    from wq_compile.runtime.decoder import FusedDecoder, int8_dots_unsupported
    from wq_compile.compiler.device import host_device
    from wq_compile.core.reference import decode_attention
    from wq_compile.runtime.library import shared_library

    for bad in (1, "yes", "AUTO"):
        with pytest.raises(ValueError, match="int8_dots"):
            WindowQuantConfig(int8_dots=bad)
    # "auto": the mode where the kernel has it, exact elsewhere (never an error); False stays the default
    assert WindowQuantConfig().int8_dots is False
    split = FusedDecoder(shared_library("llvm"), 14, 2, 64, torch.float32, split=True, int8_dots="auto")
    assert split.int8_dots is False
    auto = FusedDecoder(shared_library("llvm"), 14, 2, 64, torch.float32, int8_dots="auto")
    assert auto.int8_dots is (int8_dots_unsupported(host_device(), split=False) is None)
    with pytest.raises(ValueError, match="only the CPU fused kernel"):
        make_backend(WindowQuantConfig(int8_dots=True, target="nvidia/nvidia-h100"), 14, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="split-KV"):
        FusedDecoder(shared_library("llvm"), 14, 2, 64, torch.float32, split=True, int8_dots=True)
    why = int8_dots_unsupported(host_device(), split=False)
    if why is not None:
        pytest.skip(why)
    b = make_backend(WindowQuantConfig(int8_dots=True), 14, 2, 64, torch.float32, "cpu")
    assert "(int8 dots" in b.tuning_summary() and any("_dot81" in uri for uri in b.kernels)
    layer = make_layer(1200, {8: 0.25, 4: 0.25, 2: 0.5}, 2, 64, torch.float32, residual=40)
    q = torch.randn(1, 14, 64) * 2
    got = b.decode(q, layer, 0.125, stats=None)
    want = decode_attention(q, layer, 0.125)
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.05, f"int8 dots vs the exact reference: relative error {rel:.4f}"


def test_first_use_shows_a_progress_bar_and_a_warm_cache_shows_none(tmp_path):
    """Compiling the kernels takes seconds each, once: the user sees a bar then, and nothing once they are cached."""
    import os

    from wq_testing import run_python

    body = """
        import torch
        from wq_compile import WindowQuantConfig
        from wq_compile.runtime.backend import make_backend
        b = make_backend(WindowQuantConfig(backend="tvm"), 4, 2, 64, torch.float32, "cpu")
        print("compiled", b.compiled)
    """
    env = {**os.environ, "WQ_CACHE_DIR": str(tmp_path)}
    cold = run_python(body, env=env)
    assert cold.returncode == 0, cold.stderr[-2000:]
    # fused + multi-token (reading 8-bit scale/zero, the default), quantize x 3 and the int2 recode kernel
    assert "compiled 6" in cold.stdout and "compiling kernels" in cold.stderr and "6/6" in cold.stderr
    warm = run_python(body, env=env)
    assert warm.returncode == 0 and "compiled 0" in warm.stdout, warm.stderr[-2000:]
    assert "compiling kernels" not in warm.stderr


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_compiled_kernels_read_8_bit_scale_zero_as_the_reference_does():
    """``meta_bits=8``: the CPU fused and multi-token kernels read the 8-bit codes and run bases themselves (their
    own specs, built by make_backend) and give the reference's result over the same codes, per sample (a batch of
    two with different plans, so different runs and lengths)."""
    from wq_compile.core.layout import LayerCache
    from wq_compile.core.reference import decode_attention
    from wq_compile.core.windows import WindowAssignment

    b = make_backend(WindowQuantConfig(backend="tvm", meta_bits=8), 4, 2, 64, torch.float32, "cpu")
    assert [u for u in b.kernels if u.startswith(("fused_", "multi_")) and "_meta82" in u] and any(
        u.startswith("quantize_k2v2") and "_given1" in u for u in b.kernels)
    gen = torch.Generator().manual_seed(3)
    layer = LayerCache.empty(2, 2, 64, torch.float32, residual=64, quantizer=b.quantize, meta_bits=8)
    starts = torch.arange(5) * 196
    for i, bits in enumerate(([8, 4, 2, 2, 2], [2, 8, 2, 4, 16])):
        k, v = torch.randn(2, 5 * 196 + 40, 64, generator=gen), torch.randn(2, 5 * 196 + 40, 64, generator=gen)
        layer.fill_sample(i, k, v, WindowAssignment(starts, torch.full((5,), 196), torch.tensor(bits)))
    q2 = layer.buckets[2]
    assert layer.meta8_width == 2 and q2.runs is not None and q2.runs.tolist() == [2, 1]  # 21 and 14 groups
    q = torch.randn(2, 4, 64, generator=gen)
    torch.testing.assert_close(b.decode(q, layer, 0.125, stats=None), decode_attention(q, layer, 0.125),
                               rtol=1e-5, atol=2e-5)
    assert any(key[1] == 2 for key in b.decode._kernels)  # the native kernel ran, not the fp16 expansion
    assert b.decode_steps is not None
    qs = torch.randn(2, 4, 3, 64, generator=gen)
    got = b.decode_steps(qs, layer, 0.125, stats=None)
    assert got.shape == (2, 3, 4, 64)
    last = decode_attention(qs[:, :, 2], layer, 0.125)  # the last new token sees every cached token
    torch.testing.assert_close(got[:, 2], last, rtol=1e-5, atol=2e-5)


def test_compiled_recode_gives_the_reference_codes_on_the_8_bit_grid():
    """The quantize kernel with given scale/zero (no fit) codes exactly as the torch reference on the same grid."""
    from wq_compile.core.meta8 import constrain
    from wq_compile.core.spec import QuantSpec
    from wq_compile.runtime.backend import CompiledQuantizer
    from wq_compile.runtime.library import shared_library

    q = CompiledQuantizer(shared_library("llvm"), 4, 2, 64, torch.float32, 64)
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 9 * 28, 64, generator=gen) * 3, torch.randn(2, 9 * 28, 64, generator=gen)
    for bits in (2, 1):
        qk, qv = q(QuantSpec(bits, 28, 64), k, v)
        want, got = constrain(k, v, qk, qv), constrain(k, v, qk, qv, q.recode)
        assert torch.equal(got[0].codes, want[0].codes) and torch.equal(got[1].codes, want[1].codes)
        assert not torch.equal(want[0].codes, qk.codes)  # the grid moved some codes: the recode did work
