"""Every kind of file the package loads from disk x every way a file goes bad, each in a fresh process.

One warm tree is built once for the session (a tuning log of the 4-bit quantize kernel, a knob record of the fused
kernel, and a module cache holding the tiny preset's five modules, the OpenMP launcher and the host facts). Each case
copies it, damages one file in one way and runs a fresh Python that decodes through ``make_backend`` over the copy
(the product path). It must exit 0, decode as the torch reference, and name the bad file in a warning (or, for a
log, its folder). The offline results file (read by ``wq-tune --import-results``, a file the user hands over) must
be refused with a clear message naming it, exit 1, no traceback.

"Unreadable": tests run as root here, and ``chmod 000`` does not deny reads to root; as root the case puts a FIFO
in place of the file instead (a reader that opened it would block forever), otherwise it removes read permission.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from wq_compile.compiler import tuning_log
from wq_compile.compiler.device import resolve_device
from wq_compile.kernels.catalog import kernel_specs
from wq_testing import SMALL_MODULES, copy_warm_cache, measured_log, run_python, small_decode, warm_small_cache

#: Fresh process: the tiny preset's backend, one decode over 8/4/2-bit windows and a dense residual, compared with
#: the torch reference; prints what it did and every warning as JSON (last line).
DECODE = f"""
    import json, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
{small_decode(8)}
    print(json.dumps(dict(tvm="tvm" in sys.modules, compiled=b.compiled, cached=b.cached, err=err,
                          warnings=[f"{{w.category.__name__}}: {{w.message}}" for w in caught])))
"""

QUANT4, FUSED = (next(s for s in kernel_specs("tiny", kinds=(kind,)) if s.bits[0] == bits)
                 for kind, bits in (("quantize", 4), ("fused", 8)))
#: The knob record's knobs: not the factory defaults, so a record that is used shows in the module's URI.
RECORD_KNOBS = {"pvc": 16, "qkh": 8, "splits": 1}


def base_fused():
    """The fused kernel without its storage mode: the spec whose knob record the runtime reads for :data:`FUSED`."""
    from dataclasses import replace

    from wq_compile.kernels.knobs import MODE_KEYS

    return replace(FUSED, extra=tuple((k, v) for k, v in FUSED.extra if k not in MODE_KEYS))


def decode(root: Path) -> dict:
    """:func:`_decode_case`, asserting the process exited 0."""
    out = _decode_case(root)
    assert out["returncode"] == 0, out["stderr"]
    return out


def _knob_record(host, logs: Path) -> None:
    """A knob record of the fused kernel for this host (the winner only: what the runtime reads)."""
    base = base_fused()  # the 8-bit scale/zero form (the default) is built with the record of the kernel without it
    folder = tuning_log.log_dir(logs, host.tag, base.uri)
    meta = tuning_log.new_meta(host, base.uri, tuning_log.spec_fields(base), {"B": 1}, {"sm_scale": 0.125}, 0)
    meta.update(kind=tuning_log.KNOB_KIND, best={"knobs": RECORD_KNOBS, "median_ms": 0.3})
    tuning_log.write_meta(folder, meta)
    tuning_log.append_knob_sample(folder, RECORD_KNOBS, 0, 3e-4)


@pytest.fixture(scope="session")
def warm_tree(tmp_path_factory) -> Path:
    """Logs + a warm module cache (one cold process, then checked warm: nothing built, TVM not imported). The four
    modules no log touches come from the run's shared warm cache (``warm_small_cache``); the cold process builds the
    two the logs choose (the tuned 4-bit quantize kernel, the fused kernel with the record's knobs: the record of the
    fp16 form serves the 8-bit scale/zero form the default format runs)."""
    root = tmp_path_factory.mktemp("file-faults")
    host = resolve_device("llvm")
    measured_log(QUANT4, host, root / "logs")
    _knob_record(host, root / "logs")
    copy_warm_cache(warm_small_cache(tmp_path_factory), root / "cache")
    for path in root.glob("cache/*/cpu-*/*"):  # the untuned modules of the two logged kernels: the logs choose others
        if path.name.startswith((f"{FUSED.uri}.", f"{QUANT4.uri}.")):
            path.unlink()
    cold = decode(root)
    assert cold["compiled"] == 2 and cold["cached"] == SMALL_MODULES - 2 and cold["err"] < 1e-4, cold
    warm = decode(root)
    assert warm == {**warm, "compiled": 0, "cached": SMALL_MODULES, "tvm": False}, warm
    assert any("pvc16" in p.name for p in root.glob("cache/*/cpu-*/fused_*.so"))  # the knob record served
    return root


def _one(root: Path, pattern: str) -> Path:
    (path,) = [p for p in root.glob(pattern) if not p.name.endswith((".verify.json", ".lock"))]
    return path


#: kind -> (the file, relative to a tree; what the warning names: "file" or "folder"; modules rebuilt after it)
KINDS = {
    "module": ("cache/*/cpu-*/fused_*.so", "file", 1),
    "module_key": ("cache/*/cpu-*/fused_*.json", "file", 1),
    "launcher": ("cache/*/wq_omp_launch-*.so", "file", 0),
    "host_facts": ("cache/*/host_devices.json", "file", 0),
    "log_records": (f"logs/*/{QUANT4.uri}/{tuning_log.RECORD_FILE}", "folder", 1),
    "log_meta": (f"logs/*/{QUANT4.uri}/{tuning_log.META_FILE}", "folder", 1),
    "knob_record": (f"logs/*/{base_fused().uri}/{tuning_log.META_FILE}", "folder", 1),
}
FAULTS = ("truncated", "empty", "random_bytes", "wrong_version", "unreadable", "directory")


def _wrong_version(kind: str, path: Path, root: Path) -> None:
    """A well-formed file of another version or another thing."""
    if kind in ("module", "launcher"):  # a valid shared library, but another one
        shutil.copyfile(_one(root, "cache/*/cpu-*/quantize_k8v8_*.so"), path)
    elif kind == "module_key":
        path.write_text(json.dumps({**json.loads(path.read_text()), "apache-tvm": "0.1"}))
    elif kind == "host_facts":  # an older format: entries without the fields this version reads
        facts = json.loads(path.read_text())
        path.write_text(json.dumps({fp: {"tag": e["tag"], "format": 0} for fp, e in facts.items()}))
    elif kind == "log_records":  # JSON lines, but not MetaSchedule's record format
        path.write_text('[0, {"trace": "format 0"}]\n')
    else:  # log_meta, knob_record: written by other tvm versions
        meta = json.loads(path.read_text())
        path.write_text(json.dumps({**meta, "versions": {**meta["versions"], "apache-tvm": "0.1"}}))


def damage(kind: str, fault: str, path: Path, root: Path) -> str:
    """Damage ``path`` in the way ``fault`` names; returns how (for the report)."""
    data = path.read_bytes()
    fresh = path.with_name(path.name + ".new")  # a new inode in its place, as a torn copy leaves it
    if fault == "truncated":
        fresh.write_bytes(data[: len(data) // 2])
    elif fault == "empty":
        fresh.write_bytes(b"")
    elif fault == "random_bytes":
        fresh.write_bytes(random.Random(f"{kind}-{fault}").randbytes(max(len(data), 64)))
    elif fault == "wrong_version":
        fresh.write_bytes(data)
        _wrong_version(kind, fresh, root)
    if fresh.exists():
        os.replace(fresh, path)
        return fault
    path.unlink()
    if fault == "directory":
        path.mkdir()
        (path / "stray").write_text("x")
        return "directory"
    assert fault == "unreadable"
    if os.geteuid() == 0:  # root reads through chmod 000: a FIFO with no writer is what cannot be read
        os.mkfifo(path)
        return "fifo (root)"
    path.write_bytes(data)
    path.chmod(0)
    return "chmod 000"


@pytest.fixture(scope="session")
def fault_runs(warm_tree, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path, str, dict]]:
    """Every (kind, fault) case: a copy of the warm tree with one file damaged, then a fresh decoding process. The
    processes are independent, so they run two at a time (the machines have 2 cores; each process is single-threaded)
    and every case is still its own test below."""
    from concurrent.futures import ThreadPoolExecutor

    cases = {}
    for kind in KINDS:
        for fault in FAULTS:
            root = tmp_path_factory.mktemp(f"{kind}-{fault}") / "tree"
            shutil.copytree(warm_tree, root, symlinks=True)
            path = _one(root, KINDS[kind][0])
            cases[(kind, fault)] = (root, path, damage(kind, fault, path, root))
    with ThreadPoolExecutor(max_workers=2) as pool:
        outs = dict(zip(cases, pool.map(lambda c: _decode_case(c[0]), cases.values())))
    return {key: (*cases[key], outs[key]) for key in cases}


def _decode_case(root: Path) -> dict:
    """A fresh process decoding over the tree at ``root``; its exit status is kept, not asserted (the table asserts
    per case: one case never hides another)."""
    env = {**os.environ, "WQ_CACHE_DIR": str(root / "cache"), "WQ_TUNING_LOGS": str(root / "logs"),
           "OMP_NUM_THREADS": "1"}
    proc = run_python(DECODE, env=env)
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    return {"returncode": 0, **json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_file_is_rebuilt_or_ignored_named_never_fatal(fault_runs, kind, fault):
    root, path, how, out = fault_runs[(kind, fault)]
    _, names, rebuilt = KINDS[kind]
    assert out["returncode"] == 0, out
    assert out["err"] < 1e-4, out
    if names == "file":
        named = [w for w in out["warnings"] if str(path) in w]
    else:  # a log: its folder, or (an empty record file: no record) the kernel and the logs folder
        named = [w for w in out["warnings"] if str(path.parent) in w
                 or (path.parent.name in w and str(root / "logs") in w)]
    assert named, (path, out["warnings"])
    print(f"\n{kind} {how}: compiled {out['compiled']}, cached {out['cached']}, err {out['err']:.1e}; "
          f"{named[0][:160]}")
    if rebuilt == 0:
        assert out["compiled"] == 0, out  # a bad launcher or facts file costs no module build
    elif kind != "log_records" or fault != "truncated":  # a torn last record line is skipped: the key is the same
        assert out["compiled"] >= 1, out


# ---------------------------------------------------------------------------------------------------------------------
# The offline results file: handed over by the user, so refused with a clear message (never a traceback)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", FAULTS)
def test_bad_offline_results_file_is_refused_with_a_message_naming_it(tmp_path, fault):
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"format": 1, "kernels": [], "device": {}, "versions": {}}))
    results = export / "results.json"
    results.write_text(json.dumps({"format": 1, "manifest_sha256": "0" * 64, "candidates": {}}))
    if fault == "wrong_version":
        results.write_text(json.dumps({"format": 0, "results": []}))
    else:
        damage("offline_results", fault, results, tmp_path)
    proc = run_python(f"""
        import sys
        from wq_compile.tools.cli import main_tune
        sys.exit(main_tune(["--import-results", {str(results)!r}, "--logs-dir", {str(tmp_path / "logs")!r}]))
    """, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert str(results) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "logs").exists()  # nothing recorded

