"""Bucketed cache storage of one layer: one uniform-precision bucket per bit width plus one dense piece.

Windows of equal width are stored next to each other (the reordering); attention over cached tokens does not depend
on their order, so every kernel reads one precision. The dense piece holds, in the model's dtype, the 16-bit windows
and the tail of each window that does not fill a whole key group (both *pinned*: never flushed), then the text and
recent tokens (the residual). When the residual outgrows ``residual`` tokens, its oldest block is quantized into the
``flush_bits`` bucket.

Every tensor is ``[B, Hkv, capacity, ...]`` with a per-sample valid count ``lens [B]`` (samples of a batch hold
different windows), and capacity is a multiple of ``chunk`` so kernels loop over whole tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec import CORE_BUCKETS, EVICT, QUANT_BITS, QuantSpec
from .meta8 import bucket_meta_bits
from .buckets import DensePiece, QuantBucket, Quantizer, screened_quantizer, torch_quantizer
from .windows import Windows, runs_holding, quantizable_mask


@dataclass
class LayerCache:
    """One layer of a WindowQuant cache: ``buckets[bits]`` (8, 4, 2 always present, possibly empty; 1 when the config
    allows it: :attr:`~wq_compile.core.config.WindowQuantConfig.bucket_widths`) + ``dense``."""

    buckets: dict[int, QuantBucket]
    dense: DensePiece
    k_group: int
    residual: int = 128
    flush_tokens: int = 56
    flush_bits: int = 8
    quantizer: Quantizer = torch_quantizer
    stats: dict[str, int] = field(default_factory=lambda: {"flushes": 0, "dense_windows": 0, "dense_blocks": 0})

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              k_group: int = 28, v_group: int = 64, residual: int = 128, flush_tokens: int | None = None,
              flush_bits: int = 8, chunk: int = 64, quantizer: Quantizer = torch_quantizer,
              widths: tuple[int, ...] = CORE_BUCKETS, meta_bits: int = 16) -> "LayerCache":
        flush = flush_tokens if flush_tokens is not None else 2 * k_group
        if flush % k_group or flush <= 0:
            raise ValueError(f"flush_tokens: {flush} must be a positive multiple of k_group {k_group}")
        if flush_bits not in QUANT_BITS:
            raise ValueError(f"flush_bits: must be one of {QUANT_BITS}, got {flush_bits}")
        if not set(CORE_BUCKETS) <= set(widths) <= set(QUANT_BITS) or flush_bits not in widths:
            raise ValueError(f"widths: buckets {widths} must hold {CORE_BUCKETS} and flush_bits {flush_bits}, "
                             f"within {QUANT_BITS}")
        buckets = {
            b: QuantBucket.empty(QuantSpec(b, k_group, v_group), batch, kv_heads, head_dim, device, chunk,
                                 bucket_meta_bits(b, meta_bits))
            for b in sorted(set(widths), reverse=True)
        }
        dense = DensePiece.empty(batch, kv_heads, head_dim, dtype, device, chunk)
        return cls(buckets, dense, k_group, residual, flush, flush_bits, quantizer)

    def fill_sample(self, b: int, k: torch.Tensor, v: torch.Tensor, windows: Windows,
                    valid: torch.Tensor | None = None, *, quantizable: torch.Tensor | None = None) -> None:
        """Store the prompt of sample ``b`` (``k, v [Hkv, T, D]``): windows into buckets in bucket order,
        everything else (text, padding excluded via ``valid [T]``) into the residual in prompt order. A window with
        NaN/inf or out-of-fp16-range elements is stored as a 16-bit window (dense), whatever its assigned width.

        ``quantizable [T]`` (:func:`quantizable_mask` of ``k, v``) may be passed when the caller already has it.
        Vectorized: one gather per bucket and one for the dense piece, whatever the number of windows; the token
        indices come from ``windows`` (computed once per windows object, see :class:`Windows`)."""
        t = k.shape[-2]
        dev = k.device
        in_window = torch.zeros(t, dtype=torch.bool, device=dev)
        if len(windows.starts):
            if windows.bits is None:
                raise ValueError("windows: fill_sample needs widths (Windows.bits)")
            windows.check_disjoint(t)
            widths = {int(x) for x in windows.bits.unique().tolist()}
            if not widths <= set(self.buckets) | {16, EVICT}:
                raise ValueError(f"windows: widths {sorted(widths)} not in {sorted(set(self.buckets) | {16, EVICT})}")
            ok = quantizable_mask(k, v) if quantizable is None else quantizable.to(dev)
            bad = runs_holding(~ok, windows.starts, windows.lengths).to(windows.bits.device)
            bits = windows.bits
            n_bad = int(bad.sum())
            if n_bad:
                bits = torch.where(bad, torch.full_like(bits, 16), bits)
                self.stats["dense_windows"] += n_bad
            pos, wid, whole = windows.prompt_order(self.k_group, dev)
            tok_bits = bits.to(dev)[wid]
            in_window[pos] = True
            for width in self.buckets:  # bucket order inside a width = prompt order (windows by start)
                if width in widths:
                    idx = pos[(tok_bits == width) & whole]
                    if idx.numel():  # screened above: the quantizer need not check again
                        self.buckets[width].append(b, k.index_select(1, idx), v.index_select(1, idx),
                                                   screened_quantizer(self.quantizer))
            # 16-bit windows and group tails, in bucket order (wide first); an evicted window (width 0) is not stored
            pinned = ((tok_bits == 16) | ~whole) & (tok_bits != EVICT)
            self.stats["evicted_windows"] = self.stats.get("evicted_windows", 0) + int((bits == EVICT).sum())
            idx, tb = pos[pinned], tok_bits[pinned]
            if idx.numel():
                if len(widths) > 1:
                    idx = idx[torch.argsort(16 - tb, stable=True)]
                self.dense.append(b, k.index_select(1, idx), v.index_select(1, idx), pinned=True)
        rest = ~in_window if valid is None else (~in_window & valid.to(device=dev, dtype=torch.bool))
        idx = torch.nonzero(rest).flatten()
        self.dense.append(b, k.index_select(1, idx), v.index_select(1, idx))
        self.flush()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens ``[B, Hkv, S, D]`` to every sample's residual.

        Full blocks are flushed *before* the new tokens go in: the tokens of this step are the queries of this
        step, and a bucket has no causal mask, so none of them may be quantized until the step is done."""
        self.flush()
        self.dense.append_step(k, v)

    def flush(self) -> None:
        """Quantize the oldest residual blocks of every sample whose residual exceeds ``residual`` tokens.

        A block with NaN/inf or out-of-fp16-range elements is not quantized: it is pinned where it is (dense,
        never flushed), so attention over it equals dense attention."""
        limit = self.residual + self.flush_tokens - 1
        if int((self.dense.lens - self.dense.pinned).max()) <= limit:  # the common decode step: one check
            return
        for b in range(self.dense.lens.shape[0]):
            while self.dense.residual_len(b) > limit:
                if not self.dense.oldest_quantizable(b, self.flush_tokens):
                    self.dense.pinned[b] += self.flush_tokens
                    self.stats["dense_blocks"] += 1
                    continue
                k_old, v_old = self.dense.pop_oldest(b, self.flush_tokens)
                self.buckets[self.flush_bits].append(b, k_old, v_old, self.quantizer)
                self.stats["flushes"] += 1

    def select_samples(self, indices: torch.Tensor) -> None:
        """Sample ``i`` becomes old sample ``indices[i]`` in every bucket and the dense piece (codes, scales, lens,
        pinned counts): beam search reorders beams this way, ``num_return_sequences`` repeats them."""
        idx = torch.as_tensor(indices, device=self.dense.k.device).long()
        batch = self.dense.lens.shape[0]
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= batch)):
            raise ValueError(f"indices: expected a 1-d index into the {batch} cached samples, got "
                             f"{tuple(idx.shape)} {idx.tolist()[:8]}")
        for bk in self.buckets.values():
            for name in bk.stored():
                t = getattr(bk, name)
                setattr(bk, name, t.index_select(0, idx.to(t.device)))
        for name in ("k", "v", "lens", "pinned"):
            t = getattr(self.dense, name)
            setattr(self.dense, name, t.index_select(0, idx.to(t.device)))

    @property
    def meta8_width(self) -> int:
        """The widest bucket with 8-bit scale/zero (:mod:`wq_compile.core.meta8`), 0 if none: with the widths, what
        selects the decode kernel (a kernel reads a bucket's scale/zero in one format)."""
        return max((w for w, bk in self.buckets.items() if bk.meta_bits == 8), default=0)

    def num_tokens(self) -> torch.Tensor:
        """Cached tokens per sample ``[B]``."""
        return sum((bk.lens for bk in self.buckets.values()), self.dense.lens.clone()).long()

    def used_bytes(self) -> dict[str, int]:
        out = {f"int{b}": bk.used_bytes() for b, bk in self.buckets.items()}
        out["dense"] = self.dense.used_bytes()
        return out
