"""Faults a user or a broken machine produces: Ctrl-C and SIGKILL during ``wq-tune`` (subprocesses, tiny model,
llvm, the per-bucket decode kernel that MetaSchedule tunes) and a module build killed mid-write."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from wq_compile.compiler import tuning_log
from wq_compile.compiler.device import resolve_device
from wq_compile.kernels.catalog import kernel_specs
from wq_testing import load_tiny_decode, run_python

TUNE = [sys.executable, "-m", "wq_compile.tools.cli", "--model", "tiny", "--kernels", "decode", "--bits", "4",
        "--tokens", "64", "--no-progress"]


def _records(logs: Path) -> list[str]:
    spec = kernel_specs("tiny", bits=(4,), dtype="f32", kinds=("decode",))[0]
    path = tuning_log.log_dir(logs, resolve_device("llvm").tag, spec.uri) / tuning_log.RECORD_FILE
    return path.read_text().splitlines() if path.exists() else []


def _start(tmp: Path, trials: int) -> subprocess.Popen:
    env = {**os.environ, "WQ_CACHE_DIR": str(tmp / "cache")}
    return subprocess.Popen([*TUNE, "--trials", str(trials), "--logs-dir", str(tmp / "logs")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)


def _wait_for_records(proc: subprocess.Popen, logs: Path, more_than: int, timeout: float = 420) -> None:
    t0 = time.monotonic()
    while len(_records(logs)) <= more_than:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "wq-tune measured nothing in time"
        time.sleep(0.2)


def test_ctrl_c_and_sigkill_during_wq_tune_keep_every_finished_record(tmp_path: Path) -> None:
    """Ctrl-C: exit 130 with a message (it used to segfault, 139). SIGKILL: nothing finished is lost. Each rerun
    resumes: the earlier lines stay as they were, new ones are appended, none is duplicated."""
    logs = tmp_path / "logs"
    proc = _start(tmp_path, trials=3)  # small batches: the first records land within seconds of the first build
    _wait_for_records(proc, logs, 0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err[-3000:])
    assert "interrupted (Ctrl-C)" in err and "resume" in err and "Segmentation" not in err
    first = _records(logs)
    assert first and all(json.loads(line) for line in first)

    proc = _start(tmp_path, trials=len(first) + 3)
    _wait_for_records(proc, logs, len(first))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    second = _records(logs)
    assert second[: len(first)] == first and len(second) > len(first)

    # The rerun asks for exactly the finished records: it must count all of them (a torn last line repaired, not
    # counted), measure nothing new and report the kernel as tuned.
    valid = [line for line in second if line.endswith("]")]
    proc = _start(tmp_path, trials=len(valid))
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    final = _records(logs)
    assert final == valid  # every finished record kept, in place, none duplicated, nothing re-measured
    assert len(set(final)) == len(final)
    assert re.search(rf"tuned here \|\s+{len(valid)} \|", out), out


def test_module_build_killed_mid_write_is_rebuilt(tmp_path: Path) -> None:
    """A process SIGKILLed while exporting a module leaves a half-written temporary file and no key: the next
    process ignores the leftover, builds the module again and loads it."""
    logs, cache = tmp_path / "logs", tmp_path / "cache"
    proc = run_python(f"""
        import os, signal
        import tvm
        from wq_compile.runtime.library import KernelLibrary
        from wq_testing import TINY_DECODE
        original = tvm.runtime.Module.export_library
        def export_then_die(self, path, *a, **k):
            original(self, path, *a, **k)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)   # the write was cut here ...
            os.kill(os.getpid(), signal.SIGKILL)        # ... by a SIGKILL
        tvm.runtime.Module.export_library = export_then_die
        KernelLibrary("llvm", logs_dir={str(logs)!r}, cache_dir={str(cache)!r}).load(TINY_DECODE)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")
                 and p.name != "host_devices.json"]  # the host facts (wq_compile.compiler.light_load), written before the build
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # only the torn temporary file
    proc = load_tiny_decode(logs, cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled 1" in proc.stdout
    assert any(p.suffix == ".so" and not p.name.startswith(".") for p in cache.rglob("*.so"))
