"""Tuning logs: the only code that reads or writes ``tuning_logs/<device-tag>/<kernel-uri>/``.

A log folder holds MetaSchedule's ``database_workload.json`` and ``database_tuning_record.json`` (one JSON line per
measured candidate, appended) and ``meta.json`` (versions, device tag, target, ISA class, tuning sizes, trials).

Lookup (:func:`candidate_logs`): the log of this exact device tag first, then logs of *compatible* devices (same
target kind and ISA class, read from the target's features; nearest core count first), then none (the default
schedule). Which one served a kernel is a :class:`Provenance`: "tuned here", "tuned on <tag>" or "untuned".
A log from other tvm/tvm-ffi versions is never used. A torn last line (an interrupted append) is skipped with a
warning when reading and removed by :func:`repair_log` (``wq-tune`` calls it); any other broken line is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .device import PINNED_PACKAGES, Device, isa_class, versions

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


@dataclass(frozen=True)
class Provenance:
    """Where a kernel's schedule came from: ``tuned here``, ``tuned on <tag>`` or ``untuned``."""

    source: str  # "here" | "foreign" | "untuned"
    tag: str | None = None
    run_secs: float | None = None

    @property
    def tuned(self) -> bool:
        return self.source != "untuned"

    def __str__(self) -> str:
        if self.source == "here":
            return "tuned here"
        return f"tuned on {self.tag}" if self.source == "foreign" else "untuned"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "tag": self.tag, "run_secs": self.run_secs}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> "Provenance":
        data = data or {}
        return cls(str(data.get("source", "untuned")), data.get("tag"), data.get("run_secs"))


UNTUNED = Provenance("untuned")


@dataclass(frozen=True)
class LogSource:
    """One kernel's log folder that may serve this device: exact tag or a compatible one."""

    log_dir: Path
    tag: str
    exact: bool
    meta: Mapping[str, Any]

    def provenance(self, run_secs: float | None) -> Provenance:
        return Provenance("here" if self.exact else "foreign", self.tag, run_secs)


def log_dir(logs_dir: str | os.PathLike, tag: str, uri: str) -> Path:
    return Path(logs_dir) / tag / uri


def _fix(folder: Path) -> str:
    return f"re-tune it (wq-tune) or delete {folder}"


def read_meta(folder: Path, device: Device | None = None) -> dict[str, Any]:
    """``meta.json`` of a log, checked: parsable, same tvm/tvm-ffi versions, and (given ``device``) its tag.

    Raises :class:`TuningLogError` naming the file and the fix.
    """
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise TuningLogError(f"{path}: missing; a tuning log without meta.json cannot be version-checked; "
                             f"{_fix(folder)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TuningLogError(f"{path}: not valid JSON ({exc}); {_fix(folder)}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("versions"), dict):
        raise TuningLogError(f"{path}: no 'versions' object; {_fix(folder)}")
    now = versions()
    for pkg in PINNED_PACKAGES:
        if meta["versions"].get(pkg) != now[pkg]:
            raise TuningLogError(f"{path}: tuned with {pkg} {meta['versions'].get(pkg)}, this environment has "
                                 f"{now[pkg]}; a log from other versions is never used: {_fix(folder)}")
    if device is not None and meta.get("device_tag") not in (None, device.tag):
        raise TuningLogError(f"{path}: log of device {meta.get('device_tag')!r}, not {device.tag!r}; {_fix(folder)}")
    return meta


def write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    """Replace ``meta.json`` atomically (a crash leaves the old or the new file, never half of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{META_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / META_FILE)


def new_meta(device: Device, uri: str, spec_fields: Mapping[str, Any], sizes: Mapping[str, int],
             scalars: Mapping[str, float], seed: int) -> dict[str, Any]:
    """The fields a tuning run records before its first candidate (a crash leaves a checkable log)."""
    return {"uri": uri, "spec": dict(spec_fields), "versions": versions(), "device_tag": device.tag,
            "device_name": device.name, "target": device.target_json, "isa": device.isa,
            "num_cores": device.num_cores, "tuning_sizes": dict(sizes), "tuning_scalars": dict(scalars),
            "seed": seed}


def _scan(path: Path, folder: Path) -> tuple[list[str], bool]:
    """The JSON lines of ``path`` and whether a torn last line was dropped; raises on any other bad line."""
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
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
            raise TuningLogError(f"{path}:{i + 1}: not valid JSON ({exc}); {_fix(folder)}") from exc
        good.append(line)
    return good, torn


def repair_log(folder: Path) -> list[Path]:
    """Drop a torn last line from the log's JSON files (rewritten atomically); returns the files repaired."""
    repaired = []
    for name in (WORKLOAD_FILE, RECORD_FILE):
        path = Path(folder) / name
        good, torn = _scan(path, Path(folder))
        if torn:
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in good))
            os.replace(tmp, path)
            repaired.append(path)
    return repaired


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
        raise TuningLogError(f"{folder}: the tuning database does not load ({exc}); {_fix(folder)}") from exc
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


def _log_isa(meta: Mapping[str, Any]) -> str | None:
    if meta.get("isa"):
        return str(meta["isa"])
    try:
        return isa_class(str(meta["target"]))
    except Exception:  # noqa: BLE001 - an unreadable target is simply not compatible
        return None


def _tag_arch(tag: str) -> str:
    return tag.split("-")[1] if tag.startswith("cpu-") and tag.count("-") >= 2 else ""


def candidate_logs(logs_dir: str | os.PathLike | None, device: Device, uri: str, *,
                   strict: bool = True) -> list[LogSource]:
    """Logs that may serve ``uri`` on ``device``, in the order to try them: the exact device tag, then logs of the
    same target kind and ISA class (nearest core count first). Logs of other versions are skipped here (the exact
    one raises :class:`TuningLogError` instead, so a stale local log is never silently ignored; with ``strict``
    False it is skipped with a :class:`KnobRecordWarning`, as knob lookups at run time do)."""
    if logs_dir is None or not Path(logs_dir).is_dir():
        return []
    out: list[LogSource] = []
    exact = log_dir(logs_dir, device.tag, uri)
    if exact.is_dir():
        try:
            out.append(LogSource(exact, device.tag, True, read_meta(exact, device)))
        except TuningLogError as exc:
            if strict:
                raise
            warnings.warn(f"{exc}; skipped", KnobRecordWarning, stacklevel=2)
    foreign = []
    for folder in sorted(Path(logs_dir).glob(f"*/{uri}")):
        tag = folder.parent.name
        if tag == device.tag or not (folder / META_FILE).exists():
            continue
        try:
            meta = read_meta(folder)
        except TuningLogError as exc:
            if not strict:
                warnings.warn(f"{exc}; skipped", KnobRecordWarning, stacklevel=2)
            continue
        try:
            target = json.loads(str(meta.get("target")))
        except json.JSONDecodeError:
            continue
        same_arch = device.kind != "llvm" or _tag_arch(tag) == _tag_arch(device.tag)
        if target.get("kind") == device.kind and same_arch and _log_isa(meta) == device.isa:
            cores = int(meta.get("num_cores") or target.get("num-cores", 0) or 0)
            foreign.append((abs(cores - (device.num_cores or 0)), tag, LogSource(folder, tag, False, meta)))
    return out + [src for _, _, src in sorted(foreign, key=lambda x: (x[0], x[1]))]


def digest(sources: list[LogSource]) -> str:
    """Digest of the logs as stored (meta, workloads, records, in lookup order): part of the module-cache key, so
    a changed, added or removed record changes the key without replaying anything."""
    if not sources:
        return "none"
    h = hashlib.sha256()
    for src in sources:
        h.update(f"{src.tag}:{int(src.exact)}\n".encode())
        for name in (META_FILE, WORKLOAD_FILE, RECORD_FILE, KNOB_FILE):
            path = src.log_dir / name
            h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------------------------------
# Knob records: the measured structure knobs of a plain-TIR kernel (no MetaSchedule trace to replay)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnobRecord:
    """The winner of one knob sweep as stored: its knobs, median time, and the log (tag, cores) it came from."""

    knobs: Mapping[str, int]
    median_s: float
    num_cores: int
    source: LogSource

    def provenance(self) -> Provenance:
        return self.source.provenance(self.median_s)


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
    path = Path(folder) / KNOB_FILE
    good, torn = _scan(path, Path(folder))
    if torn:
        tmp = path.with_name(f".{KNOB_FILE}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in good))
        os.replace(tmp, path)
    return torn


def read_knob_record(src: LogSource) -> KnobRecord:
    """The winner stored in ``src``'s meta.json; raises :class:`TuningLogError` naming the file when it is not a
    complete knob record."""
    meta, where = src.meta, src.log_dir / META_FILE
    best = meta.get("best") if meta.get("kind") == KNOB_KIND else None
    try:
        knobs = {str(k): int(v) for k, v in best["knobs"].items()}  # type: ignore[index]
        median_s = float(best["median_ms"]) / 1e3  # type: ignore[index]
        cores = int(meta.get("num_cores") or 0)
    except (TypeError, KeyError, ValueError, AttributeError):
        raise TuningLogError(f"{where}: not a complete knob record (kind 'knobs' with best.knobs and "
                             f"best.median_ms); {_fix(src.log_dir)}") from None
    if not knobs or min(knobs.values()) < 1 or median_s <= 0 or cores < 1:
        raise TuningLogError(f"{where}: knob record with invalid values (knobs {knobs}, {median_s} s, "
                             f"{cores} cores); {_fix(src.log_dir)}")
    return KnobRecord(knobs, median_s, cores, src)


def find_knob_record(logs_dir: str | os.PathLike | None, device: Device, base_uri: str) -> KnobRecord | None:
    """The first knob record that serves ``base_uri`` (the kernel's URI without knobs) on ``device``, with the same
    compatibility rules as MetaSchedule logs (exact tag, then same ISA class, nearest cores); an unreadable or
    incomplete one is skipped with a :class:`KnobRecordWarning`."""
    for src in candidate_logs(logs_dir, device, base_uri, strict=False):
        try:
            return read_knob_record(src)
        except TuningLogError as exc:
            warnings.warn(f"{exc}; skipped", KnobRecordWarning, stacklevel=2)
    return None
