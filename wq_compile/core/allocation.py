"""The budgeted, similarity-monotone bit allocation and the accounting it is held to.

:func:`effective_bits` is the one place that says what a width costs per element (codes, key-slot padding,
scale/zero of whole groups); :func:`allocate_bits` picks a width per window so the average stays within the budget,
a more relevant window never gets fewer bits than a less relevant one, and the similarity-weighted measured
quantization error (:func:`window_errors`) is minimal.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .quant import fake_quant, key_slots
from .meta8 import bucket_meta_bits, meta_cost_bits
from .spec import ALLOC_WIDTHS, DEFAULT_WIDTHS, EVICT, MAX_WIDTHS, QuantSpec
from .windows import Windows


def effective_bits(bits: int, k_group: int, v_group: int, meta_bits: int = 16) -> float:
    """Storage bits per K/V element at ``bits``, scale/zero of whole groups included (16: dense).

    Keys are packed per group in ``key_slots(k_group)`` token slots (28 -> 32: whole words, one vector load per
    channel in the CPU kernel), so a key code costs ``bits * slots / k_group`` bits. ``meta_bits=8`` (a config's
    8-bit scale/zero, :mod:`wq_compile.core.meta8`): the buckets it applies to pay 8-bit codes and their run base.
    """
    if bits == 16:
        return 16.0
    k_codes = bits * key_slots(k_group) / k_group
    k_meta, v_meta = meta_cost_bits(bucket_meta_bits(bits, meta_bits), k_group, v_group)
    return (k_codes + bits + k_meta + v_meta) / 2


def window_bits(lengths: torch.Tensor, widths: Sequence[int] | torch.Tensor, k_group: int, v_group: int,
                meta_bits: int = 16) -> torch.Tensor:
    """Storage bits of each window at each width, per K/V element pair: ``[W, len(widths)]`` float64, or
    ``[..., W]`` when ``widths`` is a tensor of one width per window (``[..., W]``, e.g. a plan's bits).

    The one accounting of effective bits: every budget, floor, plan cost and table goes through it. Whole key
    groups cost :func:`effective_bits` per element, a window's tail that does not fill a group stays fp16 (16),
    and an evicted window (width :data:`~wq_compile.core.spec.EVICT`, 0) costs nothing, tail included.
    """
    lengths = lengths.double()
    whole = torch.div(lengths, k_group, rounding_mode="floor") * k_group
    tail = (lengths - whole) * 16.0
    if isinstance(widths, torch.Tensor):
        lut = torch.zeros(17, dtype=torch.float64, device=widths.device)
        for b in ALLOC_WIDTHS:
            lut[b] = effective_bits(b, k_group, v_group, meta_bits) if b != EVICT else 0.0
        w = widths.long()
        keep = (w != EVICT).double()
        return lut[w] * whole.to(w.device) + tail.to(w.device) * keep
    cols = []
    for b in widths:
        b = int(b)
        cols.append(torch.zeros_like(lengths) if b == EVICT else whole * effective_bits(b, k_group, v_group, meta_bits) + tail)
    return torch.stack(cols, -1) if cols else lengths.new_zeros(lengths.shape[0], 0)

def min_avg_bits(windows: Windows, widths: Sequence[int], k_group: int, v_group: int, meta_bits: int = 16) -> float:
    """The cheapest budget any allocation can meet: every window at the narrowest width, fp16 group tails."""
    if len(windows) == 0:
        return 0.0
    lengths = windows.lengths.double()
    return float(window_bits(lengths, [min(int(w) for w in widths)], k_group, v_group, meta_bits).sum()
                 / lengths.sum())

def window_errors(k: torch.Tensor, v: torch.Tensor, windows: Windows, widths: Sequence[int], k_group: int,
                  v_group: int, exact: bool = False) -> torch.Tensor:
    """Quantization error per window and width, mean squared per element: ``[..., W, len(widths)]``.

    ``k, v [..., Hkv, T, D]`` (leading dims, e.g. layers, are batched). Only whole key groups of a window are
    quantized (the tail stays fp16, as in the layout), so key groups never cross a window boundary.
    The default measures each group's range and uses the uniform-quantizer error ``(range / qmax)^2 / 12``: one
    min/max pass for all widths. ``exact=True`` quantizes at every width and measures (about 100x slower).
    """
    pos, wid = windows.whole_positions(k_group, k.device)
    nw = len(windows)
    first = windows.whole_run_start(k_group, k.device)
    if first is not None:  # back-to-back windows of whole groups (video frames): a view, no gather
        kw, vw = k[..., first : first + pos.numel(), :].float(), v[..., first : first + pos.numel(), :].float()
    else:
        kw, vw = k.index_select(-2, pos).float(), v.index_select(-2, pos).float()
    cnt = torch.bincount(wid, minlength=nw).clamp_min(1)
    lead = k.shape[:-3]

    def per_window(per_tok: torch.Tensor) -> torch.Tensor:  # [..., n] -> [..., W] mean over a window's tokens
        return per_tok.new_zeros(*per_tok.shape[:-1], nw).index_add_(-1, wid, per_tok) / cnt

    if not exact:
        n, d = kw.shape[-2], kw.shape[-1]
        kg = kw.reshape(*kw.shape[:-2], n // k_group, k_group, d)
        k_rng = (kg.amax(-2) - kg.amin(-2)).square().mean(dim=(-3, -1))  # [..., n/kg]
        vg = vw.reshape(*vw.shape[:-1], d // v_group, v_group)
        v_rng = (vg.amax(-1) - vg.amin(-1)).square().mean(dim=(-3, -1))  # [..., n]
        rng = torch.repeat_interleave(k_rng, k_group, dim=-1) + v_rng
        base = per_window(rng) / 12.0
    cols = []
    for bits in widths:
        if bits == 16:
            cols.append(torch.zeros(*lead, nw, device=k.device))
        elif bits == EVICT:  # the window is gone: its K/V "reconstructed" as zeros (whole groups measured)
            cols.append(per_window((kw.square() + vw.square()).mean(dim=(-3, -1))))
        elif not exact:
            cols.append(base / float((1 << bits) - 1) ** 2)
        else:
            spec = QuantSpec(bits, k_group, v_group)
            se = (fake_quant(kw, spec, "k") - kw).square() + (fake_quant(vw, spec, "v") - vw).square()
            cols.append(per_window(se.mean(dim=(-3, -1))))
    return torch.stack(cols, dim=-1)

def allocate_bits(scores: torch.Tensor, errors: torch.Tensor, lengths: torch.Tensor, avg_bits: float,
                  widths: Sequence[int] = DEFAULT_WIDTHS, k_group: int = 28, v_group: int = 64,
                  meta_bits: int = 16) -> torch.Tensor:
    """Bits per window, ``[..., W]``, for scores ``[..., W]`` and errors ``[..., W, len(widths)]``.

    Sorted by score, a monotone allocation is contiguous runs of decreasing width (16, 8, 4, 2; fewer widths are
    padded by repeating the narrowest). Every end ``(a, b)`` of the first two runs is enumerated at once; the end
    of the third is the largest that fits the budget (found by ``searchsorted``: a wider window in place of a
    narrower one never raises the error, errors being made monotone in width). The budget is ``avg_bits`` effective
    bits per windowed element, scale/zero and fp16 group tails counted (:func:`window_bits`). Cost: O(W^2 log W)
    per layer; with width 0 (eviction) next to four stored widths there are five runs, O(W^3 log W).
    Each window's error is weighted by the square of its score relative to the sample's largest (plus 1e-3) when
    every score is non-negative (attention masses: a window's share of the attention scales its error in the output,
    and the errors are squared; scores that barely differ give a uniform allocation), else by its score min-max
    normalised (cosines): the scores' scale never matters. Measured (``wq-eval --analyze``, widths 16/8/4/2/1 at
    3 bits): min-max normalisation of attention masses made the least attended window's error free even on diffuse
    prompts, 1.03x / 2.51x uniform's output error on diffuse / the tiny model; squared relative masses give 1.00x
    there; unsquared ones too, but lose on needle at 3.5-4 bits (0.25x / 0.24x of uniform's error against 0.19x /
    0.12x squared) and on near-duplicates.
    """
    widths = tuple(sorted({int(w) for w in widths}, reverse=True))
    for w in widths:
        if w not in ALLOC_WIDTHS:
            raise ValueError(f"widths: {w} not in {ALLOC_WIDTHS}")
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or avg_bits <= 0:
        raise ValueError(f"avg_bits: must be a positive number, got {avg_bits!r}")
    if errors.shape[-1] != len(widths) or errors.shape[:-1] != scores.shape:
        raise ValueError(f"errors: expected shape {(*scores.shape, len(widths))}, got {tuple(errors.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: window scores must be finite (NaN/inf usually means NaN/inf keys or queries, or a "
                         "prompt without text tokens); drop those windows or pass uniform scores")
    if bool(torch.isnan(errors).any()):
        raise ValueError("errors: quantization errors are NaN (the windows hold NaN/inf K/V); keep such windows "
                         "dense (wq_compile.core.layout.unquantizable_windows) and search over the others")
    if lengths.shape != scores.shape[-1:]:
        raise ValueError(f"lengths: expected [{scores.shape[-1]}], got {tuple(lengths.shape)}")
    lead, nw = scores.shape[:-1], scores.shape[-1]
    dev = scores.device
    if nw == 0:
        return torch.zeros(*lead, 0, dtype=torch.long, device=dev)
    lengths = lengths.to(dev).double()
    # Errors non-increasing in width: a wider code never counts as worse than a narrower one.
    err = errors.double().flip(-1).cummin(-1).values.flip(-1)
    if len(widths) > MAX_WIDTHS:
        raise ValueError(f"widths: at most five widths (five runs are enumerated), got {widths}")
    nr = max(4, len(widths))  # 5 runs when eviction or 1 bit joins the four stored widths
    runs = list(range(len(widths))) + [len(widths) - 1] * (nr - len(widths))
    order = torch.argsort(-scores.double(), dim=-1, stable=True)
    weight = torch.gather(scores.double(), -1, order)
    if bool((weight >= 0).all()):  # attention masses: squared (errors are squared), flat scores stay uniform
        weight = (weight / weight.amax(-1, keepdim=True).clamp_min(1e-30)).square() + 1e-3
    else:  # signed scores (cosines): min-max, only their ranking and relative spread mean anything
        weight = weight - weight.amin(-1, keepdim=True)
        weight = weight / weight.amax(-1, keepdim=True).clamp_min(1e-12) + 1e-3

    def prefix(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.new_zeros(*x.shape[:-1], 1), torch.cumsum(x, -1)], -1)

    costs = window_bits(lengths, widths, k_group, v_group, meta_bits).to(dev)  # [W, len(widths)]
    cost_s = [torch.gather(costs[:, j].expand(*lead, nw), -1, order) for j in runs]
    err_s = [torch.gather(err[..., j], -1, order) * weight for j in runs]
    pc, pe = [prefix(c) for c in cost_s], [prefix(e) for e in err_s]
    f = prefix(cost_s[-2] - cost_s[-1])  # cost of turning the first c windows from the last run's width to the one before
    budget = float(avg_bits) * float(lengths.sum()) * (1 + 1e-9)
    idx = torch.arange(nw + 1, device=dev)
    a = idx.view(-1, 1).expand(nw + 1, nw + 1).reshape(-1)
    b = idx.view(1, -1).expand(nw + 1, nw + 1).reshape(-1)

    def at(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, i.expand(*lead, i.shape[-1]) if i.dim() == 1 else i)

    # Four runs: cost(a, b, c) = P0[a] + P1[b]-P1[a] + P2[c]-P2[b] + P3[W]-P3[c] = k(a, b) + f[c]. Five runs (an
    # eviction run last): the end e0 of the first run is looped over, and the last four runs are the four-run
    # problem on [e0, W) with P0[e0] - P1[e0] added (a >= e0).
    q = pc[nr - 4:]
    r = pe[nr - 4:]
    best_e = best_abc = None
    for e0 in (range(nw + 1) if nr == 5 else (0,)):
        off_c = (pc[0][..., e0] - pc[1][..., e0]).unsqueeze(-1) if nr == 5 else 0.0
        off_e = (pe[0][..., e0] - pe[1][..., e0]).unsqueeze(-1) if nr == 5 else 0.0
        k_ab = off_c + at(q[0], a) + at(q[1], b) - at(q[1], a) - at(q[2], b) + q[3][..., -1:]
        c = torch.searchsorted(f.contiguous(), (budget - k_ab).contiguous(), right=True) - 1
        feasible = (a >= e0) & (b >= a) & (c >= b)
        c = torch.maximum(c, b.expand_as(c)).clamp(max=nw)
        e = (off_e + at(r[0], a) + at(r[1], b) - at(r[1], a) + at(r[2], c) - at(r[2], b.expand_as(c))
             + r[3][..., -1:] - at(r[3], c))
        e = torch.where(feasible, e, torch.full_like(e, float("inf")))
        i = e.argmin(-1, keepdim=True)
        ei = torch.gather(e, -1, i)
        abc = [torch.gather(t.expand(*lead, t.shape[-1]) if t.dim() == 1 else t, -1, i) for t in (a, b, c)]
        abc = [torch.full_like(abc[0], e0)] + abc
        if best_e is None:
            best_e, best_abc = ei, abc
        else:
            better = ei < best_e
            best_e = torch.where(better, ei, best_e)
            best_abc = [torch.where(better, x, y) for x, y in zip(abc, best_abc)]
    if not bool(torch.isfinite(best_e).all()):
        cheapest = float(costs[:, -1].sum() / lengths.sum())
        raise ValueError(
            f"avg_bits: a budget of {avg_bits} bits/element is infeasible for widths {widths}: the cheapest "
            f"allocation needs {cheapest:.3f} effective bits/element (scale/zero and fp16 group tails included); "
            f"raise avg_bits, use larger k_group/v_group, or allow narrower widths"
        )
    ends = best_abc[1:] if nr == 4 else best_abc
    rank = torch.arange(nw, device=dev).expand(*lead, nw)
    w = torch.tensor([widths[j] for j in runs], device=dev)
    run = sum((rank >= end).long() for end in ends)
    out = torch.empty(*lead, nw, dtype=torch.long, device=dev)
    out.scatter_(-1, order, w[run])
    return out
