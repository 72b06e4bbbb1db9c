"""The decoder a cache runs once per layer per decode step: the fused kernel over every bucket and the dense piece.

On CPUs one launch of the fused kernel; on GPUs (or with ``split=True``) split-KV plus a merge. Kernels come from a
:class:`~wq_compile.runtime.library.KernelLibrary` (shared per process); argument order is the kernel signature's.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..compiler.device import Device
from ..compiler.isa_variants import VNNI512_FEATURES, int8_dot_flavour
from ..kernels import piece_fields
from ..kernels.gpu_limits import check_split_config
from ..kernels.signatures import META8_KEY, SPLIT_CHUNK, choose_splits, merge_spec, split_spec
from .library import CompiledKernel, KernelLibrary, shared_library
from ..core.spec import KernelSpec, dtype_tag


#: LLVM features of the int8 dot-product mode on AVX-512 targets: ``vpdpbusd`` (VNNI) and ``vpermb``/``vpermt2b``
#: (VBMI) on 512-bit vectors. AVX2 targets have the mode too (``vpmaddubsw`` + ``vpmaddwd``, or AVX-VNNI).
INT8_DOT_FEATURES = VNNI512_FEATURES


class Int8DotsUnsupportedError(ValueError):
    """The int8 dot-product mode was asked for where no kernel implements it: a configuration error, never a reason
    to fall back to another precision or to the reference (``make_backend`` re-raises it with ``backend="auto"``)."""


def int8_dots_unsupported(device: Device, split: bool) -> str | None:
    """Why ``device`` (and the split-KV form, if ``split``) cannot run the int8 dot-product mode, or None: it exists
    in the CPU fused kernel only, for targets with the instructions it is built from (AVX-512 VNNI + VBMI, AVX-VNNI,
    or AVX2: :func:`wq_compile.compiler.isa_variants.cpu_isa`)."""
    if device.kind != "llvm" or split:
        return (f"only the CPU fused kernel has an int8 dot-product mode (target {device.tag}"
                f"{', split-KV form' if split else ''})")
    if int8_dot_flavour(device) is None:
        return (f"target {device.tag} ({device.isa}) has no int8 dot-product path (AVX-512 targets need "
                f"{'/'.join(INT8_DOT_FEATURES)}, others AVX2)")
    return None


def check_int8_dots(device: Device, split: bool) -> None:
    """Refuse the int8 dot-product mode where no kernel implements it, at construction (not at the first decode
    step): :class:`Int8DotsUnsupportedError` naming the reason."""
    why = int8_dots_unsupported(device, split)
    if why is not None:
        raise Int8DotsUnsupportedError(f"int8_dots: {why}; use int8_dots=False")


class FusedDecoder:
    """One fused decode per layer over every bucket and the dense piece of a ``LayerCache``.

    On CPUs one launch of the fused kernel. With ``split`` (the default on CUDA) the split-KV form instead: the
    chunks of all pieces together are cut into ``P`` ranges chosen per call from the SM count and their capacities
    (:func:`~wq_compile.kernels.split_decode.choose_splits`), one launch computes the partial outputs and
    log-sum-exps of every (batch, KV head, range), a second small launch merges them. One compiled module of each
    serves every length, batch and ``P``.
    """

    def __init__(self, library: KernelLibrary, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, *, k_group: int = 28, v_group: int = 64, chunk: int = 64,
                 split: bool | None = None, sm_count: int | None = None, int8_dots: bool | str = False) -> None:
        self.library = library
        self.split = library.device.kind == "cuda" if split is None else bool(split)
        if int8_dots == "auto":  # the mode where this target has it, the exact kernel elsewhere
            int8_dots = int8_dots_unsupported(library.device, self.split) is None
        if int8_dots:
            check_int8_dots(library.device, self.split)
        self.int8_dots = bool(int8_dots)
        if self.split:  # refused here, not at the first decode step (or on the GPU)
            check_split_config(num_q_heads, num_kv_heads, head_dim, SPLIT_CHUNK, layout_chunk=chunk,
                               gpu=library.device.kind == "cuda", k_group=k_group, v_group=v_group,
                               dtype_bytes=dtype.itemsize, arch=library.device.arch)
            chunk = SPLIT_CHUNK  # finer ranges: enough thread blocks at batch 1 from ~2K tokens
        self.shape = dict(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          k_group=k_group, v_group=v_group, dtype=dtype_tag(dtype), chunk=chunk)
        self.out_dtype = dtype
        self.sm_count = sm_count or _parallel_units(library.device)
        self._checked: set[tuple[Any, ...]] = set()
        # keyed by (bucket widths, widest width with 8-bit scale/zero read natively or 0): LayerCache.meta8_width
        self._kernels: dict[tuple[tuple[int, ...], int], CompiledKernel] = {}
        self._fields: dict[tuple[tuple[int, ...], int], list[tuple[str, str] | None]] = {}
        self._sources: dict[tuple[tuple[int, ...], int], list[tuple[int | None, str] | None]] = {}
        self._merge: CompiledKernel | None = None
        # id(layer) -> (identity key, tensors converted for TVM, the tensors, the layer): see _fused_call
        self._bound: dict[int, tuple[Any, list[Any], list[Any], Any]] = {}

    @classmethod
    def create(cls, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device | str, *, k_group: int = 28, v_group: int = 64, chunk: int = 64,
               target: str | None = None, bits: tuple[int, ...] = (8, 4, 2),
               library: KernelLibrary | None = None, split: bool | None = None,
               int8_dots: bool | str = False, meta8: int = 0) -> "FusedDecoder":
        """A decoder whose library targets ``target`` (default: llvm for CPU tensors, cuda for CUDA ones);
        the fused kernel for ``bits`` (its 8-bit scale/zero form up to width ``meta8``, on CPUs) is loaded now so a
        missing module fails here, not mid-generation."""
        dev = torch.device(device)
        library = library or shared_library(target or ("cuda" if dev.type == "cuda" else "llvm"))
        dec = cls(library, num_q_heads, num_kv_heads, head_dim, dtype, k_group=k_group, v_group=v_group,
                  chunk=chunk, split=split, int8_dots=int8_dots)
        dec.kernel(tuple(sorted(bits, reverse=True)), meta8)
        return dec

    def spec(self, widths: tuple[int, ...], meta8: int = 0) -> KernelSpec:
        extra = (("dot8", 1),) if self.int8_dots and any(w < 8 for w in widths) else ()
        extra += ((META8_KEY, meta8),) if meta8 and not self.split else ()
        spec = KernelSpec("fused", tuple(widths) + (16,), extra=extra, **self.shape)
        return split_spec(spec) if self.split else spec

    def specs(self, widths: tuple[int, ...], meta8: int = 0) -> list[KernelSpec]:
        """Every kernel a decode step over ``widths`` launches: the fused (or split-KV) kernel, and its merge."""
        spec = self.spec(widths, meta8)
        return [spec, merge_spec(spec)] if self.split else [spec]

    def _call(self, kernel: CompiledKernel, inputs: list[Any], outputs: list[torch.Tensor]) -> None:
        """Check every argument once per distinct set of shapes, then call unchecked: the full check costs about
        as much as the kernel on short caches. dtype, device and contiguity are fixed by the layer (its tensors
        are allocated contiguous, in its dtype, on its device), by ``q.contiguous()`` and by the outputs made
        here."""
        key = (kernel.spec.uri, tuple(a.shape for a in inputs if isinstance(a, torch.Tensor)),
               tuple(o.shape for o in outputs))
        if key not in self._checked:
            kernel(*inputs, *outputs)
            self._checked.add(key)
        else:
            kernel.call_unchecked(*inputs, *outputs)

    def _fused_call(self, kernel: CompiledKernel, key: tuple[tuple[int, ...], int], q: torch.Tensor, layer: Any,
                    scale: float, out: torch.Tensor) -> None:
        """The CPU decode call, about 5 us of Python instead of 40: the layer's tensors are checked against the
        signature and converted for TVM once, and reused while the layer holds the same tensor objects (its
        buckets grow by allocating new tensors, never in place, so a changed tensor is a changed identity; the
        cached entry keeps the old ones referenced, so an identity is never reused by another tensor)."""
        buckets, dense = layer.buckets, layer.dense  # the fused kernel reads 8-bit scale/zero natively
        inputs = [None if f is None else getattr(dense if f[0] is None else buckets[f[0]], f[1])
                  for f in self._sources[key]]
        bound_key = (key, q.shape, tuple(map(id, inputs)))
        bound = self._bound.get(id(layer))
        if bound is None or bound[0] != bound_key:
            kernel(q, *[scale if a is None else a for a in inputs], out)  # full check of shapes, dtypes, devices
            import tvm_ffi

            converted = [None if a is None else tvm_ffi.from_dlpack(a) for a in inputs]
            if len(self._bound) >= _MAX_BOUND_LAYERS:
                self._bound.clear()
            self._bound[id(layer)] = (bound_key, converted, inputs, layer)
            return
        kernel.call_unchecked(q, *[scale if a is None else a for a in bound[1]], out)

    def kernel(self, widths: tuple[int, ...], meta8: int = 0) -> CompiledKernel:
        key = (widths, 0 if self.split else meta8)
        kernel = self._kernels.get(key)
        if kernel is None:
            spec = self.spec(*key)
            kernel = self._kernels[key] = self.library.load(spec)
            # where each input comes from, in signature order: (piece tag, field) or None for sm_scale
            self._fields[key] = [None if a.is_scalar else piece_fields(a.name)
                                 for a in kernel.signature.inputs[1:]]
            # the same as (bucket width or None for the dense piece, field): no string work per call
            self._sources[key] = [None if f is None else (None if f[0] == "dense" else int(f[0][1:]), f[1])
                                  for f in self._fields[key]]
            if self.split and self._merge is None:
                self._merge = self.library.load(merge_spec(spec))
        return kernel

    def __call__(self, q: torch.Tensor, layer: Any, sm_scale: float, stats: Any = None) -> torch.Tensor:
        if q.shape[0] == 0:  # batch 0: nothing to attend (a zero grid is no launch; zero-size tensors fail TVM's checks)
            return torch.empty(q.shape, dtype=self.out_dtype, device=q.device)
        widths = tuple(sorted(layer.buckets, reverse=True))
        meta8 = 0 if self.split else layer.meta8_width
        kernel = self._kernels.get((widths, meta8)) or self.kernel(widths, meta8)
        scale = float(sm_scale)
        if not self.split:
            out = torch.empty(q.shape, dtype=self.out_dtype, device=q.device)
            self._fused_call(kernel, (widths, meta8), q if q.is_contiguous() else q.contiguous(), layer, scale, out)
            if stats is not None and hasattr(stats, "kernel_calls"):
                stats.kernel_calls += 1
            return out
        pieces = {f"q{b}": layer.buckets[b].kernel_view() for b in widths}  # 8-bit scale/zero: fp16 per call
        pieces["dense"] = layer.dense
        # the argument order is the signature's: fields are read by name (resolved once per kernel)
        args: list[Any] = [q if q.is_contiguous() else q.contiguous()]
        args += [scale if f is None else getattr(pieces[f[0]], f[1]) for f in self._fields[(widths, 0)]]
        out = torch.empty(q.shape, dtype=self.out_dtype, device=q.device)
        bsz, hq, d = q.shape
        # the kernel splits the chunks of all pieces together: P follows their total, not the longest piece
        total = sum(p.capacity for p in pieces.values())
        parts = choose_splits(self.sm_count, total, bsz, self.shape["num_kv_heads"], self.shape["chunk"])
        o_parts = torch.empty(parts, bsz, hq, d, dtype=torch.float32, device=q.device)
        lse_parts = torch.empty(parts, bsz, hq, dtype=torch.float32, device=q.device)
        self._call(kernel, args, [o_parts, lse_parts])
        assert self._merge is not None
        self._call(self._merge, [o_parts, lse_parts], [out])
        if stats is not None and hasattr(stats, "kernel_calls"):
            stats.kernel_calls += 1
        return out


#: Layers whose converted arguments a decoder keeps (one model's layers; beyond it the cache starts over).
_MAX_BOUND_LAYERS = 256


def _parallel_units(device: Device) -> int:
    """Streaming multiprocessors of the current CUDA device, or this host's cores (what splits fill)."""
    if device.kind == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return os.cpu_count() or 1
