"""Several-token attention benchmark (``wq-bench --multi``): ``S`` new query tokens of one layer over ``n`` cached
tokens, the compiled multi-token kernel over an int4 bucketed cache against torch SDPA on the same tokens as a dense
cache, each SDPA call the fastest way it can be made.

The step's ``S`` tokens are the last ``S`` of the cache (causal among themselves, every cached token visible): SDPA
gets that as a boolean mask (``is_causal`` aligns the diagonal top-left, which is wrong for ``S < N``). SDPA
forms, in fp32 and bf16: ``enable_gqa=True``; K/V ``repeat_interleave``'d to the query heads (once, outside the
timing: a cache a user could keep, at group-size times the memory); the query group folded into the query axis
(``[B, Hkv, G*S, D]``, the mask repeated per head: each KV head read once). Also timed: what several-token steps
ran before this kernel (the one-token fused kernel once per new token, and dequantize-all + SDPA). Every method is
checked against the torch reference ``decode_attention(..., causal_tail=S)`` before it is timed; times are medians
(20/80% quantiles) of blocks of back-to-back calls, in one run (:func:`~.decode.time_interleaved`).
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...core.models import get_preset
from ...core.reference import decode_attention
from ...core.layout import LayerCache
from .decode import MIXES, make_layer, time_interleaved


@dataclass(frozen=True)
class MultiRow:
    model: str
    method: str
    n_tokens: int  # cached tokens before the step
    steps: int  # new query tokens S
    median_ms: float
    p20_ms: float
    p80_ms: float
    vs_best_sdpa: float  # fastest SDPA median / this median (same case, same run): > 1 is faster
    max_err: float  # vs the torch reference over the same (dequantized) cache
    note: str = ""


def dense_kv(layer: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0's tokens as one dense fp32 cache, buckets (dequantized) first, the dense piece (which ends with the
    step's tokens) last."""
    ks, vs = [], []
    for bucket in layer.buckets.values():
        n = int(bucket.lens[0])
        if n:
            k, v = bucket.dequantize()
            ks.append(k[:1, :, :n])
            vs.append(v[:1, :, :n])
    n = int(layer.dense.lens[0])
    ks.append(layer.dense.k[:1, :, :n].float())
    vs.append(layer.dense.v[:1, :, :n].float())
    return torch.cat(ks, 2).contiguous(), torch.cat(vs, 2).contiguous()


def sdpa_methods(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float
                 ) -> list[tuple[str, Callable[[], torch.Tensor], str]]:
    """SDPA forms of ``q [B, Hq, S, D]`` over dense ``k, v [B, Hkv, N, D]`` whose last ``S`` tokens are the step's;
    each returns ``[B, Hq, S, D]``."""
    bsz, hq, s, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    mask = torch.ones(s, n, dtype=torch.bool)
    mask[:, n - s:] = torch.tril(torch.ones(s, s, dtype=torch.bool))
    folded_mask = mask.repeat(g, 1)  # rows (head, token) of one KV head's group
    out = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        qd, kd, vd = q.to(dtype), k.to(dtype).contiguous(), v.to(dtype).contiguous()
        kr, vr = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
        qf = qd.reshape(bsz, hkv, g * s, d)

        def gqa(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=sm_scale, enable_gqa=True)

        def repeated(qd=qd, kr=kr, vr=vr) -> torch.Tensor:
            return F.scaled_dot_product_attention(qd, kr, vr, attn_mask=mask, scale=sm_scale)

        def folded(qf=qf, kd=kd, vd=vd) -> torch.Tensor:
            o = F.scaled_dot_product_attention(qf, kd, vd, attn_mask=folded_mask, scale=sm_scale)
            return o.view(bsz, hq, s, d)

        out += [(f"SDPA {tag}, enable_gqa", gqa, f"sdpa(q, K, V, mask, enable_gqa=True), dense {tag}"),
                (f"SDPA {tag}, K/V repeat_interleave'd", repeated,
                 f"sdpa(q, K.repeat_interleave({g}), ...), dense {tag}, repeat outside the timing"),
                (f"SDPA {tag}, query group folded", folded, f"sdpa(q.view(B, Hkv, {g}*S, D), K, V, mask), "
                 f"dense {tag}")]
    return out


def run(model: str = "llava-ov-0.5b", n_tokens: list[int] | None = None, steps: list[int] | None = None,
        mix: str = "int4", repeats: int = 10, logs_dir: str | None = None, out_dir: str | Path = "bench_out",
        threads: int | None = None, progress: bool = True) -> list[MultiRow]:
    """Every method at every (cached tokens, S); writes ``multi.csv`` and ``multi.md``."""
    from tqdm import tqdm

    from ...compiler.cpu_threads import share_cores_with_torch
    from ...integrations.multi_token import causal_steps, dequantized_attention
    from ...runtime.decoder import FusedDecoder
    from ...runtime.library import KernelLibrary
    from ...runtime.steps import StepDecoder

    if threads is not None:
        torch.set_num_threads(threads)
    share_cores_with_torch(torch.get_num_threads())
    preset = get_preset(model)
    hq, hkv, d = preset.num_q_heads, preset.num_kv_heads, preset.head_dim
    n_tokens, steps = n_tokens or [8192, 32768], steps or [8, 40, 64]
    tuned = KernelLibrary("llvm", logs_dir=logs_dir) if logs_dir is not None else KernelLibrary("llvm")
    scratch = Path(tempfile.mkdtemp(prefix="wq-bench-multi-"))
    (scratch / "no-logs").mkdir()
    untuned = KernelLibrary("llvm", logs_dir=scratch / "no-logs", cache_dir=scratch / "cache")
    kernels = {"tuned": StepDecoder(tuned, hq, hkv, d, torch.float32),
               "default knobs": StepDecoder(untuned, hq, hkv, d, torch.float32)}
    one_token = SimpleNamespace(decode=FusedDecoder(tuned, hq, hkv, d, torch.float32))  # causal_steps' backend
    sm_scale = d ** -0.5
    rows: list[MultiRow] = []
    for n, s in tqdm([(n, s) for n in n_tokens for s in steps], desc="multi bench", disable=not progress):
        layer = make_layer(n, MIXES[mix], hkv, d, torch.float32)
        gen = torch.Generator().manual_seed(s)
        layer.append(torch.randn(1, hkv, s, d, generator=gen), torch.randn(1, hkv, s, d, generator=gen))
        q = torch.randn(1, hq, s, d, generator=gen)
        want = decode_attention(q, layer, sm_scale, causal_tail=s)
        kd, vd = dense_kv(layer)
        methods: list[tuple[str, Callable[[], torch.Tensor], str]] = sdpa_methods(q, kd, vd, sm_scale)
        for label, dec in kernels.items():
            kernel = dec.kernel(tuple(sorted(layer.buckets, reverse=True)))
            methods.append((f"WindowQuant multi-token ({label})", lambda dec=dec: dec(q, layer, sm_scale).transpose(
                1, 2), f"{kernel.provenance}; knobs {dict((k, v) for k, v in kernel.spec.extra)}"))
        methods.append(("before: fused one-token kernel x S", lambda: causal_steps(
            one_token, q, layer, sm_scale).transpose(1, 2), "what S <= 64 ran before (one launch per new token)"))
        methods.append(("before: dequantize-all + SDPA", lambda: dequantized_attention(q, layer, sm_scale).transpose(
            1, 2), "what S > 64 ran before (fp32)"))
        errs = {name: float((fn().float() - want).abs().max()) for name, fn, _ in methods}
        timed = time_interleaved([fn for _, fn, _ in methods], repeats)
        best = min(t[0] for (name, _, _), t in zip(methods, timed) if name.startswith("SDPA"))
        for (name, _, note), (med, p20, p80) in zip(methods, timed):
            rows.append(MultiRow(model, name, n, s, med, p20, p80, best / med, errs[name], note))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "multi.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [x.name for x in fields(MultiRow)])
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    (out / "multi.md").write_text(format_table(rows))
    return rows


def format_table(rows: list[MultiRow]) -> str:
    """One markdown table: a row per method, a column per (cached tokens, S): median ms (x fastest SDPA)."""
    cases = sorted({(r.n_tokens, r.steps) for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.method, r.n_tokens, r.steps): r for r in rows}
    head = "| method | " + " | ".join(f"{n // 1024}K, S={s}" for n, s in cases) + " |"
    lines = [head, "|---" * (len(cases) + 1) + "|"]
    for m in methods:
        cells = []
        for n, s in cases:
            r: Any = by.get((m, n, s))
            cells.append("" if r is None else f"{r.median_ms:.2f} ms ({r.vs_best_sdpa:.2f}x)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
