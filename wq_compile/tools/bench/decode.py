"""Decode-attention benchmark: compiled WindowQuant kernels against handwritten and library baselines.

Every method answers the same question (one new query token over ``n`` cached tokens of one layer) and is checked
against the torch reference before it is timed. Each method is timed in its own block (``repeats`` calls after
warm-up; see :func:`time_interleaved` for why not alternating rounds): medians with 20/80% quantiles. Ratios are against the *fastest* dense SDPA call of the same case (fp32 or
bf16, query group folded or ``enable_gqa``), measured in the same rounds. Bandwidth is the bytes the method must read
(its own cache format) / s / 1e9, also as a fraction of the copy bandwidth measured at the start of the run.
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

from ...core.meta8 import DEFAULT_META_BITS
from ...core.layout import LayerCache
from ...core.windows import WindowAssignment
from ...core.models import get_preset
from ...core.reference import decode_attention
from .peers import Peer, copy_bandwidth, ggml_peers, mac_peaks, ort_peers, sdpa_peers

#: Bucket mixes: fraction of windowed tokens per width (dense residual of ``residual`` tokens always present).
MIXES: dict[str, dict[int, float]] = {
    "int4": {4: 1.0},
    "int2": {2: 1.0},
    "mixed": {8: 0.125, 4: 0.375, 2: 0.5},
}


@dataclass(frozen=True)
class BenchRow:
    model: str
    method: str
    mix: str
    n_tokens: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    vs_best_dense: float  # best dense SDPA median / this median (same case, same run): > 1 is faster
    gbps: float  # bytes the method reads / median time / 1e9
    copy_frac: float  # gbps / the copy bandwidth measured in the same run
    max_err: float  # vs the exact torch reference over the same (dequantized) cache
    note: str = ""
    # the attention's multiply-adds at the arithmetic peak of `threads` cores in this method's instruction form
    # (fp32 FMA, or int8 dot products), measured by the probe kernels in the same run / this median (llvm only)
    peak_frac: float = float("nan")


def make_layer(n_tokens: int, mix: dict[int, float], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               residual: int = 64, seed: int = 0, k_group: int = 28, v_group: int = 64,
               meta_bits: int = DEFAULT_META_BITS) -> LayerCache:
    """One layer holding ``n_tokens`` windowed tokens split across buckets by ``mix`` plus a dense residual, in
    the default storage format (``meta_bits``: the 2/1-bit buckets' scale/zero, 8-bit codes unless told)."""
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
                             residual=residual + 1, meta_bits=meta_bits)
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


def time_blocks(fns: list[Callable[[], Any]], repeats: int, warmup: int = 3, rounds: int = 3) -> list[list[float]]:
    """ms of each of ``repeats`` calls per function, taken as ``rounds`` blocks per function (a warm-up, then a
    block of back-to-back calls), the functions' order rotating from round to round.

    Blocks, not calls that alternate methods: every runtime here (torch's OpenMP, ggml's and ONNX Runtime's pools)
    keeps its worker threads busy-waiting for a while after a call, and on a small machine the next method's
    threads would run against them; the warm-up absorbs the previous block's tail. Several rounds, not one block:
    this VM's host noise comes in bursts of seconds, and one block can fall into one."""
    rounds = max(1, min(rounds, repeats))
    sizes = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    times: list[list[float]] = [[] for _ in fns]
    for r, size in enumerate(sizes):
        order = list(range(len(fns)))
        order = order[r % len(order):] + order[:r % len(order)] if order else order
        for i in order:
            fn = fns[i]
            for _ in range(warmup):
                fn()
            for _ in range(size):
                t0 = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: list[Callable[[], Any]], repeats: int, warmup: int = 3,
                     rounds: int = 3) -> list[tuple[float, float, float]]:
    """(median, p20, p80) ms of each function over the calls of :func:`time_blocks`."""
    out = []
    for ts in time_blocks(fns, repeats, warmup, rounds):
        qs = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        out.append((statistics.median(ts), qs[0], qs[-1]))
    return out


def _methods(layer: LayerCache, q: torch.Tensor, sm_scale: float, preset: Any, dtype: torch.dtype,
             libraries: dict[str, Any], threads: int, peers: bool) -> list[Peer]:
    """Every method of one case; ``fn`` None when unavailable here (the note says why)."""
    kd, vd = _dense_kv(layer, torch.float32)
    quant_bytes = sum(layer.used_bytes().values())
    group = preset.num_q_heads // preset.num_kv_heads
    bsz, hq, d = q.shape

    def dequant_sdpa() -> torch.Tensor:  # what HF QuantizedCache does every step: dequantize all, then attend
        k, v = _dense_kv(layer, torch.float32)
        o = F.scaled_dot_product_attention(q.float().view(bsz, -1, group, d), k, v, scale=sm_scale)
        return o.reshape(bsz, hq, d)

    out = sdpa_peers(q.float(), kd, vd, sm_scale)
    out.append(Peer("torch dequantize-all + SDPA", dequant_sdpa, quant_bytes,
                    "HF QuantizedCache's decode path (dequantize every bucket, folded fp32 SDPA)"))
    if peers:
        out += ggml_peers(q.float(), kd, vd, sm_scale, threads) + ort_peers(q.float(), kd, vd, sm_scale, threads)
    out.append(Peer("torch reference (per bucket + merge)", lambda: decode_attention(q, layer, sm_scale),
                    quant_bytes, "the oracle"))
    widths = tuple(sorted(layer.buckets, reverse=True))
    for label, lib in libraries.items():
        if lib is None:
            out.append(Peer(f"WindowQuant fused ({label})", None, quant_bytes, "no tuning log applies here"))
            continue
        from ...runtime.decoder import FusedDecoder, int8_dots_unsupported

        dec = FusedDecoder(lib, preset.num_q_heads, preset.num_kv_heads, preset.head_dim, dtype)
        kernel = dec.kernel(widths)
        out.append(Peer(f"WindowQuant fused ({label})", lambda dec=dec: dec(q, layer, sm_scale), quant_bytes,
                        str(kernel.provenance), "fma"))
        if label == "tuned" and int8_dots_unsupported(lib.device, split=False) is None:
            from ...compiler.isa_variants import int8_dot_flavour

            dec8 = FusedDecoder(lib, preset.num_q_heads, preset.num_kv_heads, preset.head_dim, dtype,
                                int8_dots=True)
            kernel = dec8.kernel(widths)
            out.append(Peer(f"WindowQuant fused ({label}, int8 dots)", lambda dec=dec8: dec(q, layer, sm_scale),
                            quant_bytes, f"{kernel.provenance}; WindowQuantConfig(int8_dots=True): QK and P@V of "
                            f"4/2-bit buckets as int8 dot products ({int8_dot_flavour(lib.device)})", "dot8"))
    return out


def run(model: str = "llava-ov-0.5b", n_tokens: list[int] | None = None, mixes: list[str] | None = None,
        repeats: int = 20, target: str = "llvm", logs_dir: str | None = None, out_dir: str | Path = "bench_out",
        progress: bool = True, threads: int | None = None, peers: bool = True,
        models: list[str] | None = None, report: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Benchmark every method on every (model, mix, length); writes ``decode.csv`` and ``decode.png``.

    ``threads`` (default: torch's) is used by torch, ggml and ONNX Runtime alike; the TVM modules use the TVM
    thread pool (``TVM_NUM_THREADS``). ``report`` gets the line naming the arithmetic peaks (llvm targets).
    """
    from tqdm import tqdm

    from ...compiler.cpu_threads import share_cores_with_torch
    from ...runtime.library import KernelLibrary

    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    # TVM's pool: as many threads as torch, ggml and ORT get, and not spinning on the cores they are timed on
    share_cores_with_torch(threads)
    models = models or [model]
    from ...compiler.device import resolve_device

    dtype = torch.float32 if resolve_device(target).kind == "llvm" else torch.float16  # a JSON llvm target too
    n_tokens = n_tokens or [2048, 8192, 32768]
    mixes = mixes or ["int4", "mixed"]
    libraries: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="wq-bench-"))
    # The untuned library sees no tuning logs and keeps its modules apart from the tuned ones.
    (scratch / "no-logs").mkdir()
    libraries["default schedule"] = KernelLibrary(target, logs_dir=scratch / "no-logs", cache_dir=scratch / "cache")
    tuned = KernelLibrary(target, logs_dir=logs_dir) if logs_dir is not None else KernelLibrary(target)
    libraries["tuned"] = tuned if tuned.logs_dir is not None and any(Path(tuned.logs_dir).glob("*/*/meta.json")) \
        else None
    copy_gbps = copy_bandwidth()
    peaks = mac_peaks(target) if resolve_device(target).kind == "llvm" else {}
    if peaks and report is not None:
        report(format_peaks(peaks, threads))
    rows: list[BenchRow] = []
    cases = [(p, m, n) for p in models for m in mixes for n in n_tokens]
    for name, mix, n in tqdm(cases, desc="decode bench", disable=not progress):
        preset = get_preset(name)
        layer = make_layer(n, MIXES[mix], preset.num_kv_heads, preset.head_dim, dtype)
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(1, preset.num_q_heads, preset.head_dim, generator=gen).to(dtype)
        sm_scale = preset.head_dim ** -0.5
        want = decode_attention(q, layer, sm_scale)
        methods = _methods(layer, q, sm_scale, preset, dtype, libraries, threads, peers)
        live = [m for m in methods if m.fn is not None]
        errs = {m.name: float((m.fn().float() - want).abs().max()) for m in live}
        timed = dict(zip([m.name for m in live], time_interleaved([m.fn for m in live], repeats)))
        best_dense = min(timed[m.name][0] for m in live if m.name.startswith("SDPA"))
        macs = 2 * preset.num_q_heads * preset.head_dim * _cached_tokens(layer)  # QK and P @ V of this case
        for m in methods:
            if m.fn is None:
                nan = float("nan")
                rows.append(BenchRow(name, m.name, mix, n, nan, nan, nan, nan, nan, nan, nan, m.note))
                continue
            med, p20, p80 = timed[m.name]
            gbps = m.bytes_read / (med * 1e-3) / 1e9
            frac = macs / (peaks[m.form] * threads) / (med * 1e-3) if m.form in peaks else float("nan")
            rows.append(BenchRow(name, m.name, mix, n, med, p20, p80, best_dense / med, gbps, gbps / copy_gbps,
                                 errs[m.name], m.note, frac))
        for m in live:  # ggml / ORT sessions hold native memory: free it before the next case
            close = getattr(m.fn, "close", None)
            if close is not None:
                close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "decode.csv")
    (out / "decode.md").write_text(format_markdown(rows) + (f"\n{format_peaks(peaks, threads)}\n" if peaks else ""))
    plot(rows, out / "decode.png", f"decode attention, {target}, {threads} threads")
    return rows


def _cached_tokens(layer: LayerCache) -> int:
    """Tokens sample 0 of ``layer`` holds (every bucket and the dense residual)."""
    return sum(int(b.lens[0]) for b in layer.buckets.values()) + int(layer.dense.lens[0])


def format_peaks(peaks: dict[str, float], threads: int) -> str:
    """One line naming the probes' peaks the ``of peak`` columns divide by."""
    names = {"fma": "fp32 FMA", "dot8": "int8 dot products"}
    got = ", ".join(f"{names[k]} {v / 1e9:.0f} GMAC/s" for k, v in peaks.items())
    return f"arithmetic peak of one core (probe kernels): {got}; 'of peak' divides by {threads} x these"


def format_markdown(rows: list[BenchRow]) -> str:
    """One markdown table per (model, mix), a column per length: the README's tables. Two ratios per length: the
    fastest dense fp32 SDPA call over this method (the issue's bar) and the fastest dense call of any dtype."""
    by_case: dict[tuple[str, str, int], list[BenchRow]] = {}
    for r in rows:
        by_case.setdefault((r.model, r.mix, r.n_tokens), []).append(r)

    def best(case: list[BenchRow], prefix: str) -> float:
        ts = [r.median_ms for r in case if r.method.startswith(prefix) and r.median_ms == r.median_ms]
        return min(ts) if ts else float("nan")

    out: list[str] = []
    for model, mix in dict.fromkeys((r.model, r.mix) for r in rows):
        lens = sorted({r.n_tokens for r in rows if (r.model, r.mix) == (model, mix)})
        top = lens[-1]
        out.append(f"**{model}, {mix} cache** (median ms; x = fastest dense fp32 SDPA call / this, and fastest dense "
                   f"call of any dtype / this; GB/s, share of the copy bandwidth, share of the arithmetic peak and "
                   f"max error at {top} tokens)\n")
        ls = " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lens)
        out.append(f"| method | {ls} | vs best fp32 | vs best dense | GB/s | of copy | of peak | max err | note |")
        out.append("|---|" + "---|" * len(lens) + "---|---|---|---|---|---|---|")
        methods = list(dict.fromkeys(r.method for r in rows if (r.model, r.mix) == (model, mix)))
        for m in methods:
            cells, r32, rbest, last = [], [], [], None
            for n in lens:
                case = by_case.get((model, mix, n), [])
                r = next((x for x in case if x.method == m), None)
                ok = r is not None and r.median_ms == r.median_ms
                cells.append(f"{r.median_ms:.3f}" if ok else "-")
                r32.append(f"{best(case, 'SDPA fp32') / r.median_ms:.2f}x" if ok else "-")
                rbest.append(f"{best(case, 'SDPA') / r.median_ms:.2f}x" if ok else "-")
                last = r if n == top else last
            ok = last is not None and last.median_ms == last.median_ms
            peak = f"{last.peak_frac:.0%}" if ok and last.peak_frac == last.peak_frac else "-"
            tail = (f"{last.gbps:.1f} | {last.copy_frac:.0%} | {peak} | {last.max_err:.1e}" if ok else "- | - | - | -")
            name = f"**{m}**" if m.startswith("WindowQuant") and "(tuned" in m else m
            out.append(f"| {name} | {' | '.join(cells)} | {' / '.join(r32)} | {' / '.join(rbest)} | {tail} | "
                       f"{last.note if last is not None and m.startswith('WindowQuant') else ''} |")
        out.append("")
    return "\n".join(out)


def write_csv(rows: list[BenchRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(rows: list[BenchRow], path: Path, title: str) -> None:
    """One panel per (model, mix): median ms against cached tokens, log-log, every measured method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.model, r.mix) for r in rows))
    cols = min(len(panels), 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.5 * nrows), squeeze=False)
    for ax, (model, mix) in zip(axes.flat, panels):
        sel = [r for r in rows if r.model == model and r.mix == mix]
        for method in dict.fromkeys(r.method for r in sel):
            pts = [(r.n_tokens, r.median_ms) for r in sel if r.method == method and r.median_ms == r.median_ms]
            if pts:
                xs, ys = zip(*pts)
                style = "-" if method.startswith("WindowQuant") else "--"
                ax.plot(xs, ys, style, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("ms per layer (median)")
        ax.set_title(f"{title}\n{model}, {mix} cache", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[BenchRow]) -> str:
    """A terminal table; ``vs best dense`` is the fastest dense SDPA call of the same case over this method."""
    head = (f"{'model':<14} {'method':<38} {'mix':>6} {'tokens':>7} {'median ms':>10} {'p20':>8} {'p80':>8} "
            f"{'vs best dense':>13} {'GB/s':>7} {'of copy':>7} {'of peak':>7} {'max err':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.median_ms != r.median_ms:
            lines.append(f"{r.model:<14} {r.method:<38} {r.mix:>6} {r.n_tokens:>7} {'-':>10} {'-':>8} {'-':>8} "
                         f"{'-':>13} {'-':>7} {'-':>7} {'-':>7} {'-':>9}  {r.note}")
            continue
        lines.append(f"{r.model:<14} {r.method:<38} {r.mix:>6} {r.n_tokens:>7} {r.median_ms:>10.3f} "
                     f"{r.p20_ms:>8.3f} {r.p80_ms:>8.3f} {r.vs_best_dense:>12.2f}x {r.gbps:>7.2f} "
                     f"{r.copy_frac:>6.0%} {_pct(r.peak_frac):>7} {r.max_err:>9.1e}  {r.note}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{x:.0%}" if x == x else "-"
