"""Tuning logs: the only code that reads or writes ``tuning_logs/<device-tag>/<kernel-uri>/``.

The files of one log folder (format, ``meta.json``, MetaSchedule's database, appends, repair) are
:mod:`wq_compile.compiler.log_store`, re-exported here; this module adds which log serves a device and what it says about
the schedule:

Lookup (:func:`candidate_logs`): the log of this exact device tag first, then logs of *compatible* devices (same
target kind and ISA class, read from the target's features; nearest core count first), then none (the default
schedule). Which one served a kernel is a :class:`Provenance`: "tuned here", "tuned on <tag>" or "untuned".
Plain-TIR kernels store the winner of a knob sweep in ``meta.json`` (:func:`find_knob_record`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .device import Device, isa_class
from .log_store import (  # noqa: F401 - re-exported: importers use tuning_log only
    FAILED_RUN_SECS, KNOB_FILE, KNOB_KIND, META_FILE, RECORD_FILE, WORKLOAD_FILE, KnobRecordWarning, TornLogWarning,
    TuningLogError, append_knob_sample, commit_records, fix_hint, log_dir, median, new_meta, open_database,
    read_knob_samples, read_meta, record_lines, repair_knob_log, repair_log, spec_fields, timestamp, valid_records,
    write_meta,
)
from .record_rule import slower_than_default
from .verified_file import read_bytes


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
            try:
                h.update(read_bytes(src.log_dir / name))
            except FileNotFoundError:
                h.update(b"-")
            except OSError as exc:  # BadFileError: a directory or FIFO (never opened), unreadable
                raise TuningLogError(f"{exc}; {fix_hint(src.log_dir)}") from exc
    return h.hexdigest()[:16]


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
                             f"best.median_ms); {fix_hint(src.log_dir)}") from None
    if not knobs or min(knobs.values()) < 1 or median_s <= 0 or cores < 1:
        raise TuningLogError(f"{where}: knob record with invalid values (knobs {knobs}, {median_s} s, "
                             f"{cores} cores); {fix_hint(src.log_dir)}")
    return KnobRecord(knobs, median_s, cores, src)


def find_knob_record(logs_dir: str | os.PathLike | None, device: Device, base_uri: str) -> KnobRecord | None:
    """The first knob record that serves ``base_uri`` (the kernel's URI without knobs) on ``device``, with the same
    compatibility rules as MetaSchedule logs (exact tag, then same ISA class, nearest cores); an unreadable or
    incomplete one is skipped with a :class:`KnobRecordWarning`."""
    for src in candidate_logs(logs_dir, device, base_uri, strict=False):
        why = slower_than_default(src.meta)
        if why is not None:  # tuning never makes a kernel slower (wq_compile.compiler.record_rule)
            warnings.warn(f"{src.log_dir}: {why}; not used (the default knobs are)", KnobRecordWarning, stacklevel=2)
            continue
        try:
            return read_knob_record(src)
        except TuningLogError as exc:
            warnings.warn(f"{exc}; skipped", KnobRecordWarning, stacklevel=2)
    return None
