"""New visual content in a later turn: a second clip (or images) joins a conversation already in the cache.

``cache.extend(ids, attention_mask)`` checks that ``ids`` extend the cached conversation and locates the windows of
the new turn (the uncached ids). ``generate`` then runs that turn as one several-token step: attention is exact
over the new tokens (causal) and reads the cached buckets; after it, per layer and sample, the new windows are
scored against the new turn's text, searched under what is left of the budget, quantized and stored into the
existing buckets (the rest goes to the dense residual). The budget holds for the whole cache: windows already stored
keep their width, and the new ones share ``avg_bits * (old + new tokens) - bits already spent``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..core.allocation import effective_bits, min_avg_bits
from ..core.layout import LayerCache
from ..core.quant import QuantizedKeys, QuantizedValues
from ..core.scores import embedding_scores
from ..core.windows import Windows
from .llava import SampleLayout, locate

#: A :class:`~wq_compile.integrations.transformers.WindowQuantCache` (not imported: that module imports this one).
WindowQuantCache = Any


@dataclass
class Turn:
    """The pending new turn: where it starts in the conversation and its layout per sample (turn-relative)."""

    start: int
    length: int
    samples: list[SampleLayout]
    stored: set[int]  # layers whose windows are stored
    embed_scores: list[torch.Tensor] | None = None


def window_cost(windows: Windows, bits: torch.Tensor, k_group: int, v_group: int, meta_bits: int = 16) -> float:
    """Bits spent on ``windows`` stored at ``bits``: effective bits per whole key group, fp16 for group tails."""
    total = 0.0
    for n, b in zip(windows.lengths.tolist(), bits.tolist()):
        whole = n // k_group * k_group if b != 16 else n
        total += effective_bits(int(b), k_group, v_group, meta_bits) * whole + 16.0 * (n - whole)
    return total


def begin(cache: WindowQuantCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
          model: Any = None) -> Turn:
    """Check that ``input_ids [B, N]`` extend the cached conversation and locate the new turn's windows."""
    if cache.samples is None or any(layer.store is None for layer in cache.layers):
        raise ValueError("extend: the cache holds no conversation yet; call prepare(**inputs) for the first turn")
    if input_ids.dim() != 2 or input_ids.shape[0] != len(cache.samples):
        raise ValueError(f"input_ids: expected [{len(cache.samples)}, tokens] (the cached batch), got "
                         f"{tuple(input_ids.shape)}")
    seen, known = cache.layers[0].seen, cache.samples[0].valid.shape[0]
    if input_ids.shape[1] <= seen:
        raise ValueError(f"input_ids: {input_ids.shape[1]} tokens do not extend the cached conversation of {seen} "
                         f"tokens (pass the whole conversation so far plus the new turn)")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    old = locate(input_ids[:, :known], mask[:, :known], cache.visual, cache.wq.window)
    for b, (was, now) in enumerate(zip(cache.samples, old)):
        same = (torch.equal(was.windows.starts, now.windows.starts) and torch.equal(was.windows.lengths,
                now.windows.lengths) and torch.equal(was.valid, now.valid))
        if not same:
            raise ValueError(f"input_ids: sample {b}'s first {known} tokens do not match the cached conversation "
                             f"(its visual tokens or padding differ); extend() takes the whole conversation so far")
    between = input_ids[:, known:seen]
    for tok in (cache.visual.video_token_id, cache.visual.image_token_id):
        if tok is not None and bool((between == tok).any()):
            raise ValueError(f"input_ids: visual tokens at positions {known}..{seen} were cached as text; the ids "
                             f"do not extend the cached conversation")
    new = locate(input_ids[:, seen:], mask[:, seen:], cache.visual, cache.wq.window)
    turn = Turn(seen, input_ids.shape[1] - seen, new, set())
    if cache.wq.scorer == "embedding":
        if model is None:
            raise ValueError("model: the embedding scorer needs extend(..., model=model)")
        lm = model.get_decoder() if hasattr(model, "get_decoder") else model
        handle: list[Any] = []

        def capture(module: Any, args: tuple, kwargs: dict) -> None:
            emb = kwargs.get("inputs_embeds")
            if emb is not None and emb.shape[1] == turn.length:
                turn.embed_scores = [embedding_scores(emb[b].detach(), s.windows, s.text_mask)
                                     for b, s in enumerate(new)]
                handle[0].remove()

        handle.append(lm.register_forward_pre_hook(capture, with_kwargs=True))
    return turn


def _move(src: LayerCache, dst: LayerCache, b: int) -> None:
    """Move sample 0 of ``src`` (one turn, filled by ``fill_sample``) into sample ``b`` of ``dst``: buckets after
    their tokens, pinned tokens after ``dst``'s pinned ones, the rest after its residual."""
    for width, bk in src.buckets.items():
        n = int(bk.lens[0])
        if n:
            g = n // bk.spec.k_group
            if bk.meta_bits == 8:  # codes and run bases moved as they are
                dst.buckets[width].append_codes(b, bk.k_codes[0, :, :g], bk.v_codes[0, :, :n], bk.run_meta(0))
                continue
            qk = QuantizedKeys(bk.k_codes[0, :, :g], bk.k_scale[0, :, :g], bk.k_zero[0, :, :g], bk.spec)
            qv = QuantizedValues(bk.v_codes[0, :, :n], bk.v_scale[0, :, :n], bk.v_zero[0, :, :n], bk.spec)
            dst.buckets[width].append_quantized(b, qk, qv)
    m, n = int(src.dense.pinned[0]), int(src.dense.lens[0])
    if m:
        k_res, v_res = dst.dense.pop_oldest(b, dst.dense.residual_len(b))
        dst.dense.append(b, src.dense.k[0, :, :m], src.dense.v[0, :, :m], pinned=True)
        dst.dense.append(b, k_res, v_res)
    dst.dense.append(b, src.dense.k[0, :, m:n], src.dense.v[0, :, m:n])
    dst.stats["dense_windows"] += src.stats["dense_windows"]


def store_turn(cache: WindowQuantCache, prompt_sample: Any, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, sm_scale: float) -> None:
    """After the new turn's attention in layer ``layer_idx``: take its tokens back out of the residual and store
    them as a prompt is stored (windows into the buckets under the remaining budget, the rest dense)."""
    turn: Turn = cache.turn
    layer = cache.layers[layer_idx]
    store: LayerCache = layer.store
    bsz, _, s, _ = key.shape
    if s != turn.length or layer.seen - s != turn.start or layer_idx in turn.stored:
        raise ValueError(f"extend: generate ran {s} new tokens after {layer.seen - s} cached ones, but extend() "
                         f"saw {turn.length} after {turn.start}; pass generate the ids given to extend()")
    store.dense.lens -= s  # the step appended them to the residual; they are stored below
    wq, dev = cache.wq, key.device
    bits_out, scores_out = [], []
    for b, sample in enumerate(turn.samples):
        w = sample.windows
        text_idx = torch.nonzero(sample.text_mask).flatten().to(dev) if bool(sample.text_mask.any()) else None
        valid = sample.valid.to(device=dev, dtype=torch.bool)
        floor = min_avg_bits(w, wq.widths, wq.k_group, wq.v_group, wq.meta_bits) if len(w) else 0.0
        ps = prompt_sample(w, valid, text_idx, floor)
        old_w, old_bits = cache.samples[b].windows, cache.plans[layer_idx][b]
        old_tokens, new_tokens = int(old_w.lengths.sum()), int(w.lengths.sum())
        spent = window_cost(old_w, old_bits, wq.k_group, wq.v_group, wq.meta_bits)
        budget = min(16.0, (wq.avg_bits * (old_tokens + new_tokens) - spent) / max(new_tokens, 1))
        embed = None if turn.embed_scores is None else turn.embed_scores[b]
        bits, scores, ok = cache._plan_sample(layer_idx, b, ps, query[b], key[b], value[b], sm_scale,
                                              budget=budget, embed_scores=embed)
        bits_out.append(bits)
        scores_out.append(scores)
        tmp = LayerCache.empty(1, key.shape[1], key.shape[3], store.dense.k.dtype, dev, wq.k_group, wq.v_group,
                               residual=1 << 30, flush_bits=wq.flush_bits, chunk=wq.chunk, quantizer=store.quantizer,
                               widths=tuple(store.buckets), meta_bits=wq.meta_bits)
        tmp.fill_sample(0, key[b], value[b], w.with_bits(bits), valid=sample.valid, quantizable=ok)
        _move(tmp, store, b)
    store.flush()
    ends = [int((sm.windows.starts + sm.windows.lengths).max()) for sm in turn.samples if len(sm.windows)]
    if ends:
        layer.frozen = turn.start + max(ends)
    cache.plans[layer_idx] = [torch.cat([o, n]) for o, n in zip(cache.plans[layer_idx], bits_out)]
    cache.scores[layer_idx] = [torch.cat([o.float().cpu(), n.float().cpu()]) for o, n in
                               zip(cache.scores[layer_idx], scores_out)]
    turn.stored.add(layer_idx)
    if len(turn.stored) == len(cache.layers):
        _finish(cache, turn)


def _finish(cache: WindowQuantCache, turn: Turn) -> None:
    """Every layer stored the turn: the conversation's layout now spans it (plans, crop limits, later turns)."""
    out = []
    for old, new in zip(cache.samples, turn.samples):
        gap = turn.start - old.valid.shape[0]  # tokens cached as text since the last layout (answers, questions)
        fill = torch.ones(gap, dtype=torch.bool)
        w = Windows(torch.cat([old.windows.starts, new.windows.starts + turn.start]),
                    torch.cat([old.windows.lengths, new.windows.lengths]))
        out.append(SampleLayout(w, torch.cat([old.text_mask, ~fill, new.text_mask]),
                                torch.cat([old.valid, fill, new.valid])))
    cache.samples, cache.turn, cache._prompt = out, None, None
    if turn.embed_scores is not None and cache.embed_scores is not None:
        cache.embed_scores = [torch.cat([o.float().cpu(), n.float().cpu()]) for o, n in
                              zip(cache.embed_scores, turn.embed_scores)]
    if any(len(sm.windows) == 0 for sm in turn.samples):
        warnings.warn("extend: a sample's new turn holds no visual tokens; its ids went to the dense residual "
                      "(a text-only follow-up needs no extend())", stacklevel=4)
