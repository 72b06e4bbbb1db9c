"""Measure exported tuning candidates with torch and the TVM *runtime* only (no compiler, no wq_compile import).

This file is self-contained on purpose: :func:`wq_compile.tuning.offline.export_candidates` copies it into the export folder
as ``measure_candidates.py``, so the measuring machine (a GPU box with torch but no TVM compiler, no network) needs
only that folder plus ``libtvm_runtime.so``, the tvm Python files and tvm-ffi, imported with
``TVM_USE_RUNTIME_LIB=1``. It reads ``manifest.json``, loads each candidate module (CUDA: answering TVM's
``tvm_callback_cuda_compile`` with the fatbin nvcc built at export time), checks its outputs against the reference
outputs stored next to the inputs (``inputs/<uri>.pt``; outputs are poisoned before the checked call), times it
(CUDA events on a GPU, ``perf_counter`` on a CPU; warm-up, median of ``repeat`` samples) and writes
``results.json``: per candidate the measured seconds, or the error. A candidate that fails is never given a time.

Usage: ``TVM_USE_RUNTIME_LIB=1 python measure_candidates.py EXPORT_DIR [--out results.json] [--repeat 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

try:  # inside the package
    from ..compiler.cuda_binary import prebuilt_cuda_binary
except ImportError:  # run alone from an export folder, where the offline export copied cuda_binary.py beside it
    from cuda_binary import prebuilt_cuda_binary  # type: ignore[no-redef]

MANIFEST = "manifest.json"
RESULTS = "results.json"
FORMAT = 1


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compiler_loaded() -> bool | None:
    """Whether ``libtvm_compiler`` is mapped into this process (None where /proc is unavailable): proof that a
    measurement ran on the runtime library alone."""
    try:
        return "libtvm_compiler" in Path("/proc/self/maps").read_text()
    except OSError:
        return None


def _device_name(kind: str) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name(0)
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return model or platform.processor() or platform.machine()


def time_calls(fn: Callable[[], Any], kind: str, *, warmup: int, repeat: int, min_sample_s: float) -> list[float]:
    """Seconds per call, ``repeat`` samples after ``warmup`` calls; each sample loops until it lasts
    ``min_sample_s`` (CUDA: device events around the loop; CPU: ``perf_counter``)."""
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    for _ in range(max(1, warmup)):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    number = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeat):
        if kind == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / number)
        else:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - t0) / number)
    return samples


def _poison(t: torch.Tensor) -> None:
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-1)


def check_outputs(args: list[torch.Tensor], expected: dict[int, torch.Tensor], atol: float, rtol: float) -> float:
    """Largest absolute error of the outputs vs the reference; raises ``AssertionError`` naming the output."""
    worst = 0.0
    for index, want in expected.items():
        got = args[index].cpu()
        if not got.dtype.is_floating_point:
            if not torch.equal(got, want):
                raise AssertionError(f"output #{index}: {int((got != want).sum())} of {want.numel()} entries differ "
                                     "from the reference (exact comparison)")
            continue
        # an infinite reference (a split-KV kernel's empty split: lse = -inf) must be matched exactly
        inf = torch.isinf(want)
        if not torch.isfinite(got[~inf]).all() or not torch.equal(got[inf], want[inf].to(got.dtype)):
            raise AssertionError(f"output #{index}: non-finite values (unwritten or NaN)")
        got, want = got[~inf], want[~inf]
        if got.numel() == 0:
            continue
        err = (got.double() - want.double()).abs()
        worst = max(worst, float(err.max()))
        bound = atol + rtol * want.double().abs()
        if (err > bound).any():
            raise AssertionError(f"output #{index}: max abs error {float(err.max()):.3g} exceeds atol {atol} + "
                                 f"rtol {rtol} * |ref|")
    return worst


def measure_export(export_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, repeat: int = 20,
                   warmup: int = 3, min_sample_s: float = 0.005, only: str | None = None) -> dict[str, Any]:
    """Check and time every candidate of an export folder; writes and returns the results (see module doc)."""
    import tvm

    root = Path(export_dir)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"export_dir: no {MANIFEST} in {root}; pass the folder wq-tune --export-candidates "
                                "wrote")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, this script reads format {FORMAT}")
    kind = manifest["device"]["kind"]
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{manifest_path}: candidates for {manifest['device']['tag']} need a CUDA GPU; "
                           "torch.cuda.is_available() is False here")
    dev = "cuda" if kind == "cuda" else "cpu"
    results: dict[str, Any] = {}
    for kernel in manifest["kernels"]:
        if only and only not in kernel["uri"]:
            continue
        data = torch.load(root / kernel["inputs"], map_location="cpu", weights_only=True)
        expected = {int(i): t for i, t in data["expected"].items()}
        for cand in kernel["candidates"]:
            entry: dict[str, Any] = {"uri": kernel["uri"], "seconds": None, "error": None}
            try:
                path = root / cand["file"]
                entry["sha256"] = file_sha256(path)
                if entry["sha256"] != cand["sha256"]:
                    raise ValueError(f"{path}: digest differs from the manifest (file changed or truncated)")
                binary = (root / cand["binary"]).read_bytes() if cand.get("binary") else None
                with prebuilt_cuda_binary(binary):
                    module = tvm.runtime.load_module(str(path))
                func = module.get_function("main")
                args = [t.to(dev).clone() for t in data["args"]]
                for index in expected:
                    _poison(args[index])
                func(*args)
                if dev == "cuda":
                    torch.cuda.synchronize()
                entry["max_abs_err"] = check_outputs(args, expected, float(data["atol"]), float(data["rtol"]))
                samples = time_calls(lambda: func(*args), kind, warmup=warmup, repeat=repeat,
                                     min_sample_s=min_sample_s)
                entry["samples"] = samples
                entry["seconds"] = statistics.median(samples)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded as the candidate's error
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc(limit=3)
                entry["seconds"] = None
            results[cand["id"]] = entry
    doc = {
        "format": FORMAT,
        "manifest_sha256": file_sha256(manifest_path),
        "measured_on": {"kind": kind, "device_name": _device_name(kind), "host": platform.node(),
                        "torch": torch.__version__, "tvm": getattr(tvm, "__version__", "?"),
                        "runtime_only": os.environ.get("TVM_USE_RUNTIME_LIB") == "1",
                        "compiler_loaded": compiler_loaded(),
                        "timer": "cuda-events" if kind == "cuda" else "perf_counter",
                        "repeat": repeat, "warmup": warmup,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "candidates": results,
    }
    out_path = Path(out) if out is not None else root / RESULTS
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")  # atomic: an importer never reads half a file
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check and time exported tuning candidates (TVM runtime only).")
    p.add_argument("export_dir")
    p.add_argument("--out", default=None, help="results file (default EXPORT_DIR/results.json)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default=None, help="only kernels whose URI contains this text")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error(f"--repeat: must be >= 1, got {a.repeat}")
    doc = measure_export(a.export_dir, a.out, repeat=a.repeat, warmup=a.warmup, only=a.only)
    ok = sum(1 for e in doc["candidates"].values() if e["seconds"] is not None)
    print(f"measured {ok} of {len(doc['candidates'])} candidates on {doc['measured_on']['device_name']}")
    for cid, e in doc["candidates"].items():
        print(f"  {cid}: " + (f"{e['seconds'] * 1e3:.4f} ms" if e["seconds"] is not None else f"FAILED {e['error']}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
