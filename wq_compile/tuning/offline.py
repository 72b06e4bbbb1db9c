"""Offline tuning: MetaSchedule proposes and builds candidates here, another machine measures them with the TVM
runtime only, and the measured times come back as real records.

Why: the GPU machine may have torch but no TVM compiler and no network, and only a few MB can be carried there
(docs/TVM_NOTES.md). So:

1. :func:`export_candidates` (``wq-tune --export-candidates DIR``): per kernel, the target's design space is sampled
   by MetaSchedule's evolutionary search (seeded by the records already in the kernel's log, its XGBoost cost model
   trained on them) through ``TuneContext.generate_measure_candidates``, nothing is timed; each candidate is built
   (llvm: a shared library; CUDA: the host library with CUDA source plus an nvcc fatbin for the target arch), and
   ``manifest.json`` holds its workload hash, trace (MetaSchedule JSON), spec, sizes, file and digest. The kernel's
   inputs and the torch reference's outputs go to ``inputs/<uri>.pt``; the measuring script goes along as
   ``measure_candidates.py`` (:mod:`wq_compile.tuning.offline_measure`).
2. ``TVM_USE_RUNTIME_LIB=1 python DIR/measure_candidates.py DIR`` on the measuring machine writes ``results.json``.
3. :func:`import_results` (``wq-tune --import-results DIR/results.json``): every candidate that was measured and
   matched the reference becomes a record in ``tuning_logs/<device-tag>/<uri>/`` (through
   :mod:`wq_compile.compiler.tuning_log`), ``meta.json`` saying it came from an offline measurement on the named device.
   Failed or unmeasured candidates are never recorded. The next export reads those records.

This module is the export (and ``wq-tune``'s offline flags); the import is :mod:`wq_compile.tuning.offline_import`, the
folder's format (manifest, traces) :mod:`wq_compile.tuning.offline_format`; every public name is importable from here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import offline_measure
from ..compiler import cuda_binary, tuning_log
from ..compiler.build import KernelDef, compile_cuda_binary, cuda_build_flags, cuda_source, kernel_def
from ..compiler.device import Device, resolve_device, versions
from ..compiler.measure import example_args
from .metaschedule import build_candidate, task_logger
from .ms_task import replay, tune_context
from .offline_format import CUDA_BINARY_HELPER, FORMAT, MANIFEST, MEASURE_SCRIPT, RESULTS, OfflineError, read_manifest, replay_json, trace_to_json, workload_hash, write_json
from .offline_import import ImportSummary, import_results
from ..core.spec import KernelSpec
from ..kernels.signatures import spec_fit
from .settings import TuneSettings

__all__ = ["FORMAT", "MANIFEST", "MEASURE_SCRIPT", "RESULTS", "ExportSummary", "ImportSummary", "OfflineError",
           "export_candidates", "import_results", "main_offline", "read_manifest", "replay_json", "trace_to_json",
           "workload_hash"]


@dataclass(frozen=True)
class ExportSummary:
    """What one export wrote: the folder, candidates per kernel URI, and how many seeded records each used."""

    out_dir: Path
    candidates: Mapping[str, int]
    seeded_from: Mapping[str, int]


def _log_sizes(kdef: KernelDef, device: Device, folder: Path) -> dict[str, int]:
    """The log's own tuning sizes when it exists (records are keyed on that workload), else the kernel's."""
    if (folder / tuning_log.META_FILE).exists():
        meta = tuning_log.read_meta(folder, device)
        sizes = {str(k): int(v) for k, v in meta.get("tuning_sizes", {}).items()}
        if set(sizes) == set(kdef.signature.symbols):
            return sizes
    return dict(kdef.sizes)


def _trained_cost_model(ctx: Any, workload: Any, records: Sequence[Any]) -> Any:
    """An XGBoost cost model trained on the measured records of the log (none: an untrained one)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    model = ms.cost_model.XGBModel(num_warmup_samples=0)
    if records:
        candidates, results = [], []
        for r in records:
            sch = s_tir.Schedule(workload)
            r.trace.apply_to_schedule(sch, remove_postproc=False)
            candidates.append(ms.MeasureCandidate(sch, ArgInfo.from_prim_func(workload["main"])))
            results.append(ms.runner.RunnerResult([float(x) for x in r.run_secs], None))
        model.update(ctx, candidates, results)
    return model


def _sample_candidates(kdef: KernelDef, device: Device, workload: Any, n: int, settings: TuneSettings,
                       folder: Path, work_dir: Path) -> tuple[list[Any], int]:
    """Up to ``n`` new schedules from MetaSchedule's evolutionary search (no measurement): ``(schedules, number of
    log records that seeded the search)``."""
    from tvm.s_tir import meta_schedule as ms

    logger, handler = task_logger(work_dir, kdef.spec.uri)
    try:
        ctx = tune_context(kdef, device, workload, settings, settings.seed, logger)
        records: list[Any] = []
        if (folder / tuning_log.META_FILE).exists():
            db = tuning_log.open_database(folder, device)
            records = tuning_log.valid_records(db, workload)
        else:
            db = ms.database.MemoryDatabase()
        # The search hands back measured records it was seeded with too: ask for that many more, drop them below.
        want = n + len(records)
        ctx.pre_tuning(max_trials=want, num_trials_per_iter=want, design_spaces=ctx.generate_design_space(),
                       database=db, cost_model=_trained_cost_model(ctx, workload, records))
        found = ctx.generate_measure_candidates() or []
        ctx.post_tuning()
    finally:
        logger.removeHandler(handler)
        handler.close()
    seen = {workload_hash(r_mod) for r_mod in (replay(workload, r.trace).mod for r in records)}
    out = []
    for cand in found:
        h = workload_hash(cand.sch.mod)
        if h not in seen:
            seen.add(h)
            out.append(cand.sch)
    return out[:n], len(records)


def _reference_data(kdef: KernelDef, sizes: Mapping[str, int], seed: int) -> dict[str, Any]:
    """Static inputs of the workload (scalars are folded into it) and the reference outputs by argument index."""
    import torch

    from ..compiler.check import TOLERANCE, reference_outputs

    sig = kdef.signature
    args = example_args(sig, sizes, scalars=kdef.scalars, seed=seed)
    if kdef.spec.kind == "quantize":  # dense k, v: a realistic spread, as the runtime check uses
        gen = torch.Generator().manual_seed(seed)
        for i in (0, 1):
            args[i] = torch.randn(args[i].shape, generator=gen).to(args[i].dtype)
    named = dict(zip(sig.names, args))
    want = reference_outputs(kdef.spec, named)
    static = [a for a, d in zip(args, sig.args) if not d.is_scalar]
    names = [d.name for d in sig.args if not d.is_scalar]
    expected = {names.index(name): t.to(dict(zip(names, static))[name].dtype).contiguous()
                for name, t in want.items()}
    if kdef.spec.kind == "quantize":  # exact, but for a fitted key scale/zero: within two fp16 ulps
        atol, rtol = (1e-7, 2e-3) if spec_fit(kdef.spec) != "minmax" else (0.0, 0.0)
    else:
        atol, rtol = TOLERANCE.get(kdef.spec.dtype, TOLERANCE["f32"])
    return {"args": [a.contiguous() for a in static], "expected": expected, "atol": atol, "rtol": rtol,
            "names": names}


def _build_and_write(sch: Any, device: Device, out_dir: Path, stem: str, spec: KernelSpec) -> dict[str, Any]:
    """Build one candidate and write its module (and CUDA fatbin, nvcc'd as the build does for ``spec``): the
    manifest fields of its files."""
    with device.target:
        lib = build_candidate(sch.mod, device.target)
    path = out_dir / "candidates" / f"{stem}.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(path))
    entry = {"file": str(path.relative_to(out_dir)), "sha256": offline_measure.file_sha256(path), "binary": None}
    if device.kind == "cuda":
        binary = out_dir / "candidates" / f"{stem}.fatbin"
        binary.write_bytes(compile_cuda_binary(cuda_source(lib), device, kernel=stem, spec=spec))
        entry.update(binary=str(binary.relative_to(out_dir)), binary_sha256=offline_measure.file_sha256(binary))
    return entry


def _bench_module(spec: KernelSpec, device: Device, out: Path, settings: TuneSettings,
                  bench_tokens: Sequence[int]) -> dict[str, Any]:
    """The symbolic module the runtime would use (best log record, else the default schedule) for benchmarks at
    any length, with each argument's shape and the lengths' values at every benchmark length (so the measuring side
    needs no signature code): ``bench_tokens`` counts the cached tokens, split evenly over the quantized pieces."""
    from ..compiler.build import build_kernel
    from ..kernels import attention, example_sizes, piece_fields

    built = build_kernel(spec, device, logs_dir=settings.logs_dir)
    path = out / "modules" / f"{spec.uri}.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    built.module.export_library(str(path))
    entry: dict[str, Any] = {"file": str(path.relative_to(out)), "sha256": offline_measure.file_sha256(path),
                             "binary": None, "schedule": str(built.provenance), "lengths": {}}
    if built.binary is not None:
        binary = path.with_suffix(".fatbin")
        binary.write_bytes(built.binary)
        entry["binary"] = str(binary.relative_to(out))
    n_pieces = max(1, sum(1 for p in attention.pieces(spec) if p.quantized))
    scalars = {"sm_scale": spec.head_dim**-0.5}
    for total in bench_tokens:
        sizes = example_sizes(spec, max(1, total // n_pieces))
        args = example_args(built.signature, sizes, scalars=scalars)
        caps = {p.tag: sizes[p.n_sym] for p in attention.pieces(spec)}
        for i, d in enumerate(built.signature.args):  # every length is its own piece's full capacity
            if d.name.endswith("lens"):
                args[i] = args[i].fill_(caps.get(piece_fields(d.name)[0]) or next(iter(caps.values())))
        entry["lengths"][str(total)] = {
            "tokens": sum(sizes[p.n_sym] for p in attention.pieces(spec) if p.quantized),
            "bytes_read": built.signature.nbytes(sizes),
            "args": [{"name": d.name, "output": d.is_output, "scalar": a if d.is_scalar else None,
                      "dtype": None if d.is_scalar else str(a.dtype).replace("torch.", ""),
                      "shape": None if d.is_scalar else list(a.shape),
                      "values": a.tolist() if d.name.endswith("lens") else None}
                     for d, a in zip(built.signature.args, args)]}
    return entry


def export_candidates(specs: Sequence[KernelSpec | KernelDef], device: Device | str, out_dir: str | Path,
                      settings: TuneSettings = TuneSettings(), *, target_arg: str | None = None,
                      include_default: bool = True, bench_tokens: Sequence[int] = ()) -> ExportSummary:
    """Sample and build ``settings.trials_for(spec)`` new candidates per kernel into ``out_dir`` (see module doc);
    the default schedule is added as candidate ``000`` when ``include_default``. Nothing is timed."""
    from tvm import s_tir
    import torch

    device = resolve_device(target_arg or device) if not isinstance(device, Device) else device
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise OfflineError(f"out_dir: {out} already holds a {MANIFEST}; export into a new folder (a manifest "
                           "and its results belong together)")
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    kernels_doc, counts, seeded = [], {}, {}
    for i, kernel in enumerate(specs):
        kdef = kernel if isinstance(kernel, KernelDef) else kernel_def(kernel, device, settings.n_tokens)
        spec = kdef.spec
        n = settings.trials_for(spec)
        if n < 1:
            raise ValueError(f"trials: must be >= 1, got {n}")
        folder = tuning_log.log_dir(settings.logs_dir, device.tag, spec.uri)
        sizes = _log_sizes(kdef, device, folder)
        workload = kdef.workload(sizes)
        schedules, seeded[spec.uri] = _sample_candidates(kdef, device, workload, n, settings, folder,
                                                         settings.work_dir_for(device, spec))
        roles = ["sampled"] * len(schedules)
        if include_default and not seeded[spec.uri]:  # the default's time is known once a round was imported
            sch = s_tir.Schedule(workload)
            kdef.schedules.default_schedule(sch, spec)
            schedules.insert(0, sch)
            roles.insert(0, "default")
        data = _reference_data(kdef, sizes, seed=settings.seed + 11 * i)
        inputs = out / "inputs" / f"{spec.uri}.pt"
        torch.save({k: data[k] for k in ("args", "expected", "atol", "rtol")}, inputs)
        cands = []
        for j, (sch, role) in enumerate(zip(schedules, roles)):
            entry = {"id": f"{spec.uri}/{j:03d}", "role": role, "trace": trace_to_json(workload, sch.trace, device)}
            entry.update(_build_and_write(sch, device, out, f"{spec.uri}__{j:03d}", spec))
            cands.append(entry)
        counts[spec.uri] = len(cands)
        kernels_doc.append({
            "uri": spec.uri, "spec": tuning_log.spec_fields(spec), "sizes": sizes, "scalars": dict(kdef.scalars),
            "workload_hash": workload_hash(workload), "inputs": str(inputs.relative_to(out)),
            "arg_names": data["names"], "outputs": sorted(data["expected"]), "seeded_from_records": seeded[spec.uri],
            "nvcc_flags": cuda_build_flags(spec, device) if device.kind == "cuda" else None, "candidates": cands,
        })
        if bench_tokens and spec.kind in ("fused", "decode") and not isinstance(kernel, KernelDef):
            kernels_doc[-1]["bench"] = _bench_module(spec, device, out, settings, bench_tokens)
    doc = {"format": FORMAT, "created": tuning_log.timestamp(), "versions": versions(),
           "device": {"tag": device.tag, "name": device.name, "kind": device.kind, "arch": device.arch,
                      "target": device.target_json, "target_arg": target_arg or device.target_json},
           "kernels": kernels_doc}
    write_json(out / MANIFEST, doc)
    shutil.copyfile(Path(offline_measure.__file__), out / MEASURE_SCRIPT)
    shutil.copyfile(Path(cuda_binary.__file__), out / CUDA_BINARY_HELPER)  # the script imports it when run alone
    return ExportSummary(out, counts, seeded)


def main_offline(args: Any, error: Any) -> int:
    """``wq-tune --export-candidates DIR`` / ``--import-results FILE`` (parsed by :mod:`wq_compile.tools.cli`)."""
    import sys
    from dataclasses import replace

    from ..kernels.catalog import default_kernel_kinds, kernel_specs
    from ..compiler.tuning_log import TuningLogError

    if args.export_candidates and args.import_results:
        error("--export-candidates and --import-results: one at a time (measure in between)")
    if args.export_dir and not args.import_results:
        error("--export-dir goes with --import-results")
    if args.build_only or args.rpc:
        error("--export-candidates/--import-results: no --build-only or --rpc (offline means measured elsewhere)")
    if args.trials is not None and args.trials < 1:
        error(f"--trials: must be >= 1, got {args.trials}")
    try:
        if args.import_results:
            summary = import_results(args.import_results, args.export_dir, args.logs_dir)
            for uri, n in summary.recorded.items():
                bad = summary.skipped[uri]
                print(f"{uri}: {n} measured records -> {summary.log_dirs[uri]}"
                      + (f"; not recorded (failed or unmeasured): {', '.join(bad)}" if bad else ""))
            return 0 if any(summary.recorded.values()) else 1
        device = resolve_device(args.target)
        kinds = args.kernels or default_kernel_kinds(device.kind)
        specs = kernel_specs(args.model, bits=args.bits, dtype=args.dtype, kinds=kinds)
        settings = TuneSettings(trials=args.trials if args.trials is not None else 8, logs_dir=Path(args.logs_dir),
                                seed=args.seed)
        if args.tokens:
            settings = replace(settings, n_tokens=args.tokens)
        # A GPU export also carries the runtime's module of each attention kernel, for gpu_visit's benchmarks.
        from .gpu_visit import DEFAULT_LENGTHS

        bench = DEFAULT_LENGTHS if device.kind == "cuda" else ()
        out = export_candidates(specs, device, args.export_candidates, settings, target_arg=args.target,
                                bench_tokens=bench)
    except (OfflineError, TuningLogError, ValueError, FileNotFoundError) as exc:
        print(f"wq-tune: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    for uri, n in out.candidates.items():
        print(f"{uri}: {n} candidates (search seeded by {out.seeded_from[uri]} measured records)")
    print(f"wrote {out.out_dir}/{MANIFEST}; measure there with: TVM_USE_RUNTIME_LIB=1 python "
          f"{out.out_dir}/{MEASURE_SCRIPT} {out.out_dir}; then: wq-tune --import-results "
          f"{out.out_dir}/{RESULTS} --logs-dir {args.logs_dir}")
    return 0
