"""Window scorers: how relevant each window is to the text prompt (the similarity the allocation follows).

``embedding``: cosine of the window's mean input embedding vs. the prompt's (once per prompt); ``attention``: the
attention mass the prompt's text queries put on the window's keys (per layer, from the prefill itself).
"""

from __future__ import annotations

import torch

from .windows import Windows


def _segment_mean(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_zeros(n, x.shape[-1]).index_add_(0, seg, x)
    cnt = torch.bincount(seg, minlength=n).clamp_min(1).to(x.dtype)
    return out / cnt[:, None]

def embedding_scores(embeds: torch.Tensor, windows: Windows, text_mask: torch.Tensor) -> torch.Tensor:
    """Cosine of each window's mean input embedding with the mean embedding of the text tokens: ``[W]``.

    ``embeds [T, H]`` are the prompt's input embeddings (vision features already projected), ``text_mask [T]``
    marks the prompt's text tokens (the question). Cost: one pass over the prompt, computed once for all layers.
    """
    if embeds.dim() != 2:
        raise ValueError(f"embeds: expected [tokens, hidden], got shape {tuple(embeds.shape)}")
    if not bool(text_mask.any()):
        return torch.ones(len(windows), device=embeds.device)
    e = embeds.float()
    pos, wid = windows.token_index(e.device)
    win = _segment_mean(e[pos], wid, len(windows))
    txt = e[text_mask.to(e.device)].mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(win, txt, dim=-1)

def attention_scores(q_text: torch.Tensor, k: torch.Tensor, windows: Windows, sm_scale: float,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass the prompt's text queries put on each window's keys, averaged over heads and queries: ``[W]``.

    ``q_text [Hq, Tq, D]`` are the (RoPE'd) queries of the text tokens, ``k [Hkv, T, D]`` all prompt keys of one
    layer; ``key_mask [T]`` (True = a real token) keeps padding out of the softmax. Taken from the prefill itself,
    so each layer gets its own scores.
    """
    hq, tq, d = q_text.shape
    hkv, t, _ = k.shape
    if hq % hkv:
        raise ValueError(f"q_text: {hq} heads is not a multiple of {hkv} KV heads")
    qg = q_text.float().reshape(hkv, hq // hkv * tq, d)
    logits = torch.einsum("hqd,htd->hqt", qg, k.float()) * sm_scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.to(logits.device, torch.bool), float("-inf"))
    p = torch.softmax(logits, dim=-1)
    mass = p.mean(dim=(0, 1))  # [T]
    pos, wid = windows.token_index(mass.device)
    return mass.new_zeros(len(windows)).index_add_(0, wid, mass[pos])
