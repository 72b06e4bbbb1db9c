"""Video question answering on a WindowQuant cache: memory, decode speed and fidelity next to the dense cache.

Without ``--model-path`` it builds a tiny random-weight LLaVA-OneVision from a config (no download: 24 decoder
layers, so decode time is mostly attention, as in real models) and a random 32-frame video; with ``--model-path`` it
loads a local checkpoint folder (e.g. llava-onevision-qwen2-0.5b-ov-hf) through ``from_pretrained``, and its
tokenizer, chat template and pixel settings (applied here, no torchvision needed); ``--video`` reads a video file
with PyAV. Prints KV memory (dense vs WindowQuant), decode ms/token of both, fidelity and the plan.

    python examples/video_qa.py                      # tiny model, CPU, ~1 minute with module build
    python examples/video_qa.py --model-path ~/models/llava-onevision-qwen2-0.5b-ov-hf --video clip.mp4 --frames 32
    python -m wq_compile.integrations.checkpoint /tmp/tiny-ov   # a tiny local folder laid out like a hub one
    python examples/video_qa.py --family qwen2.5-vl  # tiny random-weight Qwen2.5-VL (or --model-path a checkpoint)

Fidelity is the next-token KL against the dense cache, teacher-forced on the dense run's tokens, next to uniform
allocation under the same budget (every window at the widest single width it affords, KIVI-style). The default
budget is what uniform int4 costs (5.11 effective bits: scale/zero and key-slot padding counted), so both hold the
same bytes and differ only in where the bits go. On random weights greedy tokens agreeing or not says nothing about
quality, so no agreement is printed there; ``wq-eval --analyze`` measures the allocation on workloads with ground
truth and real weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import DynamicCache

import wq_compile
from wq_compile import WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.tiny import Prompt, tiny_model, video_prompt
from wq_compile.core.allocation import effective_bits
from wq_compile.core.baselines import uniform_bits
from wq_compile.core.policy import format_plan


def load_qwen(args: argparse.Namespace) -> tuple[object, Prompt, object]:
    """Qwen2-VL / Qwen2.5-VL: a tiny random-weight model, or a local checkpoint and its processor (which needs
    torchvision: a GPU machine's torch has it, this CPU set-up does not)."""
    from wq_compile.integrations.tiny_qwen import Visual, qwen_prompt, tiny_qwen_model

    if args.model_path is None:
        model = tiny_qwen_model(args.family, wq_compile.ATTN_IMPLEMENTATION, layers=args.layers)
        return model, qwen_prompt(model, [[Visual(args.frames)]]), None
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from wq_compile.integrations.video import read_video

    frames = read_video(args.video, args.frames) if args.video is not None else None  # a bad file fails first
    model = AutoModelForImageTextToText.from_pretrained(
        args.model_path, attn_implementation=wq_compile.ATTN_IMPLEMENTATION, torch_dtype="auto", local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(args.model_path, local_files_only=True)
    if frames is None:
        frames = torch.randint(0, 255, (args.frames, 3, 336, 448), dtype=torch.uint8)
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.question}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(text=text, videos=[frames], return_tensors="pt").to(model.device)
    return model, Prompt(dict(inputs), (args.frames,)), processor.tokenizer


def load(args: argparse.Namespace) -> tuple[object, Prompt, object]:
    """The model, the prompt and the tokenizer (``None`` for the tiny model, whose token ids are made up)."""
    if args.family != "llava-ov":
        return load_qwen(args)
    if args.model_path is None:
        model = tiny_model(wq_compile.ATTN_IMPLEMENTATION, layers=args.layers)
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


class StepClock:
    """A ``generate`` streamer that only timestamps: ``put`` gets the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_ms(self) -> float:
        """Median ms of one decode step (prefill, which ends at the first new token, excluded)."""
        steps = [b - a for a, b in zip(self.times[1:], self.times[2:])]
        return statistics.median(steps) * 1e3 if steps else float("nan")


class Forced:
    """A logits processor that makes greedy decoding emit ``tokens`` (raw logits are still reported)."""

    def __init__(self, tokens: torch.Tensor, n_in: int) -> None:
        self.tokens, self.n_in = tokens, n_in

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        out[:, self.tokens[input_ids.shape[1] - self.n_in]] = 0.0
        return out


def generate(model: object, prompt: Prompt, cache: object, n: int,
             forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, StepClock]:
    """Greedy tokens ``[n]``, the model's raw logits ``[n, V]`` and the step clock. With ``forced`` (another run's
    tokens) the cache is teacher-forced: same work per step, logits comparable position by position."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    n_in = prompt.inputs["input_ids"].shape[1]
    procs = LogitsProcessorList([Forced(forced, n_in)] if forced is not None else [])
    out = model.generate(**prompt.inputs, cache=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         streamer=clock, output_logits=True, return_dict_in_generate=True, logits_processor=procs)
    return out.sequences[0, n_in:], torch.cat(out.logits).float(), clock


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(dense || other) of the next-token distributions, position by position."""
    ref, got = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    return float((ref.exp() * (ref - got)).sum(-1).clamp_min(0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="local checkpoint folder of --family (default: tiny random model)")
    ap.add_argument("--family", choices=["llava-ov", "qwen2-vl", "qwen2.5-vl"], default="llava-ov",
                    help="VLM family (Qwen: --frames must be even, two frames per temporal patch)")
    ap.add_argument("--video", default=None, help="video file (any format FFmpeg reads) sampled uniformly to "
                                                   "--frames frames; needs --model-path (default: random frames)")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers of the tiny model (default 24)")
    ap.add_argument("--avg-bits", type=float, default=None,
                    help="effective bits per element, scale/zero included (default: what uniform int4 costs, so "
                         "WindowQuant and the uniform cache it is compared with hold the same bytes)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--backend", choices=["auto", "tvm", "reference"], default="auto")
    ap.add_argument("--question", default="What happens in this video?")
    args = ap.parse_args()
    if args.video is not None and args.model_path is None:
        ap.error("--video needs --model-path: the tiny model has no tokenizer or pixel settings (write a tiny "
                 "checkpoint folder with: python -m wq_compile.integrations.checkpoint DIR)")
    if args.new_tokens < 2:
        ap.error("--new-tokens: at least 2 (one prefill token, then decode steps to time)")
    torch.set_grad_enabled(False)
    try:
        model, prompt, tokenizer = load(args)
    except (OSError, ValueError) as exc:  # missing or unreadable video / folder: one line, no traceback
        sys.exit(f"video_qa: {exc}")
    cfg = model.config
    n_in = prompt.inputs["input_ids"].shape[1]
    probe = WindowQuantConfig(backend=args.backend)
    # Load (or build, the first time) the compiled modules once; every cache below shares them.
    kernels = WindowQuantCache(cfg, probe).backend(model.dtype, model.device)

    def wq_cache(c: WindowQuantConfig) -> WindowQuantCache:
        return WindowQuantCache(cfg, c, backend=kernels).prepare(**prompt.inputs)

    located = wq_cache(probe)  # prepare() finds the frames' windows and resolves the groups; no prefill needed
    visual, k_group, v_group = located.samples[0].windows.lengths, located.wq.k_group, located.wq.v_group
    avg_bits = args.avg_bits if args.avg_bits is not None else effective_bits(4, k_group, v_group)
    wq = WindowQuantConfig(avg_bits=avg_bits, backend=args.backend)
    # Uniform allocation at the same budget: every window at the widest single width that fits (KIVI-style).
    width = int(uniform_bits(visual, avg_bits, wq.widths, k_group, v_group, wq.meta_bits)[0])
    uniform = WindowQuantConfig(avg_bits=16.0, widths=(width,), backend=args.backend)

    ref, ref_logits, dense_clock = generate(model, prompt, DynamicCache(config=cfg), args.new_tokens)
    cache = wq_cache(wq)
    _, wq_logits, wq_clock = generate(model, prompt, cache, args.new_tokens, forced=ref)
    uniform_cache = wq_cache(uniform)
    _, uniform_logits, uniform_clock = generate(model, prompt, uniform_cache, args.new_tokens, forced=ref)
    kl_wq, kl_uniform = mean_kl(ref_logits, wq_logits), mean_kl(ref_logits, uniform_logits)
    new = generate(model, prompt, wq_cache(wq), args.new_tokens)[0] if tokenizer is not None else None

    layers = cfg.text_config.num_hidden_layers
    print(f"prompt: {n_in:,} tokens ({args.frames} frames, {int(visual.sum()):,} visual tokens), {layers} layers, "
          f"{'random weights' if tokenizer is None else args.model_path}; {args.new_tokens} new tokens")
    if new is not None:
        print(f"WindowQuant answer: {tokenizer.decode(new, skip_special_tokens=True)!r}")
        print(f"dense answer:       {tokenizer.decode(ref, skip_special_tokens=True)!r} "
              f"(greedy tokens agree at {float((new == ref).float().mean()):.2f})")
    rep = cache.memory_report()
    print(f"kernels: {rep['kernels']}")
    print(f"KV memory: dense fp16 {rep['fp16_bytes']:,} B -> WindowQuant {rep['total_bytes']:,} B "
          f"({rep['total_bytes'] / rep['fp16_bytes']:.3f}x); visual part {rep['visual_fp16_bytes']:,} B -> "
          f"{rep['quantized_bytes']:,} B ({rep['quantized_bytes'] / max(rep['visual_fp16_bytes'], 1):.3f}x)")
    for name, n in rep["bytes"].items():
        print(f"  {name:>6}: {n:,} B")
    d_ms, w_ms, u_ms = dense_clock.decode_ms(), wq_clock.decode_ms(), uniform_clock.decode_ms()
    print(f"decode: dense (DynamicCache, {model.dtype}) {d_ms:.1f} ms/token, WindowQuant {w_ms:.1f} ms/token: "
          f"speedup {d_ms / w_ms:.2f}x (median of {args.new_tokens - 1} steps, prefill excluded; uniform "
          f"int{width} {u_ms:.1f} ms/token)")
    print(f"  decode kernel calls {cache.stats.kernel_calls}, reference calls {cache.stats.reference_calls}; "
          f"window search+quantize+reorder {cache.stats.store_seconds * 1e3:.0f} ms once after prefill")
    u_bytes = uniform_cache.memory_report()["quantized_bytes"]
    print(f"fidelity vs dense (next-token KL, teacher-forced on the dense tokens): WindowQuant {kl_wq:.3g} "
          f"({rep['quantized_bytes']:,} B of visual KV), uniform int{width} under the same budget {kl_uniform:.3g} "
          f"({u_bytes:,} B): {kl_wq / kl_uniform if kl_uniform > 0 else float('nan'):.2f}x")
    if tokenizer is None:
        print("  random weights attend almost evenly to every frame (see the score ranges below), so the scores "
              "have little to pick\n  and the tokens themselves say nothing about quality; `wq-eval --analyze` "
              "measures the allocation on\n  workloads with ground truth and real weights")
    plan = cache.plan(0)
    if plan is not None and plan.bits.numel():
        print(format_plan(plan.bits, plan.scores, plan.windows.lengths, round(avg_bits, 2), cache.wq.k_group,
                          cache.wq.v_group, scorer=wq.scorer, meta_bits=cache.wq.meta_bits))


if __name__ == "__main__":
    main()
