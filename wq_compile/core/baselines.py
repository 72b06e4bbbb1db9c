"""The equal-bytes baselines a window allocation is compared with: one uniform width (KIVI-style), the bytes left
spent on fp16 recent tokens as KIVI spends them, and the same histogram of widths placed at random.

Every cost goes through :func:`wq_compile.core.allocation.window_bits` (``meta_bits``: the storage format's scale/zero
bits, :mod:`wq_compile.core.meta8`), so a baseline and the plan it is compared with count bytes one way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .allocation import window_bits
from .spec import DEFAULT_WIDTHS, EVICT


def uniform_bits(lengths: torch.Tensor, avg_bits: float, widths: Sequence[int] = DEFAULT_WIDTHS, k_group: int = 28,
                 v_group: int = 64, meta_bits: int = 16) -> torch.Tensor:
    """KIVI-style: every window at the widest single width whose memory fits the budget (else the narrowest)."""
    budget = float(avg_bits) * float(lengths.double().sum()) * (1 + 1e-9)
    cost = window_bits(lengths.cpu(), widths, k_group, v_group, meta_bits).sum(0)
    order = sorted((j for j in range(len(widths)) if int(widths[j]) != EVICT), key=lambda j: -int(widths[j]))
    for j in order:
        if float(cost[j]) <= budget:
            return torch.full((lengths.numel(),), int(widths[j]), dtype=torch.long)
    return torch.full((lengths.numel(),), min(int(w) for w in widths if int(w) != EVICT), dtype=torch.long)


def kivi_recent_plan(lengths: torch.Tensor, avg_bits: float, widths: Sequence[int] = DEFAULT_WIDTHS, k_group: int = 28,
                     v_group: int = 64, nearest: bool = False, meta_bits: int = 16
                     ) -> tuple[torch.Tensor, int]:
    """The equal-bytes uniform baseline: every window at the widest stored width that fits (:func:`uniform_bits`),
    then the bytes left spent as KIVI spends them, on the most recent tokens kept in fp16, as many as fit (token
    granular, so the baseline meets any budget above its width's cost; ``nearest``: the count whose bits are nearest
    the budget, within half a token, even if just above). ``(bits [W], recent tokens)``; their cost is
    :func:`recent_plan_bits`."""
    bits = uniform_bits(lengths, avg_bits, widths, k_group, v_group, meta_bits)
    budget = float(avg_bits) * float(lengths.double().sum()) * (1 + 1e-9)
    extra = _recent_extra(lengths, bits, k_group, v_group, meta_bits)
    fits = max(int(torch.searchsorted(extra, torch.tensor([budget], dtype=extra.dtype), right=True)) - 1, 0)
    if nearest and fits + 1 < extra.numel() and float(extra[fits + 1]) - budget < budget - float(extra[fits]):
        fits += 1
    return bits, fits


def _recent_extra(lengths: torch.Tensor, bits: torch.Tensor, k_group: int, v_group: int,
                  meta_bits: int = 16) -> torch.Tensor:
    """``[T + 1]`` float64: the plan's bits with its last ``r`` windowed tokens fp16, for every ``r`` (index 0: none).
    A window's bits are spread evenly over its tokens (its fp16 tail included)."""
    per_win = window_bits(lengths.cpu(), bits, k_group, v_group, meta_bits).double()
    per_tok = torch.repeat_interleave(per_win / lengths.cpu().double().clamp_min(1), lengths.cpu().long())
    step = (16.0 - per_tok).flip(0).clamp_min(0)  # the most recent token first
    return torch.cat([step.new_zeros(1), step.cumsum(0)]) + per_win.sum()


def recent_plan_bits(lengths: torch.Tensor, bits: torch.Tensor, recent: int, k_group: int = 28,
                     v_group: int = 64, meta_bits: int = 16) -> float:
    """Bits (summed over windowed elements) of a plan ``bits [W]`` whose last ``recent`` windowed tokens are fp16."""
    return float(_recent_extra(lengths, bits, k_group, v_group, meta_bits)[recent])


def shuffled_plan(bits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same histogram of widths placed at random over the windows: ``bits [..., W]`` permuted per row (the
    equal-bytes control of any allocation over windows of equal length)."""
    gen = torch.Generator().manual_seed(seed)
    flat = bits.reshape(-1, bits.shape[-1])
    out = torch.stack([row[torch.randperm(row.numel(), generator=gen)] for row in flat])
    return out.reshape(bits.shape)
