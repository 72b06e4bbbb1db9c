"""The export folder's format, shared by export (:mod:`wq_compile.tuning.offline`) and import
(:mod:`wq_compile.tuning.offline_import`): ``manifest.json``, a candidate's trace as a tuning log would store it, the
workload hash that ties a manifest to the kernel it was exported from."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

from . import offline_measure
from ..compiler.device import Device
from .ms_task import replay
from ..compiler.verified_file import atomic_write, read_json
from ..core.spec import KernelSpec

MANIFEST = offline_measure.MANIFEST
RESULTS = offline_measure.RESULTS
FORMAT = offline_measure.FORMAT
MEASURE_SCRIPT = "measure_candidates.py"
#: Copied beside the script: :mod:`wq_compile.compiler.cuda_binary`, which it imports when run alone.
CUDA_BINARY_HELPER = "cuda_binary.py"


class OfflineError(RuntimeError):
    """An export folder, manifest or results file is unusable (the message names the file and the fix)."""


def spec_from_fields(fields: Mapping[str, Any]) -> KernelSpec:
    """The kernel spec of a manifest entry (the inverse of :func:`wq_compile.compiler.tuning_log.spec_fields`)."""
    return KernelSpec(**{k: (tuple(x) if isinstance(x, list) else x) for k, x in fields.items()})


def workload_hash(workload: Any) -> str:
    """Structural hash of the tuning workload: import refuses a manifest whose kernel has changed since."""
    import tvm_ffi

    return format(int(tvm_ffi.structural_hash(workload)) & (2**64 - 1), "016x")


def write_json(path: Path, doc: Any) -> None:
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def trace_to_json(workload: Any, trace: Any, device: Device) -> list[Any]:
    """A candidate as MetaSchedule's JSONDatabase serializes an *unmeasured* record of it (``[trace, null, target,
    args_info]``, plain JSON), so :func:`replay_json` reads back exactly what a tuning log would hold."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    with tempfile.TemporaryDirectory(prefix="wq-trace-") as tmp:
        db = ms.database.JSONDatabase(f"{tmp}/w.json", f"{tmp}/r.json")
        db.commit_tuning_record(ms.database.TuningRecord(trace, db.commit_workload(workload), run_secs=None,
                                                         target=device.target,
                                                         args_info=ArgInfo.from_prim_func(workload["main"])))
        line = Path(f"{tmp}/r.json").read_text().splitlines()[-1]
    return json.loads(line)[1]


def replay_json(workload: Any, record_json: list[Any]) -> Any:
    """The candidate of :func:`trace_to_json`, read back through a JSONDatabase and replayed on ``workload``."""
    from tvm.s_tir import meta_schedule as ms

    with tempfile.TemporaryDirectory(prefix="wq-trace-") as tmp:
        ms.database.JSONDatabase(f"{tmp}/w.json", f"{tmp}/r.json").commit_workload(workload)
        Path(f"{tmp}/r.json").write_text(json.dumps([0, record_json]) + "\n")
        (rec,) = ms.database.JSONDatabase(f"{tmp}/w.json", f"{tmp}/r.json").get_all_tuning_records()
        return replay(workload, rec.trace)


def load_json(path: Path, missing: str, fix: str) -> Any:
    """A JSON file of the round trip; :class:`OfflineError` with ``missing`` when it is absent, with ``fix`` when it
    does not parse."""
    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise OfflineError(missing) from None
    except OSError as exc:  # BadFileError: not JSON, not UTF-8, a directory, a FIFO, unreadable
        raise OfflineError(f"{exc}; {fix}") from exc
    if not isinstance(doc, dict):
        raise OfflineError(f"{path}: a JSON {type(doc).__name__}, not an object; {fix}")
    return doc


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / MANIFEST
    doc = load_json(path, f"{path}: missing; pass the folder wq-tune --export-candidates wrote", "export again")
    if doc.get("format") != FORMAT:
        raise OfflineError(f"{path}: format {doc.get('format')!r}, expected {FORMAT}; export again")
    return doc
