"""Window search: given each window's score, pick a width per window and layer (a :class:`Plan`).

The similarity policy (:mod:`wq_compile.core.allocation`) is monotone in similarity (a more relevant window never gets fewer bits than a less relevant one),
meets an average-bits budget that counts scale/zero overhead and fp16 group tails honestly, and minimises the
similarity-weighted measured quantization error. Everything is vectorised torch; no per-token Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .allocation import allocate_bits, window_bits, window_errors
from .policy import allocate_min_error, window_output_errors
from .spec import ALLOC_WIDTHS, DEFAULT_WIDTHS
from .windows import Windows


@dataclass(frozen=True)
class Plan:
    """The search result for one sample: bits per window and layer, the scores behind them, memory estimate."""

    windows: Windows
    bits: torch.Tensor  # [L, W] long
    scores: torch.Tensor  # [L, W]
    k_group: int
    v_group: int
    meta_bits: int = 16

    def layer(self, i: int) -> Windows:
        """The windows of layer ``i`` with their widths."""
        return self.windows.with_bits(self.bits[i])

    def effective_avg_bits(self) -> float:
        """Average effective bits per windowed K/V element over all layers (what the budget constrains)."""
        if len(self.windows) == 0:
            return 0.0
        lengths = self.windows.lengths.to(self.bits.device)
        cost = window_bits(lengths, self.bits, self.k_group, self.v_group, self.meta_bits)
        return float(cost.sum() / (lengths.double().sum() * self.bits.shape[0]))

    def memory_bytes(self, num_kv_heads: int, head_dim: int) -> int:
        """Estimated K+V bytes of the windowed tokens over all layers: codes, scale/zero of whole groups, fp16
        for 16-bit windows and group tails (the layout's exact count may differ by partial words only)."""
        elems = float(self.windows.lengths.sum()) * self.bits.shape[0] * num_kv_heads * head_dim * 2
        return int(round(self.effective_avg_bits() * elems / 8))

    def histogram(self) -> dict[int, int]:
        """How many (layer, window) pairs got each width."""
        used = [w for w in ALLOC_WIDTHS if w in DEFAULT_WIDTHS or bool((self.bits == w).any())]
        return {int(w): int((self.bits == w).sum()) for w in used}


#: Allocation policies of :func:`search`. ``auto`` = ``sensitivity`` when the caller passes the prompt's text
#: queries, else ``similarity`` with the caller's scores. Measured in ``wq-eval --analyze``: on prompt-focused
#: workloads ``sensitivity`` matched or beat the similarity-weighted search at every budget (up to 3x lower KL at
#: 3 bits) and stayed below uniform allocation everywhere; similarity with the attention scorer came close at a
#: small fraction of the cost (one scoring pass vs. a re-scored window per width), so it stays the cache's default
#: and ``sensitivity`` is opt-in (pass ``q_text``).
SEARCH_POLICIES = ("auto", "similarity", "sensitivity")


def search(scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows, avg_bits: float,
           widths: Sequence[int] = DEFAULT_WIDTHS, k_group: int = 28, v_group: int = 64, exact_errors: bool = False,
           *, q_text: torch.Tensor | None = None, sm_scale: float | None = None, policy: str = "auto",
           meta_bits: int = 16) -> Plan:
    """Full window search for one sample: measure errors on ``k, v [L, Hkv, T, D]``, then allocate per layer.

    ``scores`` is ``[W]`` (shared across layers, e.g. embedding scorer) or ``[L, W]`` (attention scorer).
    ``policy="similarity"``: monotone in ``scores``, similarity-weighted K/V quantization error (see
    :func:`allocate_bits`). ``policy="sensitivity"`` needs ``q_text [L, Hq, Tq, D]`` (the prompt's RoPE'd text
    queries) and ``sm_scale``: each window's error at each width is the measured change of the attention output of
    those queries when only that window is quantized (:func:`wq_compile.core.policy.window_output_errors`), and the
    summed error is minimised under the budget (:func:`wq_compile.core.policy.allocate_min_error`); ``scores`` are
    then only recorded in the plan. ``auto`` picks ``sensitivity`` when ``q_text`` is given.
    """
    if policy not in SEARCH_POLICIES:
        raise ValueError(f"policy: must be one of {SEARCH_POLICIES}, got {policy!r}")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k: expected k and v of equal shape [layers, kv_heads, tokens, head_dim], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    nl = k.shape[0]
    if scores.dim() == 1:
        scores = scores.unsqueeze(0).expand(nl, -1)
    if scores.shape != (nl, len(windows)):
        raise ValueError(f"scores: expected [{len(windows)}] or [{nl}, {len(windows)}], got {tuple(scores.shape)}")
    widths = tuple(sorted({int(w) for w in widths}, reverse=True))
    if policy == "sensitivity" or (policy == "auto" and q_text is not None):
        if q_text is None or sm_scale is None:
            raise ValueError("q_text/sm_scale: the sensitivity policy needs the prompt's text queries and sm_scale")
        if q_text.dim() != 4 or q_text.shape[0] != nl:
            raise ValueError(f"q_text: expected [{nl}, q_heads, text_tokens, head_dim], got {tuple(q_text.shape)}")
        bits = torch.stack([
            allocate_min_error(window_output_errors(q_text[i], k[i], v[i], windows, widths, sm_scale, k_group,
                                                    v_group), windows.lengths, avg_bits, widths, k_group, v_group,
                               meta_bits)
            for i in range(nl)]).to(k.device)
        return Plan(windows, bits, scores, k_group, v_group, meta_bits)
    errs = window_errors(k, v, windows, widths, k_group, v_group, exact=exact_errors)
    bits = allocate_bits(scores, errs, windows.lengths, avg_bits, widths, k_group, v_group, meta_bits)
    return Plan(windows, bits, scores, k_group, v_group, meta_bits)
