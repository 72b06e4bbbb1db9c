"""Allocation policies at equal memory, and the measured per-window attention-output error they can use.

A policy turns what the prefill knows about one layer (its prompt queries, keys, values, the windows, optional
embedding scores) into bits per window under an average effective-bits budget (scale/zero and fp16 group tails
counted, as :func:`wq_compile.core.allocation.allocate_bits` counts them). Policies:

- ``uniform``: every window at the widest single width that fits the budget (KIVI-style; it may use less memory);
- ``random``: the similarity search fed random scores (a control);
- ``similarity:<scorer>``: the window search of :mod:`wq_compile.core.search` (monotone in the score, similarity-weighted
  error) with the ``attention`` or ``embedding`` scorer;
- ``sensitivity``: minimise the summed squared attention-output error measured on the prompt's own text queries
  (:func:`window_output_errors`), one fake-quantized width at a time, no similarity weighting;
- ``oracle``: the same minimisation on errors measured with the decode query itself (known only after the fact).

:func:`allocate_min_error` is the allocator of the last two: a multiple-choice knapsack solved on its convex hull by
a Lagrange multiplier (bisection), then a greedy fill of the budget left over. Vectorised torch per layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .allocation import allocate_bits, window_bits
from .baselines import uniform_bits
from .meta8 import bucket_meta_bits, decode, encode, runs_of, token_runs
from .quant_fit import codes_of, fit_of, fit_params
from .spec import ALLOC_WIDTHS, BIT_WIDTHS, DEFAULT_WIDTHS, EVICT
from .windows import Windows

POLICIES = ("uniform", "random", "similarity:attention", "similarity:embedding", "sensitivity", "oracle")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Exact attention of ``q [Hq, S, D]`` over ``k, v [Hkv, T, D]`` (no mask, GQA): ``[Hq, S, D]`` fp32."""
    hq, s, d = q.shape
    hkv = k.shape[0]
    if hq % hkv:
        raise ValueError(f"q: {hq} heads is not a multiple of {hkv} KV heads")
    qg = q.float().reshape(hkv, hq // hkv * s, d)
    p = torch.softmax(torch.einsum("hrd,htd->hrt", qg, k.float()) * sm_scale, dim=-1)
    return torch.einsum("hrt,htd->hrd", p, v.float()).reshape(hq, s, d)


def _whole_positions(windows: Windows, k_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, window_id)`` of the tokens in whole key groups (what a bucket quantizes; tails stay fp16)."""
    return windows.whole_positions(k_group)


def fake_quant_fast(x: torch.Tensor, bits: int, group: int, kind: str, fit: str = "minmax", meta_bits: int = 16,
                    k_group: int = 28) -> torch.Tensor:
    """Quantize-dequantize in the cache's format without packing codes (same numbers as
    :func:`wq_compile.core.quant.fake_quant`, checked in the tests): keys ``[..., n, D]`` per channel over ``group``
    tokens (``n`` a multiple of ``group``), values per token over ``group`` channels; fp16 scale and zero chosen by
    ``fit`` (a config's fit: :func:`wq_compile.core.quant_fit.fit_of` gives the one of ``kind``), on the 8-bit grid
    of runs of key groups (``k_group`` tokens) where ``meta_bits`` puts this width's bucket (as one append does)."""
    qmax = (1 << bits) - 1
    xf = x.float()
    how = fit_of(fit, kind)
    grid = bucket_meta_bits(bits, meta_bits) == 8
    if how != "minmax" or grid:  # the fitted parameters (slower: the fit's iterations), same coding rule
        g = (xf.reshape(*xf.shape[:-2], xf.shape[-2] // group, group, xf.shape[-1]).transpose(-1, -2)
             if kind == "k" else xf.reshape(*xf.shape[:-1], xf.shape[-1] // group, group))
        scale, zero = fit_params(g, qmax, how)
        if grid:  # scale/zero [..., G, D] (keys) or [..., n, D / group] (values): runs along axis -2
            n_grp = scale.shape[-2] if kind == "k" else -(-scale.shape[-2] // k_group)
            run = runs_of(n_grp, x.device)
            run = run if kind == "k" else token_runs(run, k_group, scale.shape[-2])
            lead = scale.shape[:-2]
            flat = [t.reshape(-1, *t.shape[-2:]) for t in (scale, zero)]
            scale, zero = (t.reshape(*lead, *t.shape[-2:]) for t in decode(*encode(*flat, run), run))
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        deq = codes_of(g, s, z, qmax) * s.float() + z.float()
        return (deq.transpose(-1, -2) if kind == "k" else deq).reshape(xf.shape)
    if kind == "k":
        g = xf.reshape(*xf.shape[:-2], xf.shape[-2] // group, group, xf.shape[-1])
        mn, mx = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
    elif kind == "v":
        g = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group, group)
        mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    else:
        raise ValueError(f"kind: must be 'k' or 'v', got {kind!r}")
    zero = mn.to(torch.float16)
    span = mx - zero.float()
    scale = (span / qmax).to(torch.float16)
    short = scale.float() * qmax < span
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(span > 0, scale, torch.zeros_like(scale)).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(scale > 0, torch.round((g - zero.float()) / safe), torch.zeros_like(g)).clamp_(0, qmax)
    return (codes * scale + zero.float()).reshape(xf.shape)


class WindowFakeQuant:
    """Fake-quantized copies of one layer's ``k, v [Hkv, T, D]``, every window at one width, cached per width;
    :meth:`apply` composes a mixed plan from them (whole key groups from each window's start; tails exact). At
    ``meta_bits=8`` the 8-bit scale/zero grid runs over every window's groups back to back (the cache's runs hold the
    windows of one width only: a run's base may differ, the grid's error barely does, docs/formats.md)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, windows: Windows, k_group: int, v_group: int,
                 fit: str = "minmax", meta_bits: int = 16) -> None:
        self.k, self.v, self.windows = k, v, windows
        self.k_group, self.v_group, self.fit, self.meta_bits = k_group, v_group, fit, meta_bits
        self.pos, self.wid = _whole_positions(windows, k_group)
        self._at: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def at(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every window at ``bits`` (16: the dense tensors)."""
        if bits == 16:
            return self.k, self.v
        if bits not in self._at:
            sel = self.pos.to(self.k.device)
            kq, vq = self.k.clone(), self.v.clone()
            # whole groups of several windows back to back: group boundaries stay window-aligned
            kq[:, sel] = fake_quant_fast(self.k[:, sel], bits, self.k_group, "k", self.fit, self.meta_bits,
                                         self.k_group).to(self.k.dtype)
            vq[:, sel] = fake_quant_fast(self.v[:, sel], bits, self.v_group, "v", self.fit, self.meta_bits,
                                         self.k_group).to(self.v.dtype)
            self._at[bits] = (kq, vq)
        return self._at[bits]

    def apply(self, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v`` with window ``w`` stored at ``bits[w]``."""
        bits = bits.to(torch.long).cpu()
        kq, vq = self.k.clone(), self.v.clone()
        for b in sorted({int(x) for x in bits.tolist()} - {16}):
            sel = self.pos[bits[self.wid] == b].to(self.k.device)
            kb, vb = self.at(b)
            kq[:, sel], vq[:, sel] = kb[:, sel], vb[:, sel]
        return kq, vq


def quantize_windows(k: torch.Tensor, v: torch.Tensor, windows: Windows, bits: torch.Tensor, k_group: int,
                     v_group: int, fit: str = "minmax", meta_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [Hkv, T, D]`` with every window fake-quantized at ``bits [W]`` (16: unchanged), as the cache stores
    them: whole key groups quantized from the window's start, the tail kept exact."""
    return WindowFakeQuant(k, v, windows, k_group, v_group, fit, meta_bits).apply(bits)


def window_output_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows,
                         widths: Sequence[int], sm_scale: float, k_group: int, v_group: int,
                         fit: str = "minmax", meta_bits: int = 16) -> torch.Tensor:
    """Squared relative change of the attention output of ``q [Hq, S, D]`` over ``k, v [Hkv, T, D]`` when only
    window ``w`` is fake-quantized at width ``widths[j]``: ``[W, len(widths)]`` (``||o' - o||^2 / ||o||^2`` over
    all heads and query rows).

    Exact for the fake-quantized tensors, and incremental: only the window's own tokens change, so each window's
    output follows from the dense softmax numerator/denominator plus the window's delta (one attention pass in
    all, then per width only the windowed tokens are quantized and rescored).
    """
    hq, s, d = q.shape
    hkv = k.shape[0]
    nw = len(windows)
    qg = q.float().reshape(hkv, hq // hkv * s, d)
    logits = torch.einsum("hrd,htd->hrt", qg, k.float()) * sm_scale
    pos, wid = _whole_positions(windows, k_group)  # window-major order
    counts = torch.bincount(wid, minlength=nw)
    lmax = int(counts.max()) if pos.numel() else 0
    out = torch.zeros(nw, len(widths), dtype=torch.float64)
    if lmax == 0:
        return out
    n_sel = pos.numel()
    pos = pos.to(k.device)
    if bool((counts == lmax).all()):  # equal windows (frames): the padded view is a reshape
        pad_idx, pad_ok = torch.arange(n_sel, device=k.device).view(nw, lmax), None
    else:
        first = torch.zeros(nw, dtype=torch.long)
        first[1:] = torch.cumsum(counts, 0)[:-1]
        slot = torch.arange(n_sel) - first[wid]
        pad_idx = torch.zeros(nw, lmax, dtype=torch.long)
        ok = torch.zeros(nw, lmax, dtype=torch.bool)
        pad_idx[wid, slot] = torch.arange(n_sel)
        ok[wid, slot] = True
        pad_idx, pad_ok = pad_idx.to(k.device), ok.to(k.device)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [..., n_sel, *] -> [..., W, Lmax, *]
        return x[:, pad_idx] if pad_ok is not None else x.reshape(x.shape[0], nw, lmax, *x.shape[2:])

    kw, vw = k[:, pos].float(), v[:, pos].float()  # the quantizable tokens, compact
    vf = v.float()
    # dense softmax pieces once, relative to the dense row max m0; each width rescales them to its own max
    m0 = logits.amax(-1)  # [Hkv, R]
    e0 = torch.exp(logits - m0[..., None])
    num0, den0 = torch.einsum("hrt,htd->hrd", e0, vf), e0.sum(-1)
    o = num0 / den0[..., None]
    o_sq = o.double().square().sum().clamp_min(1e-30)
    zero = logits.new_zeros(())
    e_sel = e0[:, :, pos]  # [Hkv, R, n_sel]
    if pad_ok is None:  # [Hkv, R, W, Lmax]: the windows' dense terms
        eo = e_sel.reshape(*e_sel.shape[:2], nw, lmax)
    else:
        eo = torch.where(pad_ok, e_sel[:, :, pad_idx], zero)
    eo_v, eo_s = torch.einsum("hrwt,hwtd->hrwd", eo, padded(vw)), eo.sum(-1)
    for j, bits in enumerate(widths):
        if bits == 16:
            continue
        if bits == EVICT:  # the window's terms leave the softmax (whole groups; a tail is < one group)
            ow = (num0[:, :, None] - eo_v) / (den0[:, :, None] - eo_s).clamp_min(1e-30)[..., None]
            out[:, j] = ((ow - o[:, :, None]).double().square().sum(dim=(0, 1, 3)) / o_sq).cpu()
            continue
        kq = fake_quant_fast(kw, int(bits), k_group, "k", fit, meta_bits, k_group)
        vq = fake_quant_fast(vw, int(bits), v_group, "v", fit, meta_bits, k_group)
        lq = torch.einsum("hrd,hwtd->hrwt", qg, padded(kq)) * sm_scale  # [Hkv, R, W, Lmax]
        lq_max = lq if pad_ok is None else lq.masked_fill(~pad_ok, float("-inf"))
        m = torch.maximum(m0, lq_max.flatten(2).amax(-1))  # [Hkv, R]
        f = torch.exp(m0 - m)  # rescale of the dense terms; 1 unless a quantized score beats the dense max
        eq = torch.exp(lq - m[..., None, None])
        if pad_ok is not None:
            eq = torch.where(pad_ok, eq, zero)  # padding never reaches inf * 0
        dnum = torch.einsum("hrwt,hwtd->hrwd", eq, padded(vq)) - eo_v * f[..., None, None]
        dden = eq.sum(-1) - eo_s * f[..., None]  # [Hkv, R, W]
        num, den = num0 * f[..., None], den0 * f
        ow = (num[:, :, None] + dnum) / (den[:, :, None] + dden)[..., None]
        err = (ow - o[:, :, None]).double().square().sum(dim=(0, 1, 3))  # [W]
        out[:, j] = (err / o_sq).cpu()
    return out


def allocate_min_error(errors: torch.Tensor, lengths: torch.Tensor, avg_bits: float,
                       widths: Sequence[int] = DEFAULT_WIDTHS, k_group: int = 28, v_group: int = 64,
                       meta_bits: int = 16) -> torch.Tensor:
    """Bits per window ``[W]`` minimising ``sum_w errors[w, j(w)]`` under the effective-bits budget.

    ``errors [W, len(widths)]`` may be any additive cost (measured squared output errors here). Lagrangian
    relaxation: for a multiplier ``lam`` every window independently takes ``argmin_j err + lam * cost``; ``lam``
    is bisected to the smallest value that fits, then single-window upgrades with the best error drop per bit are
    applied while the budget allows (at most ``W * len(widths)`` steps, each vectorised over windows).
    """
    widths = [int(w) for w in widths]
    nw = errors.shape[0]
    if errors.shape != (nw, len(widths)) or lengths.shape != (nw,):
        raise ValueError(f"errors/lengths: expected [W, {len(widths)}] and [W], got {tuple(errors.shape)} and "
                         f"{tuple(lengths.shape)}")
    if nw == 0:
        return torch.zeros(0, dtype=torch.long)
    cost = window_bits(lengths.cpu(), widths, k_group, v_group, meta_bits)
    err = errors.double().cpu()
    budget = float(avg_bits) * float(lengths.double().sum()) * (1 + 1e-9)
    if float(cost.min(1).values.sum()) > budget:
        raise ValueError(f"avg_bits: {avg_bits} is below the {float(cost.min(1).values.sum() / lengths.sum()):.3f} "
                         f"effective bits the narrowest width needs")
    rows = torch.arange(nw)

    def pick(lam: float) -> torch.Tensor:
        return torch.argmin(err + lam * cost, dim=1)

    lo, hi = 0.0, 1.0
    while float(cost[rows, pick(hi)].sum()) > budget:
        hi *= 4.0
        if hi > 1e30:
            break
    if float(cost[rows, pick(lo)].sum()) > budget:
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if float(cost[rows, pick(mid)].sum()) > budget:
                lo = mid
            else:
                hi = mid
        choice = pick(hi)
    else:
        choice = pick(lo)
    used = float(cost[rows, choice].sum())
    for _ in range(nw * len(widths)):
        dcost = cost - cost[rows, choice][:, None]
        gain = err[rows, choice][:, None] - err
        ok = (dcost > 0) & (gain > 0) & (used + dcost <= budget)
        if not bool(ok.any()):
            break
        ratio = torch.where(ok, gain / dcost, torch.full_like(gain, -1.0))
        flat = int(torch.argmax(ratio))
        w, j = divmod(flat, len(widths))
        used += float(dcost[w, j])
        choice[w] = j
    return torch.tensor(widths)[choice]


def plan_layer(policy: str, *, q_text: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows,
               avg_bits: float, sm_scale: float, k_group: int, v_group: int, widths: Sequence[int] = DEFAULT_WIDTHS,
               meta_bits: int = 16, embedding: torch.Tensor | None = None, oracle_errors: torch.Tensor | None = None,
               prompt_errors: torch.Tensor | None = None, quant_errors: torch.Tensor | None = None,
               attention: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Bits per window ``[W]`` of one layer under ``policy`` (see the module docstring).

    ``k, v [Hkv, T, D]`` are the layer's prompt keys/values, ``q_text [Hq, Tq, D]`` its text queries;
    ``embedding [W]`` the embedding scores; ``oracle_errors [W, len(widths)]`` the errors measured with the
    decode query (``oracle`` only). ``prompt_errors`` / ``quant_errors`` (``[W, len(widths)]``) and ``attention``
    (``[W]``) may be passed in when already computed; they are derived from ``q_text, k, v`` otherwise.
    """
    from .scores import attention_scores
    from .allocation import window_errors

    widths = tuple(sorted({int(w) for w in widths}, reverse=True))
    lengths = windows.lengths
    if policy == "uniform":
        return uniform_bits(lengths, avg_bits, widths, k_group, v_group, meta_bits)
    if policy in ("sensitivity", "oracle"):
        if policy == "oracle":
            if oracle_errors is None:
                raise ValueError("oracle_errors: the oracle policy needs the measured errors")
            errs = oracle_errors
        else:
            errs = prompt_errors if prompt_errors is not None else window_output_errors(
                q_text, k, v, windows, widths, sm_scale, k_group, v_group, meta_bits=meta_bits)
        return allocate_min_error(errs, lengths, avg_bits, widths, k_group, v_group, meta_bits)
    if policy == "random":
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(len(windows), generator=gen)
    elif policy == "similarity:attention":
        scores = attention if attention is not None else attention_scores(q_text, k, windows, sm_scale)
    elif policy == "similarity:embedding":
        if embedding is None:
            raise ValueError("embedding: the embedding policy needs embedding scores")
        scores = embedding
    else:
        raise ValueError(f"policy: must be one of {POLICIES}, got {policy!r}")
    errs = quant_errors if quant_errors is not None else window_errors(k[None], v[None], windows, widths, k_group,
                                                                       v_group)[0]
    return allocate_bits(scores.float(), errs.float(), lengths, avg_bits, widths, k_group, v_group, meta_bits)


_SPARK = "▁▂▃▄▅▆▇█"


def format_plan(bits: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, avg_bits: float,
                k_group: int = 28, v_group: int = 64, scorer: str = "attention", unit: str = "frame",
                meta_bits: int = 16) -> str:
    """The plan as a model sees it: one row per layer, one column per window (its width), then the layer's
    scores as a sparkline (low to high, min..max printed) so one sees which scores drove which widths.

    When every window of every layer got one width, a last line says why (the budget's slack over uniform
    allocation is smaller than one window's upgrade to the next width)."""
    nl, nw = bits.shape
    eff = float(window_bits(lengths, bits, k_group, v_group, meta_bits).sum() / (float(lengths.sum()) * nl))
    lines = [f"plan (effective {eff:.2f} bits/element under a {avg_bits:g}-bit budget; widths per {unit}, then the "
             f"{scorer} scores that drove them, low ▁ to high █):",
             f"  {unit:>9} " + "".join(f"{i:>3}" for i in range(nw))]
    for li in range(nl):
        sc = scores[li].double()
        lo, hi = float(sc.min()), float(sc.max())
        level = ((sc - lo) / (hi - lo) * (len(_SPARK) - 1)).round().long() if hi > lo else torch.zeros(nw).long()
        spark = "".join(_SPARK[int(x)] for x in level)
        lines.append(f"  layer {li:2d}: " + "".join(f"{int(b):>3}" for b in bits[li].tolist())
                     + f"  | {spark} ({lo:.3g}..{hi:.3g})")
    used = sorted({int(b) for b in bits.flatten().tolist()})
    if used == [EVICT]:
        lines.append("  every window was evicted (width 0): attention sees none of them")
    elif len(used) == 1:
        b = used[0]
        wider = [w for w in BIT_WIDTHS if w > b]
        if wider:
            nxt = min(wider)
            cost = window_bits(lengths, ALLOC_WIDTHS, k_group, v_group, meta_bits)
            step = float((cost[:, ALLOC_WIDTHS.index(nxt)] - cost[:, ALLOC_WIDTHS.index(b)]).min()) / float(lengths.sum())
            lines.append(f"  every window got int{b}: the budget leaves {avg_bits - eff:.2f} bits/element over uniform "
                         f"int{b} ({eff:.2f}), and moving even one {unit} to int{nxt} costs {step:.2f}; raise "
                         f"--avg-bits or use more {unit}s")
        else:
            lines.append(f"  every window got {b} bits: the budget covers the widest width")
    return "\n".join(lines)
