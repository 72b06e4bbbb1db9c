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
from .spec import BIT_WIDTHS, GROUP_META_BITS, QuantSpec
from .windows import Windows


def effective_bits(bits: int, k_group: int, v_group: int) -> float:
    """Storage bits per K/V element at ``bits``, fp16 scale/zero of whole groups included (16: dense).

    Keys are packed per group in ``key_slots(k_group)`` token slots (28 -> 32: whole words, one vector load per
    channel in the CPU kernel), so a key code costs ``bits * slots / k_group`` bits.
    """
    if bits == 16:
        return 16.0
    k_codes = bits * key_slots(k_group) / k_group
    return (k_codes + bits) / 2 + GROUP_META_BITS / 2 / k_group + GROUP_META_BITS / 2 / v_group

def min_avg_bits(windows: Windows, widths: Sequence[int], k_group: int, v_group: int) -> float:
    """The cheapest budget any allocation can meet: every window at the narrowest width, fp16 group tails."""
    if len(windows) == 0:
        return 0.0
    lengths = windows.lengths.double()
    whole = torch.div(lengths, k_group, rounding_mode="floor") * k_group
    narrow = effective_bits(min(int(w) for w in widths), k_group, v_group)
    return float((whole * narrow + (lengths - whole) * 16.0).sum() / lengths.sum())

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
        elif not exact:
            cols.append(base / float((1 << bits) - 1) ** 2)
        else:
            spec = QuantSpec(bits, k_group, v_group)
            se = (fake_quant(kw, spec, "k") - kw).square() + (fake_quant(vw, spec, "v") - vw).square()
            cols.append(per_window(se.mean(dim=(-3, -1))))
    return torch.stack(cols, dim=-1)

def allocate_bits(scores: torch.Tensor, errors: torch.Tensor, lengths: torch.Tensor, avg_bits: float,
                  widths: Sequence[int] = BIT_WIDTHS, k_group: int = 28, v_group: int = 64) -> torch.Tensor:
    """Bits per window, ``[..., W]``, for scores ``[..., W]`` and errors ``[..., W, len(widths)]``.

    Sorted by score, a monotone allocation is contiguous runs of decreasing width (16, 8, 4, 2; fewer widths are
    padded by repeating the narrowest). Every end ``(a, b)`` of the first two runs is enumerated at once; the end
    of the third is the largest that fits the budget (found by ``searchsorted``: a wider window in place of a
    narrower one never raises the error, errors being made monotone in width). The budget is ``avg_bits`` effective
    bits per windowed element, scale/zero and fp16 group tails counted. Cost: O(W^2 log W) per layer.
    Each window's error is weighted by its score min-max normalised over the sample (plus 1e-3), so only the
    ranking and the relative spread of the scores matter, not their scale (cosines and attention masses both work).
    """
    widths = tuple(sorted({int(w) for w in widths}, reverse=True))
    for w in widths:
        if w not in BIT_WIDTHS:
            raise ValueError(f"widths: {w} not in {BIT_WIDTHS}")
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
    whole = torch.div(lengths, k_group, rounding_mode="floor") * k_group
    tail_bits = (lengths - whole) * 16.0
    # Errors non-increasing in width: a wider code never counts as worse than a narrower one.
    err = errors.double().flip(-1).cummin(-1).values.flip(-1)
    runs = list(range(len(widths))) + [len(widths) - 1] * (4 - len(widths))
    order = torch.argsort(-scores.double(), dim=-1, stable=True)
    weight = torch.gather(scores.double(), -1, order)
    weight = weight - weight.amin(-1, keepdim=True)
    weight = weight / weight.amax(-1, keepdim=True).clamp_min(1e-12) + 1e-3  # positive and scale-free

    def prefix(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.new_zeros(*x.shape[:-1], 1), torch.cumsum(x, -1)], -1)

    cost_s = [torch.gather((whole * effective_bits(widths[j], k_group, v_group) + tail_bits).expand(*lead, nw), -1,
                           order) for j in runs]
    err_s = [torch.gather(err[..., j], -1, order) * weight for j in runs]
    pc, pe = [prefix(c) for c in cost_s], [prefix(e) for e in err_s]
    f = prefix(cost_s[2] - cost_s[3])  # cost of turning the first c windows from run-3 width to run-2 width
    budget = float(avg_bits) * float(lengths.sum()) * (1 + 1e-9)
    idx = torch.arange(nw + 1, device=dev)
    a = idx.view(-1, 1).expand(nw + 1, nw + 1).reshape(-1)
    b = idx.view(1, -1).expand(nw + 1, nw + 1).reshape(-1)

    def at(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, i.expand(*lead, i.shape[-1]) if i.dim() == 1 else i)

    # cost(a, b, c) = P0[a] + P1[b]-P1[a] + P2[c]-P2[b] + P3[W]-P3[c] = k(a, b) + f[c]
    k_ab = at(pc[0], a) + at(pc[1], b) - at(pc[1], a) - at(pc[2], b) + pc[3][..., -1:]
    c = torch.searchsorted(f.contiguous(), (budget - k_ab).contiguous(), right=True) - 1
    feasible = (b >= a) & (c >= b)
    c = torch.maximum(c, b.expand_as(c)).clamp(max=nw)
    e = (at(pe[0], a) + at(pe[1], b) - at(pe[1], a) + at(pe[2], c) - at(pe[2], b.expand_as(c))
         + pe[3][..., -1:] - at(pe[3], c))
    e = torch.where(feasible, e, torch.full_like(e, float("inf")))
    best = e.argmin(-1, keepdim=True)
    if not bool(torch.isfinite(torch.gather(e, -1, best)).all()):
        cheapest = float((whole * effective_bits(widths[-1], k_group, v_group) + tail_bits).sum() / lengths.sum())
        raise ValueError(
            f"avg_bits: a budget of {avg_bits} bits/element is infeasible for widths {widths}: the cheapest "
            f"allocation needs {cheapest:.3f} effective bits/element (scale/zero and fp16 group tails included); "
            f"raise avg_bits, use larger k_group/v_group, or allow narrower widths"
        )
    ends = [torch.gather(t.expand(*lead, t.shape[-1]) if t.dim() == 1 else t, -1, best) for t in (a, b, c)]
    rank = torch.arange(nw, device=dev).expand(*lead, nw)
    w = torch.tensor([widths[j] for j in runs], device=dev)
    run = (rank >= ends[0]).long() + (rank >= ends[1]).long() + (rank >= ends[2]).long()
    out = torch.empty(*lead, nw, dtype=torch.long, device=dev)
    out.scatter_(-1, order, w[run])
    return out
