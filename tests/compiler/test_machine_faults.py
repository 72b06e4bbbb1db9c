"""Faults of the machine, each in fresh processes over the tiny preset's backend (the decode of
tests/test_file_faults.py): a full disk (``RLIMIT_FSIZE`` in the child, ``SIGXFSZ`` ignored so writes fail with
``EFBIG`` as on a full disk), a cache that cannot be written, a SIGKILL between a module's export and its key, and
eight processes starting at once on one empty cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_file_faults import DECODE, decode
from wq_compile.compiler import tuning_log
from wq_compile.compiler.verified_file import DIGEST_SUFFIX, check, verify_with_digest
from wq_testing import SMALL_MODULES, TESTS_DIR, copy_warm_cache, run_python, warm_small_cache

#: Prepended to a child's script: files this process writes may not exceed ``{limit}`` bytes (a full disk).
DISK_FULL = """
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.fixture(scope="session")
def warm(tmp_path_factory) -> Path:
    """Warm modules for the tests that are not about the cold build (copied, never built again per test)."""
    return warm_small_cache(tmp_path_factory)


def _env(root: Path) -> dict:
    return {**os.environ, "WQ_CACHE_DIR": str(root / "cache"), "WQ_TUNING_LOGS": str(root / "logs"),
            "OMP_NUM_THREADS": "1"}


def _loadable(cache: Path, temporaries: bool = True) -> list[str]:
    """Problems with what a later process would load from ``cache``: modules whose key does not describe them, a
    launcher that does not match its digest, and (``temporaries``) leftover temporary files."""
    bad = [str(p) for p in cache.rglob(".*") if p.is_file()] if temporaries else []
    for key in cache.glob("*/cpu-*/*.json"):
        rec = json.loads(key.read_text())
        why = check(key.with_suffix(".so"), rec["module_size"], rec["module_sha256"])
        if why:
            bad.append(f"{key.with_suffix('.so')}: {why}")
    for lib in cache.glob("*/wq_omp_launch-*.so"):
        why = verify_with_digest(lib)
        if why:
            bad.append(f"{lib}: {why}")
    return bad


def test_disk_full_while_exporting_a_module_fails_clearly_and_the_next_run_builds(tmp_path):
    """8 KB per file: the host facts fit, no module does. LLVM writes the object file in-process and ends the
    process on the failed write (``LLVM ERROR: IO failure on output stream: File too large``, exit 1: LLVM's own
    fatal error, which Python cannot catch). Nothing a later run would load is torn (only a dot-named temporary
    file may stay, never read), and the next process (no limit) builds the six modules and decodes correctly."""
    proc = run_python(DISK_FULL.format(limit=8192) + DECODE, env=_env(tmp_path))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "File too large" in proc.stderr, proc.stderr[-3000:]
    assert _loadable(tmp_path / "cache", temporaries=False) == []
    assert not list((tmp_path / "cache").glob("*/cpu-*/*.json"))  # no key: nothing is taken as built
    out = decode(tmp_path)
    assert out["compiled"] == SMALL_MODULES and out["err"] < 1e-4, out
    assert _loadable(tmp_path / "cache", temporaries=False) == []


def test_disk_full_while_building_the_launcher_falls_back_to_tvm_threads(warm, tmp_path):
    """Warm modules, no launcher, 8 KB per file (the launcher is ~15 KB): the launcher's build fails, the kernels
    keep TVM's thread pool with a warning, the decode is correct and no launcher is left that a later run would
    load; the next process (no limit) builds it."""
    copy_warm_cache(warm, tmp_path / "cache")
    (lib,) = (tmp_path / "cache").glob("*/wq_omp_launch-*.so")
    lib.unlink()
    Path(str(lib) + DIGEST_SUFFIX).unlink()
    proc = run_python(DISK_FULL.format(limit=8192) + DECODE, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compiled"] == 0 and out["err"] < 1e-4, out
    assert any("keep TVM's thread pool" in w for w in out["warnings"]), out["warnings"]
    assert _loadable(tmp_path / "cache") == [] and not lib.exists()
    decode(tmp_path)
    assert verify_with_digest(lib) is None


def test_disk_full_while_writing_a_log_keeps_the_log_as_it_was(tmp_path):
    """meta.json rewritten on a full disk: EFBIG raised, the old file intact, no temporary file left. A knob sample
    appended on a full disk: the partial line is a torn last line, skipped when read (every earlier sample kept)."""
    folder = tmp_path / "log"
    tuning_log.write_meta(folder, {"uri": "x", "note": "old"})
    tuning_log.append_knob_sample(folder, {"pvc": 16}, 0, 1e-4)
    meta = (folder / tuning_log.META_FILE).read_bytes()
    limit = (folder / tuning_log.KNOB_FILE).stat().st_size + 20
    proc = run_python(DISK_FULL.format(limit=limit) + f"""
    from pathlib import Path
    from wq_compile.compiler import tuning_log
    folder = Path({str(folder)!r})
    for name, call in (("meta", lambda: tuning_log.write_meta(folder, {{"uri": "x", "note": "n" * 4096}})),
                       ("sample", lambda: tuning_log.append_knob_sample(folder, {{"pvc": 32}}, 1, 2e-4))):
        try:
            call()
        except OSError as exc:
            print(name, "failed:", exc)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("File too large") == 2, proc.stdout
    assert (folder / tuning_log.META_FILE).read_bytes() == meta
    assert sorted(p.name for p in folder.iterdir()) == [tuning_log.KNOB_FILE, tuning_log.META_FILE]
    assert tuning_log.read_knob_samples(folder) == [{"knobs": {"pvc": 16}, "round": 0, "secs": 1e-4}]


@pytest.mark.parametrize("how", ["cache_dir_is_a_file", "read_only_dir"])
def test_cache_that_cannot_be_written_still_runs_loudly(tmp_path, how):
    """``WQ_CACHE_DIR`` naming a file, or a read-only folder (as root, which writes through ``chmod 555``, that
    case is skipped: the file case is the one root can be denied by): every module is built into a private
    temporary folder, with a warning naming the cache; the decode matches the reference."""
    cache = tmp_path / "cache"
    if how == "cache_dir_is_a_file":
        cache.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; the cache-is-a-file case covers it")
        cache.mkdir()
        cache.chmod(0o555)
    proc = run_python(DECODE, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compiled"] == SMALL_MODULES and out["err"] < 1e-4, out
    stored = [w for w in out["warnings"] if "the module cache cannot store it" in w]
    assert len(stored) == SMALL_MODULES and all("WQ_CACHE_DIR" in w for w in stored), out["warnings"]
    assert any("host_devices.json: cannot be written" in w for w in out["warnings"]), out["warnings"]


def test_sigkill_between_export_and_key_is_rebuilt(tmp_path):
    """A process killed after a module was renamed into place but before its key was written leaves a module
    without a key: the next process builds it again (never loads an unchecked module) and decodes correctly."""
    proc = run_python("""
    import os, signal
    from wq_compile.compiler import module_cache
    def die(path):
        os.kill(os.getpid(), signal.SIGKILL)  # the module is in place, its key not yet written
    module_cache._file_digest = die
    """ + DECODE, env=_env(tmp_path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    modules = list((tmp_path / "cache").glob("*/cpu-*/*.so"))
    assert len(modules) == 1 and not modules[0].with_suffix(".json").exists()
    out = decode(tmp_path)
    assert out["compiled"] == SMALL_MODULES and out["err"] < 1e-4, out
    assert _loadable(tmp_path / "cache") == []


def test_launcher_without_its_digest_is_rebuilt_quietly(warm, tmp_path):
    """A launcher whose digest file is missing (a build killed between the two writes, or a cache of an older
    version) is rebuilt before it is loaded: no module is rebuilt and the digest is written."""
    copy_warm_cache(warm, tmp_path / "cache")
    (lib,) = [p for p in (tmp_path / "cache").glob("*/wq_omp_launch-*.so")]
    Path(str(lib) + DIGEST_SUFFIX).unlink()
    lib.write_bytes(lib.read_bytes()[:100])  # and short: loading it unchecked would SIGBUS
    out = decode(tmp_path)
    assert out["compiled"] == 0 and out["err"] < 1e-4, out
    assert verify_with_digest(lib) is None


def test_eight_processes_on_one_empty_cache_build_each_module_once(tmp_path):
    """Heavy (8 fresh processes on a 2-core machine, ~1 min): started at once on an empty cache, all decode as the
    reference and the six modules are built once in all (the per-module lock is held across lookup, build and
    store). Prints the slowest process's wall time."""
    script = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n" + textwrap.dedent(DECODE)
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", script], env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs, walls = [], []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        walls.append(time.monotonic() - t0)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert all(o["err"] < 1e-4 for o in outs), outs
    assert sum(o["compiled"] for o in outs) == SMALL_MODULES, [o["compiled"] for o in outs]
    assert all(o["compiled"] + o["cached"] == SMALL_MODULES for o in outs), outs
    assert _loadable(tmp_path / "cache") == []
    print(f"8 processes on one empty cache: slowest {max(walls):.1f} s, builds {[o['compiled'] for o in outs]}")


@pytest.fixture()
def tmpfs(tmp_path):
    """A tiny tmpfs mounted at ``tmp_path/mnt`` (root with mount rights only; skipped elsewhere), unmounted after."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*options: str) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); RLIMIT_FSIZE cases cover a full disk")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("fs", ["full", "read_only"])
def test_real_full_or_read_only_filesystem_under_the_cache(tmpfs, tmp_path, fs):
    """A 160 KB tmpfs (ENOSPC part way: some modules fit, the rest do not) or a read-only one (EROFS) as the
    cache: the process falls back to private copies with a warning and decodes as the reference; whatever was
    stored is whole, and the next process loads it and builds only what is missing."""
    mnt = tmpfs("size=160k") if fs == "full" else tmpfs("size=1m", "ro")
    env = {**_env(tmp_path), "WQ_CACHE_DIR": str(mnt)}
    proc = run_python(DECODE, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compiled"] == SMALL_MODULES and out["err"] < 1e-4, out
    private = sum("the module cache cannot store it" in w for w in out["warnings"])
    assert private >= 1 if fs == "full" else private == SMALL_MODULES, out["warnings"]
    assert _loadable(mnt) == []
    again = json.loads(run_python(DECODE, env=env).stdout.strip().splitlines()[-1])
    stored = len(list(mnt.glob("*/cpu-*/*.json")))
    assert again["cached"] == stored and again["compiled"] == SMALL_MODULES - stored and again["err"] < 1e-4, again
