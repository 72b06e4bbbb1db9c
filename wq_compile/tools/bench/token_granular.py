"""Claim (2), measured: window-level mixed precision with reordering vs token-granularity mixed precision.

Decode latency of one layer at equal average bits: the reordered cache (one uniform bucket per width, the fused
kernel called through the public runtime, :class:`wq_compile.runtime.decoder.FusedDecoder`, so a faster fused kernel is
picked up as soon as it lands) against the token-granular cache (every key group keeps its width in place,
:mod:`wq_compile.kernels.token_granular`), plus torch SDPA on the dense fp32 cache for scale. Both quantized caches
hold the same tokens with the same share of each width (the ``mixed`` mix: 1/8 int8, 3/8 int4, 1/2 int2) and a
64-token dense residual; the token-granular widths are shuffled across key groups (seeded), as a token-level
search would leave them. Each method is checked against its torch reference before timing; timings alternate
between methods within one process, medians of ``repeats``.

And the search: the window-level search (one window per frame) against the same search at the finest granularity
the format allows (one key group), on every layer of the model, similarity and sensitivity policies.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...kernels.token_granular import TokenGranularSpec, pack_token_granular, reference_token_granular
from ...compiler.baselines import compile_token_granular
from ...core.models import get_preset
from ...core.reference import decode_attention
from .decode import MIXES, make_layer, time_blocks

RESIDUAL = 64


@dataclass(frozen=True)
class GranularityRow:
    method: str
    n_tokens: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    vs_reordered: float  # reordered median / this median (> 1: faster than reordered)
    eff_bits: float
    max_err: float
    note: str = ""


@dataclass(frozen=True)
class SearchRow:
    granularity: str
    policy: str
    units: int  # windows per layer
    median_ms: float  # all layers, scoring excluded (identical for both granularities)


def _group_bits(frames: int, k_group: int, mix: dict[int, float], seed: int) -> torch.Tensor:
    """Key-group widths with the mix's shares of the frame widths, shuffled across groups."""
    per_frame = 196 // k_group
    widths = sorted(mix, reverse=True)
    counts = [round(mix[w] * frames) for w in widths]
    counts[-1] = frames - sum(counts[:-1])
    bits = torch.tensor([w for w, c in zip(widths, counts) for _ in range(c * per_frame)])
    return bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(seed))]


def _eff_bits_tokgran(cache: Any, d: int) -> float:
    n = int(cache.lens[0])
    hkv = cache.k_words.shape[1]
    words = int((d * cache.bits[0, :n].long() // 32).sum())
    groups = -(-n // 28)
    nbytes = hkv * (2 * words * 4 + 2 * groups * d * 2 + 2 * n * cache.v_scale.shape[-1] * 2)
    return nbytes * 8 / (hkv * n * d * 2)


def _time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """ms of ``repeats`` calls of each function, each in one block after its warm-up
    (:func:`wq_compile.tools.bench.decode.time_blocks` with one round)."""
    return dict(zip(fns, time_blocks(list(fns.values()), repeats, warmup, rounds=1)))


def run_decode(model: str = "llava-ov-0.5b", n_tokens: tuple[int, ...] = (2048, 8192, 32768), repeats: int = 20,
               seed: int = 0, library: Any = None, check_up_to: int = 8192) -> list[GranularityRow]:
    from ...compiler.cpu_threads import share_cores_with_torch
    from ...runtime.decoder import FusedDecoder
    from ...kernels import piece_fields
    from ...kernels.attention_cpu import CpuKnobs
    from ...compiler.baselines import compile_group_dispatch
    from ...kernels.granular_cpu import dispatch_spec, pack_group_dispatch, reference_group_dispatch
    from ...runtime.library import KernelLibrary

    share_cores_with_torch(torch.get_num_threads())  # every kernel here on torch's threads (TVM's pool starts now)
    p = get_preset(model)
    hq, hkv, d = p.num_q_heads, p.num_kv_heads, p.head_dim
    library = library or KernelLibrary("llvm")
    fused = FusedDecoder(library, hq, hkv, d, torch.float32)
    kernel = fused.kernel((8, 4, 2))
    spec = TokenGranularSpec(d, hq, hkv)
    toks = {kind: compile_token_granular(spec, schedule=kind) for kind in ("vectorized", "parallel")}
    # per-key-group dispatch to the fused kernel's own SIMD tiles, with the fused kernel's knobs
    dspec = dispatch_spec(d, hq, hkv, CpuKnobs.of(kernel.spec))
    disp = compile_group_dispatch(dspec)
    sm = d ** -0.5
    rows = []
    for n in n_tokens:
        frames = max(1, n // 196)
        layer = make_layer(n, MIXES["mixed"], hkv, d, torch.float32, residual=RESIDUAL, seed=seed,
                           meta_bits=16)  # the per-token kernels read fp16 scale/zero
        gen = torch.Generator().manual_seed(seed + 1)
        k = torch.randn(hkv, frames * 196, d, generator=gen)
        v = torch.randn(hkv, frames * 196, d, generator=gen)
        dk, dv = torch.randn(hkv, RESIDUAL, d, generator=gen), torch.randn(hkv, RESIDUAL, d, generator=gen)
        gbits = _group_bits(frames, 28, MIXES["mixed"], seed)
        cache = pack_token_granular(k, v, gbits, dk, dv)
        gcache = pack_group_dispatch(dspec, k, v, gbits, dk, dv)
        gargs = gcache.args()
        q = torch.randn(1, hq, d, generator=gen)
        out = torch.empty(1, hq, d)
        args = cache.args()

        def run_disp() -> torch.Tensor:
            disp(q, *gargs, sm, out)
            return out

        def run_tok(kind: str = "vectorized") -> torch.Tensor:
            toks[kind](q, *args, sm, out)
            return out

        kd = torch.cat([b.dequantize()[0][:, :, : int(b.lens[0])] for b in layer.buckets.values()]
                       + [layer.dense.k[:, :, : int(layer.dense.lens[0])]], 2)
        vd = torch.cat([b.dequantize()[1][:, :, : int(b.lens[0])] for b in layer.buckets.values()]
                       + [layer.dense.v[:, :, : int(layer.dense.lens[0])]], 2)
        qg = q.view(1, hkv, hq // hkv, d)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qg, kd, vd, scale=sm)

        err_r = float((fused(q, layer, sm).float() - decode_attention(q, layer, sm)).abs().max())
        # the fused kernel called like the baselines (arguments made once, torch tensors, no decoder around it):
        # a kernel-to-kernel comparison; the decoder's per-call Python is in wq-bench's decode table
        pieces = {f"q{b}": layer.buckets[b] for b in (8, 4, 2)}
        pieces["dense"] = layer.dense
        fargs = [q] + [sm if a.is_scalar else getattr(pieces[piece_fields(a.name)[0]], piece_fields(a.name)[1])
                       for a in kernel.signature.inputs[1:]] + [out]
        kernel(*fargs)  # checked once

        def run_fused() -> torch.Tensor:
            kernel.call_unchecked(*fargs)
            return out

        if n <= check_up_to:
            want = reference_token_granular(q, cache, sm)
            err_t = float((run_tok().clone() - want).abs().max())
            err_p = float((run_tok("parallel").clone() - want).abs().max())
            err_d = float((run_disp().clone() - reference_group_dispatch(q, gcache, sm)).abs().max())
        else:
            err_t = err_p = err_d = float("nan")
        times = _time_interleaved({"reordered": run_fused, "token": run_tok,
                                   "token_par": lambda: run_tok("parallel"), "dispatch": run_disp, "sdpa": sdpa},
                                  repeats)
        med = {k_: statistics.median(v_) for k_, v_ in times.items()}
        qs = {k_: statistics.quantiles(v_, n=5) for k_, v_ in times.items()}
        eff_r = sum(layer.used_bytes()[f"int{b}"] for b in (8, 4, 2)) * 8 / (hkv * frames * 196 * d * 2)
        eff_t = _eff_bits_tokgran(cache, d)
        eff_d = gcache.bytes_read() * 8 / (hkv * frames * 196 * d * 2)  # codes, scales, zeros and the 3 tables
        base = med["reordered"]
        rows += [
            GranularityRow("reordered buckets (fused kernel)", n, med["reordered"], qs["reordered"][0],
                           qs["reordered"][-1], 1.0, eff_r, err_r,
                           f"{kernel.provenance}; kernel called directly, as the baselines are"),
            GranularityRow("token-granular in place, per-group dispatch", n, med["dispatch"], qs["dispatch"][0],
                           qs["dispatch"][-1], base / med["dispatch"], eff_d, err_d,
                           "width read per key group, then the fused kernel's SIMD tile for it (same knobs)"),
            GranularityRow("token-granular in place", n, med["token"], qs["token"][0], qs["token"][-1],
                           base / med["token"], eff_t, err_t, "hand schedule (parallel, inline, vectorized PV)"),
            GranularityRow("token-granular in place, parallel only", n, med["token_par"], qs["token_par"][0],
                           qs["token_par"][-1], base / med["token_par"], eff_t, err_p,
                           "same effort as the fused default schedule"),
            GranularityRow("torch SDPA, dense fp32 (query group as rows)", n, med["sdpa"], qs["sdpa"][0],
                           qs["sdpa"][-1], base / med["sdpa"], 32.0, 0.0, "scale reference"),
        ]
    return rows


def run_search(model: str = "llava-ov-0.5b", frames: int = 32, text_tokens: int = 40, avg_bits: float = 3.5,
               repeats: int = 3, seed: int = 0) -> list[SearchRow]:
    """Allocation time, all layers: windows of one frame vs windows of one key group (28 tokens)."""
    from ...core.policy import allocate_min_error, window_output_errors
    from ...core.scores import attention_scores
    from ...core.search import search
    from ...core.spec import DEFAULT_WIDTHS
    from ...core.windows import make_windows

    p = get_preset(model)
    gen = torch.Generator().manual_seed(seed)
    t = 14 + frames * 196 + 1 + text_tokens
    k = torch.randn(p.num_layers, p.num_kv_heads, t, p.head_dim, generator=gen)
    v = torch.randn(p.num_layers, p.num_kv_heads, t, p.head_dim, generator=gen)
    q = torch.randn(p.num_layers, p.num_q_heads, text_tokens, p.head_dim, generator=gen)
    sm = p.head_dim ** -0.5
    rows = []
    for name, size in (("window (frame)", 196), ("token group (28)", 28)):
        w = make_windows([(14, frames * 196)], size)
        scores = torch.stack([attention_scores(q[i], k[i], w, sm) for i in range(p.num_layers)])

        def sim() -> None:
            search(scores, k, v, w, avg_bits)

        def sens() -> None:
            for i in range(p.num_layers):
                errs = window_output_errors(q[i], k[i], v[i], w, DEFAULT_WIDTHS, sm, 28, 64)  # the policy's widths
                allocate_min_error(errs, w.lengths, avg_bits)

        for policy, fn in (("similarity", sim), ("sensitivity", sens)):
            if policy == "similarity":  # warm-up; the sensitivity pass is long and timed once
                fn()
            times = []
            for _ in range(repeats if policy == "similarity" else 1):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append(SearchRow(name, policy, len(w), statistics.median(times)))
    return rows


def write(rows: list[GranularityRow], search_rows: list[SearchRow], out_dir: str | Path, title: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rs in (("granularity.csv", rows), ("granularity_search.csv", search_rows)):
        if rs:
            with open(out / name, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(asdict(rs[0])))
                wr.writeheader()
                wr.writerows(asdict(r) for r in rs)
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for method in dict.fromkeys(r.method for r in rows):
            pts = [(r.n_tokens, r.median_ms) for r in rows if r.method == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("ms per layer (median)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "granularity.png", dpi=120)
        plt.close(fig)


def format_tables(rows: list[GranularityRow], search_rows: list[SearchRow]) -> str:
    lines = [f"{'method':<46} {'tokens':>7} {'median ms':>10} {'p20':>8} {'p80':>8} {'reordered/this':>14} "
             f"{'eff bits':>8} {'max err':>9}  note"]
    for r in rows:
        lines.append(f"{r.method:<46} {r.n_tokens:>7} {r.median_ms:>10.3f} {r.p20_ms:>8.3f} {r.p80_ms:>8.3f} "
                     f"{r.vs_reordered:>13.2f}x {r.eff_bits:>8.2f} {r.max_err:>9.1e}  {r.note}")
    if search_rows:
        lines += ["", f"{'search granularity':<20} {'policy':<12} {'units/layer':>11} {'ms, all layers':>15}"]
        for s in search_rows:
            lines.append(f"{s.granularity:<20} {s.policy:<12} {s.units:>11} {s.median_ms:>15.1f}")
    return "\n".join(lines)
