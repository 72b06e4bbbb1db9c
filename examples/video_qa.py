"""Video question answering on a WindowQuant cache.

Without ``--model-path`` it builds a tiny random-weight LLaVA-OneVision from a config (no download) and a random
video; with ``--model-path`` it loads a local checkpoint folder (e.g. llava-onevision-qwen2-0.5b-ov-hf) through
``from_pretrained``, and its tokenizer, chat template and pixel settings (applied here, no torchvision needed);
``--video`` reads a video file with PyAV. Prints the generated tokens, KV memory (dense vs WindowQuant), decode
ms/token and the plan.

    python examples/video_qa.py                      # tiny model, CPU, ~1 minute with module build
    python examples/video_qa.py --model-path ~/models/llava-onevision-qwen2-0.5b-ov-hf --video clip.mp4 --frames 32
    python -m wq_compile.integrations.checkpoint /tmp/tiny-ov   # a tiny local folder laid out like a hub one

The default budget is 4 effective bits: at 3, eight frames cannot afford a single int4 frame (uniform int2 already
costs 2.82 bits with scale/zero, one int4 frame of eight adds 0.25), so every frame would get int2. The plan is
printed per layer with the scores that drove it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import DynamicCache

import wq_compile
from wq_compile import WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.tiny import Prompt, tiny_model, video_prompt
from wq_compile.policy import format_plan


def load(args: argparse.Namespace) -> tuple[object, Prompt, object]:
    """The model, the prompt and the tokenizer (``None`` for the tiny model, whose token ids are made up)."""
    if args.model_path is None:
        model = tiny_model(wq_compile.ATTN_IMPLEMENTATION)
        return model, video_prompt(model, [args.frames]), None
    # The folder's tokenizer, chat template and pixel settings, applied without torchvision (see preprocess.py).
    from wq_compile.integrations.preprocess import (
        load_checkpoint,
        random_frames,
        video_question,
    )
    from wq_compile.integrations.video import read_video

    frames = read_video(args.video, args.frames) if args.video is not None else None  # a bad file fails first
    model, processor = load_checkpoint(args.model_path, wq_compile.ATTN_IMPLEMENTATION)
    if frames is None:
        frames = random_frames(args.frames, processor.pixels.height)
    return model, video_question(model, processor, frames, args.question), processor.tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="local LLaVA-OneVision folder (default: tiny random model)")
    ap.add_argument("--video", default=None, help="video file (any format FFmpeg reads) sampled uniformly to "
                                                   "--frames frames; needs --model-path (default: random frames)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--avg-bits", type=float, default=4.0, help="effective bits per element (scale/zero included)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--backend", choices=["auto", "tvm", "reference"], default="auto")
    ap.add_argument("--question", default="What happens in this video?")
    args = ap.parse_args()
    if args.video is not None and args.model_path is None:
        ap.error("--video needs --model-path: the tiny model has no tokenizer or pixel settings (write a tiny "
                 "checkpoint folder with: python -m wq_compile.integrations.checkpoint DIR)")
    torch.set_grad_enabled(False)
    try:
        model, prompt, tokenizer = load(args)
    except (OSError, ValueError) as exc:  # missing or unreadable video / folder: one line, no traceback
        sys.exit(f"video_qa: {exc}")
    n_in = prompt.inputs["input_ids"].shape[1]

    model.generate(**prompt.inputs, cache=DynamicCache(config=model.config), max_new_tokens=2, do_sample=False)
    dense = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    ref = model.generate(**prompt.inputs, cache=dense, max_new_tokens=args.new_tokens, do_sample=False)
    t_dense = time.perf_counter() - t0

    wq = WindowQuantConfig(avg_bits=args.avg_bits, backend=args.backend)
    # Load (or build, the first time) the compiled modules once; every cache below shares them.
    kernels = WindowQuantCache(model.config, wq).backend(model.dtype, model.device)
    model.generate(**prompt.inputs, cache=WindowQuantCache(model.config, wq, backend=kernels).prepare(**prompt.inputs),
                   max_new_tokens=2, do_sample=False)  # warm-up
    cache = WindowQuantCache(model.config, wq, backend=kernels).prepare(**prompt.inputs)
    t0 = time.perf_counter()
    out = model.generate(**prompt.inputs, cache=cache, max_new_tokens=args.new_tokens, do_sample=False)
    t_wq = time.perf_counter() - t0

    new = out[0, n_in:].tolist()
    print(f"prompt: {n_in} tokens, {args.frames} frames; generated {len(new)} tokens")
    print(f"WindowQuant tokens: {new}")
    if tokenizer is not None:
        print(f"WindowQuant answer: {tokenizer.decode(new, skip_special_tokens=True)!r}")
    print(f"agreement with the dense cache: {sum(a == b for a, b in zip(new, ref[0, n_in:].tolist())) / len(new):.2f}")
    rep = cache.memory_report()
    print(f"kernels: {rep['kernels']}")
    print(f"KV memory: dense fp16 {rep['fp16_bytes']:,} B -> WindowQuant {rep['total_bytes']:,} B "
          f"({rep['total_bytes'] / rep['fp16_bytes']:.3f}x); visual part {rep['visual_fp16_bytes']:,} B -> "
          f"{rep['quantized_bytes']:,} B ({rep['quantized_bytes'] / max(rep['visual_fp16_bytes'], 1):.3f}x)")
    for name, n in rep["bytes"].items():
        print(f"  {name:>6}: {n:,} B")
    steps = max(args.new_tokens - 1, 1)
    print(f"wall time for {args.new_tokens} tokens: dense {t_dense * 1e3:.0f} ms, WindowQuant {t_wq * 1e3:.0f} ms "
          f"(decode kernel calls {cache.stats.kernel_calls}, reference calls {cache.stats.reference_calls}, "
          f"search+quantize+reorder {cache.stats.store_seconds * 1e3:.1f} ms; ~{t_wq / steps * 1e3:.1f} ms/token incl. prefill)")
    plan = cache.plan(0)
    if plan is not None and plan.bits.numel():
        print(format_plan(plan.bits, plan.scores, plan.windows.lengths, args.avg_bits, cache.wq.k_group, cache.wq.v_group,
                          scorer=wq.scorer))


if __name__ == "__main__":
    main()
