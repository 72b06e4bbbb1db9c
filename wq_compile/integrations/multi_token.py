"""Several new tokens on a filled cache (draft verification, a follow-up question) through the compiled one-token
decode kernel: query ``i`` of ``S`` is one kernel call with the dense piece's valid count cut to the cache plus
new tokens ``0..i`` (the new tokens are the last ``S`` of every sample's dense piece), which is exactly causal
attention. ``S`` calls read the quantized buckets ``S`` times, so this pays only for short steps: longer ones
keep the torch reference (one dequantization, then dense attention); issue 19 item 1's multi-token kernel
replaces both.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.layout import LayerCache

#: Longest step run as per-token kernel calls: on the tiny model's 1.6K- and 6.3K-token caches (CPU, one layer) the
#: per-token calls took 0.2-1.0 ms at S = 2-4 against 8-21 ms for the reference, and about half the reference's
#: time at S = 64; a longer step (a new clip, a long prompt chunk) keeps the reference.
MAX_STEP_TOKENS = 64


def runs_compiled(backend: Any, s: int) -> bool:
    """Whether a step of ``s`` new tokens takes the per-token compiled path (a compiled backend, a short step)."""
    return 1 < s <= MAX_STEP_TOKENS and str(getattr(backend, "name", "")).startswith("tvm:")


def causal_steps(backend: Any, query: torch.Tensor, store: LayerCache, sm_scale: float, stats: Any = None
                 ) -> torch.Tensor:
    """``query [B, Hq, S, D]`` over ``store`` (whose dense piece ends with the ``S`` new tokens), causally among
    the new tokens; returns ``[B, S, Hq, D]``. The valid counts are restored whatever happens."""
    s = query.shape[2]
    lens = store.dense.lens  # changed in place: the kernel's bound arguments keep this tensor's identity
    full = lens.clone()
    if bool((full - store.dense.pinned < s).any()):
        raise ValueError(f"store: the dense residual holds fewer than the {s} new tokens of this step")
    outs = []
    try:
        for i in range(s):
            lens.copy_(full - (s - 1 - i))
            outs.append(backend.decode(query[:, :, i], store, sm_scale, stats))
    finally:
        lens.copy_(full)
    return torch.stack(outs, 1)
