"""Compile from a tuning log (this device's or a compatible one's) vs the default schedule; CUDA codegen + nvcc
without a GPU; ``wq-tune --build-only``. Every build here uses the real kernels."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from tolerances import ATOL, RTOL
from wq_compile.tools import cli
from wq_compile.compiler.build import UntunedKernelWarning, build_kernel
from wq_compile.compiler.device import resolve_device
from wq_compile.compiler.measure import example_args
from wq_compile.kernels.catalog import kernel_specs
from wq_compile.compiler.module_cache import expected_key, module_paths, read_key, store
from wq_compile.core.spec import KernelSpec
from wq_compile.compiler.tuning_log import TuningLogError
from wq_testing import TINY_DECODE, measured_log

#: The fused kernel of the ``tiny`` preset (all widths + the dense residual), as ``wq-tune --kernels fused`` builds it.
(TINY_FUSED,) = kernel_specs("tiny", kinds=("fused",))
H100 = "nvidia/nvidia-h100"
FATBIN_MAGIC = b"\x50\xed\x55\xba"


def simulated_devices(host) -> tuple[dict, dict]:
    """Another machine of the host's ISA class and one of another class, derived from the host so neither can be
    the host itself: the tags extend the host's own tag (a fleet never names a machine ``<host>-sim...``)."""
    target = dict(host.target.export())
    same = {"tag": f"{host.tag}-simsame", "target": {**target, "num-cores": 2 * int(target.get("num-cores", 1) or 1)}}
    other_mcpu = "haswell" if host.isa == "x86_64-avx512" else "skylake-avx512"
    other = {"tag": f"{host.tag}-simother", "target": {"kind": "llvm", "mcpu": other_mcpu, "num-cores": 2}}
    return same, other


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")  # any ISA class: the simulated machines are derived from it


@pytest.fixture(scope="module")
def default_decode(host, tmp_path_factory):
    """TINY_DECODE compiled from a logs dir without its log: the default schedule, with a warning (compiled once)."""
    with pytest.warns(UntunedKernelWarning, match="untuned default schedule"):
        return build_kernel(TINY_DECODE, host, logs_dir=tmp_path_factory.mktemp("no_logs"))


def _run(built, sizes, seed=0):
    args = example_args(built.signature, sizes, seed=seed)
    built.module.get_function(built.spec.uri)(*args)
    return [a for a, d in zip(args, built.signature.args) if d.is_output]


def _agrees(a, b):
    for n in (64, 192):  # the trace tuned on static sizes replays on the symbolic kernel: other lengths work
        sizes = {"B": 2, "N": n, "G": -(-n // 28)}
        for x, y in zip(_run(a, sizes), _run(b, sizes)):
            torch.testing.assert_close(x, y, rtol=RTOL[4], atol=ATOL[4])


def test_default_schedule_warns_and_own_log_is_used(tmp_path, host, default_decode):
    assert str(default_decode.provenance) == "untuned"
    measured_log(TINY_DECODE, host, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelWarning)
        tuned = build_kernel(TINY_DECODE, host, logs_dir=tmp_path)
    assert str(tuned.provenance) == "tuned here" and tuned.provenance.run_secs > 0
    _agrees(default_decode, tuned)
    untuned = KernelSpec("decode", (2,), head_dim=64, num_q_heads=4, num_kv_heads=2)  # no log for this one
    with pytest.raises(TuningLogError, match="allow_untuned=False"):
        build_kernel(untuned, host, logs_dir=tmp_path, allow_untuned=False)


def test_log_of_same_isa_class_is_used_other_class_is_not(tmp_path, host, default_decode):
    SAME_CLASS, OTHER_CLASS = simulated_devices(host)
    assert SAME_CLASS["tag"] != host.tag and OTHER_CLASS["tag"] != host.tag
    measured_log(TINY_DECODE, host, tmp_path / "same", as_device=SAME_CLASS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelWarning)
        foreign = build_kernel(TINY_DECODE, host, logs_dir=tmp_path / "same")
    assert str(foreign.provenance) == f"tuned on {SAME_CLASS['tag']}"
    _agrees(default_decode, foreign)

    measured_log(TINY_DECODE, host, tmp_path / "other", as_device=OTHER_CLASS)
    with pytest.warns(UntunedKernelWarning, match="no tuning record"):
        assert str(build_kernel(TINY_DECODE, host, logs_dir=tmp_path / "other").provenance) == "untuned"


def test_foreign_record_that_disagrees_with_the_reference_is_not_used(tmp_path, host, monkeypatch):
    from wq_compile.compiler import check

    SAME_CLASS, _ = simulated_devices(host)
    measured_log(TINY_DECODE, host, tmp_path, as_device=SAME_CLASS)

    def broken(kdef, module, device, n_tokens=None):
        raise check.ReferenceMismatch("simulated wrong result")

    monkeypatch.setattr(check, "check_against_reference", broken)
    with pytest.warns(UntunedKernelWarning, match="disagrees with the reference"):
        assert not build_kernel(TINY_DECODE, host, logs_dir=tmp_path).tuned


def test_stale_log_of_this_device_is_ignored_cleanly(tmp_path, host):
    """A log whose workload is not the current kernel's (a kernel rewrite) serves nothing: untuned, no error."""
    other = KernelSpec("decode", (4,), head_dim=64, num_q_heads=4, num_kv_heads=2, chunk=128)
    folder = measured_log(other, host, tmp_path)
    shutil.move(str(folder), str(folder.parent / TINY_DECODE.uri))
    with pytest.warns(UntunedKernelWarning, match="no tuning record"):
        assert not build_kernel(TINY_DECODE, host, logs_dir=tmp_path).tuned


def test_fused_kernel_cuda_source_and_nvcc_binary_without_gpu(tmp_path):
    """The real fused kernel with the CUDA default schedule: source generated here, nvcc'd to a fatbin offline."""
    nvcc = shutil.which("nvcc") is not None  # ships here and on the GPU machine; without it the module keeps source
    h100 = resolve_device(H100)
    with pytest.warns(UntunedKernelWarning):
        built = build_kernel(TINY_FUSED, h100, cuda_binary=nvcc)
    assert "__global__" in built.source and TINY_FUSED.uri in built.source
    assert built.signature.names[0] == "q" and [a.name for a in built.signature.outputs] == ["out"]
    paths = store(built, expected_key(TINY_FUSED, h100, None), tmp_path)
    assert paths == module_paths(TINY_FUSED, h100, tmp_path) and paths.module.exists()
    assert "cuda-nvidia-h100-sm_90a" in str(paths.module)
    assert read_key(paths)["target"] == h100.target_json
    if nvcc:
        assert built.binary[:4] == FATBIN_MAGIC and len(built.binary) > 1000
        assert paths.binary.read_bytes() == built.binary
    else:
        assert built.binary is None and not paths.binary.exists()


#: A kernel that cannot fit its registers: 64 live floats per thread under ``__launch_bounds__(1024, 2)`` (32
#: registers each). One small nvcc compile (~2 s).
SPILLING_CUDA = r"""
extern "C" __global__ void __launch_bounds__(1024, 2) spills(const float* __restrict__ x, float* __restrict__ y) {
  float a[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) a[i] = x[threadIdx.x + 1024 * i];
  float s = 0.f;
#pragma unroll
  for (int j = 1; j < 64; ++j) {
#pragma unroll
    for (int i = 0; i < 64; ++i) s += a[i] * a[(i * j) & 63];
  }
  y[threadIdx.x] = s;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: CUDA modules keep their source")
def test_cuda_build_reports_register_spills():
    """Issue 21: the CUDA build runs nvcc with TVM's flags and reads ptxas' report: a kernel that spills builds
    (it runs, slower: a tuner sweeping a knob into a spill measures it) and says so, naming the kernel and the
    bytes (``wq-tune --build-only`` shows it). The report's parser is the one tests/kernels/test_split_cuda.py holds
    every default CUDA kernel to no spills with."""
    from wq_compile.compiler.build import compile_cuda_binary
    from wq_compile.compiler.nvcc import RegisterSpillWarning

    with pytest.warns(RegisterSpillWarning, match=r"toy-kernel: ptxas for sm_90a spills registers .*spills: 32 "
                                                  r"registers, [1-9]\d* B spill stores") as rec:
        binary = compile_cuda_binary(SPILLING_CUDA, resolve_device(H100), kernel="toy-kernel")
    assert binary[:4] == FATBIN_MAGIC and len(rec) == 1
    from wq_compile.compiler.nvcc import nvcc_flags

    assert "--register-usage-level=5" in nvcc_flags("sm_90a", 5)[-1]  # a kernel's own ptxas level (multi-token split)
    with pytest.raises(ValueError, match="register usage level 0-10, got 11"):
        nvcc_flags("sm_90a", 11)


def test_cli_build_only_for_h100_writes_modules(tmp_path, capsys):
    """``wq-tune --build-only`` compiles (default schedule: no log) and caches without a GPU; no measuring."""
    argv = ["--target", H100, "--model", "tiny", "--build-only", "--kernels", "fused",
            "--logs-dir", str(tmp_path / "logs"), "--cache-dir", str(tmp_path / "cache")]
    with pytest.warns(UntunedKernelWarning):
        assert cli.main_tune(argv) == 0
    out = capsys.readouterr().out
    assert TINY_FUSED.uri in out and "untuned" in out
    paths = module_paths(TINY_FUSED, resolve_device(H100), tmp_path / "cache")
    assert paths.module.exists() and paths.module.stat().st_size > 0
    assert read_key(paths)["uri"] == TINY_FUSED.uri
    if shutil.which("nvcc") is not None:
        assert paths.binary.read_bytes()[:4] == FATBIN_MAGIC
