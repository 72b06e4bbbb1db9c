"""Load compiled kernels and call them from PyTorch.

A :class:`KernelLibrary` (held by the caller, no global state) resolves a spec to a module in this order:
cached module (``wq_compile.build`` cache, keyed on uri + tvm/tvm-ffi versions + target + kernel + schedule) ->
compile from the tuning log (seconds, no tuning) -> the default schedule with an ``UntunedKernelWarning``.
A cached module from other versions is refused with :class:`~wq_compile.build.ModuleCacheError`.

Calls pass torch tensors straight through DLPack (zero copy) after checking them against the kernel's argument
description (errors name the argument). :meth:`KernelLibrary.op` exposes a kernel as a torch custom op
(``<namespace>::<uri>``, functional: inputs in, outputs out) with a fake implementation, so it runs under
``torch.compile(fullgraph=True)``. :class:`DecodePlan` is the plan/run split: plan once per decode step
(sizes bound, outputs allocated), run once per layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .build import (
    KernelProvider,
    ModuleCacheError,
    build_kernel,
    default_provider,
    export_kernel,
    make_func,
    module_key,
    module_paths,
    read_cached_key,
    best_record,
)
from .device import Device, resolve_device
from .signature import KernelArgumentError, KernelSignature
from .spec import KernelSpec, dtype_tag

LOGS_ENV = "WQ_TUNING_LOGS"

__all__ = [
    "CompiledKernel",
    "DecodePlan",
    "FusedDecoder",
    "KernelArgumentError",
    "KernelLibrary",
    "LibraryStats",
    "default_logs_dir",
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


class CompiledKernel:
    """One loaded kernel: ``kernel(*inputs, *outputs)`` (checked), :meth:`run` (allocates outputs)."""

    def __init__(self, spec: KernelSpec, device: Device, signature: KernelSignature, module: Any,
                 path: Path | None, tuned: bool) -> None:
        self.spec = spec
        self.device = device
        self.signature = signature
        self.module = module
        self.path = path
        self.tuned = tuned
        self._func = module.get_function(spec.uri)
        self.torch_device_type = "cpu" if device.kind == "llvm" else "cuda"

    def __repr__(self) -> str:
        return f"CompiledKernel({self.spec.uri}, {self.device.tag}, tuned={self.tuned})"

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


@contextlib.contextmanager
def _prebuilt_cuda_binary(binary: bytes | None) -> Iterator[None]:
    """While loading, answer TVM's ``tvm_callback_cuda_compile`` with the nvcc binary built offline, so the GPU
    machine needs no compiler (the module carries CUDA source; the loader compiles it through that callback)."""
    if binary is None:
        yield
        return
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda code, *rest: bytearray(binary), override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


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
        provider: KernelProvider | None = None,
        allow_untuned: bool = True,
        namespace: str = "wq",
    ) -> None:
        self.device = resolve_device(target)
        self.logs_dir = Path(logs_dir) if logs_dir is not None else default_logs_dir()
        self.cache_dir = cache_dir
        self.provider = provider or default_provider()
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
    def expected_key(self, spec: KernelSpec) -> tuple[dict[str, Any], Any, KernelSignature]:
        func = make_func(spec, self.provider)
        sig = self.provider.signature(spec, func)
        choice = best_record(spec, self.device, self.logs_dir, func, sig) if self.logs_dir is not None else None
        return module_key(spec, self.device, func, choice), func, sig

    def load(self, spec: KernelSpec) -> CompiledKernel:
        """The kernel of ``spec``: from this library, the module cache, the tuning log, or the default schedule."""
        if spec.uri in self._kernels:
            return self._kernels[spec.uri]
        import tvm

        paths = module_paths(spec, self.device, self.cache_dir)
        key, _func, sig = self.expected_key(spec)
        cached = read_cached_key(paths)
        if cached is not None and cached.get("target") != self.device.target_json:
            raise ModuleCacheError(
                f"{paths['module']}: built for target {cached.get('target')}, this library targets "
                f"{self.device.target_json}; delete it to rebuild"
            )
        fresh = cached is not None and all(cached.get(k) == v for k, v in key.items())
        if fresh:
            self.stats.cache_hits += 1
            tuned = bool(cached.get("tuned"))
        else:
            built = build_kernel(spec, self.device, logs_dir=self.logs_dir, provider=self.provider,
                                 allow_untuned=self.allow_untuned)
            export_kernel(built, self.cache_dir)
            self.stats.compiled += 1
            self.stats.compiled_untuned += 0 if built.tuned else 1
            tuned = built.tuned
        if self.device.kind == "cuda":
            from .device import has_local_gpu

            if not has_local_gpu():
                raise RuntimeError(
                    f"{spec.uri}: compiled for {self.device.tag} into {paths['module']} (with an nvcc binary), "
                    "but no CUDA GPU is usable here to load it; load it on the GPU machine"
                )
            binary = paths["binary"].read_bytes() if paths["binary"].exists() else None
            with _prebuilt_cuda_binary(binary):
                module = tvm.runtime.load_module(str(paths["module"]))
        else:
            module = tvm.runtime.load_module(str(paths["module"]))
        kernel = CompiledKernel(spec, self.device, sig, module, paths["module"], tuned)
        self._kernels[spec.uri] = kernel
        return kernel

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

    def plan(self, spec: KernelSpec, inputs: Sequence[Any]) -> "DecodePlan":
        """Bind sizes once (e.g. per decode step) from example inputs; :meth:`DecodePlan.run` reuses them."""
        kernel = self.load(spec)
        env = kernel.bind_inputs(inputs)
        outputs = kernel.signature.allocate_outputs(env, _first_tensor(inputs).device)
        return DecodePlan(kernel, env, outputs, _shape_key(inputs))


def _shape_key(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else type(v) for v in values)


@dataclass
class DecodePlan:
    """Sizes bound and outputs allocated once; :meth:`run` per layer only checks that shapes did not change."""

    kernel: CompiledKernel
    sizes: Mapping[str, Any]
    outputs: list[torch.Tensor]
    _key: tuple[Any, ...] = field(repr=False, default=())

    def run(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """Run on this layer's inputs; returns the plan's output tensors (overwritten by the next run)."""
        if _shape_key(inputs) != self._key:
            self.kernel.bind_inputs(inputs)  # raises naming the argument
            raise KernelArgumentError(
                f"{self.kernel.spec.uri}: inputs differ in shape/dtype/device from the planned ones; plan again"
            )
        self.kernel.call_unchecked(*_interleave(self.kernel.signature, inputs, self.outputs))
        return tuple(self.outputs)


class FusedDecoder:
    """One fused-kernel launch per layer over every bucket and the dense piece of a ``LayerCache``."""

    def __init__(self, library: KernelLibrary, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, *, k_group: int = 28, v_group: int = 64, chunk: int = 64) -> None:
        self.library = library
        self.shape = dict(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          k_group=k_group, v_group=v_group, dtype=dtype_tag(dtype), chunk=chunk)
        self.out_dtype = dtype
        self._checked: set[tuple[Any, ...]] = set()

    @classmethod
    def create(cls, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device | str, *, k_group: int = 28, v_group: int = 64, chunk: int = 64,
               target: str | None = None, bits: tuple[int, ...] = (8, 4, 2),
               library: KernelLibrary | None = None) -> "FusedDecoder":
        """A decoder whose library targets ``target`` (default: llvm for CPU tensors, cuda for CUDA ones);
        the fused kernel for ``bits`` is loaded now so a missing module fails here, not mid-generation."""
        dev = torch.device(device)
        library = library or KernelLibrary(target or ("cuda" if dev.type == "cuda" else "llvm"))
        dec = cls(library, num_q_heads, num_kv_heads, head_dim, dtype, k_group=k_group, v_group=v_group, chunk=chunk)
        dec.kernel(tuple(sorted(bits, reverse=True)))
        return dec

    def spec(self, widths: tuple[int, ...]) -> KernelSpec:
        return KernelSpec("fused", tuple(widths) + (16,), **self.shape)

    def _run(self, kernel: CompiledKernel, args: list[Any]) -> torch.Tensor:
        """Run the full argument check once per distinct (shape, dtype, device, contiguity) of every tensor, then
        call unchecked: the full check costs about as much as the kernel on short caches."""
        key = (kernel.spec.uri, tuple((a.shape, a.dtype, a.device, a.is_contiguous()) for a in args
                                      if isinstance(a, torch.Tensor)))
        if key not in self._checked:
            (out,) = kernel.run(*args)
            self._checked.add(key)
            return out
        out = torch.empty(args[0].shape, dtype=self.out_dtype, device=args[0].device)
        kernel.call_unchecked(*args, out)
        return out

    def kernel(self, widths: tuple[int, ...]) -> CompiledKernel:
        return self.library.load(self.spec(widths))

    def __call__(self, q: torch.Tensor, layer: Any, sm_scale: float, stats: Any = None) -> torch.Tensor:
        widths = tuple(sorted(layer.buckets, reverse=True))
        kernel = self.kernel(widths)
        args: list[Any] = [q.contiguous()]
        for b in widths:
            args += list(layer.buckets[b].tensors())
        args += [layer.dense.k, layer.dense.v, layer.dense.lens, float(sm_scale)]
        out = self._run(kernel, args)
        if stats is not None and hasattr(stats, "kernel_calls"):
            stats.kernel_calls += 1
        return out


def module_digest(path: Path) -> str:
    """sha256 prefix of a module file (for logs and tests)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
