"""Quality and cost of a KV-cache method against the dense cache, on the same prompt and model.

For each method: greedy-token agreement with DynamicCache (free running), mean KL of the next-token distributions
(teacher forced on the DynamicCache tokens, so one early divergence does not count twice), KV bytes as stored, and
decode milliseconds per token (median over repeats, prefill subtracted).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..core.config import WindowQuantConfig
from ..core.quant_fit import DEFAULT_FIT
from ..integrations.tiny import Prompt
from ..integrations.transformers import WindowQuantCache
from ..runtime.backend import reference_quantizer


@dataclass(frozen=True)
class EvalRow:
    method: str
    kv_bytes: int
    alloc_bytes: int
    bytes_vs_dense: float
    agreement: float
    mean_kl: float
    decode_ms: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Method:
    """A named cache factory; ``note`` says what the row means (or why it is missing)."""

    name: str
    make: Callable[[], Any] | None
    note: str = ""


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of every tensor reachable from ``obj`` (tensor subclasses such as quanto's QTensor unflattened)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


def kv_bytes(cache: Any) -> tuple[int, int]:
    """``(used, allocated)`` KV bytes: allocated is every tensor the cache holds (capacity slack included), used is
    the exact payload for WindowQuant and the same as allocated for transformers caches."""
    allocated = _tensor_bytes(list(cache.layers), set())
    if isinstance(cache, WindowQuantCache):
        return int(cache.memory_report()["total_bytes"]), allocated
    return allocated, allocated


def default_methods(model: Any, prompt: Prompt, avg_bits: list[float], backend: str = "auto") -> list[Method]:
    """DynamicCache, every HF QuantizedCache backend that imports here, and WindowQuant at each budget."""
    from transformers import DynamicCache, QuantizedCache

    cfg = model.config
    methods = [Method("dense (DynamicCache)", lambda: DynamicCache(config=cfg), "baseline, model dtype")]
    peers = [("quanto", "optimum.quanto", (4, 2)), ("hqq", "hqq", (4, 2)), ("fp8", None, (None,))]
    for backend_name, module, widths in peers:
        available = module is None or importlib.util.find_spec(module.split(".")[0]) is not None
        for nb in widths:
            name = f"HF QuantizedCache {backend_name}" + (f" int{nb}" if nb else "")
            if not available:
                methods.append(Method(name, None, f"{module} not installed (pip install -e .[peers])"))
                continue
            kw = {} if nb is None else {"nbits": nb}
            methods.append(Method(name, lambda b=backend_name, kw=kw: QuantizedCache(b, cfg, **kw),
                                  "dequantizes the whole cache every step"))
    # One set of loaded modules for every WindowQuant row (same shapes, dtype and groups).
    shared = WindowQuantCache(cfg, WindowQuantConfig(backend=backend))
    kernels = shared.backend(model.dtype, model.device)

    one_bit = (16, 8, 4, 2, 1)
    # one backend per set of buckets its kernels read (the int1 one built on first use)
    backends = {shared.wq.bucket_widths: kernels}

    def wq_method(name: str, wq: WindowQuantConfig, note: str) -> Method:
        def make() -> WindowQuantCache:
            if wq.bucket_widths not in backends:
                backends[wq.bucket_widths] = WindowQuantCache(cfg, WindowQuantConfig(
                    backend=backend, widths=wq.bucket_widths)).backend(model.dtype, model.device)
            return WindowQuantCache(cfg, wq, backend=backends[wq.bucket_widths]).prepare(**prompt.inputs)
        return Method(name, make, note)

    for width in (4, 2, 1):  # KIVI-style: every window at one width, same kernels and format
        methods.append(wq_method(f"uniform int{width} (KIVI-style)",
                                 WindowQuantConfig(avg_bits=16.0, widths=(width,), backend=backend),
                                 f"no window search; fit {DEFAULT_FIT} (the default), compiled quantizer"))
    for width in (2, 1):  # the format before the 8-bit scale/zero grid: the same fit, fp16 scale and zero
        methods.append(wq_method(f"uniform int{width}, fp16 scale/zero",
                                 WindowQuantConfig(avg_bits=16.0, widths=(width,), backend=backend, meta_bits=16),
                                 "no window search; meta_bits=16 (the default is 8-bit scale/zero)"))
    for fit in ("minmax", "lsq-hqq", "hqq"):  # other scale/zero fits: same format, same decode kernels, torch quantizer
        fitted = dataclasses.replace(kernels, quantize=reference_quantizer(fit))
        for width in (4, 2):
            wq = WindowQuantConfig(avg_bits=16.0, widths=(width,), backend=backend, fit=fit)
            methods.append(Method(f"uniform int{width}, fit {fit}", lambda wq=wq, b=fitted: WindowQuantCache(
                cfg, wq, backend=b).prepare(**prompt.inputs), "no window search; torch quantizer"))
    for ab in avg_bits:
        methods.append(wq_method(f"WindowQuant avg {ab:g} bits", WindowQuantConfig(avg_bits=ab, backend=backend), ""))
        methods.append(wq_method(f"WindowQuant avg {ab:g} bits, eviction", WindowQuantConfig(
            avg_bits=ab, widths=(16, 8, 4, 2, 0), backend=backend), "width 0 allowed: a window may be evicted"))
        methods.append(wq_method(f"WindowQuant avg {ab:g} bits, 1 bit", WindowQuantConfig(
            avg_bits=ab, widths=one_bit, backend=backend), "width 1 allowed"))
        methods.append(wq_method(f"WindowQuant avg {ab:g} bits, fp16 s/z", WindowQuantConfig(
            avg_bits=ab, backend=backend, meta_bits=16), "meta_bits=16"))
    return methods


class _StepClock:
    """A ``generate`` streamer that only timestamps: ``put`` is called with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_ms(self) -> float:
        """Mean ms per decode step: from the first new token (prefill done) to the last."""
        steps = len(self.times) - 2
        return (self.times[-1] - self.times[1]) / steps * 1e3 if steps > 0 else float("nan")


def _generate(model: Any, prompt: Prompt, cache: Any, new: int, clock: _StepClock | None = None) -> torch.Tensor:
    out = model.generate(**prompt.inputs, cache=cache, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                         streamer=clock)
    return out[:, prompt.inputs["input_ids"].shape[1]:]


def _teacher_forced_logprobs(model: Any, prompt: Prompt, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[N, V]`` when the model is fed ``tokens [1, N]`` one at a time."""
    inputs = dict(prompt.inputs)
    inputs.pop("attention_mask", None)
    out = model(**inputs, cache=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for i in range(tokens.shape[1] - 1):
        out = model(input_ids=tokens[:, i : i + 1], cache=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.log_softmax(torch.cat(logits), dim=-1)


def run_eval(model: Any, prompt: Prompt, methods: list[Method], new_tokens: int = 32, repeats: int = 3,
             progress: Callable[[str], None] | None = None) -> list[EvalRow]:
    """Measure every method against the first (the dense reference). Batch size 1."""
    if prompt.inputs["input_ids"].shape[0] != 1:
        raise ValueError("prompt: evaluation uses a batch of one prompt")
    torch.set_grad_enabled(False)
    ref_make = methods[0].make
    assert ref_make is not None
    ref_tokens = _generate(model, prompt, ref_make(), new_tokens)
    ref_logp = _teacher_forced_logprobs(model, prompt, ref_make(), ref_tokens)
    dense_bytes = 0
    rows = []
    for m in methods:
        if progress:
            progress(m.name)
        if m.make is None:
            rows.append(EvalRow(m.name, 0, 0, float("nan"), float("nan"), float("nan"), float("nan"), m.note))
            continue
        cache = m.make()
        tokens = _generate(model, prompt, cache, new_tokens)
        nbytes, alloc = kv_bytes(cache)
        dense_bytes = dense_bytes or nbytes
        logp = _teacher_forced_logprobs(model, prompt, m.make(), ref_tokens)
        kl = float(torch.sum(ref_logp.exp() * (ref_logp - logp), dim=-1).mean())
        step_ms = []
        for _ in range(repeats):
            clock = _StepClock()
            _generate(model, prompt, m.make(), new_tokens, clock)
            step_ms.append(clock.decode_ms())
        ms = statistics.median(step_ms)
        rows.append(EvalRow(m.name, nbytes, alloc, nbytes / dense_bytes, float((tokens == ref_tokens).float().mean()),
                            kl, ms, m.note))
    return rows


def format_table(rows: list[EvalRow]) -> str:
    """A plain-text table for the terminal."""
    head = (f"{'method':<34} {'KV bytes':>11} {'allocated':>11} {'vs dense':>8} {'agree':>6} {'mean KL':>9} "
            f"{'ms/tok':>7}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.kv_bytes == 0 and r.note:
            lines.append(f"{r.method:<34} {'-':>11} {'-':>11} {'-':>8} {'-':>6} {'-':>9} {'-':>7}  {r.note}")
            continue
        lines.append(f"{r.method:<34} {r.kv_bytes:>11,} {r.alloc_bytes:>11,} {r.bytes_vs_dense:>8.3f} {r.agreement:>6.2f} "
                     f"{r.mean_kl:>9.2e} {r.decode_ms:>7.2f}  {r.note}")
    return "\n".join(lines)
