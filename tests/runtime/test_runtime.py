"""KernelLibrary: cache reuse, shared libraries, argument checks naming the argument, custom ops under torch.compile."""

from __future__ import annotations

import json

import pytest
import torch

from wq_compile.compiler.build import UntunedKernelWarning, kernel_def
from wq_compile.compiler.check import check_against_reference
from wq_compile.compiler.device import resolve_device
from wq_compile.compiler.measure import example_args
from wq_compile.compiler.module_cache import module_paths
from wq_compile.compiler.verified_file import BadFileWarning
from wq_compile.runtime.library import KernelArgumentError, KernelLibrary, shared_library
from wq_testing import TINY_DECODE, measured_log

SIZES = {"B": 2, "N": 128, "G": 5}


@pytest.fixture()
def lib(tmp_path):
    measured_log(TINY_DECODE, resolve_device("llvm"), tmp_path / "logs")
    with KernelLibrary("llvm", logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache", namespace="wqtest") as lib:
        yield lib


def test_cache_is_reused_across_libraries(lib, tmp_path):
    k = lib.load(TINY_DECODE)
    assert k.tuned and lib.stats.compiled == 1 and lib.stats.cache_hits == 0
    assert lib.load(TINY_DECODE) is k
    with KernelLibrary("llvm", logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache") as again:
        k2 = again.load(TINY_DECODE)
        assert again.stats.compiled == 0 and again.stats.cache_hits == 1 and k2.tuned
    # without the log the key differs (default schedule): rebuilt with a warning, never the tuned module reused
    with KernelLibrary("llvm", logs_dir=tmp_path / "none", cache_dir=tmp_path / "cache") as untuned:
        with pytest.warns(UntunedKernelWarning):
            assert not untuned.load(TINY_DECODE).tuned
        assert untuned.stats.compiled_untuned == 1
    paths = module_paths(TINY_DECODE, lib.device, tmp_path / "cache")
    key = json.loads(paths.key.read_text())
    paths.key.write_text(json.dumps({**key, "apache-tvm": "0.1"}))
    with KernelLibrary("llvm", logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache") as stale:
        with pytest.warns(BadFileWarning, match="built with apache-tvm 0.1"):  # never loaded: rebuilt
            stale.load(TINY_DECODE)
        assert stale.stats.compiled == 1


def test_argument_errors_name_the_argument(lib):
    k = lib.load(TINY_DECODE)
    args = example_args(k.signature, SIZES)
    k(*args)
    names = [a.name for a in k.signature.args]

    def bad(name, value, match):
        broken = list(args)
        broken[names.index(name)] = value
        with pytest.raises(KernelArgumentError, match=match):
            k(*broken)

    i = names.index
    bad("k_codes", args[i("k_codes")].float(), r"'k_codes': expected dtype torch.int32")
    bad("v_scale", args[i("v_scale")][:, :, :64].contiguous(), r"'v_scale': dim 2 is 'N' = 128")
    bad("k_scale", args[i("k_scale")][:, :, :2].contiguous(), r"'k_scale': dim 2 is 'G' = \d+ from an earlier argument")
    few_groups = list(args)
    for name in ("k_codes", "k_scale", "k_zero"):  # token-packed key codes are per group too
        few_groups[i(name)] = args[i(name)][:, :, :2].contiguous()
    with pytest.raises(KernelArgumentError, match=r"'k_codes': G=2 groups of 28 tokens do not cover N=128"):
        k(*few_groups)
    bad("q", args[i("q")].transpose(0, 1).contiguous().transpose(0, 1), r"'q': expected a contiguous tensor")
    bad("sm_scale", torch.tensor(0.1), r"'sm_scale': expected a Python number")
    bad("o", args[i("o")][..., :32].contiguous(), r"'o': dim 2 must be 64")
    with pytest.raises(KernelArgumentError, match="multiple of 64"):
        k.run(*example_args(k.signature, {"B": 1, "N": 100, "G": 4})[:-2])
    with pytest.raises(KernelArgumentError, match="expected 11 arguments"):
        k(*args[:-1])


def test_run_and_custom_op_under_torch_compile(lib):
    k = lib.load(TINY_DECODE)
    args = example_args(k.signature, SIZES)
    inputs = args[:-2]
    o, lse = k.run(*inputs)
    k(*args)
    torch.testing.assert_close(o, args[-2])
    torch.testing.assert_close(lse, args[-1])
    assert torch.isfinite(lse).all() and lse.abs().sum() > 0
    check_against_reference(kernel_def(TINY_DECODE), k.module, lib.device)  # o and lse vs the torch reference

    op = lib.op(TINY_DECODE)
    eo, else_ = op(*inputs)
    torch.testing.assert_close(eo, o)
    torch.testing.assert_close(else_, lse)

    def step(*xs):
        out, l = op(*xs)
        return out * 2.0, l

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    co, clse = compiled(*inputs)
    torch.testing.assert_close(co, 2.0 * o)
    torch.testing.assert_close(clse, lse)


def test_shared_library_is_one_per_target_logs_and_cache(tmp_path):
    a = shared_library("llvm", logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache")
    assert shared_library("llvm", logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache") is a
    assert shared_library("llvm", logs_dir=tmp_path / "other", cache_dir=tmp_path / "cache") is not a


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split-kv"])
def test_fused_decoder_matches_the_reference(split: bool, tmp_path) -> None:
    """The decoder the cache runs: one fused launch (CPU default), or split-KV + merge (the CUDA path, run here on
    llvm with the same PrimFuncs), over every bucket mix the bench uses, batch 1."""
    from wq_compile.tools.bench.decode import MIXES, make_layer
    from wq_compile.core.reference import decode_attention
    from wq_compile.runtime.decoder import FusedDecoder

    with KernelLibrary("llvm", logs_dir=tmp_path / "nologs", cache_dir=tmp_path / "cache") as lib:
        dec = FusedDecoder(lib, 4, 2, 64, torch.float32, split=split, sm_count=3)
        assert dec.split is split
        gen = torch.Generator().manual_seed(3)
        for mix in ("int4", "mixed"):
            layer = make_layer(600, MIXES[mix], 2, 64, torch.float32)
            q = torch.randn(1, 4, 64, generator=gen)
            want = decode_attention(q, layer, 0.125)
            for _ in range(2):  # first call checked, second unchecked
                got = dec(q, layer, 0.125)
                assert got.shape == want.shape and got.dtype == torch.float32
                assert (got - want).abs().max() < 2e-5
        if split:  # the merge kernel was loaded and several ranges were used (3 units x 2 blocks / 2 kv heads)
            assert dec._merge is not None
            assert any(k[0].endswith("split1") and k[2][0][0] == 3 for k in dec._checked)


def test_fused_decoder_checks_once_per_tensor_set_and_follows_growth(tmp_path, monkeypatch) -> None:
    """The CPU decoder converts a layer's tensors for TVM once and calls unchecked while the layer holds the same
    tensor objects; decode tokens appended in place are seen (lens is read by the kernel), and a piece that grows
    into new tensors is checked and converted again. Counted, not timed."""
    from wq_compile.tools.bench.decode import MIXES, make_layer
    from wq_compile.runtime.decoder import FusedDecoder
    from wq_compile.core.reference import decode_attention
    from wq_compile.runtime.library import CompiledKernel

    calls = {"checked": 0, "unchecked": 0}
    checked, unchecked = CompiledKernel.__call__, CompiledKernel.call_unchecked

    def count_checked(self, *a):
        calls["checked"] += 1
        return checked(self, *a)

    def count_unchecked(self, *a):
        calls["unchecked"] += 1
        return unchecked(self, *a)

    monkeypatch.setattr(CompiledKernel, "__call__", count_checked)
    monkeypatch.setattr(CompiledKernel, "call_unchecked", count_unchecked)
    with KernelLibrary("llvm", logs_dir=tmp_path / "nologs", cache_dir=tmp_path / "cache") as lib:
        dec = FusedDecoder(lib, 4, 2, 64, torch.float32)
        gen = torch.Generator().manual_seed(5)
        layer = make_layer(400, MIXES["mixed"], 2, 64, torch.float32)
        other = make_layer(300, MIXES["int4"], 2, 64, torch.float32, seed=1)
        dense_ids = {id(layer.dense.k)}
        for step in range(40):
            q = torch.randn(1, 4, 64, generator=gen)
            for lay in (layer, other):
                got = dec(q, lay, 0.125)
                assert (got - decode_attention(q, lay, 0.125)).abs().max() < 2e-5, f"step {step}"
            kv = torch.randn(2, 1, 2, 1, 64, generator=gen)
            layer.append(kv[0], kv[1])  # one decode token: in place until the dense piece must grow
            dense_ids.add(id(layer.dense.k))
    assert len(dense_ids) > 1, "the dense piece never grew: the test does not cover re-binding"
    # one full check per distinct tensor set of each layer, every other call unchecked
    assert calls["checked"] == len(dense_ids) + 1
    assert calls["unchecked"] == 80 - calls["checked"]


def test_the_repository_logs_serve_by_default(monkeypatch):
    """Without ``$WQ_TUNING_LOGS`` a checkout's shipped ``tuning_logs/`` is what the runtime looks up (a package move
    once pointed this one folder too high, and every kernel silently ran untuned)."""
    from pathlib import Path

    from wq_compile.runtime.library import LOGS_ENV, default_logs_dir

    monkeypatch.delenv(LOGS_ENV, raising=False)
    shipped = Path(__file__).resolve().parents[2] / "tuning_logs"
    assert shipped.is_dir() and any(shipped.iterdir())
    assert default_logs_dir() == shipped
    monkeypatch.setenv(LOGS_ENV, "/elsewhere")
    assert default_logs_dir() == Path("/elsewhere")
