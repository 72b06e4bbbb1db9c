"""``wq-bench``: its parser and main (the benchmarks live in :mod:`wq_compile.tools.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ...core.models import PRESETS
from ...core.quant_fit import FITS


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
    p.add_argument("--target", default="llvm",
                   help="llvm (this host), a JSON llvm target to measure another ISA class on this machine, e.g. "
                        "'{\"kind\": \"llvm\", \"mcpu\": \"haswell\", \"num-cores\": 2}' for AVX2 (run with "
                        "ATEN_CPU_CAPABILITY=avx2 so torch's peers use the same ISA), or a CUDA target")
    p.add_argument("--tokens", default=None, help="cached token counts (default 2048,8192,32768; --multi: 8192,32768)")
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
    p.add_argument("--fit", default="", choices=("",) + FITS,
                   help="--e2e: WindowQuantConfig(fit=...) (default: the config's default fit)")
    p.add_argument("--conversation", action="store_true",
                   help="--e2e: a three-turn conversation instead (clip of --frames, follow-up question, second "
                        "clip): TTFT and ms/token per turn, DynamicCache, StaticCache and WindowQuantCache")
    p.add_argument("--multi", action="store_true",
                   help="several new query tokens per step (follow-ups, draft verification): the multi-token kernel "
                        "over int4 buckets vs SDPA on the dense cache (fp32/bf16, enable_gqa, repeat_interleave'd "
                        "K/V, query group folded) and the paths it replaced, at --steps x --tokens; writes multi.csv")
    p.add_argument("--steps", default="8,40,64", help="--multi: new query tokens per step")
    p.add_argument("--token-granular", action="store_true",
                   help="claim (2): reordered buckets (fused kernel) vs token-granular mixed precision in place, "
                        "decode latency at equal average bits (--tokens, default 2048,8192,32768) and search time "
                        "per window vs per key group (--frames); writes granularity.csv/.png")
    return p

def _counts(text: str, flag: str) -> list[int]:
    """Positive integers from a comma-separated flag value (a parser error otherwise)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        bench_parser().error(f"{flag}: expected positive integers such as 2048,8192, got {text!r}")
    return values


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
        from ..bench import e2e

        bad = [m for m in models if m not in e2e.MODELS]
        if bad:
            bench_parser().error(f"--model: --e2e builds {sorted(e2e.MODELS)}, not {bad}")
        for name, value, low in (("--frames", args.frames, 1), ("--new-tokens", args.new_tokens, 2),
                                 ("--layers", args.layers or 1, 1)):
            if value < low:
                bench_parser().error(f"{name}: expected at least {low}, got {value}")
        if args.conversation:
            from ..bench import conversation

            turns = [r for m in models for r in conversation.measure(m, args.layers, frames=args.frames,
                                                                      new_tokens=args.new_tokens)]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            conversation.write_csv(turns, Path(args.out) / "conversation.csv")
            print(conversation.format_table(turns))
            return 0
        rows = e2e.run(models, frames=args.frames, new_tokens=args.new_tokens, repeats=args.repeats,
                       layers=args.layers, int8_dots=args.int8_dots, fit=args.fit)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        e2e.write_csv(rows, Path(args.out) / "e2e.csv")
        print(e2e.format_table(rows))
        print(f"wrote {args.out}/e2e.csv")
        return 0
    tokens = _counts(args.tokens or ("8192,32768" if args.multi else "2048,8192,32768"), "--tokens")
    if args.multi:
        from ..bench import multi

        rows = multi.run(models[0], tokens, _counts(args.steps, "--steps"), repeats=args.repeats,
                         logs_dir=args.logs_dir, out_dir=args.out, threads=args.threads)
        print(multi.format_table(rows))
        print(f"wrote {args.out}/multi.csv and {args.out}/multi.md")
        return 0
    if args.token_granular:
        from ..bench import token_granular as tg
        from ...runtime.library import KernelLibrary

        lib = KernelLibrary(args.target, logs_dir=args.logs_dir) if args.logs_dir else KernelLibrary(args.target)
        rows = tg.run_decode(models[0], tuple(tokens), repeats=args.repeats, library=lib)
        srows = tg.run_search(models[0], frames=args.frames, repeats=3)
        tg.write(rows, srows, args.out, f"token-granular vs reordered, {models[0]}, {args.target}")
        print(tg.format_tables(rows, srows))
        print(f"wrote {args.out}/granularity.csv, granularity_search.csv and granularity.png")
        return 0
    if args.search:
        from ..bench import search as search_bench

        for name in models:
            t = search_bench.run(name, frames=args.frames, repeats=max(3, min(args.repeats, 10)))
            print(f"window search, {t.model}: {t.frames} frames x 196 tokens, {t.layers} layers (median of runs)")
            print(f"  attention scores  {t.score_ms:8.1f} ms\n  errors + allocate {t.search_ms:8.1f} ms\n"
                  f"  quantize + reorder{t.store_ms:8.1f} ms (torch reference quantizer)")
        return 0
    from ..bench.decode import MIXES, format_table, run

    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    bad = [m for m in mixes if m not in MIXES]
    if bad or not mixes:
        bench_parser().error(f"--mixes: unknown {bad or args.mixes!r}; expected some of {sorted(MIXES)}")
    peaks: list[str] = []
    rows = run(models[0], tokens, mixes, repeats=args.repeats, target=args.target, logs_dir=args.logs_dir,
               out_dir=args.out, threads=args.threads, peers=not args.no_peers, models=models, report=peaks.append)
    print(format_table(rows))
    print(*peaks, sep="\n")
    print(isa_note(args.target))
    print(f"wrote {args.out}/decode.csv and {args.out}/decode.png")
    return 0


def isa_note(target: str) -> str:
    """Which ISA the compiled kernels and torch's peers ran with: a ratio is fair only when they match (torch picks
    its kernels by ``ATEN_CPU_CAPABILITY``, read when torch is imported)."""
    import torch

    from ...compiler.device import resolve_device

    device = resolve_device(target)
    cap = torch.backends.cpu.get_cpu_capability()
    note = f"kernels: {device.tag} ({device.isa}); torch CPU capability: {cap}"
    want = device.isa.replace("x86_64-", "")
    if device.kind == "llvm" and want in ("avx2", "avx512") and cap.lower() != want:
        note += f" -- torch's peers did not run at the kernels' ISA: rerun with ATEN_CPU_CAPABILITY={want}"
    return note
