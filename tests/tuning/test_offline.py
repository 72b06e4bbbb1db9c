"""Offline tuning round trip on llvm: export candidates of the tiny decode kernel, measure them in a subprocess with
the TVM runtime library only, import the times as records, and load the tuned module through the runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wq_compile.tools import cli
from wq_compile.compiler import tuning_log
from wq_compile.compiler.check import check_against_reference
from wq_compile.compiler.build import UntunedKernelWarning, kernel_def
from wq_compile.tuning.gpu_visit import assemble_bundle, check_export, plan
from wq_compile.compiler.device import resolve_device
from wq_compile.tuning.offline import MANIFEST, MEASURE_SCRIPT, OfflineError, export_candidates, import_results
from wq_compile.runtime.library import KernelLibrary
from wq_compile.tuning.settings import TuneSettings
from wq_testing import N_TOKENS, TINY_DECODE, read_json


def _settings(logs: Path, trials: int = 2) -> TuneSettings:
    return TuneSettings(trials=trials, logs_dir=logs, n_tokens=N_TOKENS, population_size=16, genetic_iters=1)


def _measure(export: Path, out: Path | None = None) -> dict:
    """The measuring side as the GPU machine runs it: the copied script, a fresh process, runtime library only."""
    cmd = [sys.executable, str(export / MEASURE_SCRIPT), str(export), "--repeat", "3"]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, env=env, cwd=export, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return read_json(out or export / "results.json")


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, host):
    """One export of the tiny decode kernel (the default schedule + 2 sampled candidates) and its measurement."""
    root = tmp_path_factory.mktemp("offline")
    export = root / "export"
    with pytest.warns(UntunedKernelWarning):  # the benchmark module: no log yet, the default schedule
        summary = export_candidates([TINY_DECODE], host, export, _settings(root / "logs"), bench_tokens=(256,))
    results = _measure(export)
    return root, export, summary, results


def test_export_writes_manifest_modules_and_reference(exported, host):
    root, export, summary, _ = exported
    manifest = read_json(export / MANIFEST)
    (kernel,) = manifest["kernels"]
    assert summary.candidates == {TINY_DECODE.uri: 3} and summary.seeded_from == {TINY_DECODE.uri: 0}
    assert manifest["device"]["tag"] == host.tag and kernel["uri"] == TINY_DECODE.uri
    assert kernel["sizes"] == {"B": 1, "G": 5, "N": N_TOKENS} and len(kernel["workload_hash"]) == 16
    roles = [c["role"] for c in kernel["candidates"]]
    assert roles == ["default", "sampled", "sampled"]
    assert len({json.dumps(c["trace"]) for c in kernel["candidates"]}) == 3  # distinct schedules
    for cand in kernel["candidates"]:
        assert (export / cand["file"]).stat().st_size > 1000 and len(cand["sha256"]) == 64
        assert not {"seconds", "run_secs", "samples"} & set(cand)  # nothing is timed at export
    data = torch.load(export / kernel["inputs"], weights_only=True)
    assert [int(i) for i in data["expected"]] == kernel["outputs"]
    assert (export / MEASURE_SCRIPT).read_text() == Path(sys.modules["wq_compile.tuning.offline_measure"].__file__).read_text()
    assert not (root / "logs").exists()  # export records nothing


def test_measure_runs_on_the_runtime_library_alone(exported):
    _, export, _, results = exported
    assert results["measured_on"]["runtime_only"] is True and results["measured_on"]["compiler_loaded"] is False
    entries = results["candidates"]
    assert len(entries) == 3
    for e in entries.values():
        assert e["error"] is None and e["seconds"] > 0 and len(e["samples"]) == 3
        assert e["max_abs_err"] < 1e-3


def test_measure_rejects_wrong_outputs(exported, tmp_path):
    """A module that disagrees with the reference gets an error and no time (here: the reference is perturbed)."""
    _, export, _, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    (kernel,) = read_json(bad / MANIFEST)["kernels"]
    data = torch.load(bad / kernel["inputs"], weights_only=True)
    index = kernel["outputs"][0]
    data["expected"][index] = data["expected"][index] + 0.5
    torch.save(data, bad / kernel["inputs"])
    results = _measure(bad)
    assert all(e["seconds"] is None and "exceeds" in e["error"] for e in results["candidates"].values())
    summary = import_results(bad / "results.json", bad, tmp_path / "logs")
    assert summary.recorded == {TINY_DECODE.uri: 0} and len(summary.skipped[TINY_DECODE.uri]) == 3
    assert not (tmp_path / "logs").exists()


def test_import_records_measured_times_and_runtime_uses_them(exported, host, tmp_path):
    root, export, _, results = exported
    logs = tmp_path / "logs"
    doc = json.loads((export / "results.json").read_text())
    ids = sorted(doc["candidates"])
    doc["candidates"][ids[1]].update(seconds=None, error="RuntimeError: launch failed")  # failed there
    del doc["candidates"][ids[2]]  # never measured
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(doc))
    summary = import_results(partial, export, logs)
    assert summary.recorded == {TINY_DECODE.uri: 1} and summary.skipped[TINY_DECODE.uri] == ids[1:]
    folder = summary.log_dirs[TINY_DECODE.uri]
    lines = list(tuning_log.record_lines(folder))
    assert len(lines) == 1
    assert json.loads(lines[0])[1][1] == pytest.approx(results["candidates"][ids[0]]["samples"])  # the measured times
    meta = tuning_log.read_meta(folder, host)
    assert meta["measurement"] == f"offline measurement on {results['measured_on']['device_name']}"
    assert meta["valid_trials"] == 1 and meta["offline_measurements"][0]["records"] == 1

    # The full results add the rest; the runtime then compiles the best record ("tuned here") and it is correct.
    assert import_results(export / "results.json", None, logs).recorded == {TINY_DECODE.uri: 3}
    assert len(list(tuning_log.record_lines(folder))) == 4
    best = min(e["seconds"] for e in results["candidates"].values())
    with KernelLibrary(host, logs_dir=logs, cache_dir=tmp_path / "cache") as lib:
        kernel = lib.load(TINY_DECODE)
        assert str(kernel.provenance) == "tuned here"
        assert kernel.provenance.run_secs == pytest.approx(best, rel=0.5)
        check_against_reference(kernel_def(TINY_DECODE, "llvm"), kernel.module, host)

    # The next round is seeded by the imported records: only new schedules, no default again.
    nxt = export_candidates([TINY_DECODE], host, tmp_path / "round2", _settings(logs))
    assert nxt.seeded_from == {TINY_DECODE.uri: 4}
    (kernel2,) = read_json(tmp_path / "round2" / MANIFEST)["kernels"]
    old = {json.dumps(c["trace"]) for c in read_json(export / MANIFEST)["kernels"][0]["candidates"]}
    assert all(c["role"] == "sampled" and json.dumps(c["trace"]) not in old for c in kernel2["candidates"])


def test_import_refuses_a_changed_kernel(exported, tmp_path):
    _, export, _, _ = exported
    changed = tmp_path / "changed"
    shutil.copytree(export, changed)
    manifest = read_json(changed / MANIFEST)
    manifest["kernels"][0]["workload_hash"] = "0" * 16
    (changed / MANIFEST).write_text(json.dumps(manifest))
    _measure(changed)
    with pytest.raises(OfflineError, match="another export"):  # results of one export, the manifest of another
        import_results(changed / "results.json", export, tmp_path / "logs")
    with pytest.raises(OfflineError, match="changed since the export"):
        import_results(changed / "results.json", None, tmp_path / "logs")


def test_cli_offline_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main_tune(["--export-candidates", str(tmp_path / "a"), "--import-results", "r.json"])
    assert "one at a time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main_tune(["--export-candidates", str(tmp_path / "a"), "--trials", "0"])
    assert "--trials" in capsys.readouterr().err
    assert cli.main_tune(["--import-results", str(tmp_path / "missing.json")]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc absent: CUDA candidates cannot be built here")
def test_export_cuda_candidates_builds_fatbins(tmp_path):
    """CUDA export for an H200 without a GPU: host module with CUDA source plus an sm_90a fatbin per candidate."""
    device = resolve_device("nvidia/nvidia-h200")
    spec = TINY_DECODE.__class__(**{**vars(TINY_DECODE), "dtype": "f16"})
    summary = export_candidates([spec], device, tmp_path / "cuda", _settings(tmp_path / "logs", trials=1),
                                target_arg="nvidia/nvidia-h200")
    (kernel,) = read_json(tmp_path / "cuda" / MANIFEST)["kernels"]
    assert summary.candidates[spec.uri] == len(kernel["candidates"]) >= 2
    assert read_json(tmp_path / "cuda" / MANIFEST)["device"]["arch"] == "sm_90a"
    for cand in kernel["candidates"]:
        fatbin = (tmp_path / "cuda" / cand["binary"]).read_bytes()
        assert len(fatbin) > 1000 and cand["binary_sha256"]
    check_export(tmp_path / "cuda")
    (measure_step,) = [s for s in plan([tmp_path / "cuda"], gpu=False, dry_run=True) if s.name == "measure[0]"]
    assert measure_step.needs_gpu and not measure_step.runs


def _visit(args: list[str], env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "wq_compile.gpu_visit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_gpu_visit_dry_run_on_cpu(exported, tmp_path):
    """The prepared command, dry run: plan, export check, the llvm candidates measured, baselines and the exported
    module benchmarked on CPU, every GPU step named; with the TVM runtime library only."""
    _, export, _, _ = exported
    out = tmp_path / "visit"
    proc = _visit(["--export", str(export), "--out", str(out), "--dry-run", "--dry-lengths", "256",
                   "--models", "llava-ov-0.5b", "--repeat", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read_json(out / "visit.json")
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["bench"]["needs_gpu"] and not steps["measure[0]"]["needs_gpu"] and steps["measure[0]"]["runs"]
    assert doc["measure"][0]["measured"] == doc["measure"][0]["candidates"] == 3
    assert read_json(out / "results_0.json")["measured_on"]["compiler_loaded"] is False
    rows = {r["method"]: r for r in doc["bench"]}
    for method in ("sdpa_dense_gqa", "sdpa_dense_folded", "dequant_all_int4_sdpa"):
        assert rows[method]["seconds"] > 0 and rows[method]["error"] is None, rows[method]
    assert rows["sdpa_dense_gqa"]["rel_err"] < 1e-5 and rows["sdpa_dense_folded"]["rel_err"] < 1e-5
    assert 1e-3 < rows["dequant_all_int4_sdpa"]["rel_err"] < 0.3  # int4 error, not zero: the path really quantizes
    wq = rows[f"windowquant:{TINY_DECODE.uri}"]
    assert wq["seconds"] > 0 and wq["tokens"] == 256 and wq["note"] == "untuned"
    assert "needs a GPU" in (out / "visit.log").read_text()
    assert steps["sanitizer"]["needs_gpu"] and not steps["sanitizer"]["runs"] and doc["sanitizer"]["skipped"]
    assert (out / "bench.csv").read_text().splitlines()[0].startswith("model,tokens,method,seconds")


def test_gpu_visit_refuses_a_tampered_export_and_no_gpu(exported, tmp_path):
    _, export, _, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    cand = read_json(bad / MANIFEST)["kernels"][0]["candidates"][1]
    (bad / cand["file"]).write_bytes(b"x")
    with pytest.raises(ValueError, match="digest differs"):
        check_export(bad)
    proc = _visit(["--export", str(export), "--out", str(tmp_path / "v")])
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr


def test_bundle_is_runtime_only_fits_and_measures(exported, tmp_path):
    """The carried bundle: no compiler library, under the limit, and its tvm measures the export by itself."""
    _, export, _, _ = exported
    rep = assemble_bundle(tmp_path / "bundle", [export])
    files = [p.name for p in (tmp_path / "bundle").rglob("*")]
    assert "libtvm_compiler.so" not in files and "libtvm_runtime.so" in files
    assert rep.fits and rep.total == sum(rep.parts.values()) and rep.parts["exports"] > 0
    assert rep.total < 64 * 2**20 and rep.parts["tvm (runtime only)"] < 32 * 2**20
    site = tmp_path / "bundle" / "site"
    bexport = tmp_path / "bundle" / "exports" / "0"
    proc = subprocess.run([sys.executable, str(bexport / MEASURE_SCRIPT), str(bexport), "--repeat", "2"],
                          env={**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measured 3 of 3" in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import tvm; print(tvm.__file__)"], capture_output=True, text=True,
                           env={**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(site)}, timeout=120)
    assert probe.stdout.strip().startswith(str(site))


def test_cli_export_candidates(tmp_path, capsys):
    rc = cli.main_tune(["--target", "llvm", "--model", "tiny", "--bits", "4", "--kernels", "decode", "--trials", "1",
                        "--tokens", "128", "--logs-dir", str(tmp_path / "logs"), "--export-candidates",
                        str(tmp_path / "x")])
    assert rc == 0, capsys.readouterr().err
    (kernel,) = read_json(tmp_path / "x" / MANIFEST)["kernels"]
    assert [c["role"] for c in kernel["candidates"]] == ["default", "sampled"] and "bench" not in kernel
    assert "measure_candidates.py" in capsys.readouterr().out
    assert cli.main_tune(["--target", "llvm", "--model", "tiny", "--export-candidates", str(tmp_path / "x")]) == 1
    assert "already holds" in capsys.readouterr().err


def test_check_outputs_matches_empty_splits_exactly():
    """A split-KV kernel's empty split has lse = -inf in the reference (compiler.check's partials): the measuring
    side accepts exactly that, and still refuses NaN, an unwritten (wrong-signed) infinity or a finite mismatch."""
    import torch

    from wq_compile.tuning.offline_measure import check_outputs

    want = torch.tensor([1.0, float("-inf"), 2.0])
    assert check_outputs([torch.tensor([1.0, float("-inf"), 2.0])], {0: want}, 1e-3, 1e-3) == 0.0
    for bad in ([1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0], [1.0, 0.0, 2.0], [1.0, float("-inf"), 2.5]):
        with pytest.raises(AssertionError, match="output #0"):
            check_outputs([torch.tensor(bad)], {0: want}, 1e-3, 1e-3)
