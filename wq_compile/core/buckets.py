"""The storage of one width: a uniform-precision bucket of quantized windows, and the dense piece (16-bit windows,
group tails, text and recent tokens) that every layer keeps beside its buckets.

Every tensor is ``[B, Hkv, capacity, ...]`` with a per-sample valid count ``lens [B]`` (samples of a batch hold
different windows), and capacity is a multiple of ``chunk`` so kernels loop over whole tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quant import QuantizedKeys, QuantizedValues, dequantize_keys, dequantize_values, key_words, quantizable_tokens, quantize_keys, quantize_values
from .meta8 import BASE_FIELDS, RUN_GROUPS, RunMeta, check_meta_bits, constrain, decode, token_runs
from .spec import QuantSpec


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
    """All tokens of one layer stored at ``spec.bits``, in bucket order, packed as in :mod:`wq_compile.core.quant`.

    ``meta_bits`` 16: scale and zero are fp16 per group. 8 (:mod:`wq_compile.core.meta8`): they are uint8 codes on
    the grid of their run (``k_base``/``v_base`` fp16 per run, ``run_of`` the run of each key group); kernels and the
    reference read them expanded to fp16 (:meth:`meta`, :meth:`tensors`), so both formats decode one way."""

    spec: QuantSpec
    k_codes: torch.Tensor  # [B, Hkv, ceil(cap/k_group), D, key_words] int32, token-packed per key group
    k_scale: torch.Tensor  # [B, Hkv, ceil(cap/k_group), D] fp16 (uint8 codes at meta_bits 8)
    k_zero: torch.Tensor
    v_codes: torch.Tensor  # [B, Hkv, cap, D/per] int32
    v_scale: torch.Tensor  # [B, Hkv, cap, D/v_group] fp16 (uint8 codes at meta_bits 8)
    v_zero: torch.Tensor
    lens: torch.Tensor  # [B] int32
    chunk: int = 64
    meta_bits: int = 16
    k_base: torch.Tensor | None = None  # [B, Hkv, runs cap, 3, D] fp16 (meta_bits 8): scale base, zero low, step
    v_base: torch.Tensor | None = None  # [B, Hkv, runs cap, 3, D/v_group] fp16
    run_of: torch.Tensor | None = None  # [B, ceil(cap/k_group)] int32: the run of each key group
    runs: torch.Tensor | None = None  # [B] int32: runs stored per sample

    @classmethod
    def empty(cls, spec: QuantSpec, batch: int, kv_heads: int, head_dim: int, device: torch.device | str = "cpu",
              chunk: int = 64, meta_bits: int = 16) -> "QuantBucket":
        spec.check_head_dim(head_dim)
        check_meta_bits(meta_bits)
        cap = chunk
        words = head_dim // spec.per_word
        groups = -(-cap // spec.k_group)
        vgroups = head_dim // spec.v_group
        z = dict(device=device)
        mdt = torch.float16 if meta_bits == 16 else torch.uint8
        extra = {}
        if meta_bits == 8:
            runs = -(-groups // RUN_GROUPS)
            extra = dict(k_base=torch.zeros(batch, kv_heads, runs, BASE_FIELDS, head_dim, dtype=torch.float16, **z),
                         v_base=torch.zeros(batch, kv_heads, runs, BASE_FIELDS, vgroups, dtype=torch.float16, **z),
                         run_of=torch.zeros(batch, groups, dtype=torch.int32, **z),
                         runs=torch.zeros(batch, dtype=torch.int32, **z))
        return cls(
            spec,
            torch.zeros(batch, kv_heads, groups, head_dim, key_words(spec.bits, spec.k_group), dtype=torch.int32, **z),
            torch.zeros(batch, kv_heads, groups, head_dim, dtype=mdt, **z),
            torch.zeros(batch, kv_heads, groups, head_dim, dtype=mdt, **z),
            torch.zeros(batch, kv_heads, cap, words, dtype=torch.int32, **z),
            torch.zeros(batch, kv_heads, cap, vgroups, dtype=mdt, **z),
            torch.zeros(batch, kv_heads, cap, vgroups, dtype=mdt, **z),
            torch.zeros(batch, dtype=torch.int32, **z),
            chunk,
            meta_bits,
            **extra,
        )

    @property
    def capacity(self) -> int:
        return self.v_codes.shape[2]

    def stored(self) -> tuple[str, ...]:
        """Names of the tensors this bucket stores with a leading batch axis (what a save writes and a beam
        reorder indexes), ``lens`` last."""
        extra = ("k_base", "v_base", "run_of", "runs") if self.meta_bits == 8 else ()
        return ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", *extra, "lens")

    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        cap = _round_up(max(tokens, self.capacity * 3 // 2), self.chunk)  # amortized growth
        groups = -(-cap // self.spec.k_group)
        self.k_codes, self.v_codes = _grow(self.k_codes, 2, groups), _grow(self.v_codes, 2, cap)
        self.v_scale, self.v_zero = _grow(self.v_scale, 2, cap), _grow(self.v_zero, 2, cap)
        self.k_scale, self.k_zero = _grow(self.k_scale, 2, groups), _grow(self.k_zero, 2, groups)
        if self.run_of is not None:
            self.run_of = _grow(self.run_of, 1, groups)

    def _reserve_runs(self, runs: int) -> None:
        assert self.k_base is not None and self.v_base is not None
        if runs > self.k_base.shape[2]:
            cap = max(runs, self.k_base.shape[2] * 3 // 2)
            self.k_base, self.v_base = _grow(self.k_base, 2, cap), _grow(self.v_base, 2, cap)

    def append(self, b: int, k: torch.Tensor, v: torch.Tensor, quantizer: Quantizer = torch_quantizer) -> None:
        """Quantize ``k, v [Hkv, n, D]`` (``n`` whole key groups) and store them after sample ``b``'s tokens."""
        n = k.shape[-2]
        if n == 0:
            return
        if n % self.spec.k_group:
            raise ValueError(f"k: {n} tokens is not a whole number of key groups ({self.spec.k_group})")
        qk, qv = quantizer(self.spec, k, v)
        if self.meta_bits == 8:  # the compiled quantizer's recode (also behind its bound ``screened``), else torch
            recode = getattr(getattr(quantizer, "__self__", quantizer), "recode", None)
            self.append_quantized(b, *constrain(k, v, qk, qv, recode))
        else:
            self.append_quantized(b, qk, qv)

    def append_quantized(self, b: int, qk: QuantizedKeys, qv: QuantizedValues, run_meta: RunMeta | None = None
                         ) -> None:
        """Store already-quantized tokens (e.g. from the compiled quantize kernel) after sample ``b``'s tokens; a
        bucket with 8-bit metadata takes their :class:`RunMeta` and stores its codes (:meth:`append_codes`)."""
        if self.meta_bits == 8:
            if run_meta is None:
                raise ValueError("run_meta: a bucket with 8-bit scale/zero stores the 8-bit codes of RunMeta; "
                                 "quantize through append()")
            self.append_codes(b, qk.codes, qv.codes, run_meta)
            return
        if run_meta is not None:
            raise ValueError("run_meta: a bucket with 16-bit scale/zero takes no RunMeta")
        g0, start, n = self._store_codes(b, qk.codes, qv.codes)
        self.v_scale[b, :, start : start + n] = qv.scale
        self.v_zero[b, :, start : start + n] = qv.zero
        self.k_scale[b, :, g0 : g0 + qk.codes.shape[-3]] = qk.scale
        self.k_zero[b, :, g0 : g0 + qk.codes.shape[-3]] = qk.zero
        self.lens[b] += n

    def append_codes(self, b: int, k_codes: torch.Tensor, v_codes: torch.Tensor, run_meta: RunMeta) -> None:
        """Store tokens of an 8-bit scale/zero bucket as another bucket or a saved file holds them: packed codes and
        their :class:`RunMeta`, moved unchanged (nothing is decoded or encoded again)."""
        if self.meta_bits != 8:
            raise ValueError("run_meta: a bucket with 16-bit scale/zero takes no RunMeta")
        assert self.k_base is not None and self.v_base is not None and self.run_of is not None
        assert self.runs is not None
        g0, start, n = self._store_codes(b, k_codes, v_codes)
        g = k_codes.shape[-3]
        r0, nr = int(self.runs[b]), int(run_meta.k_base.shape[1])
        self._reserve_runs(r0 + nr)
        self.v_scale[b, :, start : start + n] = run_meta.v_scale
        self.v_zero[b, :, start : start + n] = run_meta.v_zero
        self.k_scale[b, :, g0 : g0 + g] = run_meta.k_scale
        self.k_zero[b, :, g0 : g0 + g] = run_meta.k_zero
        self.k_base[b, :, r0 : r0 + nr] = run_meta.k_base
        self.v_base[b, :, r0 : r0 + nr] = run_meta.v_base
        self.run_of[b, g0 : g0 + g] = run_meta.run_of + r0
        self.runs[b] += nr
        self.lens[b] += n

    def _store_codes(self, b: int, k_codes: torch.Tensor, v_codes: torch.Tensor) -> tuple[int, int, int]:
        """Write packed codes after sample ``b``'s tokens (capacity grown first); ``(first group, first token,
        tokens)``. The caller writes their scale/zero and then counts the tokens in ``lens``."""
        n = v_codes.shape[-2]
        start = int(self.lens[b])
        if start % self.spec.k_group:
            raise ValueError(f"lens: sample {b} holds {start} tokens, not whole key groups of {self.spec.k_group}")
        self._reserve(start + n)
        g0 = start // self.spec.k_group
        self.k_codes[b, :, g0 : g0 + k_codes.shape[-3]] = k_codes
        self.v_codes[b, :, start : start + n] = v_codes
        return g0, start, n

    def run_meta(self, b: int) -> RunMeta:
        """Sample ``b``'s 8-bit metadata as one :class:`RunMeta` (to move or save it unchanged)."""
        if self.meta_bits != 8:
            raise ValueError("run_meta: this bucket stores fp16 scale/zero")
        assert self.k_base is not None and self.v_base is not None and self.run_of is not None
        assert self.runs is not None
        n, r = int(self.lens[b]), int(self.runs[b])
        g = n // self.spec.k_group
        return RunMeta(self.k_scale[b, :, :g], self.k_zero[b, :, :g], self.v_scale[b, :, :n], self.v_zero[b, :, :n],
                       self.k_base[b, :, :r], self.v_base[b, :, :r], self.run_of[b, :g])

    def meta(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp16 ``(k_scale, k_zero, v_scale, v_zero)`` over the whole capacity, as the kernels read them."""
        if self.meta_bits == 16:
            return self.k_scale, self.k_zero, self.v_scale, self.v_zero
        assert self.k_base is not None and self.v_base is not None and self.run_of is not None
        ks, kz = decode(self.k_scale, self.k_zero, self.k_base, self.run_of)
        tok_run = token_runs(self.run_of, self.spec.k_group, self.capacity)
        vs, vz = decode(self.v_scale, self.v_zero, self.v_base, tok_run)
        return ks, kz, vs, vz

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense fp32 ``(k, v)`` over the whole capacity: for the reference and tests only."""
        ks, kz, vs, vz = self.meta()
        qk = QuantizedKeys(self.k_codes, ks, kz, self.spec)
        qv = QuantizedValues(self.v_codes, vs, vz, self.spec)
        return dequantize_keys(qk, self.capacity), dequantize_values(qv)

    def used_bytes(self) -> int:
        """Exact bytes of the valid tokens: codes, key-group and value-group scale/zero, all samples and heads (at
        8-bit metadata: its codes, the run bases and one int32 run index per key group and sample)."""
        hkv, vwords = self.v_codes.shape[1], self.v_codes.shape[3]
        d, kwords = self.k_codes.shape[3], self.k_codes.shape[4]
        vgroups = self.v_scale.shape[3]
        mb = self.meta_bits // 8
        runs = self.runs.tolist() if self.runs is not None else [0] * len(self.lens)
        total = 0
        for n, r in zip(self.lens.tolist(), runs):
            groups = -(-n // self.spec.k_group)
            total += hkv * (groups * d * kwords * 4 + n * vwords * 4 + 2 * groups * d * mb + 2 * n * vgroups * mb)
            if self.meta_bits == 8:
                total += hkv * r * (d + vgroups) * BASE_FIELDS * 2 + groups * 4
        return total

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in self.stored()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The seven kernel arguments of this bucket, in kernel order (fp16 scale/zero, expanded at 8 bits)."""
        ks, kz, vs, vz = self.meta()
        return (self.k_codes, ks, kz, self.v_codes, vs, vz, self.lens)

    def kernel_view(self) -> "QuantBucket":
        """What a decode kernel reads, by field name: this bucket, or at 8-bit metadata a transient bucket whose
        scale/zero are the fp16 expansion (made per call and dropped after it, so the cache keeps only the codes)."""
        if self.meta_bits == 16:
            return self
        ks, kz, vs, vz = self.meta()
        return QuantBucket(self.spec, self.k_codes, ks, kz, self.v_codes, vs, vz, self.lens, self.chunk)

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

    def kernel_view(self) -> "DensePiece":
        """What a decode kernel reads, by field name: the piece itself."""
        return self
