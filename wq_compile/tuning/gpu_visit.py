"""The prepared GPU visit: one command that verifies, measures and benchmarks, within a few minutes of device time.

``python -m wq_compile.tuning.gpu_visit --export DIR [--export DIR2] --out OUT [--dry-run]`` runs these steps and writes
``OUT/visit.json``, ``OUT/bench.csv``, ``OUT/results_<n>.json`` and ``OUT/visit.log``:

1. ``environment``: torch/CUDA/GPU name, whether FlashInfer and Triton import.
2. ``measure``: every exported candidate is loaded with the TVM runtime only, checked against the stored torch
   reference outputs and timed (:mod:`wq_compile.tuning.offline_measure`); bring ``results_<n>.json`` back and import it
   with ``wq-tune --import-results``. A candidate that disagrees with the reference gets no time.
3. ``bench``: decode attention at each length for the 0.5B and 7B shapes: torch SDPA on the dense fp16 cache
   (FlashAttention backend, GQA as ``enable_gqa`` and with the query group folded into rows), torch dequantize-all
   + SDPA (int4 keys/values, the reference format), FlashInfer's single decode if importable, and each exported
   WindowQuant module (``bench`` entries of the manifest, built by ``export_candidates(bench_tokens=...)``); the
   benchmarks are :mod:`wq_compile.tuning.gpu_bench`.
4. ``edge[i]`` (exports with a split kernel and its merge) and ``sanitizer``: the edge cases of
   :mod:`wq_compile.tuning.gpu_edge_cases` against the reference, then under compute-sanitizer where it exists.

Only torch, the TVM runtime and the pure-torch modules of this package (quant, spec, models) are imported, so it
runs where TVM's compiler is absent (``TVM_USE_RUNTIME_LIB=1``). ``--dry-run`` plans the steps, checks every export
folder (manifest, file digests), runs the steps that do not need a GPU on the CPU (an llvm export is measured;
benchmarks at ``--dry-lengths``) and lists the steps that need a GPU. :func:`assemble_bundle` (``--bundle``,
:mod:`wq_compile.tuning.gpu_bundle`) collects what must be carried to a GPU machine without TVM and reports its size against
the limit.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import gpu_edge_cases, offline_measure
from .gpu_bench import bench_baselines, bench_modules
from .gpu_bundle import CARRY_LIMIT_BYTES, BundleReport, assemble_bundle
from ..core.models import get_preset

__all__ = ["DEFAULT_LENGTHS", "DEFAULT_MODELS", "CARRY_LIMIT_BYTES", "Step", "BundleReport", "assemble_bundle",
           "bench_baselines", "bench_modules", "check_export", "plan", "run_visit", "main"]

DEFAULT_LENGTHS = (8192, 32768, 65536)
DEFAULT_MODELS = ("llava-ov-0.5b", "llava-ov-7b")


@dataclass(frozen=True)
class Step:
    """One planned step: what it does, whether it needs a GPU, and whether this run executes it."""

    name: str
    detail: str
    needs_gpu: bool
    runs: bool


def _log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "visit.log", "a") as f:
        f.write(text + "\n")


def check_export(export: Path) -> dict[str, Any]:
    """The manifest of an export folder after checking every file it names exists with its digest (raises
    ``ValueError`` naming the file)."""
    path = export / offline_measure.MANIFEST
    if not path.is_file():
        raise ValueError(f"--export: {export} has no {offline_measure.MANIFEST}; pass a folder written by "
                         "wq-tune --export-candidates")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != offline_measure.FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {offline_measure.FORMAT}")
    for kernel in manifest["kernels"]:
        entries = list(kernel["candidates"]) + ([kernel["bench"]] if kernel.get("bench") else [])
        for entry in entries:
            f = export / entry["file"]
            if not f.is_file() or offline_measure.file_sha256(f) != entry["sha256"]:
                raise ValueError(f"{f}: missing or its digest differs from {path}; copy the export folder again")
            if manifest["device"]["kind"] == "cuda" and not (entry.get("binary") and (export / entry["binary"]).is_file()):
                raise ValueError(f"{f}: no nvcc binary next to it; the GPU machine cannot compile CUDA source")
        if not (export / kernel["inputs"]).is_file():
            raise ValueError(f"{export / kernel['inputs']}: missing reference inputs; copy the export folder again")
    return manifest


def plan(exports: Sequence[Path], gpu: bool, dry_run: bool) -> list[Step]:
    """The steps of a visit and which of them this run executes (a GPU step runs only with a GPU)."""
    steps = [Step("environment", "torch, CUDA, GPU name, FlashInfer/Triton availability", False, True)]
    for i, export in enumerate(exports):
        kind = json.loads((export / offline_measure.MANIFEST).read_text())["device"]["kind"]
        steps.append(Step(f"measure[{i}]", f"verify against the reference and time every candidate of {export} "
                          f"({kind})", kind == "cuda", gpu or kind != "cuda"))
    for i, export in enumerate(exports):
        manifest = json.loads((export / offline_measure.MANIFEST).read_text())
        kind = manifest["device"]["kind"]
        if gpu_edge_cases.export_split_pairs(manifest):
            steps.append(Step(f"edge[{i}]", f"split + merge of {export} vs the reference: padding sample, odd lengths, "
                              f"residual 1-31, empty buckets, P in {gpu_edge_cases.PARTS}, NaN checks ({kind})",
                              kind == "cuda", gpu or kind != "cuda"))
    has_tool = gpu_edge_cases.sanitizer_tool() is not None
    steps.append(Step("sanitizer", "compute-sanitizer memcheck/racecheck/synccheck on the small edge cases"
                      + ("" if has_tool else " (compute-sanitizer not found: skipped)"), True, gpu and has_tool))
    steps.append(Step("bench", "decode at each length: SDPA flash fp16 (gqa, folded), dequantize-all + SDPA, "
                      "FlashInfer, WindowQuant modules", True, True))
    if dry_run:
        steps[-1] = Step("bench", steps[-1].detail + " (dry run: CPU, --dry-lengths, CPU-built modules only)", True,
                         True)
    return steps


def run_visit(exports: Sequence[Path], out: Path, *, dry_run: bool = False, lengths: Sequence[int] = DEFAULT_LENGTHS,
              models: Sequence[str] = DEFAULT_MODELS, repeat: int = 20) -> dict[str, Any]:
    """Run the visit (see module doc); returns what ``visit.json`` holds."""
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if not gpu and not dry_run:
        raise RuntimeError("no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run to check the plan "
                           "on a CPU machine")
    dev = "cuda" if gpu else "cpu"
    manifests = [check_export(e) for e in exports]
    steps = plan(exports, gpu, dry_run)
    doc: dict[str, Any] = {"dry_run": dry_run, "steps": [asdict(s) for s in steps], "measure": [], "bench": []}
    for s in steps:
        _log(out, f"[plan] {s.name}: {s.detail}" + (" (needs a GPU)" if s.needs_gpu else "")
             + ("" if s.runs else " -> skipped: no GPU here"))
    doc["environment"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "flashinfer": importlib.util.find_spec("flashinfer") is not None,
        "triton": importlib.util.find_spec("triton") is not None,
        "tvm_runtime_only": os.environ.get("TVM_USE_RUNTIME_LIB") == "1",
    }
    _log(out, f"[environment] {doc['environment']}")
    for i, (export, manifest, s) in enumerate(zip(exports, manifests, steps[1:])):
        if not s.runs:
            continue
        t0 = time.perf_counter()
        res = offline_measure.measure_export(export, out / f"results_{i}.json", repeat=max(3, repeat // 2))
        ok = sum(1 for e in res["candidates"].values() if e["seconds"] is not None)
        doc["measure"].append({"export": str(export), "measured": ok, "candidates": len(res["candidates"]),
                               "results": f"results_{i}.json", "wall_s": time.perf_counter() - t0})
        _log(out, f"[measure[{i}]] {ok} of {len(res['candidates'])} candidates correct and timed "
                  f"({time.perf_counter() - t0:.1f} s) -> results_{i}.json")
    for s in steps:
        if s.name.startswith("edge[") and s.runs:
            i = int(s.name[5:-1])
            rows = gpu_edge_cases.check_export_edge_cases(exports[i], manifests[i], dev)
            doc.setdefault("edge", []).extend(rows)
            failed = [f"{r['case']} P={r['parts']}" for r in rows if not r["ok"]]
            _log(out, f"[{s.name}] {len(rows) - len(failed)} of {len(rows)} edge cases match the reference, finite"
                      + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        elif s.name == "sanitizer":
            cuda_exports = [e for e, m in zip(exports, manifests) if m["device"]["kind"] == "cuda"
                            and gpu_edge_cases.export_split_pairs(m)]
            why = [w for w, bad in (("no GPU here", not gpu), ("compute-sanitizer not found (PATH, $CUDA_HOME/bin)",
                                                             gpu_edge_cases.sanitizer_tool() is None)) if bad]
            doc["sanitizer"] = gpu_edge_cases.run_sanitizer(cuda_exports) if s.runs else {"skipped": "; ".join(why)}
            _log(out, f"[sanitizer] {doc['sanitizer']}")
    for model in models:
        for n in lengths:
            rows = bench_baselines(model, n, dev, repeat)
            doc["bench"] += rows
            for r in rows:
                _log(out, f"[bench] {model} {n:>6} {r['method']:<24} "
                          + (f"{r['seconds'] * 1e6:9.1f} us {r['gbps']:8.1f} GB/s err {r['rel_err']:.1e}"
                             if r["seconds"] else f"FAILED {r['error']}"))
    for export, manifest in zip(exports, manifests):
        if manifest["device"]["kind"] == ("cuda" if gpu else "llvm"):
            rows = bench_modules(export, manifest, [int(k) for k in _bench_lengths(manifest)] if dry_run else lengths,
                                 dev, repeat)
            doc["bench"] += rows
            for r in rows:
                _log(out, f"[bench] {r['method']} {r['tokens']} tokens: "
                          + (f"{r['seconds'] * 1e6:.1f} us, {r['gbps']:.1f} GB/s" if r["seconds"] else r["error"]))
    (out / "visit.json").write_text(json.dumps(doc, indent=1) + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        fields = ["model", "tokens", "method", "seconds", "gbps", "rel_err", "bytes", "note", "error"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(doc["bench"])
    return doc


def _bench_lengths(manifest: dict[str, Any]) -> list[str]:
    return sorted({n for k in manifest["kernels"] if k.get("bench") for n in k["bench"]["lengths"]}, key=int)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wq_compile.tuning.gpu_visit", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", action="append", default=[], metavar="DIR", help="an export folder (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (visit.json, bench.csv, logs)")
    p.add_argument("--dry-run", action="store_true", help="plan, check the exports, run the CPU-able steps on CPU")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="cached tokens to benchmark")
    p.add_argument("--dry-lengths", default="512", help="benchmark lengths of a dry run")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="instead of a visit: assemble what a GPU machine without TVM needs into DIR, report its size")
    p.add_argument("--ffi-wheel", default=None, metavar="WHL", help="with --bundle: the tvm-ffi wheel for the GPU "
                   "machine's Python (e.g. cp312; pip download apache-tvm-ffi==0.1.14.post1 --python-version 3.12)")
    a = p.parse_args(argv)
    try:
        lengths = [int(x) for x in (a.dry_lengths if a.dry_run else a.lengths).split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths/--dry-lengths: expected integers such as 8192,32768, got {a.lengths!r}")
    if a.repeat < 1:
        p.error(f"--repeat: must be >= 1, got {a.repeat}")
    exports = [Path(e) for e in a.export]
    if a.bundle:
        rep = assemble_bundle(a.bundle, exports, ffi_wheel=Path(a.ffi_wheel) if a.ffi_wheel else None)
        for name, size in rep.parts.items():
            print(f"{name:<20} {size / 2**20:8.2f} MiB")
        print(f"{'total':<20} {rep.total / 2**20:8.2f} MiB of {rep.limit / 2**20:.0f} MiB "
              f"({'fits' if rep.fits else 'DOES NOT FIT'}); tvm_ffi for {rep.ffi_python_tag}")
        return 0 if rep.fits else 1
    if a.out is None:
        p.error("--out: required for a visit")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    try:
        for m in models:
            get_preset(m)
        run_visit(exports, Path(a.out), dry_run=a.dry_run, lengths=lengths, models=models, repeat=a.repeat)
    except (ValueError, RuntimeError) as exc:
        print(f"gpu_visit: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
