"""Tuning never makes a kernel slower: a record is used only when it beat the default schedule in the same
measurement.

``wq-tune`` times the default schedule (MetaSchedule kernels) or the factory's knobs (knob sweeps) next to the
candidates, in interleaved rounds, and writes both medians to the log's ``meta.json`` (``untuned_ms``,
``tuned_ms``); a run whose candidates are all slower writes ``default_wins`` and keeps no record. The runtime
applies the same rule to every log it finds, shipped ones included (logs tuned before the rule existed may hold
records slower than their default): :func:`slower_than_default` says why a log must not be used, and the lookup
skips it with a warning, so the default schedule is built instead. :func:`slow_records` lists such logs of a
logs folder (``python -m wq_compile.compiler.record_rule [tuning_logs]``; ``tests/tuning/test_record_rule.py``
checks the shipped ones are all skipped).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from .log_store import META_FILE


def slower_than_default(meta: Mapping[str, Any]) -> str | None:
    """Why the record of a log with this ``meta.json`` must not be used (None: it may be). A log without both
    times (an unmeasured run, ``--no-measure``) is judged by nothing and may be used."""
    if meta.get("default_wins"):
        return "its tuning run measured the default schedule faster than every candidate (no record kept)"
    try:
        untuned, tuned = float(meta["untuned_ms"]), float(meta["tuned_ms"])
    except (KeyError, TypeError, ValueError):
        return None
    if tuned >= untuned:
        return (f"its record ({tuned:.4g} ms) was not faster than the default schedule ({untuned:.4g} ms) in the "
                "same measurement")
    return None


def slow_records(logs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every log under ``logs_dir`` (``<tag>/<uri>/meta.json``) whose record :func:`slower_than_default` refuses:
    tag, uri, untuned and tuned ms, and why."""
    out = []
    for meta_path in sorted(Path(logs_dir).glob(f"*/*/{META_FILE}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        why = slower_than_default(meta)
        if why is not None:
            out.append({"tag": meta_path.parent.parent.name, "uri": meta_path.parent.name,
                        "untuned_ms": meta.get("untuned_ms"), "tuned_ms": meta.get("tuned_ms"), "why": why})
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the logs of a logs folder whose records the runtime skips as slower than their default."""
    args = sys.argv[1:] if argv is None else argv
    logs = Path(args[0] if args else "tuning_logs")
    rows = slow_records(logs)
    for r in rows:
        print(f"{r['tag']}/{r['uri']}: untuned {r['untuned_ms']} ms, tuned {r['tuned_ms']} ms -> not used")
    print(f"{len(rows)} record(s) under {logs} slower than their default schedule (skipped at run time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
