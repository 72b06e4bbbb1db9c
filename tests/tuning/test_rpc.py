"""Distributed tuning for real on loopback: a TVM RPC tracker and two RPC servers as subprocesses, ``wq-tune --rpc``
measuring a MetaSchedule-tunable llvm kernel through them, the records landing in the log. Bounded in time; the
processes this test starts are always stopped (by their own process-group ids)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wq_compile.tools import cli
from wq_compile.compiler import tuning_log
from wq_compile.compiler.device import resolve_device
from wq_compile.kernels.catalog import kernel_specs

KEY = "wq-loopback"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # the group this test created (the server forks per session)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture
def fleet(tmp_path):
    """Tracker + two servers registered under KEY on 127.0.0.1; yields the tracker port."""
    from tvm import rpc

    port = _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end",
                     str(port + 1)], tmp_path / "tracker.log")]
    try:
        for i in range(2):
            sport = _free_port()
            procs.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport), "--port-end",
                                 str(sport + 20), "--tracker", f"127.0.0.1:{port}", "--key", KEY],
                                tmp_path / f"server{i}.log"))
        deadline = time.monotonic() + 90
        while True:
            assert all(p.poll() is None for p in procs), "an RPC process exited: see " + str(tmp_path)
            try:
                summary = rpc.connect_tracker("127.0.0.1", port).summary()
                if sum(1 for s in summary["server_info"] if s["key"].endswith(KEY)) == 2:
                    break
            except Exception:  # noqa: BLE001 - the tracker is not listening yet
                pass
            assert time.monotonic() < deadline, "two servers did not register at the tracker within 90 s"
            time.sleep(1)
        yield port
    finally:
        _stop(procs)
        assert all(p.poll() is not None for p in procs)


def test_wq_tune_measures_through_an_rpc_fleet(fleet, tmp_path, monkeypatch):
    from tvm import rpc

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    logs = tmp_path / "logs"
    rc = cli.main_tune(["--target", "llvm", "--model", "tiny", "--bits", "4", "--kernels", "decode", "--trials", "2",
                        "--tokens", "128", "--logs-dir", str(logs), "--rpc", f"127.0.0.1:{fleet}", "--rpc-key", KEY,
                        "--no-progress"])
    assert rc == 0
    (spec,) = kernel_specs("tiny", bits=(4,), kinds=("decode",))
    folder = tuning_log.log_dir(logs, resolve_device("llvm").tag, spec.uri)
    records = [json.loads(line) for line in tuning_log.record_lines(folder)]
    assert len(records) >= 2
    assert all(0 < max(r[1][1]) < tuning_log.FAILED_RUN_SECS for r in records)  # real measured times
    meta = tuning_log.read_meta(folder)
    assert meta["valid_trials"] >= 2 and meta["tuned_ms"] > 0
    # The servers did the measuring: the tracker saw sessions requested under the key.
    summary = rpc.connect_tracker("127.0.0.1", fleet).summary()
    assert any(q.endswith(KEY) for q in summary["queue_info"])
