"""Compile from a tuning log vs the default schedule, the versioned module cache, CUDA codegen + nvcc without a GPU.

Every build here uses the real kernels (``wq_compile.kernels`` + ``wq_compile.schedules``): the tiny decode kernel
on llvm, the tiny model's fused kernel on an H100 tag, directly and through ``wq-tune --build-only``.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from wq_compile import cli
from wq_compile.build import (
    UntunedKernelWarning,
    build_kernel,
    cache_root,
    export_kernel,
    module_paths,
    read_cached_key,
    ModuleCacheError,
)
from wq_compile.device import resolve_device, versions
from wq_compile.models import kernel_specs
from wq_compile.spec import KernelSpec
from wq_testing import TINY_DECODE, measured_log

#: The fused kernel of the ``tiny`` preset (all widths + the dense residual), as ``wq-tune --kernels fused`` builds it.
(TINY_FUSED,) = kernel_specs("tiny", kinds=("fused",))
H100 = "nvidia/nvidia-h100"
FATBIN_MAGIC = b"\x50\xed\x55\xba"


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


@pytest.fixture(scope="module")
def default_decode(host, tmp_path_factory):
    """TINY_DECODE compiled from a logs dir without its log: the default schedule, with a warning (compiled once)."""
    with pytest.warns(UntunedKernelWarning, match="untuned default schedule"):
        return build_kernel(TINY_DECODE, host, logs_dir=tmp_path_factory.mktemp("no_logs"))


def _run(built, sizes, seed=0):
    args = built.signature.example_args(sizes, seed=seed)
    built.module.get_function(built.spec.uri)(*args)
    return [a for a, d in zip(args, built.signature.args) if d.is_output]


def test_default_schedule_warns_and_tuned_log_is_used(tmp_path, host, default_decode):
    default = default_decode
    assert not default.tuned and default.key["schedule"] == "default"

    measured_log(TINY_DECODE, host, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelWarning)
        tuned = build_kernel(TINY_DECODE, host, logs_dir=tmp_path)
    assert tuned.tuned and tuned.key["schedule"].startswith("tuned:") and tuned.tuned_run_secs > 0
    # the trace tuned on static sizes replays on the symbolic kernel: other lengths work and agree
    for n in (64, 192):
        sizes = {"B": 2, "N": n, "G": -(-n // 28)}
        for a, b in zip(_run(default, sizes), _run(tuned, sizes)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    untuned = KernelSpec("decode", (2,), head_dim=64, num_q_heads=4, num_kv_heads=2)  # no log for this one
    with pytest.raises(Exception, match="allow_untuned=False"):
        build_kernel(untuned, host, logs_dir=tmp_path, allow_untuned=False)


def test_export_is_versioned_atomic_and_checked(tmp_path, host, default_decode, monkeypatch):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    v = versions()
    assert cache_root() == tmp_path / "cache" / f"{v['apache-tvm']}-{v['apache-tvm-ffi']}"
    path = export_kernel(default_decode)
    paths = module_paths(TINY_DECODE, host)
    assert path == paths["module"] == cache_root() / host.tag / f"{TINY_DECODE.uri}.so"
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [
        f"{TINY_DECODE.uri}.json", f"{TINY_DECODE.uri}.so"]  # no temporary files left behind
    key = read_cached_key(paths)
    assert key["uri"] == TINY_DECODE.uri and key["target"] == host.target_json and key["tuned"] is False

    key["apache-tvm-ffi"] = "0.0.1"
    paths["key"].write_text(json.dumps(key))
    with pytest.raises(ModuleCacheError, match="built with apache-tvm-ffi 0.0.1.*delete"):
        read_cached_key(paths)
    shutil.rmtree(cache_root())


def test_fused_kernel_cuda_source_and_nvcc_binary_without_gpu(tmp_path):
    """The real fused kernel with the CUDA default schedule: source generated here, nvcc'd to a fatbin offline."""
    nvcc = shutil.which("nvcc") is not None  # ships here and on the GPU machine; without it the module keeps source
    h100 = resolve_device(H100)
    with pytest.warns(UntunedKernelWarning):
        built = build_kernel(TINY_FUSED, h100, cuda_binary=nvcc)
    assert "__global__" in built.source and TINY_FUSED.uri in built.source
    assert built.signature.names[0] == "q" and [a.name for a in built.signature.outputs] == ["out"]
    path = export_kernel(built, tmp_path)
    paths = module_paths(TINY_FUSED, h100, tmp_path)
    assert path == paths["module"] and path.exists() and "cuda-nvidia-h100-sm_90a" in str(path)
    assert read_cached_key(paths)["target"] == h100.target_json
    if nvcc:
        assert built.binary[:4] == FATBIN_MAGIC and len(built.binary) > 1000
        assert paths["binary"].read_bytes() == built.binary
    else:
        assert built.binary is None and not paths["binary"].exists()


def test_cli_build_only_for_h100_writes_modules(tmp_path, capsys):
    """``wq-tune --build-only`` compiles (default schedule: no log) and caches without a GPU; no measuring."""
    argv = ["--target", H100, "--model", "tiny", "--build-only", "--kernels", "fused",
            "--logs-dir", str(tmp_path / "logs"), "--cache-dir", str(tmp_path / "cache")]
    with pytest.warns(UntunedKernelWarning):
        assert cli.main_tune(argv) == 0
    assert TINY_FUSED.uri in capsys.readouterr().out
    paths = module_paths(TINY_FUSED, resolve_device(H100), tmp_path / "cache")
    assert paths["module"].exists() and paths["module"].stat().st_size > 0
    assert read_cached_key(paths)["uri"] == TINY_FUSED.uri
    if shutil.which("nvcc") is not None:
        assert paths["binary"].read_bytes()[:4] == FATBIN_MAGIC
