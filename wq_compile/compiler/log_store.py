"""The files of one tuning-log folder ``tuning_logs/<device-tag>/<kernel-uri>/``: their format, ``meta.json``,
MetaSchedule's JSON database, appends and repair.

A log folder holds MetaSchedule's ``database_workload.json`` and ``database_tuning_record.json`` (one JSON line per
measured candidate, appended), ``meta.json`` (versions, device tag, target, ISA class, tuning sizes, trials) and, for
plain-TIR kernels, ``knob_samples.json``. A log from other tvm/tvm-ffi versions is never used. A torn last line (an
interrupted append) is skipped with a warning when reading and removed by :func:`repair_log` (``wq-tune`` calls it);
any other broken line is an error.

Use it through :mod:`wq_compile.compiler.tuning_log`, which re-exports every name here and adds which log serves a device;
no other module imports this one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from .device import PINNED_PACKAGES, Device, versions
from .verified_file import atomic_write, read_text

META_FILE = "meta.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
#: Knob records (plain-TIR kernels whose structure knobs are factory parameters, not a MetaSchedule trace): one JSON
#: line per measured sample ``{"knobs": {...}, "round": r, "secs": s}``, appended; the winner lives in meta.json.
KNOB_FILE = "knob_samples.json"
#: ``meta["kind"]`` of a knob record (MetaSchedule logs have no kind).
KNOB_KIND = "knobs"
#: Tuning records with run time at or above this are failed runs (MetaSchedule writes 1e10 s).
FAILED_RUN_SECS = 1e9


class TuningLogError(RuntimeError):
    """A tuning log is unreadable, stale (other versions/target) or does not replay on the kernel."""


class KnobRecordWarning(UserWarning):
    """A knob record is unreadable or incomplete; it is skipped (the next one, else the default knobs, serves)."""


class TornLogWarning(UserWarning):
    """The last line of a tuning log was cut off (an interrupted append); it is skipped."""


def log_dir(logs_dir: str | os.PathLike, tag: str, uri: str) -> Path:
    return Path(logs_dir) / tag / uri


def fix_hint(folder: Path) -> str:
    """How to fix a broken or stale log folder (the end of every :class:`TuningLogError` message)."""
    return f"re-tune it (wq-tune) or delete {folder}"


def read_meta(folder: Path, device: Device | None = None) -> dict[str, Any]:
    """``meta.json`` of a log, checked: parsable, same tvm/tvm-ffi versions, and (given ``device``) its tag.

    Raises :class:`TuningLogError` naming the file and the fix.
    """
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(read_text(path))
    except FileNotFoundError:
        raise TuningLogError(f"{path}: missing; a tuning log without meta.json cannot be version-checked; "
                             f"{fix_hint(folder)}") from None
    except json.JSONDecodeError as exc:
        raise TuningLogError(f"{path}: not valid JSON ({exc}); {fix_hint(folder)}") from exc
    except OSError as exc:  # BadFileError: a directory, a FIFO, unreadable, not UTF-8
        raise TuningLogError(f"{exc}; {fix_hint(folder)}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("versions"), dict):
        raise TuningLogError(f"{path}: no 'versions' object; {fix_hint(folder)}")
    now = versions()
    for pkg in PINNED_PACKAGES:
        if meta["versions"].get(pkg) != now[pkg]:
            raise TuningLogError(f"{path}: tuned with {pkg} {meta['versions'].get(pkg)}, this environment has "
                                 f"{now[pkg]}; a log from other versions is never used: {fix_hint(folder)}")
    if device is not None and meta.get("device_tag") not in (None, device.tag):
        raise TuningLogError(f"{path}: log of device {meta.get('device_tag')!r}, not {device.tag!r}; {fix_hint(folder)}")
    return meta


def write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    """Replace ``meta.json`` atomically (a crash leaves the old or the new file, never half of one)."""
    atomic_write(folder / META_FILE, json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")


def new_meta(device: Device, uri: str, spec_fields: Mapping[str, Any], sizes: Mapping[str, int],
             scalars: Mapping[str, float], seed: int) -> dict[str, Any]:
    """The fields a tuning run records before its first candidate (a crash leaves a checkable log)."""
    return {"uri": uri, "spec": dict(spec_fields), "versions": versions(), "device_tag": device.tag,
            "device_name": device.name, "target": device.target_json, "isa": device.isa,
            "num_cores": device.num_cores, "tuning_sizes": dict(sizes), "tuning_scalars": dict(scalars),
            "seed": seed}


def spec_fields(spec: Any) -> dict[str, Any]:
    """A kernel spec's fields as ``meta.json`` stores them (tuples as lists)."""
    return {k: (list(x) if isinstance(x, tuple) else x) for k, x in vars(spec).items()}


def timestamp() -> str:
    """Now, in UTC, as meta.json stores times."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _scan(path: Path, folder: Path) -> tuple[list[str], bool]:
    """The JSON lines of ``path`` and whether a torn last line was dropped; raises on any other bad line."""
    if not os.path.lexists(path):
        return [], False
    try:
        lines = read_text(path).splitlines()
    except OSError as exc:  # BadFileError: a directory, a FIFO, unreadable, not UTF-8
        raise TuningLogError(f"{exc}; {fix_hint(folder)}") from exc
    good: list[str] = []
    torn = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                torn = True
                continue
            raise TuningLogError(f"{path}:{i + 1}: not valid JSON ({exc}); {fix_hint(folder)}") from exc
        good.append(line)
    return good, torn


def _repair(path: Path, folder: Path) -> bool:
    """Drop a torn last line of one JSON-lines file (rewritten atomically); True when one was dropped."""
    good, torn = _scan(path, folder)
    if torn:
        atomic_write(path, "".join(line + "\n" for line in good))
    return torn


def repair_log(folder: Path) -> list[Path]:
    """Drop a torn last line from the log's JSON files (rewritten atomically); returns the files repaired."""
    paths = [Path(folder) / name for name in (WORKLOAD_FILE, RECORD_FILE)]
    return [path for path in paths if _repair(path, Path(folder))]


def open_database(folder: Path, device: Device | None = None, *, require_meta: bool = True) -> Any:
    """The JSONDatabase of one kernel's log after checking meta.json and every JSON line.

    A torn last line is skipped with a :class:`TornLogWarning` (the database is read from a repaired copy, the
    log itself is left for :func:`repair_log`)."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    if require_meta:
        read_meta(folder, device)
    scans = {name: _scan(folder / name, folder) for name in (WORKLOAD_FILE, RECORD_FILE)}
    torn = [name for name, (_, t) in scans.items() if t]
    src = folder
    if torn:
        warnings.warn(f"{folder}: torn last line in {', '.join(torn)} (interrupted write) skipped; "
                      "wq-tune repairs it", TornLogWarning, stacklevel=2)
        src = Path(tempfile.mkdtemp(prefix="wq-log-"))
        for name, (lines, _) in scans.items():
            (src / name).write_text("".join(line + "\n" for line in lines))
    try:
        return ms.database.JSONDatabase(path_workload=str(src / WORKLOAD_FILE),
                                        path_tuning_record=str(src / RECORD_FILE))
    except Exception as exc:  # TVM raises its own error types on malformed records
        raise TuningLogError(f"{folder}: the tuning database does not load ({exc}); {fix_hint(folder)}") from exc
    finally:
        if src != folder:
            shutil.rmtree(src, ignore_errors=True)


def valid_records(db: Any, workload: Any, limit: int = 100000) -> list[Any]:
    """Records of ``workload`` with a real measured time, best first (the workload is not committed)."""
    if not db.has_workload(workload):
        return []
    out = []
    for r in db.get_top_k(db.commit_workload(workload), limit):
        secs = [float(x) for x in (r.run_secs or [])]
        if secs and max(secs) < FAILED_RUN_SECS:
            out.append(r)
    return out


def median(values: Any) -> float:
    secs = sorted(float(x) for x in values)
    return secs[len(secs) // 2]


def record_lines(folder: Path) -> Iterator[str]:
    """The stored record lines of a log (for digests and tests)."""
    yield from _scan(folder / RECORD_FILE, folder)[0]


def commit_records(folder: Path, device: Device, meta: Mapping[str, Any], workload: Any,
                   measured: list[tuple[Any, list[float]]]) -> int:
    """Append measured records (``(trace, run_secs)``) of ``workload`` to a log, ``meta.json`` written first.

    For times measured elsewhere (offline measurement): a time that is missing, not positive or at the failed-run
    mark is refused (``ValueError``), never recorded. Returns the number of records appended."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    for _, secs in measured:
        if not secs or not all(0.0 < float(s) < FAILED_RUN_SECS for s in secs):
            raise ValueError(f"run_secs: {secs!r} is no measured time; only measured candidates are recorded")
    write_meta(folder, meta)
    db = open_database(folder, device)
    entry = db.commit_workload(workload)
    args_info = ArgInfo.from_prim_func(workload["main"])
    for trace, secs in measured:
        db.commit_tuning_record(ms.database.TuningRecord(trace, entry, run_secs=[float(s) for s in secs],
                                                         target=device.target, args_info=args_info))
    return len(measured)


# Knob samples: one line per measured sample of a plain-TIR kernel's knob sweep (the winner goes into meta.json).
def append_knob_sample(folder: Path, knobs: Mapping[str, int], round_: int, secs: float) -> None:
    """Append one measured sample (one line, flushed and synced: an interrupted sweep keeps every finished one)."""
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"knobs": dict(sorted(knobs.items())), "round": int(round_), "secs": float(secs)})
    with (folder / KNOB_FILE).open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_knob_samples(folder: Path) -> list[dict[str, Any]]:
    """Every stored sample of a knob sweep (a torn last line is skipped; :func:`repair_knob_log` removes it)."""
    return [json.loads(line) for line in _scan(Path(folder) / KNOB_FILE, Path(folder))[0]]


def repair_knob_log(folder: Path) -> bool:
    """Drop a torn last line of the sample file (rewritten atomically); True when one was dropped."""
    return _repair(Path(folder) / KNOB_FILE, Path(folder))
