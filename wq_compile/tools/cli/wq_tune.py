"""``wq-tune``: its parser and main (the work lives in :mod:`wq_compile.tuning`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ...core.models import PRESETS
from ...core.meta8 import DEFAULT_META_BITS, META_BITS
from ...core.quant_fit import DEFAULT_FIT, FITS
from ...kernels.signatures import compiled_fit
from ...kernels.catalog import CUDA_KERNEL_KINDS, DEFAULT_KERNEL_KINDS, KERNEL_KINDS
from .common import exit_on_sigint, fmt, parse_bits, parse_kinds, positive_int


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wq-tune",
        description="Tune the WindowQuant kernels of a model with MetaSchedule and build them into the module cache.",
    )
    p.add_argument("--target", default="llvm",
                   help="llvm | cuda (local GPU) | a TVM tag such as nvidia/nvidia-h100 | a JSON target dict")
    p.add_argument("--model", default="llava-ov-0.5b", choices=sorted(PRESETS))
    p.add_argument("--bits", type=parse_bits, default=(2, 4, 8), help="quantized widths (default 2,4,8)")
    p.add_argument("--fit", default=DEFAULT_FIT, choices=[f for f in FITS if compiled_fit(f)],
                   help=f"scale/zero fit of the quantize kernels: the config's fit (default {DEFAULT_FIT})")
    p.add_argument("--meta-bits", type=int, default=DEFAULT_META_BITS, choices=META_BITS,
                   help=f"scale/zero bits of the 2/1-bit buckets: the config's meta_bits (default {DEFAULT_META_BITS}: "
                        f"the CPU kernels' 8-bit forms and the recode kernels)")
    p.add_argument("--dtype", default="f32", choices=("f32", "f16", "bf16"), help="query/dense dtype of the kernels")
    p.add_argument("--kernels", type=parse_kinds, default=None,
                   help=f"kernel kinds among {','.join(KERNEL_KINDS)} (default: what the target's decoder runs, "
                        f"{','.join(CUDA_KERNEL_KINDS)} on CUDA, {','.join(DEFAULT_KERNEL_KINDS)} elsewhere)")
    p.add_argument("--trials", type=positive_int, default=None,
                   help="valid trials per kernel, existing records included (default per kind: fused 40, decode 24, "
                        "merge 8, quantize 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="token capacity per piece to tune at (default 2048)")
    p.add_argument("--logs-dir", default="tuning_logs")
    p.add_argument("--cache-dir", default=None, help="module cache root (default $WQ_CACHE_DIR or ~/.cache/wq_compile)")
    p.add_argument("--builder-timeout", type=float, default=None, help="seconds per candidate build (default 180)")
    p.add_argument("--knob-rounds", type=int, default=None,
                   help="llvm fused and multi kernels (plain TIR, knob sweep): interleaved timing rounds per candidate "
                        "(default 7; "
                        "a larger value on an existing record adds rounds, finished ones are kept)")
    p.add_argument("--knob-tokens", type=int, default=None,
                   help="llvm fused and multi kernels: tokens per bucket the knobs are timed at (default 8192)")
    p.add_argument("--build-only", action="store_true",
                   help="compile from existing logs (else the default schedule) into the cache; no tuning")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT", help="TVM RPC tracker that serves the target device")
    p.add_argument("--rpc-key", default=None, metavar="KEY", help="device key registered at the tracker")
    o = p.add_argument_group("offline tuning (measure on a machine without the TVM compiler; docs/offline_tuning.md)")
    o.add_argument("--export-candidates", default=None, metavar="DIR",
                   help="sample and build --trials candidates per kernel into DIR (manifest.json, modules, reference "
                        "inputs/outputs, measure_candidates.py); nothing is timed")
    o.add_argument("--import-results", default=None, metavar="RESULTS_JSON",
                   help="record the times measure_candidates.py wrote as tuning records of --logs-dir")
    o.add_argument("--export-dir", default=None, metavar="DIR",
                   help="with --import-results: the export folder (default: the folder of RESULTS_JSON)")
    p.add_argument("--no-progress", action="store_true")
    return p

def format_table(results: Sequence[object]) -> str:
    """kernel | schedule (tuned here / tuned on <tag> / untuned) | valid trials | untuned ms | tuned ms | speedup |
    GB/s (bytes of the inputs read / s / 1e9)."""
    rows = [("kernel", "schedule", "valid", "untuned ms", "tuned ms", "speedup", "GB/s")]
    for r in results:
        rows.append((
            r.spec.uri,  # type: ignore[attr-defined]
            str(r.provenance),  # type: ignore[attr-defined]
            str(r.valid_trials),  # type: ignore[attr-defined]
            fmt(None if r.untuned_s is None else r.untuned_s * 1e3, ".4f"),  # type: ignore[attr-defined]
            fmt(None if r.tuned_s is None else r.tuned_s * 1e3, ".4f"),  # type: ignore[attr-defined]
            fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),  # type: ignore[attr-defined]
            fmt(r.gbps, ".2f"),  # type: ignore[attr-defined]
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)

def main_tune(argv: Sequence[str] | None = None) -> int:
    args = tune_parser().parse_args(argv)
    if (args.rpc is None) != (args.rpc_key is None):
        tune_parser().error("--rpc and --rpc-key go together")
    for flag, value in (("--knob-rounds", args.knob_rounds), ("--knob-tokens", args.knob_tokens)):
        if value is not None and value < 1:
            tune_parser().error(f"{flag}: expected a positive count, got {value}")
    if args.export_candidates or args.import_results:
        from ...tuning.offline import main_offline

        return main_offline(args, tune_parser().error)


    from ...compiler.device import resolve_device
    from ...compiler.measure import MeasurementUnavailableError, RPCSettings
    from ...kernels.catalog import default_kernel_kinds, kernel_specs
    from ...compiler.module_cache import ModuleCacheError
    from ...tuning.settings import NoValidTrialsError, TuneSettings
    from ...tuning.tune import build_only, tune_kernels
    from ...compiler.tuning_log import TuningLogError

    try:
        device = resolve_device(args.target)
        kinds = args.kernels or default_kernel_kinds(device.kind)
        specs = kernel_specs(args.model, bits=args.bits, dtype=args.dtype, kinds=kinds, fit=args.fit,
                             meta_bits=args.meta_bits)
        rpc = RPCSettings.parse(args.rpc, args.rpc_key) if args.rpc else None
    except ValueError as exc:
        print(f"wq-tune: {exc}", file=sys.stderr)
        return 2
    print(f"wq-tune: {len(specs)} kernels of {args.model} for {device.tag} ({device.name}); logs in "
          f"{args.logs_dir}/{device.tag}")
    t0 = time.perf_counter()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, exit_on_sigint) if on_main else None
    try:
        if args.build_only:
            results = build_only(specs, device, logs_dir=args.logs_dir, cache_dir=args.cache_dir)
        else:
            settings = TuneSettings(trials=args.trials, logs_dir=Path(args.logs_dir), seed=args.seed, rpc=rpc)
            if args.tokens:
                settings = replace(settings, n_tokens=args.tokens)
            if args.builder_timeout:
                settings = replace(settings, builder_timeout=args.builder_timeout)
            if args.knob_rounds:
                settings = replace(settings, knob_rounds=args.knob_rounds)
            if args.knob_tokens:
                settings = replace(settings, knob_tokens=args.knob_tokens)
            results = tune_kernels(specs, device, settings, progress=not args.no_progress)
            built = build_only(specs, device, logs_dir=args.logs_dir, cache_dir=args.cache_dir)
            results = [replace(r, provenance=b.provenance) for r, b in zip(results, built)]
    except MeasurementUnavailableError as exc:
        print(f"wq-tune: {exc}", file=sys.stderr)
        return 2
    except (NoValidTrialsError, TuningLogError, ModuleCacheError) as exc:
        print(f"wq-tune: {exc}", file=sys.stderr)
        return 1
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)
    print(format_table(results))
    for r in results:  # what tuning bought, per kernel (default vs best vs worst candidate, same measurement)
        if getattr(r, "bought", None) is not None:
            print(r.bought.line(r.spec.uri))  # type: ignore[attr-defined]
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0
