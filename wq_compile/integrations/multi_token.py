"""Several new tokens on a filled cache (draft verification, a follow-up question) through the compiled one-token
decode kernel: query ``i`` of ``S`` is one kernel call with the dense piece's valid count cut to the cache plus
new tokens ``0..i`` (the new tokens are the last ``S`` of every sample's dense piece), which is exactly causal
attention. ``S`` calls read the quantized buckets ``S`` times, so this pays only for short steps: longer ones
dequantize every bucket once and run one SDPA call (:func:`dequantized_attention`). Both serve only backends
without the compiled multi-token kernel (``Backend.decode_steps``: the compiled backends have it on CPUs and, in its
split-KV form, on CUDA, :mod:`wq_compile.runtime.steps`).
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


def dequantized_attention(query: torch.Tensor, store: LayerCache, sm_scale: float) -> torch.Tensor:
    """A long step (a new clip's turn, a long chunk): every bucket dequantized once, then one SDPA call over buckets
    plus the dense piece, causal among the last ``S`` dense tokens (the step's own). The same data and result as
    :func:`~wq_compile.core.reference.decode_attention` with ``causal_tail=S`` (fp32 rounding aside), without
    its ``[B, Hq, S, N]`` per-piece einsum / logsumexp passes, which made a 1.6K-token clip turn over a 6K-token
    cache cost seconds per layer. Returns ``[B, S, Hq, D]``."""
    bsz, hq, s, d = query.shape
    ks, vs, masks = [], [], []
    qi = torch.arange(s, device=query.device)
    for bk in store.buckets.values():
        n = int(bk.lens.max())
        if n == 0:
            continue
        k, v = bk.dequantize()
        ks.append(k[:, :, :n])
        vs.append(v[:, :, :n])
        valid = torch.arange(n, device=query.device)[None, :] < bk.lens.to(query.device).long()[:, None]
        masks.append(valid[:, None, :].expand(bsz, s, n))
    n = int(store.dense.lens.max())
    lens = store.dense.lens.to(query.device).long()
    pos = torch.arange(n, device=query.device)
    masks.append(pos[None, None, :] <= (lens[:, None, None] - s + qi[None, :, None]))  # valid and causal
    ks.append(store.dense.k[:, :, :n])
    vs.append(store.dense.v[:, :, :n])
    k = torch.cat([x.float() for x in ks], 2)
    v = torch.cat([x.float() for x in vs], 2)
    mask = torch.cat(masks, 2)[:, None]  # [B, 1, S, N]
    g = hq // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, scale=sm_scale)
    return out.transpose(1, 2)
