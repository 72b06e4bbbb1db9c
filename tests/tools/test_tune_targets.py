"""``wq-tune`` without ``--kernels`` builds exactly the kernels the target's decoder runs (issue 21, item 0).

CUDA runs the split-KV kernel and its merge (``FusedDecoder(split=None)`` splits on CUDA) and the split-KV
multi-token kernel for several-token steps (``StepDecoder(split=None)``, the same merge), CPUs the fused kernel:
tuning "fused" for a GPU (the old default) left the kernel the GPU runs untuned. Both tests build for real (CUDA:
the modules are compiled with nvcc, nothing runs; llvm: the backend then loads what was built).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from wq_compile.core.config import WindowQuantConfig
from wq_compile.core.spec import QuantSpec
from wq_compile.compiler.module_cache import module_paths
from wq_compile.compiler.verified_file import read_json
from wq_compile.kernels.catalog import CUDA_KERNEL_KINDS, DEFAULT_KERNEL_KINDS, default_kernel_kinds
from wq_compile.kernels.signatures import MULTI_SPLIT_REGISTER_LEVEL
from wq_compile.runtime.backend import CompiledQuantizer, make_backend
from wq_compile.runtime.decoder import FusedDecoder
from wq_compile.runtime.library import KernelLibrary
from wq_compile.runtime.steps import StepDecoder
from wq_compile.tools.cli.wq_tune import main_tune

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)


def _built(capsys: pytest.CaptureFixture, argv: list[str]) -> dict[str, str]:
    """Run ``wq-tune`` and read its table back: kernel uri -> schedule provenance."""
    assert main_tune(argv) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line]
    return {r[0].strip(): r[1].strip() for r in rows[1:] if not set(r[0].strip()) <= {"-", "+"}}


def test_default_kinds_follow_the_target():
    assert default_kernel_kinds("cuda") == CUDA_KERNEL_KINDS == ("split", "multi-split", "quantize")
    assert default_kernel_kinds("llvm") == DEFAULT_KERNEL_KINDS == ("fused", "multi", "quantize")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: CUDA modules cannot be built")
def test_cuda_build_only_builds_what_the_cuda_decoder_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WQ_TUNING_LOGS", str(tmp_path / "logs"))
    target = "nvidia/nvidia-h200"
    built = _built(capsys, ["--target", target, "--model", "tiny", "--bits", "4", "--dtype", "f16", "--build-only",
                            "--logs-dir", str(tmp_path / "logs"), "--cache-dir", str(tmp_path / "cache"),
                            "--no-progress"])
    library = KernelLibrary(target, logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache")
    decoder = FusedDecoder(library, 4, 2, 64, torch.float16)  # split=None: split on CUDA
    quantizer = CompiledQuantizer(library, 4, 2, 64, torch.float16, WindowQuantConfig().chunk)
    steps = StepDecoder(library, 4, 2, 64, torch.float16)  # split=None: the split-KV multi-token kernel on CUDA
    specs = {s.uri: s for s in [*decoder.specs((4,)), *steps.specs((4,)), quantizer.spec(QuantSpec(4, 28, 64))]}
    runs = set(specs)
    assert decoder.split and steps.split and any(uri.startswith("merge") for uri in runs)
    assert any(uri.startswith("multi") and uri.endswith("_split1") for uri in runs)
    assert set(built) == runs, f"built {sorted(built)}, the CUDA decoder runs {sorted(runs)}"
    assert all(how == "untuned" for how in built.values())  # no log: every one built from the default schedule
    # each binary was nvcc'd with its kernel's ptxas register level (the multi-token split kernel's own: TVM's 10
    # spills it at the 7B shapes, docs/offline_tuning.md) and the cache records the flags nvcc ran and ptxas' report
    levels = {}
    for uri, spec in specs.items():
        record = read_json(module_paths(spec, library.device, tmp_path / "cache").key)
        levels[spec.kind] = re.findall(r"--register-usage-level=(\d+)", " ".join(record["nvcc_flags"]))
        assert record["ptxas"] and all(u["spill_stores"] == u["spill_loads"] == 0 for u in record["ptxas"]), record
    assert levels == {"fused": ["10"], "merge": ["10"], "quantize": ["10"], "multi": [str(MULTI_SPLIT_REGISTER_LEVEL)]}


def test_llvm_build_only_is_what_the_backend_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WQ_TUNING_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    built = _built(capsys, ["--target", "llvm", "--model", "tiny", "--build-only", "--logs-dir",
                            str(tmp_path / "logs"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    backend = make_backend(WindowQuantConfig(backend="tvm", target="llvm"), 4, 2, 64, torch.float32, "cpu",
                           shared=False)
    assert backend.kernels == built, f"built {built}, the backend runs {backend.kernels}"
    assert backend.compiled == 0  # every module it runs came from the cache wq-tune filled
