"""Compile one kernel for one target: PrimFunc in, module out (schedule + ``tvm.driver.build`` + nvcc for CUDA).

The schedule is the best record of the first log that serves the kernel (:func:`wq_compile.compiler.tuning_log.
candidate_logs`: this device, then a compatible one), replayed on the symbolic kernel, else the target's default
schedule with an :class:`UntunedKernelWarning`. A record from another device is checked once against the torch
reference (:mod:`wq_compile.compiler.check`) before it is used; one that fails is skipped with a warning.

Schedules come from ``wq_compile.schedules.<target kind>``, a module with a fixed protocol (docs/kernel_pipeline.md):
``default_schedule(sch, spec)``, ``design_space(sch, spec)``, ``postprocs()``, ``mutator_probs()``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

from .. import kernels
from .device import Device, resolve_device
from ..kernels.signature import KernelSignature
from ..core.spec import KernelSpec
from .tuning_log import UNTUNED, LogSource, Provenance, TuningLogError, candidate_logs, median, open_database
from .tuning_log import valid_records

if TYPE_CHECKING:
    from .nvcc import NvccOutput

#: Token capacity per piece that kernels are tuned and timed at (a 32-frame video is ~6300 tokens over 3 buckets).
DEFAULT_N_TOKENS = 2048


class UntunedKernelWarning(UserWarning):
    """A kernel was compiled with its default schedule because no tuning record serves it."""


def schedules_for(kind: str) -> ModuleType:
    """The schedule module of a target kind (``wq_compile.schedules.llvm`` / ``.cuda``)."""
    try:
        return importlib.import_module(f"wq_compile.schedules.{kind}")
    except ImportError as exc:
        raise ImportError(f"schedules for target kind {kind!r}: cannot import wq_compile.schedules.{kind} ({exc}); "
                          "install the package (pip install -e .) so schedules/ maps to wq_compile.schedules") from exc


def schedule_code_digest(kind: str) -> str:
    """Digest of the schedule module's source (read, not imported): part of the module-cache key."""
    spec = importlib.util.find_spec(f"wq_compile.schedules.{kind}")
    if spec is None or spec.origin is None:
        raise ImportError(f"schedules for target kind {kind!r}: wq_compile.schedules.{kind} not found")
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class KernelDef:
    """What compiling and tuning need of one kernel: its function, signature, schedules and tuning sizes.

    :func:`kernel_def` makes it from ``wq_compile.kernels``; tests may build one around a toy kernel.
    """

    spec: KernelSpec
    func: Any  # tvm.tirx.PrimFunc, global_symbol == spec.uri
    signature: KernelSignature
    schedules: ModuleType | Any
    sizes: Mapping[str, int]
    scalars: Mapping[str, float] = field(default_factory=dict)

    def workload(self, sizes: Mapping[str, int] | None = None, scalars: Mapping[str, float] | None = None) -> Any:
        """The static IRModule MetaSchedule tunes (a log finds its records by this module's structural hash)."""
        return kernels.tuning_module(self.func, self.signature, sizes or self.sizes,
                                     {**self.scalars, **(scalars or {})})


def kernel_def(spec: KernelSpec, kind: str | Device = "llvm", n_tokens: int = DEFAULT_N_TOKENS) -> KernelDef:
    """``spec``'s kernel for a target kind, or for a device: then the CPU kernel is written for that device's vector
    unit (:func:`wq_compile.compiler.isa_variants.cpu_isa`: 8 lanes on AVX2); a kind alone gets the AVX-512 one."""
    from .isa_variants import check_isa_variants, cpu_isa

    if isinstance(kind, Device):
        check_isa_variants(spec, kind)  # x86-intrinsic variants on another target: refused before the factory
    cpu = cpu_isa(kind) if isinstance(kind, Device) else None
    kind = kind.kind if isinstance(kind, Device) else kind
    func = kernels.make_kernel(spec, kind, cpu)
    if func.attrs is None or func.attrs.get("global_symbol") != spec.uri:
        func = func.with_attr("global_symbol", spec.uri)
    sig = kernels.signature(spec).check_prim_func(func)
    return KernelDef(spec, func, sig, schedules_for(kind), kernels.example_sizes(spec, n_tokens),
                     kernels.default_scalars(spec))


def default_schedule(kdef: KernelDef) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(kdef.func)
    kdef.schedules.default_schedule(sch, kdef.spec)
    return sch


def apply_trace(func: Any, trace: Any, where: str) -> Any:
    """Replay a tuned trace on the symbolic kernel (raises :class:`TuningLogError` when it does not replay)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as exc:
        raise TuningLogError(f"{where}: the tuned trace does not replay on the symbolic kernel "
                             f"({type(exc).__name__}: {exc}); re-tune or delete the log") from exc
    return sch


#: Lowering options of CUDA builds: the split kernel's double-buffered staging copies (``async_scope``) become
#: ``cp.async`` (``InjectPTXAsyncCopy``); without it they stay plain loads (correct, not overlapped).
CUDA_PASS_CONFIG = {"tirx.use_async_copy": True}


def pass_config(target_kind: str) -> dict[str, Any]:
    """The ``tvm.transform.PassContext`` config a build for ``target_kind`` uses (also MetaSchedule's builder)."""
    return dict(CUDA_PASS_CONFIG) if target_kind == "cuda" else {}


def build_module(sch: Any, device: Device) -> Any:
    """Lower and build with ``tvm.driver.build`` (a runtime.Module that ``export_library`` accepts)."""
    import tvm

    with device.target, tvm.transform.PassContext(config=pass_config(device.kind)):
        return tvm.driver.build(sch.mod, target=device.target)


def build_func(func: Any, device: Device) -> Any:
    """Build one plain PrimFunc with no schedule (a machine probe, :mod:`wq_compile.kernels.probes`) for
    ``device``: a runtime.Module whose ``main`` is the function."""
    import tvm

    with device.target, tvm.transform.PassContext(config=pass_config(device.kind)):
        return tvm.driver.build(tvm.IRModule({"main": func}), target=device.target)


def cuda_source(module: Any) -> str:
    """CUDA C source of a built CUDA module (the import that carries the device code)."""
    for imp in module.imports:
        if imp.kind == "cuda":
            return imp.inspect_source()
    raise ValueError("module: no CUDA device module among its imports")


def compile_cuda_binary(source: str, device: Device, target_format: str = "fatbin", kernel: str = "",
                        spec: KernelSpec | None = None) -> bytes:
    """nvcc the generated source for ``device``'s arch offline (no GPU needed): :func:`nvcc_build`'s binary."""
    return nvcc_build(source, device, target_format, kernel, spec).binary


def nvcc_build(source: str, device: Device, target_format: str = "fatbin", kernel: str = "",
               spec: KernelSpec | None = None) -> NvccOutput:
    """nvcc the generated source for ``device``'s arch with TVM's nvcc flags and ``spec``'s own ptxas
    register-usage level where it has one (:func:`cuda_register_level`): binary, ptxas' report and flags
    (:class:`~wq_compile.compiler.nvcc.NvccOutput`). A kernel function that spills registers is reported
    (:class:`~wq_compile.compiler.nvcc.RegisterSpillWarning`, naming ``kernel``): it runs, slower, so the build
    goes on."""
    from .nvcc import RegisterSpillWarning, compile_cuda, spill_message

    out = compile_cuda(source, device.arch, target_format, cuda_register_level(spec))
    why = spill_message(kernel or "CUDA module", device.arch, out.usage)
    if why is not None:
        warnings.warn(why, RegisterSpillWarning, stacklevel=3)
    return out


def cuda_register_level(spec: KernelSpec | None) -> int | None:
    """The ptxas register-usage level the CUDA build gives ``spec``'s kernel (None: TVM's, 10): the kernel
    catalogue's measured choice (:func:`wq_compile.kernels.signatures.ptxas_register_level`)."""
    from ..kernels.signatures import ptxas_register_level

    return None if spec is None else ptxas_register_level(spec)


def cuda_build_flags(spec: KernelSpec, device: Device) -> list[str]:
    """The nvcc command line (flags, no files) the CUDA build runs for ``spec`` on ``device``: part of the module
    cache key and of the offline export's manifest, so a binary says how it was built."""
    from .nvcc import nvcc_flags

    return nvcc_flags(device.arch or "", cuda_register_level(spec))


@dataclass
class BuiltKernel:
    """A compiled kernel plus where its schedule came from."""

    spec: KernelSpec
    device: Device
    module: Any
    signature: KernelSignature
    provenance: Provenance
    source: str | None = None  # CUDA source for CUDA targets
    binary: bytes | None = None  # nvcc output for CUDA targets
    nvcc: NvccOutput | None = None  # nvcc's flags and ptxas' report (binary left out): the cache records them

    @property
    def tuned(self) -> bool:
        return self.provenance.tuned


def _record_schedule(kdef: KernelDef, src: LogSource) -> tuple[Any, float] | None:
    """The best record of ``kdef`` in one log, replayed: ``(schedule, median seconds)`` or None (no record of the
    current kernel: a stale log after a kernel change is simply not used)."""
    sizes = src.meta.get("tuning_sizes")
    if not isinstance(sizes, dict):
        raise TuningLogError(f"{src.log_dir}: meta.json has no 'tuning_sizes'; re-tune it or delete {src.log_dir}")
    try:
        workload = kdef.workload(sizes, src.meta.get("tuning_scalars") or None)
    except Exception as exc:  # noqa: BLE001 - the log's symbols do not fit the current kernel: stale
        if src.exact:
            raise TuningLogError(f"{src.log_dir}: its tuning sizes {sizes} do not fit the kernel ({exc}); "
                                 "re-tune or delete it") from exc
        return None
    records = valid_records(open_database(src.log_dir, require_meta=False), workload, limit=1)
    if not records:
        return None
    return apply_trace(kdef.func, records[0].trace, str(src.log_dir)), median(records[0].run_secs)


def choose_schedule(kdef: KernelDef, device: Device, logs_dir: str | os.PathLike | None
                    ) -> tuple[Any, Provenance, Any]:
    """The first log's best record that serves ``kdef`` (foreign ones built and checked against the reference):
    ``(schedule, provenance, module built for the check or None)``, else ``(None, UNTUNED, None)``. Replays traces;
    never called on a warm module-cache load."""
    from .check import ReferenceMismatch, check_against_reference
    from .record_rule import slower_than_default

    for src in candidate_logs(logs_dir, device, kdef.spec.uri):
        why = slower_than_default(src.meta)
        if why is not None:  # tuning never makes a kernel slower (wq_compile.compiler.record_rule)
            warnings.warn(f"{src.log_dir}: {why}; not used", UntunedKernelWarning, stacklevel=3)
            continue
        try:
            found = _record_schedule(kdef, src)
        except TuningLogError:
            if src.exact:
                raise
            warnings.warn(f"{src.log_dir}: the record does not replay here; not used", UntunedKernelWarning,
                          stacklevel=3)
            continue
        if found is None:
            continue
        sch, secs = found
        module = None
        if not src.exact:
            module = build_module(sch, device)
            try:
                check_against_reference(kdef, module, device)
            except ReferenceMismatch as exc:
                warnings.warn(f"{src.log_dir}: the record replayed here disagrees with the reference ({exc}); "
                              "not used", UntunedKernelWarning, stacklevel=3)
                continue
        return sch, src.provenance(secs), module
    return None, UNTUNED, None


def build_kernel(spec: KernelSpec | KernelDef, device: Device | str = "llvm", *,
                 logs_dir: str | os.PathLike | None = None, allow_untuned: bool = True,
                 cuda_binary: bool = True) -> BuiltKernel:
    """Compile ``spec`` from the first log that serves it, else its default schedule with an
    :class:`UntunedKernelWarning` (an error when ``allow_untuned`` is False)."""
    device = resolve_device(device)
    kdef = spec if isinstance(spec, KernelDef) else kernel_def(spec, device)
    if is_plain_tir(kdef):
        return build_plain_kernel(kdef, device, logs_dir=logs_dir, allow_untuned=allow_untuned)
    sch, provenance, module = choose_schedule(kdef, device, logs_dir)
    if sch is None:
        where = logs_dir if logs_dir is not None else "no logs dir given"
        msg = (f"{kdef.spec.uri}: no tuning record for {device.tag} or a compatible {device.isa} device "
               f"({where}); compiling the untuned default schedule")
        if not allow_untuned:
            raise TuningLogError(msg + " (refused: allow_untuned=False); run wq-tune first")
        warnings.warn(msg + f" (tune it: wq-tune --target {device.kind})", UntunedKernelWarning, stacklevel=2)
        sch = default_schedule(kdef)
    module = module if module is not None else build_module(sch, device)
    built = BuiltKernel(kdef.spec, device, module, kdef.signature, provenance)
    if device.kind == "cuda":
        built.source = cuda_source(module)
        if cuda_binary:
            out = nvcc_build(built.source, device, kernel=kdef.spec.uri, spec=kdef.spec)
            built.binary, built.nvcc = out.binary, out._replace(binary=b"")
    return built


def is_plain_tir(kdef: KernelDef) -> bool:
    """A kernel whose schedule is written into its TIR (its knobs are factory parameters, not a trace)."""
    from ..kernels.attention_cpu import PLAIN_TIR_ATTR

    attrs = kdef.func.attrs
    return bool(attrs is not None and attrs.get(PLAIN_TIR_ATTR, False))


def build_plain_kernel(kdef: KernelDef, device: Device, *, logs_dir: str | os.PathLike | None = None,
                       allow_untuned: bool = True) -> BuiltKernel:
    """Build a plain-TIR kernel as written (its knobs are already in its spec). Provenance comes from the knob
    record (:func:`wq_compile.compiler.knob_lookup.provenance`); knobs from another device are checked once against the reference
    (a failure raises: knobs never change results, so it is a kernel bug, never a reason to cache the module)."""
    from . import knob_lookup
    from .check import check_against_reference
    from .isa_variants import check_isa_variants

    check_isa_variants(kdef.spec, device)  # x86-intrinsic variants on another target: LLVM would abort the process
    provenance, note = knob_lookup.provenance(kdef.spec, device, logs_dir)
    if not provenance.tuned:
        msg = (f"{kdef.spec.uri}: no knob record for {device.tag} or a compatible {device.isa} device "
               f"({logs_dir if logs_dir is not None else 'no logs dir given'}); {note}")
        if not allow_untuned:
            raise TuningLogError(msg + " (refused: allow_untuned=False); run wq-tune first")
        warnings.warn(msg + f" (tune them: wq-tune --target {device.kind} --kernels {kdef.spec.kind})",
                      UntunedKernelWarning, stacklevel=3)
    module = build_module(default_schedule(kdef), device)
    if provenance.source == "foreign":
        check_against_reference(kdef, module, device)
    return BuiltKernel(kdef.spec, device, module, kdef.signature, provenance)
