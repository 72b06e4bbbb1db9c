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
from typing import Any, Callable

import torch

from .quant import (
    QuantizedKeys, QuantizedValues, dequantize_keys, dequantize_values, key_words, quantizable_tokens, quantize_keys,
    quantize_values,
)
from .spec import EVICT, QUANT_BITS, QuantSpec


#: Quantizes ``k, v [Hkv, n, D]`` (whole key groups) into the bucket format: the torch reference by default, the
#: compiled quantize kernel when the runtime provides one.
Quantizer = Callable[[QuantSpec, torch.Tensor, torch.Tensor], "tuple[QuantizedKeys, QuantizedValues]"]


def torch_quantizer(spec: QuantSpec, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantizedKeys, QuantizedValues]:
    return quantize_keys(k, spec), quantize_values(v, spec)


def screened_quantizer(quantizer: Quantizer) -> Quantizer:
    """The form of ``quantizer`` for tokens the caller already screened (:func:`quantizable_mask`): its
    ``screened`` attribute when it has one (the compiled quantizer, which then skips its own NaN/range check),
    else ``quantizer`` itself."""
    return getattr(quantizer, "screened", quantizer)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _grow(t: torch.Tensor, dim: int, new: int) -> torch.Tensor:
    """Return ``t`` zero-padded along ``dim`` to ``new`` entries (no copy if already large enough)."""
    if t.shape[dim] >= new:
        return t
    shape = list(t.shape)
    shape[dim] = new
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


@dataclass
class QuantBucket:
    """All tokens of one layer stored at ``spec.bits``, in bucket order, packed as in :mod:`wq_compile.quant`."""

    spec: QuantSpec
    k_codes: torch.Tensor  # [B, Hkv, ceil(cap/k_group), D, key_words] int32, token-packed per key group
    k_scale: torch.Tensor  # [B, Hkv, ceil(cap/k_group), D] fp16
    k_zero: torch.Tensor
    v_codes: torch.Tensor  # [B, Hkv, cap, D/per] int32
    v_scale: torch.Tensor  # [B, Hkv, cap, D/v_group] fp16
    v_zero: torch.Tensor
    lens: torch.Tensor  # [B] int32
    chunk: int = 64

    @classmethod
    def empty(cls, spec: QuantSpec, batch: int, kv_heads: int, head_dim: int, device: torch.device | str = "cpu",
              chunk: int = 64) -> "QuantBucket":
        spec.check_head_dim(head_dim)
        cap = chunk
        words = head_dim // spec.per_word
        groups = -(-cap // spec.k_group)
        z = dict(device=device)
        return cls(
            spec,
            torch.zeros(batch, kv_heads, groups, head_dim, key_words(spec.bits, spec.k_group), dtype=torch.int32, **z),
            torch.zeros(batch, kv_heads, groups, head_dim, dtype=torch.float16, **z),
            torch.zeros(batch, kv_heads, groups, head_dim, dtype=torch.float16, **z),
            torch.zeros(batch, kv_heads, cap, words, dtype=torch.int32, **z),
            torch.zeros(batch, kv_heads, cap, head_dim // spec.v_group, dtype=torch.float16, **z),
            torch.zeros(batch, kv_heads, cap, head_dim // spec.v_group, dtype=torch.float16, **z),
            torch.zeros(batch, dtype=torch.int32, **z),
            chunk,
        )

    @property
    def capacity(self) -> int:
        return self.v_codes.shape[2]

    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        cap = _round_up(max(tokens, self.capacity * 3 // 2), self.chunk)  # amortized growth
        groups = -(-cap // self.spec.k_group)
        self.k_codes, self.v_codes = _grow(self.k_codes, 2, groups), _grow(self.v_codes, 2, cap)
        self.v_scale, self.v_zero = _grow(self.v_scale, 2, cap), _grow(self.v_zero, 2, cap)
        self.k_scale, self.k_zero = _grow(self.k_scale, 2, groups), _grow(self.k_zero, 2, groups)

    def append(self, b: int, k: torch.Tensor, v: torch.Tensor, quantizer: Quantizer = torch_quantizer) -> None:
        """Quantize ``k, v [Hkv, n, D]`` (``n`` whole key groups) and store them after sample ``b``'s tokens."""
        n = k.shape[-2]
        if n == 0:
            return
        if n % self.spec.k_group:
            raise ValueError(f"k: {n} tokens is not a whole number of key groups ({self.spec.k_group})")
        self.append_quantized(b, *quantizer(self.spec, k, v))

    def append_quantized(self, b: int, qk: QuantizedKeys, qv: QuantizedValues) -> None:
        """Store already-quantized tokens (e.g. from the compiled quantize kernel) after sample ``b``'s tokens."""
        n = qv.codes.shape[-2]
        start = int(self.lens[b])
        if start % self.spec.k_group:
            raise ValueError(f"lens: sample {b} holds {start} tokens, not whole key groups of {self.spec.k_group}")
        self._reserve(start + n)
        g0 = start // self.spec.k_group
        self.k_codes[b, :, g0 : g0 + qk.codes.shape[-3]] = qk.codes
        self.v_codes[b, :, start : start + n] = qv.codes
        self.v_scale[b, :, start : start + n] = qv.scale
        self.v_zero[b, :, start : start + n] = qv.zero
        self.k_scale[b, :, g0 : g0 + qk.scale.shape[-2]] = qk.scale
        self.k_zero[b, :, g0 : g0 + qk.zero.shape[-2]] = qk.zero
        self.lens[b] += n

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense fp32 ``(k, v)`` over the whole capacity: for the reference and tests only."""
        qk = QuantizedKeys(self.k_codes, self.k_scale, self.k_zero, self.spec)
        qv = QuantizedValues(self.v_codes, self.v_scale, self.v_zero, self.spec)
        return dequantize_keys(qk, self.capacity), dequantize_values(qv)

    def used_bytes(self) -> int:
        """Exact bytes of the valid tokens: codes, key-group and value-group scale/zero, all samples and heads."""
        hkv, vwords = self.v_codes.shape[1], self.v_codes.shape[3]
        d, kwords = self.k_codes.shape[3], self.k_codes.shape[4]
        vgroups = self.v_scale.shape[3]
        total = 0
        for n in self.lens.tolist():
            groups = -(-n // self.spec.k_group)
            total += hkv * (groups * d * kwords * 4 + n * vwords * 4 + 2 * groups * d * 2 + 2 * n * vgroups * 2)
        return total

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The seven kernel arguments of this bucket, in kernel order."""
        return (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.lens)


@dataclass
class DensePiece:
    """Unquantized tokens in the model's dtype: pinned (16-bit windows, group tails) first, then the residual."""

    k: torch.Tensor  # [B, Hkv, cap, D]
    v: torch.Tensor
    lens: torch.Tensor  # [B] int32: valid tokens
    pinned: torch.Tensor  # [B] int32: leading tokens that are never flushed
    chunk: int = 64

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              chunk: int = 64) -> "DensePiece":
        z = torch.zeros(batch, kv_heads, chunk, head_dim, dtype=dtype, device=device)
        return cls(z, z.clone(), torch.zeros(batch, dtype=torch.int32, device=device),
                   torch.zeros(batch, dtype=torch.int32, device=device), chunk)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _reserve(self, tokens: int) -> None:
        if tokens > self.capacity:
            cap = _round_up(max(tokens, self.capacity * 3 // 2), self.chunk)
            self.k, self.v = _grow(self.k, 2, cap), _grow(self.v, 2, cap)

    def append(self, b: int, k: torch.Tensor, v: torch.Tensor, pinned: bool = False) -> None:
        """Store ``k, v [Hkv, n, D]`` after sample ``b``'s tokens; pinned tokens must come before any residual."""
        n = k.shape[-2]
        start = int(self.lens[b])
        if pinned and start != int(self.pinned[b]):
            raise RuntimeError("pinned tokens must be appended before the residual")
        self._reserve(start + n)
        self.k[b, :, start : start + n] = k.to(self.k.dtype)
        self.v[b, :, start : start + n] = v.to(self.v.dtype)
        self.lens[b] += n
        if pinned:
            self.pinned[b] += n

    def append_step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v [B, Hkv, S, D]`` (new decode tokens) to every sample at once."""
        bsz, _, s, _ = k.shape
        self._reserve(int(self.lens.max()) + s)
        pos = self.lens.long()[:, None] + torch.arange(s, device=k.device)[None, :]  # [B, S]
        bidx = torch.arange(bsz, device=k.device)[:, None].expand(bsz, s)
        self.k[bidx, :, pos] = k.permute(0, 2, 1, 3).to(self.k.dtype)
        self.v[bidx, :, pos] = v.permute(0, 2, 1, 3).to(self.v.dtype)
        self.lens += s

    def residual_len(self, b: int) -> int:
        return int(self.lens[b] - self.pinned[b])

    def oldest_quantizable(self, b: int, n: int) -> bool:
        """Whether the ``n`` oldest residual tokens of sample ``b`` are all finite and within the fp16 range."""
        p = int(self.pinned[b])
        blk = slice(p, p + n)
        return bool((quantizable_tokens(self.k[b, :, blk]) & quantizable_tokens(self.v[b, :, blk])).all())

    def pop_oldest(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the ``n`` oldest residual tokens of sample ``b`` (``[Hkv, n, D]``)."""
        p, end = int(self.pinned[b]), int(self.lens[b])
        if n > end - p:
            raise ValueError(f"n: cannot pop {n} tokens from a residual of {end - p}")
        k_old, v_old = self.k[b, :, p : p + n].clone(), self.v[b, :, p : p + n].clone()
        self.k[b, :, p : end - n] = self.k[b, :, p + n : end].clone()
        self.v[b, :, p : end - n] = self.v[b, :, p + n : end].clone()
        self.lens[b] -= n
        return k_old, v_old

    def used_bytes(self) -> int:
        hkv, d = self.k.shape[1], self.k.shape[3]
        return int(self.lens.sum()) * hkv * d * 2 * self.k.element_size()

    def allocated_bytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


def unquantizable_windows(k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
                          ) -> torch.Tensor:
    """``[W]`` bool: windows of ``k, v [Hkv, T, D]`` holding a NaN/inf or an element beyond the fp16 range.

    Such a window is stored dense at the model's dtype like a 16-bit window (attention then equals dense attention:
    NaN propagates, large values stay exact). One vectorized pass over the prompt plus a prefix sum.
    """
    return _bad_runs(~quantizable_mask(k, v), starts, lengths)


def windows_holding(tokens: torch.Tensor, windows: "Windows") -> torch.Tensor:
    """``[W]`` bool: the windows holding any True of ``tokens [T]`` (e.g. ``~quantizable_mask(k, v)``)."""
    return _bad_runs(tokens, windows.starts, windows.lengths)


def quantizable_mask(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: token ``t`` of ``k, v [Hkv, T, D]`` is finite and within the fp16 range in every head."""
    return (quantizable_tokens(k) & quantizable_tokens(v)).all(0)


def _bad_runs(bad: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[W]`` bool: runs ``[starts, starts + lengths)`` holding any True of ``bad [T]`` (one prefix sum)."""
    cs = torch.cat([bad.new_zeros(1, dtype=torch.long), torch.cumsum(bad.long(), 0)])
    s, ln = starts.to(cs.device), lengths.to(cs.device)
    return (cs[s + ln] - cs[s]) > 0


@dataclass(frozen=True)
class Windows:
    """Windows of one sample: token runs ``[starts[i], starts[i] + lengths[i])`` of the prompt, and (once a search
    assigned them) the width ``bits[i]`` each is stored at (16: dense).

    The token indices derived from the windows (every windowed token's position and window, which tokens fill whole
    key groups, the start order) are computed once per object and device and then reused: a prompt's windows are
    the same at every layer, only ``bits`` changes, and :meth:`with_bits` keeps the derived indices. The index
    tensors handed out are those cached: read them, never modify them in place.
    """

    starts: torch.Tensor  # [W] long
    lengths: torch.Tensor  # [W] long
    bits: torch.Tensor | None = None  # [W] long, in {16, 8, 4, 2}; None before the search
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def with_bits(self, bits: torch.Tensor) -> "Windows":
        """The same windows stored at ``bits [W]``: the derived token indices are shared with this object (one
        cache for both), so what any layer derives is there for every later one."""
        out = Windows(self.starts, self.lengths, bits)
        object.__setattr__(out, "_derived", self._derived)  # one cache: nothing in it depends on bits
        return out

    def _cached(self, key: tuple, make: Callable[[], object]) -> Any:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def token_index(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, window_id)`` of every windowed token, both ``[sum(lengths)]``, window-major."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            starts, lengths = self.starts.to(dev), self.lengths.to(dev)
            wid = torch.repeat_interleave(torch.arange(len(self), device=dev), lengths)
            first = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
            pos = first + torch.arange(int(self.lengths.sum()), device=dev)
            return pos, wid

        return self._cached(("token_index", dev), make)

    def whole_groups(self, k_group: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[sum(lengths)]`` bool over :meth:`token_index`: the token lies in a whole key group of its window
        (what a bucket quantizes; the tail of a window stays fp16)."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> torch.Tensor:
            pos, wid = self.token_index(dev)
            starts, lengths = self.starts.to(dev), self.lengths.to(dev)
            return (pos - starts[wid]) < (lengths // k_group * k_group)[wid]

        return self._cached(("whole_groups", k_group, dev), make)

    def whole_positions(self, k_group: int, device: torch.device | str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, window_id)`` of the tokens in whole key groups, window-major."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            pos, wid = self.token_index(dev)
            keep = self.whole_groups(k_group, dev)
            return pos[keep], wid[keep]

        return self._cached(("whole_positions", k_group, dev), make)

    def prompt_order(self, k_group: int, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions, window_id, whole)`` of every windowed token in prompt order (windows sorted by start);
        ``whole`` as in :meth:`whole_groups`."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            pos, wid = self.token_index(dev)
            whole = self.whole_groups(k_group, dev)
            if len(self) < 2 or bool((self.starts[1:] >= self.starts[:-1]).all()):
                return pos, wid, whole
            order = torch.argsort(pos, stable=True)
            return pos[order], wid[order], whole[order]

        return self._cached(("prompt_order", k_group, dev), make)

    def whole_run_start(self, k_group: int, device: torch.device | str | None = None) -> int | None:
        """The first position when the whole-group tokens (:meth:`whole_positions`) are one run of consecutive
        positions (back-to-back frames of a video), else None: callers slice instead of gathering."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> int | None:
            pos = self.whole_positions(k_group, dev)[0]
            if pos.numel() == 0:
                return None
            first = int(pos[0])
            return first if int(pos[-1]) - first + 1 == pos.numel() and bool((pos.diff() == 1).all()) else None

        return self._cached(("whole_run_start", k_group, dev), make)

    def check_disjoint(self, tokens: int) -> None:
        """Raise ``ValueError`` unless the windows are disjoint runs inside a ``tokens``-token prompt (checked once)."""
        ok = self._derived.get(("disjoint", tokens))
        if ok is None:
            ends = self.starts + self.lengths
            srt = torch.argsort(self.starts)
            ok = not (int(self.starts.min()) < 0 or int(ends.max()) > tokens
                      or bool((self.starts[srt][1:] < ends[srt][:-1]).any()))
            self._derived[("disjoint", tokens)] = ok
        if not ok:
            raise ValueError(f"windows: must be disjoint runs inside the {tokens}-token prompt")

    def bucket_order(self) -> torch.Tensor:
        """Window indices grouped by width (wide first), original order inside a bucket."""
        if self.bits is None:
            raise ValueError("windows: no widths assigned (bits is None)")
        key = (16 - self.bits) * (int(self.starts.max()) + 1 if len(self.starts) else 1) + self.starts
        return torch.argsort(key, stable=True)


#: A prompt's windows with their widths: the same type as :class:`Windows` (kept as a name for callers).
WindowAssignment = Windows


@dataclass
class LayerCache:
    """One layer of a WindowQuant cache: ``buckets[bits]`` (always 8, 4, 2 present, possibly empty) + ``dense``."""

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
              flush_bits: int = 8, chunk: int = 64, quantizer: Quantizer = torch_quantizer) -> "LayerCache":
        flush = flush_tokens if flush_tokens is not None else 2 * k_group
        if flush % k_group or flush <= 0:
            raise ValueError(f"flush_tokens: {flush} must be a positive multiple of k_group {k_group}")
        if flush_bits not in QUANT_BITS:
            raise ValueError(f"flush_bits: must be one of {QUANT_BITS}, got {flush_bits}")
        buckets = {
            b: QuantBucket.empty(QuantSpec(b, k_group, v_group), batch, kv_heads, head_dim, device, chunk)
            for b in QUANT_BITS
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
            bad = _bad_runs(~ok, windows.starts, windows.lengths).to(windows.bits.device)
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
            for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "lens"):
                t = getattr(bk, name)
                setattr(bk, name, t.index_select(0, idx.to(t.device)))
        for name in ("k", "v", "lens", "pinned"):
            t = getattr(self.dense, name)
            setattr(self.dense, name, t.index_select(0, idx.to(t.device)))

    def num_tokens(self) -> torch.Tensor:
        """Cached tokens per sample ``[B]``."""
        return sum((bk.lens for bk in self.buckets.values()), self.dense.lens.clone()).long()

    def used_bytes(self) -> dict[str, int]:
        out = {f"int{b}": bk.used_bytes() for b, bk in self.buckets.items()}
        out["dense"] = self.dense.used_bytes()
        return out
