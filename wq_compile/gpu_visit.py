"""The prepared GPU visit: one command that verifies, measures and benchmarks, within a few minutes of device time.

``python -m wq_compile.gpu_visit --export DIR [--export DIR2] --out OUT [--dry-run]`` runs these steps and writes
``OUT/visit.json``, ``OUT/bench.csv``, ``OUT/results_<n>.json`` and ``OUT/visit.log``:

1. ``environment``: torch/CUDA/GPU name, whether FlashInfer and Triton import.
2. ``measure``: every exported candidate is loaded with the TVM runtime only, checked against the stored torch
   reference outputs and timed (:mod:`wq_compile.offline_measure`); bring ``results_<n>.json`` back and import it
   with ``wq-tune --import-results``. A candidate that disagrees with the reference gets no time.
3. ``bench``: decode attention at each length for the 0.5B and 7B shapes: torch SDPA on the dense fp16 cache
   (FlashAttention backend, GQA as ``enable_gqa`` and with the query group folded into rows), torch dequantize-all
   + SDPA (int4 keys/values, the reference format), FlashInfer's single decode if importable, and each exported
   WindowQuant module (``bench`` entries of the manifest, built by ``export_candidates(bench_tokens=...)``).

Only torch, the TVM runtime and the pure-torch modules of this package (quant, spec, models) are imported, so it
runs where TVM's compiler is absent (``TVM_USE_RUNTIME_LIB=1``). ``--dry-run`` plans the steps, checks every export
folder (manifest, file digests), runs the steps that do not need a GPU on the CPU (an llvm export is measured;
benchmarks at ``--dry-lengths``) and lists the steps that need a GPU. :func:`assemble_bundle` (``bundle``
subcommand) collects what must be carried to a GPU machine without TVM and reports its size against the limit.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import offline_measure
from .models import get_preset

DEFAULT_LENGTHS = (8192, 32768, 65536)
DEFAULT_MODELS = ("llava-ov-0.5b", "llava-ov-7b")
#: What one device call may carry (tree + carried paths), from the device README.
CARRY_LIMIT_BYTES = 64 * 2**20


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
    steps.append(Step("bench", "decode at each length: SDPA flash fp16 (gqa, folded), dequantize-all + SDPA, "
                      "FlashInfer, WindowQuant modules", True, True))
    if dry_run:
        steps[-1] = Step("bench", steps[-1].detail + " (dry run: CPU, --dry-lengths, CPU-built modules only)", True,
                         True)
    return steps


def _sdpa_backend(dev: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if dev == "cuda" else sdpa_kernel(SDPBackend.MATH)


def _timer(dev: str, repeat: int) -> Callable[[Callable[[], Any]], float]:
    kind = "cuda" if dev == "cuda" else "llvm"
    return lambda fn: statistics.median(offline_measure.time_calls(fn, kind, warmup=3, repeat=repeat,
                                                                   min_sample_s=0.01))


def bench_baselines(model: str, tokens: int, dev: str, repeat: int) -> list[dict[str, Any]]:
    """Every peer at its fastest on one decode step (batch 1), rows with seconds, GB/s and error vs fp32."""
    import torch.nn.functional as F

    from .quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values
    from .spec import QuantSpec

    p = get_preset(model)
    hq, hkv, d = p.num_q_heads, p.num_kv_heads, p.head_dim
    g = hq // hkv
    dtype = torch.float16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    q = torch.randn(1, hq, 1, d, generator=gen).to(dev, dtype)
    k = torch.randn(1, hkv, tokens, d, generator=gen).to(dev, dtype)
    v = torch.randn(1, hkv, tokens, d, generator=gen).to(dev, dtype)
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                         v.double().repeat_interleave(g, 1))
    dense_bytes = 2 * k.numel() * k.element_size()
    timer = _timer(dev, repeat)
    rows = []

    def row(method: str, fn: Callable[[], torch.Tensor], nbytes: int, note: str = "") -> None:
        try:
            out = fn().reshape(ref.shape)
            err = float((out.double() - ref).norm() / ref.norm())
            secs = timer(fn)
            rows.append({"model": model, "tokens": tokens, "method": method, "seconds": secs,
                         "gbps": nbytes / secs / 1e9, "rel_err": err, "bytes": nbytes, "note": note, "error": None})
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            rows.append({"model": model, "tokens": tokens, "method": method, "seconds": None, "gbps": None,
                         "rel_err": None, "bytes": nbytes, "note": note, "error": f"{type(exc).__name__}: {exc}"})

    backend = "flash" if dev == "cuda" else "math (cpu)"
    with _sdpa_backend(dev):
        row("sdpa_dense_gqa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), dense_bytes,
            backend)
        qf = q.reshape(1, hkv, g, d)
        row("sdpa_dense_folded", lambda: F.scaled_dot_product_attention(qf, k, v), dense_bytes, backend)
    qs = QuantSpec(4, k_group=28, v_group=min(64, d))
    kq = quantize_keys(k.float().reshape(hkv, tokens, d), qs)
    vq = quantize_values(v.float().reshape(hkv, tokens, d), qs)
    q_bytes = sum(t.numel() * t.element_size() for t in (kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero))

    def dequant_sdpa() -> torch.Tensor:
        kd = dequantize_keys(kq, tokens).to(dtype).unsqueeze(0)
        vd = dequantize_values(vq).to(dtype).unsqueeze(0)
        with _sdpa_backend(dev):
            return F.scaled_dot_product_attention(q.reshape(1, hkv, g, d), kd, vd)

    row("dequant_all_int4_sdpa", dequant_sdpa, q_bytes, "torch dequantize of every token, then SDPA")
    if dev == "cuda" and importlib.util.find_spec("flashinfer") is not None:
        import flashinfer

        kn, vn = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
        row("flashinfer_decode_fp16", lambda: flashinfer.single_decode_with_kv_cache(q[0, :, 0], kn, vn),
            dense_bytes, "single_decode_with_kv_cache, NHD")
    return rows


def _module_args(spec_args: list[dict[str, Any]], dev: str, seed: int) -> list[Any]:
    """Arguments for a WindowQuant module from the manifest's description (random floats, random code words)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[Any] = []
    for a in spec_args:
        if a["scalar"] is not None:
            out.append(a["scalar"])
            continue
        dt = getattr(torch, a["dtype"])
        if a["values"] is not None:
            t = torch.tensor(a["values"], dtype=dt)
        elif dt.is_floating_point:
            t = torch.rand(a["shape"], generator=gen).to(dt) * (0.1 if a["name"].endswith("scale") else 1.0)
        else:
            t = torch.randint(-2**31, 2**31 - 1, a["shape"], generator=gen, dtype=torch.int64).to(dt)
        out.append(t.to(dev))
    return out


def bench_modules(export: Path, manifest: dict[str, Any], lengths: Sequence[int], dev: str,
                  repeat: int) -> list[dict[str, Any]]:
    """Time each exported WindowQuant module at the benchmark lengths it was exported for."""
    import tvm

    rows = []
    for kernel in manifest["kernels"]:
        bench = kernel.get("bench")
        if not bench:
            continue
        binary = (export / bench["binary"]).read_bytes() if bench.get("binary") else None
        with offline_measure.prebuilt_cuda_binary(binary):
            func = tvm.runtime.load_module(str(export / bench["file"])).get_function(kernel["uri"])
        for total in lengths:
            at = bench["lengths"].get(str(total))
            if at is None:
                continue
            args = _module_args(at["args"], dev, seed=total)
            try:
                func(*args)
                if dev == "cuda":
                    torch.cuda.synchronize()
                outs = [t for t, a in zip(args, at["args"]) if a["output"]]
                if not all(torch.isfinite(t).all() for t in outs if t.dtype.is_floating_point):
                    raise AssertionError("non-finite output")
                secs = _timer(dev, repeat)(lambda: func(*args))
                rows.append({"model": kernel["spec"]["num_q_heads"], "tokens": at["tokens"],
                             "method": f"windowquant:{kernel['uri']}", "seconds": secs,
                             "gbps": at["bytes_read"] / secs / 1e9, "rel_err": None, "bytes": at["bytes_read"],
                             "note": bench["schedule"], "error": None})
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": kernel["spec"]["num_q_heads"], "tokens": at["tokens"],
                             "method": f"windowquant:{kernel['uri']}", "seconds": None, "gbps": None,
                             "rel_err": None, "bytes": at["bytes_read"], "note": bench["schedule"],
                             "error": f"{type(exc).__name__}: {exc}"})
    return rows


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


# ---------------------------------------------------------------------------------------------------------------------
# What to carry to a GPU machine without TVM
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleReport:
    """Sizes (bytes) of an assembled bundle's parts and whether it fits one device call."""

    root: Path
    parts: dict[str, int]
    total: int
    limit: int
    ffi_python_tag: str

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


#: Parts of the tvm package the runtime does not need: the compiler library, C++ sources and headers, caches.
_TVM_SKIP = ("libtvm_compiler.so", "3rdparty", "src", "include", "__pycache__", "*.pyc")


def assemble_bundle(out: str | os.PathLike, exports: Sequence[Path] = (), *, ffi_wheel: Path | None = None,
                    limit: int = CARRY_LIMIT_BYTES) -> BundleReport:
    """Copy the runtime-only tvm package (no ``libtvm_compiler.so``), tvm-ffi (from ``ffi_wheel``, e.g. the cp312
    wheel the GPU machine's Python needs, else this environment's package) and the export folders into
    ``out/site`` and ``out/exports/<i>``; report the sizes against ``limit`` (the tree that travels adds to it)."""
    import tvm as _tvm_probe  # noqa: F401 - only to locate the installed package

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    site = out / "site"
    tvm_src = Path(importlib.util.find_spec("tvm").origin).parent  # type: ignore[union-attr, arg-type]
    shutil.copytree(tvm_src, site / "tvm", ignore=shutil.ignore_patterns(*_TVM_SKIP))
    if ffi_wheel is not None:
        with zipfile.ZipFile(ffi_wheel) as z:
            z.extractall(site)
        tag = Path(ffi_wheel).name.split("-")[2]
    else:
        ffi_src = Path(importlib.util.find_spec("tvm_ffi").origin).parent  # type: ignore[union-attr, arg-type]
        shutil.copytree(ffi_src, site / "tvm_ffi", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for i, export in enumerate(exports):
        shutil.copytree(export, out / "exports" / str(i))
    parts = {"tvm (runtime only)": _tree_size(site / "tvm"),
             "tvm_ffi": sum(_tree_size(p) for p in site.iterdir() if p.name.startswith(("tvm_ffi", "apache_tvm"))),
             "exports": _tree_size(out / "exports") if exports else 0}
    return BundleReport(out, parts, sum(parts.values()), limit, tag)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wq_compile.gpu_visit", description=__doc__.split("\n\n")[0])
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
