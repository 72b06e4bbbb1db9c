"""Import of offline measurements (``wq-tune --import-results DIR/results.json``): every candidate of an export that
was measured and matched the reference becomes a record in ``tuning_logs/<device-tag>/<uri>/`` (through
:mod:`wq_compile.compiler.tuning_log`), ``meta.json`` saying it came from an offline measurement on the named device. Failed
or unmeasured candidates are never recorded. See :mod:`wq_compile.tuning.offline` for the whole round trip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import offline_measure
from ..compiler import tuning_log
from ..compiler.build import kernel_def
from ..compiler.device import resolve_device, versions
from .offline_format import MANIFEST, OfflineError, load_json, read_manifest, replay_json, spec_from_fields, workload_hash


@dataclass(frozen=True)
class ImportSummary:
    """What one import recorded: records added per URI, and candidates skipped (failed or unmeasured) per URI."""

    recorded: Mapping[str, int]
    skipped: Mapping[str, list[str]]
    log_dirs: Mapping[str, Path]


def import_results(results_path: str | Path, export_dir: str | Path | None = None,
                   logs_dir: str | Path = "tuning_logs") -> ImportSummary:
    """Record every measured, correct candidate of ``results_path`` in the tuning logs (see module doc)."""
    results_path = Path(results_path)
    export = Path(export_dir) if export_dir is not None else results_path.parent
    manifest = read_manifest(export)
    results = load_json(results_path, f"import-results: {results_path} does not exist", "measure again")
    if results.get("format") != offline_measure.FORMAT or not isinstance(results.get("candidates"), dict):
        raise OfflineError(f"{results_path}: format {results.get('format')!r} with candidates "
                           f"{type(results.get('candidates')).__name__}, expected format {offline_measure.FORMAT} "
                           "with a candidates object; measure again with this export's measure_candidates.py")
    if results.get("manifest_sha256") != offline_measure.file_sha256(export / MANIFEST):
        raise OfflineError(f"{results_path}: measured another export than {export / MANIFEST} (manifest digest "
                           "differs); pass the export folder these results belong to (--export-dir)")
    device = resolve_device(manifest["device"]["target_arg"])
    if device.tag != manifest["device"]["tag"]:
        raise OfflineError(f"{export / MANIFEST}: exported for {manifest['device']['tag']}, the target resolves to "
                           f"{device.tag} here; import where it was exported")
    vers = versions()
    if manifest.get("versions") != vers:
        raise OfflineError(f"{export / MANIFEST}: exported with {manifest.get('versions')}, this environment has "
                           f"{vers}; traces are only recorded under the versions that built them")
    measured_on = results.get("measured_on") or {}
    device_name = str(measured_on.get("device_name") or "an unnamed device")
    recorded, skipped, folders = {}, {}, {}
    for kernel in manifest["kernels"]:
        spec = spec_from_fields(kernel["spec"])
        kdef = kernel_def(spec, device)
        workload = kdef.workload(kernel["sizes"], kernel["scalars"])
        if workload_hash(workload) != kernel["workload_hash"]:
            raise OfflineError(f"{export / MANIFEST}: {spec.uri} has changed since the export (workload hash "
                               "differs); export and measure again")
        good, bad = [], []
        for cand in kernel["candidates"]:
            res = results.get("candidates", {}).get(cand["id"])
            secs = None if res is None or res.get("error") else res.get("samples") or (
                [res["seconds"]] if res.get("seconds") is not None else None)
            if not secs or res.get("sha256") != cand["sha256"]:
                bad.append(cand["id"])
                continue
            try:
                sch = replay_json(workload, cand["trace"])
            except Exception as exc:  # noqa: BLE001 - TVM raises several error types on a bad trace
                raise OfflineError(f"{export / MANIFEST}: the trace of {cand['id']} does not replay on "
                                   f"{spec.uri} ({type(exc).__name__}: {exc}); export again") from exc
            good.append((sch.trace, [float(s) for s in secs]))
        skipped[spec.uri] = bad
        folder = tuning_log.log_dir(logs_dir, device.tag, spec.uri)
        folders[spec.uri] = folder
        if not good:
            recorded[spec.uri] = 0
            continue
        meta: dict[str, Any] = {}
        if (folder / tuning_log.META_FILE).exists():
            meta = tuning_log.read_meta(folder, device)
            if {str(k): int(v) for k, v in meta.get("tuning_sizes", {}).items()} != kernel["sizes"]:
                raise OfflineError(f"{folder}: tuned at sizes {meta.get('tuning_sizes')}, the export at "
                                   f"{kernel['sizes']}; import into an empty logs folder or delete {folder}")
        offline = list(meta.get("offline_measurements", []))
        meta.update(tuning_log.new_meta(device, spec.uri, kernel["spec"], kernel["sizes"], kernel["scalars"],
                                        int(meta.get("seed", 0))))
        offline.append({"measured_on": device_name, "host": measured_on.get("host"), "time": measured_on.get("time"),
                        "timer": measured_on.get("timer"), "records": len(good),
                        "manifest_sha256": results["manifest_sha256"], "imported": tuning_log.timestamp()})
        meta.update(measurement=f"offline measurement on {device_name}", offline_measurements=offline)
        recorded[spec.uri] = tuning_log.commit_records(folder, device, meta, workload, good)
        db = tuning_log.open_database(folder, device)
        meta["valid_trials"] = len(tuning_log.valid_records(db, workload))
        tuning_log.write_meta(folder, meta)
    return ImportSummary(recorded, skipped, folders)
