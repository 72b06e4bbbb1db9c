"""Load compiled kernels and call them from PyTorch.

A :class:`KernelLibrary` resolves a spec to a module: the module cache (:mod:`wq_compile.module_cache`, a file
lookup plus ``load_module`` when current) -> compile from a tuning log of this device or a compatible one
(:mod:`wq_compile.compile`, seconds, no tuning) -> the default schedule with an ``UntunedKernelWarning``.
:func:`shared_library` hands out one library per target, logs and cache folder for the whole process, so a second
cache or a second ``generate`` loads nothing.

Calls pass torch tensors straight through DLPack (zero copy) after checking them against the kernel's argument
description (errors name the argument); the decode path (:class:`FusedDecoder`) checks once per tensor layout and
then calls unchecked. :meth:`KernelLibrary.op` exposes a kernel as a torch custom op (``<namespace>::<uri>``,
functional) with a fake implementation, so it runs under ``torch.compile(fullgraph=True)``; it is not on the decode
path.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import knobs, module_cache
from .compile import build_kernel
from .device import Device, resolve_device
from .kernels import piece_fields, signature as kernel_signature
from .kernels.split_decode import choose_splits, merge_spec, split_spec
from .signature import KernelArgumentError, KernelSignature
from .spec import KernelSpec, dtype_tag
from .tuning_log import Provenance

LOGS_ENV = "WQ_TUNING_LOGS"

__all__ = [
    "CompiledKernel",
    "FusedDecoder",
    "KernelArgumentError",
    "KernelLibrary",
    "LibraryStats",
    "default_logs_dir",
    "ensure_module",
    "shared_library",
]


def default_logs_dir() -> Path | None:
    """``$WQ_TUNING_LOGS``, else the repository's ``tuning_logs/`` next to the package when it exists."""
    env = os.environ.get(LOGS_ENV)
    if env:
        return Path(env)
    repo_logs = Path(__file__).resolve().parent.parent / "tuning_logs"
    return repo_logs if repo_logs.is_dir() else None


@dataclass
class LibraryStats:
    """What a library did: compiled (tuned or default), loaded from the module cache."""

    compiled: int = 0
    compiled_untuned: int = 0
    cache_hits: int = 0
    reused: int = 0  # already loaded by this library (no file touched)


def ensure_module(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None,
                  cache_dir: str | os.PathLike | None = None, *, allow_untuned: bool = True
                  ) -> tuple[module_cache.ModulePaths, Provenance, bool]:
    """Make sure the module cache holds a current module of ``spec``: ``(paths, provenance, compiled now)``.

    A warm call reads files only (key, hash); a miss compiles (:func:`wq_compile.compile.build_kernel`) and stores.
    """
    paths = module_cache.module_paths(spec, device, cache_dir)
    key = module_cache.expected_key(spec, device, logs_dir)
    provenance = module_cache.lookup(paths, key)
    if provenance is not None:
        return paths, provenance, False
    built = build_kernel(spec, device, logs_dir=logs_dir, allow_untuned=allow_untuned)
    module_cache.store(built, key, cache_dir)
    return paths, built.provenance, True


class CompiledKernel:
    """One loaded kernel: ``kernel(*inputs, *outputs)`` (checked), :meth:`run` (allocates outputs)."""

    def __init__(self, spec: KernelSpec, device: Device, signature: KernelSignature, module: Any,
                 path: Path | None, provenance: Provenance) -> None:
        self.spec = spec
        self.device = device
        self.signature = signature
        self.module = module
        self.path = path
        self.provenance = provenance
        self._func = module.get_function(spec.uri)
        self.torch_device_type = "cpu" if device.kind == "llvm" else "cuda"

    @property
    def tuned(self) -> bool:
        return self.provenance.tuned

    def __repr__(self) -> str:
        return f"CompiledKernel({self.spec.uri}, {self.device.tag}, {self.provenance})"

    def __call__(self, *args: Any) -> None:
        """Destination-passing call with every parameter (outputs last), checked first."""
        self.signature.bind(*args, device_type=self.torch_device_type)
        self._func(*args)

    def call_unchecked(self, *args: Any) -> None:
        """The raw call (about 0.5 us overhead): wrong shapes here can read out of bounds."""
        self._func(*args)

    def bind_inputs(self, inputs: Sequence[Any]) -> dict[str, Any]:
        return self.signature.bind(*inputs, inputs_only=True, device_type=self.torch_device_type)

    def run(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """Call with the inputs only; outputs are allocated on the inputs' device and returned."""
        env = self.bind_inputs(inputs)
        device = _first_tensor(inputs).device
        outputs = self.signature.allocate_outputs(env, device)
        self._func(*_interleave(self.signature, inputs, outputs))
        return tuple(outputs)


def _first_tensor(values: Sequence[Any]) -> torch.Tensor:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise KernelArgumentError("kernel: no tensor argument to infer the device from")


def _interleave(sig: KernelSignature, inputs: Sequence[Any], outputs: Sequence[Any]) -> list[Any]:
    """Inputs and outputs in parameter order."""
    it_in, it_out = iter(inputs), iter(outputs)
    return [next(it_out) if a.is_output else next(it_in) for a in sig.args]


class KernelLibrary:
    """Compiled kernels for one target, resolved from cache / tuning logs / default schedules.

    ``logs_dir`` defaults to :func:`default_logs_dir`; ``cache_dir`` to ``$WQ_CACHE_DIR`` or ``~/.cache/wq_compile``.
    Custom ops are registered under ``namespace`` and removed by :meth:`close` (or leaving a ``with`` block).
    """

    def __init__(
        self,
        target: Device | str | dict = "llvm",
        *,
        logs_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_untuned: bool = True,
        namespace: str = "wq",
    ) -> None:
        self.device = resolve_device(target)
        self.logs_dir = Path(logs_dir) if logs_dir is not None else default_logs_dir()
        self.cache_dir = cache_dir
        self.allow_untuned = allow_untuned
        self.namespace = namespace
        self.stats = LibraryStats()
        self._kernels: dict[str, CompiledKernel] = {}
        self._ops: dict[str, Any] = {}

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "KernelLibrary":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Unregister this library's custom ops and drop its modules."""
        for op in self._ops.values():
            lib = getattr(op, "_lib", None)
            if lib is not None:
                lib._destroy()
        self._ops.clear()
        self._kernels.clear()

    # ---- loading -----------------------------------------------------------------------------------------------
    def load(self, spec: KernelSpec) -> CompiledKernel:
        """The kernel of ``spec``: from this library, the module cache, a tuning log, or the default schedule."""
        requested = spec.uri
        if requested in self._kernels:
            self.stats.reused += 1
            return self._kernels[requested]
        spec = knobs.resolve(spec, self.device, self.logs_dir)  # plain-TIR kernels: knobs of the knob record
        paths, provenance, compiled = ensure_module(spec, self.device, self.logs_dir, self.cache_dir,
                                                    allow_untuned=self.allow_untuned)
        self.stats.compiled += compiled
        self.stats.compiled_untuned += compiled and not provenance.tuned
        self.stats.cache_hits += not compiled
        module = module_cache.load(paths, self.device)
        kernel = CompiledKernel(spec, self.device, kernel_signature(spec), module, paths.module, provenance)
        self._kernels[requested] = kernel  # keyed by the URI asked for: the next call skips the knob lookup
        return kernel

    def provenance(self) -> dict[str, str]:
        """``uri -> "tuned here" | "tuned on <tag>" | "untuned"`` of every kernel loaded so far."""
        return {uri: str(k.provenance) for uri, k in self._kernels.items()}

    # ---- torch integration ---------------------------------------------------------------------------------------
    def op(self, spec: KernelSpec) -> Any:
        """The kernel as a functional torch custom op ``<namespace>::<uri>`` (inputs -> outputs)."""
        if spec.uri in self._ops:
            return self._ops[spec.uri]
        kernel = self.load(spec)
        sig = kernel.signature
        if not sig.output_symbols_bound_by_inputs():
            raise ValueError(f"{spec.uri}: output shapes depend on sizes no input carries; use load(spec)(...)")
        params = []
        for a in sig.inputs:
            if a.is_scalar:
                params.append(f"{'float' if a.dtype.startswith('float') else 'int'} {a.name}")
            else:
                params.append(f"Tensor {a.name}")
        n_out = len(sig.outputs)
        returns = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
        schema = f"({', '.join(params)}) -> {returns}"

        def impl(*inputs: Any) -> Any:
            outs = kernel.run(*inputs)
            return outs[0] if n_out == 1 else outs

        def fake(*inputs: Any) -> Any:
            outs = sig.allocate_outputs(sig.bind(*inputs, inputs_only=True), _first_tensor(inputs).device)
            return outs[0] if n_out == 1 else tuple(outs)

        op = torch.library.custom_op(
            f"{self.namespace}::{spec.uri}", impl, mutates_args=(), device_types=kernel.torch_device_type,
            schema=schema,
        )
        op.register_fake(fake)
        self._ops[spec.uri] = op
        return op


_SHARED: dict[tuple[str, str, str], KernelLibrary] = {}
_SHARED_LOCK = threading.Lock()


def shared_library(target: Device | str | dict = "llvm", *, logs_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> KernelLibrary:
    """The process-wide library for ``target`` (and logs / cache folders): loaded kernels are shared by every
    cache and backend of the process, so only the first one pays for loading."""
    device = resolve_device(target)
    logs = Path(logs_dir) if logs_dir is not None else default_logs_dir()
    cache = module_cache.cache_root(cache_dir)
    key = (device.target_json, str(logs), str(cache))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = KernelLibrary(device, logs_dir=logs, cache_dir=cache_dir)
        return _SHARED[key]


class FusedDecoder:
    """One fused decode per layer over every bucket and the dense piece of a ``LayerCache``.

    On CPUs one launch of the fused kernel. With ``split`` (the default on CUDA) the split-KV form instead: the
    tokens of every piece are cut into ``P`` ranges chosen per call from the SM count and the longest piece
    (:func:`~wq_compile.kernels.split_decode.choose_splits`), one launch computes the partial outputs and
    log-sum-exps of every (batch, KV head, range), a second small launch merges them. One compiled module of each
    serves every length, batch and ``P``.
    """

    def __init__(self, library: KernelLibrary, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, *, k_group: int = 28, v_group: int = 64, chunk: int = 64,
                 split: bool | None = None, sm_count: int | None = None) -> None:
        self.library = library
        self.split = library.device.kind == "cuda" if split is None else bool(split)
        if self.split:
            chunk = SPLIT_CHUNK  # finer ranges: enough thread blocks at batch 1 from ~2K tokens
        self.shape = dict(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          k_group=k_group, v_group=v_group, dtype=dtype_tag(dtype), chunk=chunk)
        self.out_dtype = dtype
        self.sm_count = sm_count or _parallel_units(library.device)
        self._checked: set[tuple[Any, ...]] = set()
        self._kernels: dict[tuple[int, ...], CompiledKernel] = {}
        self._fields: dict[tuple[int, ...], list[tuple[str, str] | None]] = {}
        self._merge: CompiledKernel | None = None

    @classmethod
    def create(cls, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device | str, *, k_group: int = 28, v_group: int = 64, chunk: int = 64,
               target: str | None = None, bits: tuple[int, ...] = (8, 4, 2),
               library: KernelLibrary | None = None, split: bool | None = None) -> "FusedDecoder":
        """A decoder whose library targets ``target`` (default: llvm for CPU tensors, cuda for CUDA ones);
        the fused kernel for ``bits`` is loaded now so a missing module fails here, not mid-generation."""
        dev = torch.device(device)
        library = library or shared_library(target or ("cuda" if dev.type == "cuda" else "llvm"))
        dec = cls(library, num_q_heads, num_kv_heads, head_dim, dtype, k_group=k_group, v_group=v_group,
                  chunk=chunk, split=split)
        dec.kernel(tuple(sorted(bits, reverse=True)))
        return dec

    def spec(self, widths: tuple[int, ...]) -> KernelSpec:
        spec = KernelSpec("fused", tuple(widths) + (16,), **self.shape)
        return split_spec(spec) if self.split else spec

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

    def kernel(self, widths: tuple[int, ...]) -> CompiledKernel:
        kernel = self._kernels.get(widths)
        if kernel is None:
            spec = self.spec(widths)
            kernel = self._kernels[widths] = self.library.load(spec)
            # where each input comes from, in signature order: (piece tag, field) or None for sm_scale
            self._fields[widths] = [None if a.is_scalar else piece_fields(a.name)
                                    for a in kernel.signature.inputs[1:]]
            if self.split and self._merge is None:
                self._merge = self.library.load(merge_spec(spec))
        return kernel

    def __call__(self, q: torch.Tensor, layer: Any, sm_scale: float, stats: Any = None) -> torch.Tensor:
        widths = tuple(sorted(layer.buckets, reverse=True))
        kernel = self.kernel(widths)
        pieces = {f"q{b}": layer.buckets[b] for b in widths}
        pieces["dense"] = layer.dense
        scale = float(sm_scale)
        # the argument order is the signature's: fields are read by name (resolved once per kernel)
        args: list[Any] = [q if q.is_contiguous() else q.contiguous()]
        args += [scale if f is None else getattr(pieces[f[0]], f[1]) for f in self._fields[widths]]
        out = torch.empty(q.shape, dtype=self.out_dtype, device=q.device)
        if self.split:
            bsz, hq, d = q.shape
            longest = max(p.capacity for p in pieces.values())
            parts = choose_splits(self.sm_count, longest, bsz, self.shape["num_kv_heads"], self.shape["chunk"])
            o_parts = torch.empty(parts, bsz, hq, d, dtype=torch.float32, device=q.device)
            lse_parts = torch.empty(parts, bsz, hq, dtype=torch.float32, device=q.device)
            self._call(kernel, args, [o_parts, lse_parts])
            assert self._merge is not None
            self._call(self._merge, [o_parts, lse_parts], [out])
        else:
            self._call(kernel, args, [out])
        if stats is not None and hasattr(stats, "kernel_calls"):
            stats.kernel_calls += 1
        return out


#: Chunk (tokens) of the split-KV decode: whole chunks per split range (the layout's capacities are multiples).
SPLIT_CHUNK = 32


def _parallel_units(device: Device) -> int:
    """Streaming multiprocessors of the current CUDA device, or this host's cores (what splits fill)."""
    if device.kind == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return os.cpu_count() or 1
