"""Load compiled kernels and call them from PyTorch.

A :class:`KernelLibrary` resolves a spec to a module: the module cache (:mod:`wq_compile.compiler.module_cache`, a file
lookup plus ``load_module`` when current; without importing TVM while every module is warm, see
:mod:`wq_compile.compiler.light_load`) -> compile from a tuning log of this device or a compatible one
(:mod:`wq_compile.compiler.build`, seconds, no tuning) -> the default schedule with an ``UntunedKernelWarning``.
:func:`shared_library` hands out one library per target, logs and cache folder for the whole process, so a second
cache or a second ``generate`` loads nothing.

Calls pass torch tensors straight through DLPack (zero copy) after checking them against the kernel's argument
description (errors name the argument); the decode path (:class:`wq_compile.runtime.decoder.FusedDecoder`) checks once per
tensor layout and then calls unchecked. :meth:`KernelLibrary.op` exposes a kernel as a torch custom op (``<namespace>::<uri>``,
functional) with a fake implementation, so it runs under ``torch.compile(fullgraph=True)``; it is not on the decode
path.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..compiler import cache_files, cpu_threads, knob_lookup, light_load, module_cache
from ..compiler.module_cache import ensure_module
from ..compiler.device import Device, resolve_device
from ..kernels import signature as kernel_signature
from ..kernels.signature import KernelArgumentError, KernelSignature
from ..core.spec import KernelSpec
from ..compiler.tuning_log import Provenance

LOGS_ENV = "WQ_TUNING_LOGS"

__all__ = [
    "CompiledKernel",
    "KernelArgumentError",
    "KernelLibrary",
    "LibraryStats",
    "default_logs_dir",
    "shared_library",
]


def default_logs_dir() -> Path | None:
    """``$WQ_TUNING_LOGS``, else the repository's ``tuning_logs/`` next to the package when it exists."""
    env = os.environ.get(LOGS_ENV)
    if env:
        return Path(env)
    repo_logs = Path(__file__).resolve().parents[2] / "tuning_logs"  # <repo>/wq_compile/runtime/library.py
    return repo_logs if repo_logs.is_dir() else None


@dataclass
class LibraryStats:
    """What a library did: compiled (tuned or default), loaded from the module cache."""

    compiled: int = 0
    compiled_untuned: int = 0
    cache_hits: int = 0
    reused: int = 0  # already loaded by this library (no file touched)


def library_device(target: Device | str | dict, cache_dir: str | os.PathLike | None = None) -> Device:
    """:func:`wq_compile.compiler.device.resolve_device`, except that this host (``"llvm"``) comes from the module cache's
    host-facts file while TVM is not imported (:func:`wq_compile.compiler.light_load.host_device`): the same device, read
    from a file instead of asked of LLVM."""
    if isinstance(target, str) and target.strip() == "llvm":
        return light_load.host_device(cache_dir)
    return resolve_device(target)


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
        #: Which threads run its parallel loops on a CPU ("torch OpenMP" after :func:`wq_compile.compiler.cpu_threads.attach`,
        #: else "TVM pool (why)"); empty on GPUs.
        self.threads = "TVM pool" if device.kind == "llvm" else ""

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
        self.device = library_device(target, cache_dir)
        self.logs_dir = Path(logs_dir) if logs_dir is not None else default_logs_dir()
        self.cache_dir = cache_dir
        self.allow_untuned = allow_untuned
        #: Called before each compile (cold kernels only); set for a while by :meth:`reporting`.
        self.on_build: Callable[[KernelSpec], None] | None = None
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
    @contextlib.contextmanager
    def reporting(self, on_build: Callable[[KernelSpec], None]) -> Iterator[None]:
        """Within the block, ``on_build(spec)`` runs before every compile this library starts (a progress bar)."""
        previous, self.on_build = self.on_build, on_build
        try:
            yield
        finally:
            self.on_build = previous

    def load(self, spec: KernelSpec) -> CompiledKernel:
        """The kernel of ``spec``: from this library, the module cache, a tuning log, or the default schedule."""
        requested = spec.uri
        if requested in self._kernels:
            self.stats.reused += 1
            return self._kernels[requested]
        spec = knob_lookup.resolve(spec, self.device, self.logs_dir)  # plain-TIR kernels: knobs of the knob record
        paths, provenance, compiled = ensure_module(spec, self.device, self.logs_dir, self.cache_dir,
                                                    allow_untuned=self.allow_untuned, on_build=self.on_build)
        self.stats.compiled += compiled
        self.stats.compiled_untuned += compiled and not provenance.tuned
        self.stats.cache_hits += not compiled
        module = module_cache.load(paths, self.device)
        kernel = CompiledKernel(spec, self.device, kernel_signature(spec), module, paths.module, provenance)
        if self.device.kind == "llvm":
            kernel.threads = cpu_threads.attach(paths.module, cache_files.cache_root(self.cache_dir))
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
    device = library_device(target, cache_dir)
    logs = Path(logs_dir) if logs_dir is not None else default_logs_dir()
    cache = cache_files.cache_root(cache_dir)
    key = (device.target_json, str(logs), str(cache))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = KernelLibrary(device, logs_dir=logs, cache_dir=cache_dir)
        return _SHARED[key]
