"""Decode-attention benchmark: compiled WindowQuant kernels against handwritten and library baselines.

Every method answers the same question (one new query token over ``n`` cached tokens of one layer) and is checked
against the torch reference before it is timed. Times are medians of ``repeats`` runs after warm-up, with 20/80%
quantiles; ratios are against torch SDPA on the dense cache measured in the same run. Bandwidth is the bytes of
cache the method must read, / s / 1e9.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..layout import LayerCache, WindowAssignment
from ..models import get_preset
from ..reference import decode_attention

#: Bucket mixes: fraction of windowed tokens per width (dense residual of ``residual`` tokens always present).
MIXES: dict[str, dict[int, float]] = {
    "int4": {4: 1.0},
    "int2": {2: 1.0},
    "mixed": {8: 0.125, 4: 0.375, 2: 0.5},
}


@dataclass(frozen=True)
class BenchRow:
    method: str
    mix: str
    n_tokens: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    vs_sdpa: float
    gbps: float
    max_err: float
    note: str = ""


def make_layer(n_tokens: int, mix: dict[int, float], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               residual: int = 64, seed: int = 0, k_group: int = 28, v_group: int = 64) -> LayerCache:
    """One layer holding ``n_tokens`` windowed tokens split across buckets by ``mix`` plus a dense residual."""
    gen = torch.Generator().manual_seed(seed)
    frame = 196
    frames = max(1, n_tokens // frame)
    t = frames * frame + residual
    k = torch.randn(num_kv_heads, t, head_dim, generator=gen)
    v = torch.randn(num_kv_heads, t, head_dim, generator=gen)
    widths = sorted(mix, reverse=True)
    counts = [round(mix[w] * frames) for w in widths]
    counts[-1] = frames - sum(counts[:-1])
    bits = torch.tensor([w for w, c in zip(widths, counts) for _ in range(c)])
    starts = torch.arange(frames) * frame
    layer = LayerCache.empty(1, num_kv_heads, head_dim, dtype, k_group=k_group, v_group=v_group,
                             residual=residual + 1)
    layer.fill_sample(0, k.to(dtype), v.to(dtype), WindowAssignment(starts, torch.full((frames,), frame), bits))
    return layer


def _dense_kv(layer: LayerCache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tokens as one dense cache (what an unquantized cache would hold)."""
    ks, vs = [], []
    for bucket in layer.buckets.values():
        n = int(bucket.lens[0])
        if n:
            k, v = bucket.dequantize()
            ks.append(k[:, :, :n])
            vs.append(v[:, :, :n])
    n = int(layer.dense.lens[0])
    ks.append(layer.dense.k[:, :, :n].float())
    vs.append(layer.dense.v[:, :, :n].float())
    return torch.cat(ks, 2).to(dtype).contiguous(), torch.cat(vs, 2).to(dtype).contiguous()


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), qs[0], qs[-1]


def _methods(layer: LayerCache, q: torch.Tensor, sm_scale: float, preset: Any, dtype: torch.dtype,
             libraries: dict[str, Any]) -> list[tuple[str, Callable[[], torch.Tensor] | None, int, str]]:
    """(name, fn, bytes read, note) for every method; fn None when unavailable here (note says why)."""
    kd, vd = _dense_kv(layer, torch.float32)
    dense_bytes = kd.numel() * 4 * 2
    quant_bytes = sum(layer.used_bytes().values())

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None].float(), kd, vd, scale=sm_scale,
                                              enable_gqa=True)[:, :, 0]

    def dequant_sdpa() -> torch.Tensor:  # what HF QuantizedCache does every step: dequantize all, then attend
        k, v = _dense_kv(layer, torch.float32)
        return F.scaled_dot_product_attention(q[:, :, None].float(), k, v, scale=sm_scale, enable_gqa=True)[:, :, 0]

    out: list[tuple[str, Callable[[], torch.Tensor] | None, int, str]] = [
        ("torch SDPA, dense fp32 cache", sdpa, dense_bytes, "baseline"),
        ("torch dequantize-all + SDPA", dequant_sdpa, quant_bytes, "HF QuantizedCache's decode path"),
        ("torch reference (per bucket + merge)", lambda: decode_attention(q, layer, sm_scale), quant_bytes, "oracle"),
    ]
    widths = tuple(sorted(layer.buckets, reverse=True))
    for label, lib in libraries.items():
        if lib is None:
            out.append((f"TVM fused ({label})", None, quant_bytes, "no module"))
            continue
        from ..runtime import FusedDecoder

        dec = FusedDecoder(lib, preset.num_q_heads, preset.num_kv_heads, preset.head_dim, dtype)
        kernel = dec.kernel(widths)
        out.append((f"TVM fused ({label})", lambda dec=dec: dec(q, layer, sm_scale), quant_bytes,
                    "tuned" if kernel.tuned else "default schedule"))
    for name in ("Triton", "FlashInfer"):
        out.append((name, None, dense_bytes, "needs a CUDA GPU" if not torch.cuda.is_available() else "not installed"))
    return out


def run(model: str = "llava-ov-0.5b", n_tokens: list[int] | None = None, mixes: list[str] | None = None,
        repeats: int = 20, target: str = "llvm", logs_dir: str | None = None, out_dir: str | Path = "bench_out",
        progress: bool = True) -> list[BenchRow]:
    """Benchmark every method on every (mix, length); writes ``decode.csv`` and ``decode.png`` into ``out_dir``."""
    from tqdm import tqdm

    from ..runtime import KernelLibrary

    preset = get_preset(model)
    dtype = torch.float32 if target == "llvm" else torch.float16
    n_tokens = n_tokens or [1024, 2048, 4096, 8192]
    mixes = mixes or ["int4", "mixed"]
    libraries: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="wq-bench-"))
    # The untuned library sees no tuning logs and keeps its modules apart from the tuned ones.
    (scratch / "no-logs").mkdir()
    libraries["default schedule"] = KernelLibrary(target, logs_dir=scratch / "no-logs", cache_dir=scratch / "cache")
    tuned = KernelLibrary(target, logs_dir=logs_dir) if logs_dir is not None else KernelLibrary(target)
    libraries["tuned"] = tuned if tuned.logs_dir is not None and any(Path(tuned.logs_dir).glob("*/*/meta.json")) \
        else None
    rows: list[BenchRow] = []
    cases = [(m, n) for m in mixes for n in n_tokens]
    for mix, n in tqdm(cases, desc="decode bench", disable=not progress):
        layer = make_layer(n, MIXES[mix], preset.num_kv_heads, preset.head_dim, dtype)
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(1, preset.num_q_heads, preset.head_dim, generator=gen).to(dtype)
        sm_scale = preset.head_dim ** -0.5
        want = decode_attention(q, layer, sm_scale)
        base = None
        for name, fn, nbytes, note in _methods(layer, q, sm_scale, preset, dtype, libraries):
            if fn is None:
                rows.append(BenchRow(name, mix, n, float("nan"), float("nan"), float("nan"), float("nan"),
                                     float("nan"), float("nan"), note))
                continue
            err = float((fn().float() - want).abs().max())
            med, p20, p80 = _time(fn, repeats)
            base = base or med
            rows.append(BenchRow(name, mix, n, med, p20, p80, base / med, nbytes / (med * 1e-3) / 1e9, err, note))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "decode.csv")
    plot(rows, out / "decode.png", f"decode attention, {preset.name}, {target}")
    return rows


def write_csv(rows: list[BenchRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(rows: list[BenchRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = sorted({r.mix for r in rows})
    fig, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.5), squeeze=False)
    for ax, mix in zip(axes[0], mixes):
        for method in dict.fromkeys(r.method for r in rows if r.mix == mix):
            pts = [(r.n_tokens, r.median_ms) for r in rows if r.mix == mix and r.method == method
                   and r.median_ms == r.median_ms]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("ms per layer (median)")
        ax.set_title(f"{title}: {mix}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'method':<38} {'mix':>6} {'tokens':>7} {'median ms':>10} {'p20':>8} {'p80':>8} {'vs SDPA':>8} "
            f"{'GB/s':>7} {'max err':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.median_ms != r.median_ms:
            lines.append(f"{r.method:<38} {r.mix:>6} {r.n_tokens:>7} {'-':>10} {'-':>8} {'-':>8} {'-':>8} {'-':>7} "
                         f"{'-':>9}  {r.note}")
            continue
        lines.append(f"{r.method:<38} {r.mix:>6} {r.n_tokens:>7} {r.median_ms:>10.3f} {r.p20_ms:>8.3f} "
                     f"{r.p80_ms:>8.3f} {r.vs_sdpa:>7.2f}x {r.gbps:>7.2f} {r.max_err:>9.1e}  {r.note}")
    return "\n".join(lines)
