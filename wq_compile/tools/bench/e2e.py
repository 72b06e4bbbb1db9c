"""End to end: time to first token and ms per decode token, DynamicCache vs WindowQuantCache, on a video prompt.

Each measurement runs in a fresh process, so "cold" (an empty module cache: every kernel is built) and "warm" (the
modules are on disk: a new process only loads them) are what a user sees on a first and a later run. Inside one
process a second ``WindowQuantCache`` (a new conversation) is timed too: it should cost no set-up at all.

The first ``generate`` of a process pays torch's own first-call costs whatever the cache; so the process runs one
dense ``generate`` first ("dense 1st": torch's warm-up is its excess over "TTFT dense"), then the first
WindowQuantCache ("WQ 1st": what it costs above "WQ next" is WindowQuant's own first use, mainly importing TVM and
loading or building the kernels).

Times come from a ``generate`` streamer that timestamps every new token: TTFT is from the call to the first new
token (prefill; for WindowQuant including the window search, quantization and reordering of every layer, and on
the first cache of a process the kernel load), ms per decode token is the median interval between later tokens.
Medians over ``repeats`` generations. Random weights: these rows measure cost, not quality.
"""

from __future__ import annotations

import json
import os
import statistics
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: Models the benchmark can build (random weights, tiny vision tower): name -> (text widths, default layers).
MODELS: dict[str, tuple[dict | None, int]] = {
    "tiny": (None, 24),
    "llava-ov-0.5b": ({"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                       "num_key_value_heads": 2}, 4),
}


@dataclass(frozen=True)
class E2ERow:
    model: str
    layers: int
    prompt_tokens: int
    module_cache: str  # "cold" (empty) or "warm" (modules on disk) when the process started
    dense_ttft_ms: float
    wq_first_ttft_ms: float  # the first WindowQuantCache of the process (loads or builds the kernels)
    wq_next_ttft_ms: float  # a second WindowQuantCache in the same process
    store_ms: float  # search + quantize + reorder, all layers, inside wq_next_ttft_ms
    dense_decode_ms: float
    wq_decode_ms: float
    backend: str
    dense_first_ttft_ms: float = 0.0  # the process's first generate (dense): torch's own warm-up included
    #: ``store_ms`` by stage (all layers): K/V screening, attention scores, search, quantize + reorder + residual
    screen_ms: float = 0.0
    score_ms: float = 0.0
    search_ms: float = 0.0
    fill_ms: float = 0.0
    int8_dots: bool = False  # WindowQuantConfig(int8_dots=True)
    fit: str = ""  # WindowQuantConfig(fit=...) ("": the default)

    @property
    def torch_warmup_ms(self) -> float:
        return self.dense_first_ttft_ms - self.dense_ttft_ms

    @property
    def wq_first_extra_ms(self) -> float:
        """What the first WindowQuantCache of a process costs above a later one (torch's warm-up not in it)."""
        return self.wq_first_ttft_ms - self.wq_next_ttft_ms

    @property
    def ttft_ratio(self) -> float:
        return self.wq_next_ttft_ms / self.dense_ttft_ms

    @property
    def decode_ratio(self) -> float:
        return self.dense_decode_ms / self.wq_decode_ms

    @property
    def store_fraction(self) -> float:
        return self.store_ms / self.dense_ttft_ms


class StepClock:
    """A ``generate`` streamer that only timestamps: ``put`` gets the prompt once, then each new token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ttft_ms(self) -> float:
        return (self.times[1] - self.start) * 1e3

    def step_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.times[1:], self.times[2:])]


def measure(model_name: str, layers: int, frames: int, new_tokens: int, repeats: int, avg_bits: float,
            module_cache: str, int8_dots: bool = False, fit: str = "") -> E2ERow:
    """One process's measurement (call it in a fresh process: see :func:`run`)."""
    import torch
    from transformers import DynamicCache

    import wq_compile
    from wq_compile import WindowQuantCache, WindowQuantConfig
    from wq_compile.integrations.tiny import tiny_model, video_prompt

    torch.set_grad_enabled(False)
    shapes, _ = MODELS[model_name]
    model = tiny_model(wq_compile.ATTN_IMPLEMENTATION, layers=layers, text_shapes=shapes)
    prompt = video_prompt(model, [frames])
    n_prompt = int(prompt.inputs["input_ids"].shape[1])
    wq = WindowQuantConfig(avg_bits=avg_bits, int8_dots=int8_dots, **({"fit": fit} if fit else {}))

    def gen(cache: Any, n: int) -> StepClock:
        clock = StepClock()
        model.generate(**prompt.inputs, cache=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       streamer=clock)
        return clock

    dense_first = gen(DynamicCache(config=model.config), 2).ttft_ms()  # torch's first-call warm-up is here
    # the first WindowQuant cache of the process: whatever kernel loading or building it needs is in its TTFT
    first = WindowQuantCache(model.config, wq).prepare(**prompt.inputs)
    wq_first = gen(first, 2).ttft_ms()
    backend = first.backend(model.dtype, model.device).name
    dense, wqc, caches = [], [], []
    for _ in range(repeats):  # alternating: a load change on the machine hits both alike
        dense.append(gen(DynamicCache(config=model.config), new_tokens))
        caches.append(WindowQuantCache(model.config, wq).prepare(**prompt.inputs))
        wqc.append(gen(caches[-1], new_tokens))

    def stage(name: str) -> float:
        return statistics.median(c.stats.stage_seconds[name] * 1e3 for c in caches)

    return E2ERow(model_name, layers, n_prompt, module_cache,
                  statistics.median(c.ttft_ms() for c in dense), wq_first,
                  statistics.median(c.ttft_ms() for c in wqc),
                  statistics.median(c.stats.store_seconds * 1e3 for c in caches),
                  statistics.median(t for c in dense for t in c.step_ms()),
                  statistics.median(t for c in wqc for t in c.step_ms()), backend, dense_first,
                  stage("screen"), stage("score"), stage("search"), stage("fill"), int8_dots, fit)


def run(models: list[str], frames: int = 32, new_tokens: int = 16, repeats: int = 3, avg_bits: float = 3.0,
        layers: int | None = None, cache_dir: str | None = None, progress: bool = True,
        int8_dots: bool = False, fit: str = "") -> list[E2ERow]:
    """Cold then warm, per model, each in a fresh process sharing one module cache folder."""
    from tqdm import tqdm

    if new_tokens < 2:
        raise ValueError(f"new_tokens: at least 2 are needed to time a decode step, got {new_tokens}")
    root = Path(cache_dir or tempfile.mkdtemp(prefix="wq-e2e-"))
    rows: list[E2ERow] = []
    cases = [(m, state) for m in models for state in ("cold", "warm")]
    for name, state in tqdm(cases, desc="end to end", disable=not progress):
        if name not in MODELS:
            raise ValueError(f"model: unknown {name!r}; expected one of {sorted(MODELS)}")
        n_layers = layers or MODELS[name][1]
        mod_dir = root / name
        if state == "cold" and mod_dir.exists() and any(mod_dir.rglob("*.so")):
            raise RuntimeError(f"cache_dir: {mod_dir} already holds modules; a cold run needs an empty folder")
        args = dict(model_name=name, layers=n_layers, frames=frames, new_tokens=new_tokens, repeats=repeats,
                    avg_bits=avg_bits, module_cache=state, int8_dots=int8_dots, fit=fit)
        # a crash in native code (TVM, torch) leaves a Python traceback on stderr instead of nothing
        env = dict(os.environ, WQ_CACHE_DIR=str(mod_dir), PYTHONFAULTHANDLER="1")
        proc = subprocess.run([sys.executable, "-m", "wq_compile.tools.bench.e2e", json.dumps(args)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit status {proc.returncode}")
            raise RuntimeError(f"end-to-end child for {name} ({state}) failed ({how}):\n{proc.stderr[-3000:]}\n"
                               f"stdout tail:\n{proc.stdout[-1000:]}")
        rows.append(E2ERow(**json.loads(proc.stdout.strip().splitlines()[-1])))
    return rows


def format_table(rows: list[E2ERow]) -> str:
    head = (f"{'model':<14} {'layers':>6} {'prompt':>7} {'modules':>7} {'dense 1st':>9} {'TTFT dense':>10} "
            f"{'WQ 1st':>9} {'WQ next':>9} {'next/dense':>10} {'store':>8} {'of prefill':>10} "
            f"{'screen/score/search/fill':>24} {'ms/tok dense':>12} {'ms/tok WQ':>10} {'speedup':>8}  backend")
    lines = [head, "-" * len(head)]
    for r in rows:
        parts = "/".join(f"{x:.0f}" for x in (r.screen_ms, r.score_ms, r.search_ms, r.fill_ms))
        name = r.model + (" dots" if r.int8_dots else "") + (f" {r.fit}" if r.fit else "")
        lines.append(f"{name:<14} {r.layers:>6} {r.prompt_tokens:>7} {r.module_cache:>7} "
                     f"{r.dense_first_ttft_ms:>9.0f} {r.dense_ttft_ms:>10.0f} "
                     f"{r.wq_first_ttft_ms:>9.0f} {r.wq_next_ttft_ms:>9.0f} {r.ttft_ratio:>9.2f}x "
                     f"{r.store_ms:>8.0f} {r.store_fraction:>9.1%} {parts:>24} {r.dense_decode_ms:>12.2f} "
                     f"{r.wq_decode_ms:>10.2f} {r.decode_ratio:>7.2f}x  {r.backend}")
    lines.append("times in ms; dense 1st: the process's first generate (torch warm-up included); WQ 1st: the first "
                 "WindowQuantCache, after it (kernel import/load or build included); store: window search, quantize "
                 "and reorder over all layers, inside WQ next; 'dots': WindowQuantConfig(int8_dots=True); a fit name: "
                 "WindowQuantConfig(fit=...), else the default fit")
    return "\n".join(lines)


def write_csv(rows: list[E2ERow], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[f.name for f in fields(E2ERow)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


if __name__ == "__main__":  # the child process of run(): one JSON argument in, one JSON row out
    import warnings

    warnings.simplefilter("ignore")
    row = measure(**json.loads(sys.argv[1]))
    print(json.dumps(asdict(row)))
