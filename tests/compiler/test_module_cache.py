"""Module cache: the key is cheap and complete, a warm load builds and replays nothing (counted), stale or
broken modules are refused or rebuilt, writes are atomic and readable per umask."""

from __future__ import annotations

import json
import os

import pytest

from wq_compile import kernels
from wq_compile.compiler import build as wq_compile_mod
from wq_compile.compiler import module_cache
from wq_compile.compiler.cache_files import cache_root
from wq_compile.compiler.device import resolve_device, versions
from wq_compile.compiler.measure import example_args
from wq_compile.compiler.module_cache import expected_key, module_paths
from wq_compile.compiler.verified_file import BadFileWarning
from wq_compile.runtime.library import KernelLibrary
from wq_testing import TINY_DECODE, load_tiny_decode, measured_log


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


@pytest.fixture()
def warm(tmp_path, host):
    """A log of this device and a cache holding its module (one cold build)."""
    logs, cache = tmp_path / "logs", tmp_path / "cache"
    measured_log(TINY_DECODE, host, logs)
    with KernelLibrary(host, logs_dir=logs, cache_dir=cache) as lib:
        assert lib.load(TINY_DECODE).tuned and lib.stats.compiled == 1
    return logs, cache


def _count_builds(monkeypatch):
    """Count every way a kernel could be built or a record replayed on the load path."""
    calls = {"make_kernel": 0, "apply_trace": 0, "build_kernel": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(kernels, "make_kernel", counted("make_kernel", kernels.make_kernel))
    monkeypatch.setattr(wq_compile_mod, "apply_trace", counted("apply_trace", wq_compile_mod.apply_trace))
    monkeypatch.setattr(module_cache, "build_kernel", counted("build_kernel", module_cache.build_kernel))
    return calls


def test_warm_load_builds_and_replays_nothing(warm, host, monkeypatch):
    logs, cache = warm
    calls = _count_builds(monkeypatch)
    with KernelLibrary(host, logs_dir=logs, cache_dir=cache) as lib:
        k = lib.load(TINY_DECODE)
        assert lib.stats.cache_hits == 1 and lib.stats.compiled == 0
    assert calls == {"make_kernel": 0, "apply_trace": 0, "build_kernel": 0}
    assert str(k.provenance) == "tuned here"
    k(*example_args(k.signature, {"B": 1, "N": 64, "G": 3}))  # and it runs


def test_changed_record_or_schedule_code_changes_the_key_and_rebuilds(warm, host, monkeypatch):
    logs, cache = warm
    key = expected_key(TINY_DECODE, host, logs)
    rec = next(logs.glob(f"*/{TINY_DECODE.uri}/database_tuning_record.json"))
    line = json.loads(rec.read_text())
    line[1][1] = [x * 2 for x in line[1][1]]  # the stored record changed (here: its measured time)
    rec.write_text(json.dumps(line) + "\n")
    assert expected_key(TINY_DECODE, host, logs)["logs"] != key["logs"]
    with KernelLibrary(host, logs_dir=logs, cache_dir=cache) as lib:
        lib.load(TINY_DECODE)
        assert lib.stats.compiled == 1  # rebuilt, never the old module

    assert key["schedule_code"] == wq_compile_mod.schedule_code_digest("llvm")
    monkeypatch.setattr(module_cache, "schedule_code_digest", lambda kind: "edited-schedule")
    assert expected_key(TINY_DECODE, host, logs)["schedule_code"] == "edited-schedule"
    calls = _count_builds(monkeypatch)
    with KernelLibrary(host, logs_dir=logs, cache_dir=cache) as lib:
        lib.load(TINY_DECODE)
        assert lib.stats.compiled == 1 and calls["build_kernel"] == 1


def test_other_versions_or_target_are_never_loaded_but_rebuilt_with_a_warning(warm, host):
    logs, cache = warm
    paths = module_paths(TINY_DECODE, host, cache)
    good = json.loads(paths.key.read_text())
    for bad, match in (({"apache-tvm": "0.1"}, "built with apache-tvm 0.1"),
                       ({"target": '{"kind": "llvm", "mcpu": "x"}'}, "built for target")):
        paths.key.write_text(json.dumps({**good, **bad}))
        with KernelLibrary(host, logs_dir=logs, cache_dir=cache) as lib, pytest.warns(BadFileWarning, match=match):
            lib.load(TINY_DECODE)
            assert lib.stats.compiled == 1 and lib.stats.cache_hits == 0
        assert json.loads(paths.key.read_text())["apache-tvm"] == good["apache-tvm"]


def test_layout_is_versioned_atomic_and_readable_per_umask(warm, host, monkeypatch):
    _, cache = warm
    v = versions()
    monkeypatch.setenv("WQ_CACHE_DIR", str(cache))
    assert cache_root() == cache / f"{v['apache-tvm']}-{v['apache-tvm-ffi']}"
    paths = module_paths(TINY_DECODE, host)
    assert paths.module == cache_root() / host.tag / f"{TINY_DECODE.uri}.so"
    names = sorted(p.name for p in paths.module.parent.iterdir() if not p.name.endswith(".lock"))
    assert names == [f"{TINY_DECODE.uri}.json", f"{TINY_DECODE.uri}.so"]  # no temporary files left behind
    key = json.loads(paths.key.read_text())
    assert key["module_size"] == paths.module.stat().st_size and len(key["module_sha256"]) == 64
    mask = os.umask(0)
    os.umask(mask)
    for p in (paths.module, paths.key):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_truncated_module_is_rebuilt_never_loaded(warm, host):
    """A cut-off .so (a crash mid-copy, a full disk) is caught by its recorded size/hash: rebuilt, no SIGBUS."""
    logs, cache = warm
    paths = module_paths(TINY_DECODE, host, cache)
    data = paths.module.read_bytes()
    cut = paths.module.with_name("cut.so")
    cut.write_bytes(data[: len(data) // 2])
    # a new file in its place (as a torn copy leaves it): truncating the loaded file in place would SIGBUS *this*
    # process, which still maps it from the warm load above
    os.replace(cut, paths.module)
    proc = load_tiny_decode(logs, cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled 1" in proc.stdout
    assert paths.module.stat().st_size == json.loads(paths.key.read_text())["module_size"]
