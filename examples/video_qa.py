"""Video question answering on a WindowQuant cache.

Without ``--model-path`` it builds a tiny random-weight LLaVA-OneVision from a config (no download) and a random
video; with ``--model-path`` it loads real weights from a local folder (e.g. llava-onevision-qwen2-0.5b-ov-hf) and
its processor. Prints the generated tokens, KV memory (dense vs WindowQuant), decode ms/token and the plan.

    python examples/video_qa.py                      # tiny model, CPU, ~1 minute with module build
    python examples/video_qa.py --model-path ~/models/llava-onevision-qwen2-0.5b-ov-hf --frames 32 --avg-bits 3
    python examples/video_qa.py --family qwen2.5-vl  # tiny random-weight Qwen2.5-VL (or --model-path a checkpoint)

The default budget is 4 effective bits: at 3, eight frames cannot afford a single int4 frame (uniform int2 already
costs 2.82 bits with scale/zero, one int4 frame of eight adds 0.25), so every frame would get int2. The plan is
printed per layer with the scores that drove it.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import wq_compile
from wq_compile import WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.tiny import Prompt, tiny_model, video_prompt
from wq_compile.core.policy import format_plan


def load_qwen(args: argparse.Namespace) -> tuple[object, Prompt]:
    """Qwen2-VL / Qwen2.5-VL: a tiny random-weight model, or a local checkpoint and its processor."""
    from wq_compile.integrations.tiny_qwen import Visual, qwen_prompt, tiny_qwen_model

    if args.model_path is None:
        model = tiny_qwen_model(args.family, wq_compile.ATTN_IMPLEMENTATION)
        return model, qwen_prompt(model, [[Visual(args.frames)]])
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        args.model_path, attn_implementation=wq_compile.ATTN_IMPLEMENTATION, torch_dtype="auto", local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(args.model_path, local_files_only=True)
    video = torch.randint(0, 255, (args.frames, 3, 336, 448), dtype=torch.uint8)  # bring your own frames here
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.question}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(text=text, videos=[video], return_tensors="pt").to(model.device)
    return model, Prompt(dict(inputs), (args.frames,))


def load(args: argparse.Namespace) -> tuple[object, Prompt]:
    if args.family != "llava-ov":
        return load_qwen(args)
    if args.model_path is None:
        model = tiny_model(wq_compile.ATTN_IMPLEMENTATION)
        return model, video_prompt(model, [args.frames])
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        args.model_path, attn_implementation=wq_compile.ATTN_IMPLEMENTATION, torch_dtype="auto", local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(args.model_path, local_files_only=True)
    video = torch.randint(0, 255, (args.frames, 3, 384, 384), dtype=torch.uint8)  # bring your own frames here
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.question}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(text=text, videos=[video], return_tensors="pt").to(model.device)
    return model, Prompt(dict(inputs), (args.frames,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="local checkpoint folder of --family (default: tiny random model)")
    ap.add_argument("--family", choices=["llava-ov", "qwen2-vl", "qwen2.5-vl"], default="llava-ov",
                    help="VLM family (Qwen: --frames must be even, two frames per temporal patch)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--avg-bits", type=float, default=4.0, help="effective bits per element (scale/zero included)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--backend", choices=["auto", "tvm", "reference"], default="auto")
    ap.add_argument("--question", default="What happens in this video?")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, prompt = load(args)
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
