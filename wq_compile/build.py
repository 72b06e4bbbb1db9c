"""Compile one kernel for one target: tuned record -> else default schedule (warned); export into a versioned cache.

Cache layout (``WQ_CACHE_DIR`` overrides the root ``~/.cache/wq_compile``)::

    <root>/<tvm-version>-<tvm-ffi-version>/<device-tag>/<uri>.so      compiled module
                                                        <uri>.json    its key: versions, target, kernel, schedule
                                                        <uri>.fatbin  CUDA only: nvcc output for the GPU machine

Writes go to a temporary file renamed into place (``os.replace``) under a file lock, so concurrent processes never
see half a module. For CUDA the generated source is compiled offline with nvcc (inside ``with target:``): the GPU
machine needs no compiler.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from filelock import FileLock

from .device import PINNED_PACKAGES, Device, resolve_device, versions
from .signature import KernelSignature
from .spec import KernelSpec

CACHE_ENV = "WQ_CACHE_DIR"
META_FILE = "meta.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
#: Tuning records with run time at or above this are failed runs (MetaSchedule writes 1e10 s).
FAILED_RUN_SECS = 1e9


class UntunedKernelWarning(UserWarning):
    """A kernel was compiled with its default schedule because no tuning record serves it."""


class TuningLogError(RuntimeError):
    """A tuning log is unreadable, stale (other versions/target) or does not replay on the kernel."""


class ModuleCacheError(RuntimeError):
    """A cached module was built with other versions or for another target."""


# ---------------------------------------------------------------------------------------------------------------------
# Kernel provider: where PrimFuncs and schedules come from.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelProvider:
    """Kernel factory plus per-target schedule modules (``default_schedule``, ``design_space``, postprocs).

    The default is ``wq_compile.kernels.make_kernel`` and ``wq_compile.schedules.<target kind>``.
    ``sizes(spec, n_tokens) -> {symbol: value}``, when given, picks the symbol values kernels are tuned and
    benchmarked at; otherwise every token symbol is ``n_tokens``. ``describe(spec)``, when given, is the factory's
    :class:`KernelSignature` (outputs and size rules); without it the signature is read off the PrimFunc.
    """

    make_kernel: Callable[[KernelSpec], Any]
    schedules_for: Callable[[str], ModuleType]
    sizes: Callable[[KernelSpec, int], Mapping[str, int]] | None = None
    #: The factory's own argument description (size rules such as whole chunks), when it has one.
    describe: Callable[[KernelSpec], KernelSignature] | None = None

    def signature(self, spec: KernelSpec, func: Any) -> KernelSignature:
        """The factory's description checked against ``func`` (raises if they disagree), else read off ``func``."""
        if self.describe is None:
            return KernelSignature.from_prim_func(func, spec.uri)
        return self.describe(spec).check_prim_func(func)

    def schedules(self, target_kind: str) -> ModuleType:
        return self.schedules_for(target_kind)

    def postprocs(self, target_kind: str, spec: KernelSpec) -> Any:
        mod = self.schedules(target_kind)
        for name in ("postprocs", "POSTPROCS", "make_postprocs"):
            value = getattr(mod, name, None)
            if value is None:
                continue
            return list(_call_with_spec(value, spec) if callable(value) else value)
        return target_kind  # MetaSchedule's defaults for the target

    def mutator_probs(self, target_kind: str, spec: KernelSpec) -> Any:
        value = getattr(self.schedules(target_kind), "mutator_probs", None)
        if value is None:
            return target_kind
        return _call_with_spec(value, spec) if callable(value) else value


def _call_with_spec(fn: Callable[..., Any], spec: KernelSpec) -> Any:
    """Call a schedule-module hook that takes either ``(spec)`` or nothing."""
    params = inspect.signature(fn).parameters
    return fn(spec) if params else fn()


def _default_schedules(kind: str) -> ModuleType:
    try:
        return importlib.import_module(f"wq_compile.schedules.{kind}")
    except ImportError as exc:
        raise ImportError(
            f"schedules for target kind {kind!r}: cannot import wq_compile.schedules.{kind} ({exc}); "
            "install the package (pip install -e .) so schedules/ is mapped to wq_compile.schedules"
        ) from exc


def _default_make_kernel(spec: KernelSpec) -> Any:
    kernels = importlib.import_module("wq_compile.kernels")
    return kernels.make_kernel(spec)


def _default_sizes(spec: KernelSpec, n_tokens: int) -> Mapping[str, int]:
    kernels = importlib.import_module("wq_compile.kernels")
    fn = getattr(kernels, "example_sizes", None)
    return dict(fn(spec, n_tokens)) if fn is not None else {}


def _default_describe(spec: KernelSpec) -> KernelSignature:
    kernels = importlib.import_module("wq_compile.kernels")
    return kernels.signature(spec)


def default_provider() -> KernelProvider:
    return KernelProvider(_default_make_kernel, _default_schedules, _default_sizes, _default_describe)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel + workload helpers shared with tune.py
# ---------------------------------------------------------------------------------------------------------------------
def make_func(spec: KernelSpec, provider: KernelProvider) -> Any:
    func = provider.make_kernel(spec)
    gsym = func.attrs["global_symbol"] if func.attrs is not None and "global_symbol" in func.attrs else None
    if gsym != spec.uri:
        func = func.with_attr("global_symbol", spec.uri)
    return func


def kernel_sizes(spec: KernelSpec, sig: KernelSignature, provider: KernelProvider, n_tokens: int) -> dict[str, int]:
    """Symbol values a kernel is tuned and benchmarked at (the provider's choice, else the signature's defaults)."""
    chosen = dict(provider.sizes(spec, n_tokens)) if provider.sizes is not None else {}
    defaults = sig.default_sizes(n_tokens)
    constrained = {s for s, _, _ in sig.at_least}
    for s in defaults:
        if s == "P":  # partial states merged: one per piece
            defaults[s] = len(spec.bits)
        elif s.startswith("G") and s not in constrained:  # key groups of the matching token symbol
            tokens = next((t + s[1:] for t in ("N", "n") if t + s[1:] in defaults), None)
            if tokens is not None:
                defaults[s] = -(-defaults[tokens] // spec.k_group)
    return {s: int(chosen.get(s, defaults[s])) for s in sig.symbols}


def tuning_workload(func: Any, sig: KernelSignature, sizes: Mapping[str, int], scalars: Mapping[str, float] | None = None):
    """A static copy of ``func`` (symbols fixed, scalar params folded) as MetaSchedule tunes and measures it.

    MetaSchedule can neither allocate symbolic-shape arguments nor scalar parameters; the trace tuned on this
    copy replays on the symbolic kernel because design spaces only tile inside the fixed token chunk.
    """
    import tvm
    from tvm import tirx

    mapping: dict[Any, Any] = {}
    for p, desc in zip(func.params, sig.args):
        if desc.is_scalar:
            value = (scalars or {}).get(desc.name, 0.125 if desc.dtype.startswith("float") else 1)
            mapping[p] = tirx.FloatImm(desc.dtype, float(value)) if desc.dtype.startswith("float") else tirx.IntImm(desc.dtype, int(value))
        elif any(not isinstance(d, int) for d in desc.shape or ()):
            mapping[p] = tirx.decl_buffer(desc.shape_at(sizes), desc.dtype, desc.name)
    static = func.specialize(mapping) if mapping else func
    return tvm.IRModule({"main": static.with_attr("global_symbol", "main")})


def func_digest(func: Any) -> str:
    return hashlib.sha256(func.script().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Tuning logs (read side; tune.py writes them)
# ---------------------------------------------------------------------------------------------------------------------
def log_dir_for(logs_dir: str | os.PathLike, device: Device, spec: KernelSpec) -> Path:
    return Path(logs_dir) / device.tag / spec.uri


def read_meta(log_dir: Path, device: Device | None = None) -> dict[str, Any]:
    """``meta.json`` of a tuning log, checked: parsable, same tvm/tvm-ffi versions, same target.

    Raises :class:`TuningLogError` naming the file and the fix.
    """
    path = Path(log_dir) / META_FILE
    fix = f"re-tune it (wq-tune) or delete {Path(log_dir)}"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise TuningLogError(f"{path}: missing; a tuning log without meta.json cannot be version-checked; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TuningLogError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("versions"), dict):
        raise TuningLogError(f"{path}: no 'versions' object; {fix}")
    now = versions()
    for pkg in PINNED_PACKAGES:
        if meta["versions"].get(pkg) != now[pkg]:
            raise TuningLogError(
                f"{path}: tuned with {pkg} {meta['versions'].get(pkg)}, this environment has {now[pkg]}; "
                f"a log from other versions is never used: {fix}"
            )
    if device is not None and meta.get("device_tag") not in (None, device.tag):
        raise TuningLogError(f"{path}: log of device {meta.get('device_tag')!r}, not {device.tag!r}; {fix}")
    return meta


def _check_json_lines(path: Path, fix: str) -> None:
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise TuningLogError(f"{path}:{lineno}: not valid JSON ({exc}); {fix}") from exc


def open_database(log_dir: Path, device: Device | None = None, *, require_meta: bool = True):
    """The JSONDatabase of one kernel's log, after checking meta.json and every JSON line."""
    from tvm.s_tir import meta_schedule as ms

    log_dir = Path(log_dir)
    if require_meta:
        read_meta(log_dir, device)
    fix = f"re-tune it (wq-tune) or delete {log_dir}"
    for name in (WORKLOAD_FILE, RECORD_FILE):
        _check_json_lines(log_dir / name, fix)
    try:
        return ms.database.JSONDatabase(
            path_workload=str(log_dir / WORKLOAD_FILE), path_tuning_record=str(log_dir / RECORD_FILE)
        )
    except Exception as exc:  # TVM raises its own error types on malformed records
        raise TuningLogError(f"{log_dir}: the tuning database does not load ({exc}); {fix}") from exc


def valid_records(db: Any, workload_mod: Any, limit: int = 100000) -> list[Any]:
    """Records of ``workload_mod`` with a real measured time, best first (no workload is committed)."""
    if not db.has_workload(workload_mod):
        return []
    records = db.get_top_k(db.commit_workload(workload_mod), limit)
    out = []
    for r in records:
        secs = [float(x) for x in (r.run_secs or [])]
        if secs and max(secs) < FAILED_RUN_SECS:
            out.append(r)
    return out


@dataclass(frozen=True)
class TunedChoice:
    """The best tuning record for a kernel, as a trace to replay on the symbolic kernel."""

    trace: Any
    run_secs: float
    digest: str
    log_dir: Path


def best_record(
    spec: KernelSpec, device: Device, logs_dir: str | os.PathLike, func: Any, sig: KernelSignature
) -> TunedChoice | None:
    """Best valid record of the current kernel in ``logs_dir`` (None when there is no log or no match)."""
    log_dir = log_dir_for(logs_dir, device, spec)
    if not log_dir.exists():
        return None
    meta = read_meta(log_dir, device)
    db = open_database(log_dir, device, require_meta=False)
    sizes = meta.get("tuning_sizes")
    if not isinstance(sizes, dict):
        raise TuningLogError(f"{log_dir / META_FILE}: no 'tuning_sizes'; re-tune it (wq-tune) or delete {log_dir}")
    try:
        workload = tuning_workload(func, sig, sizes, meta.get("tuning_scalars"))
    except Exception as exc:
        raise TuningLogError(f"{log_dir}: its tuning sizes {sizes} do not fit the kernel ({exc}); re-tune or delete it") from exc
    records = valid_records(db, workload, limit=1)
    if not records:
        return None
    rec = records[0]
    digest = hashlib.sha256(str(rec.trace).encode()).hexdigest()[:16]
    secs = [float(x) for x in rec.run_secs]
    return TunedChoice(rec.trace, sorted(secs)[len(secs) // 2], digest, log_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduling and compiling
# ---------------------------------------------------------------------------------------------------------------------
def default_schedule(spec: KernelSpec, device: Device, func: Any, provider: KernelProvider):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    provider.schedules(device.kind).default_schedule(sch, spec)
    return sch


def apply_trace(func: Any, trace: Any, where: str):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as exc:
        raise TuningLogError(
            f"{where}: the tuned trace does not replay on the symbolic kernel ({type(exc).__name__}: {exc}); "
            "the design space must only tile inside the fixed token chunk. Re-tune or delete the log."
        ) from exc
    return sch


def compile_schedule(sch: Any, device: Device):
    """Lower and build with ``tvm.driver.build`` (a runtime.Module that ``export_library`` accepts)."""
    import tvm

    with device.target:
        return tvm.driver.build(sch.mod, target=device.target)


def cuda_source(module: Any) -> str:
    """CUDA C source of a built CUDA module (the import that carries the device code)."""
    for imp in module.imports:
        if imp.kind == "cuda":
            return imp.inspect_source()
    raise ValueError("module: no CUDA device module among its imports")


def compile_cuda_binary(source: str, device: Device, target_format: str = "fatbin") -> bytes:
    """nvcc the generated source for ``device``'s arch offline (no GPU needed), inside ``with target:``."""
    from tvm.support import nvcc

    with device.target:
        return bytes(nvcc.compile_cuda(source, target_format=target_format, arch=device.arch, compiler="nvcc"))


@dataclass
class BuiltKernel:
    """A compiled kernel plus how it was scheduled."""

    spec: KernelSpec
    device: Device
    module: Any
    signature: KernelSignature
    tuned: bool
    key: dict[str, Any]
    source: str | None = None  # CUDA source for CUDA targets
    binary: bytes | None = None  # nvcc output for CUDA targets
    tuned_run_secs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def module_key(spec: KernelSpec, device: Device, func: Any, choice: TunedChoice | None) -> dict[str, Any]:
    v = versions()
    return {
        "uri": spec.uri,
        **{pkg: v[pkg] for pkg in PINNED_PACKAGES},
        "target": device.target_json,
        "device_tag": device.tag,
        "kernel": func_digest(func),
        "schedule": f"tuned:{choice.digest}" if choice is not None else "default",
    }


def build_kernel(
    spec: KernelSpec,
    device: Device | str = "llvm",
    *,
    logs_dir: str | os.PathLike | None = None,
    provider: KernelProvider | None = None,
    allow_untuned: bool = True,
    cuda_binary: bool = True,
) -> BuiltKernel:
    """Compile ``spec``: best tuning record in ``logs_dir`` if one serves the current kernel, else the default
    schedule with an :class:`UntunedKernelWarning` (or an error when ``allow_untuned`` is False)."""
    device = resolve_device(device)
    provider = provider or default_provider()
    func = make_func(spec, provider)
    sig = provider.signature(spec, func)
    choice = best_record(spec, device, logs_dir, func, sig) if logs_dir is not None else None
    if choice is not None:
        sch = apply_trace(func, choice.trace, str(choice.log_dir))
    else:
        where = log_dir_for(logs_dir, device, spec) if logs_dir is not None else "no logs dir given"
        msg = f"{spec.uri}: no tuning record for {device.tag} ({where}); compiling the untuned default schedule"
        if not allow_untuned:
            raise TuningLogError(msg + " (refused: allow_untuned=False); run wq-tune first")
        warnings.warn(msg, UntunedKernelWarning, stacklevel=2)
        sch = default_schedule(spec, device, func, provider)
    module = compile_schedule(sch, device)
    built = BuiltKernel(
        spec, device, module, sig, choice is not None, module_key(spec, device, func, choice),
        tuned_run_secs=choice.run_secs if choice is not None else None,
    )
    if device.kind == "cuda":
        built.source = cuda_source(module)
        if cuda_binary:
            built.binary = compile_cuda_binary(built.source, device)
    return built


# ---------------------------------------------------------------------------------------------------------------------
# Module cache
# ---------------------------------------------------------------------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $WQ_CACHE_DIR or ~/.cache/wq_compile>/<tvm>-<tvm-ffi>``."""
    base = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wq_compile"
    v = versions()
    return Path(base) / f"{v['apache-tvm']}-{v['apache-tvm-ffi']}"


def module_paths(spec: KernelSpec, device: Device, cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    folder = cache_root(cache_dir) / device.tag
    return {
        "module": folder / f"{spec.uri}.so",
        "key": folder / f"{spec.uri}.json",
        "binary": folder / f"{spec.uri}.fatbin",
        "lock": folder / f"{spec.uri}.lock",
    }


def _atomic_write(path: Path, writer: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_kernel(built: BuiltKernel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the module (and for CUDA the nvcc binary) atomically, the key file last."""
    paths = module_paths(built.spec, built.device, cache_dir)
    paths["module"].parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths["lock"])):
        _atomic_write(paths["module"], built.module.export_library)
        if built.binary is not None:
            binary = built.binary
            _atomic_write(paths["binary"], lambda p: Path(p).write_bytes(binary))
        key = {**built.key, "tuned": built.tuned, "tuned_run_secs": built.tuned_run_secs}
        _atomic_write(paths["key"], lambda p: Path(p).write_text(json.dumps(key, indent=1, sort_keys=True)))
    return paths["module"]


def read_cached_key(paths: Mapping[str, Path]) -> dict[str, Any] | None:
    """The key file of a cached module; raises :class:`ModuleCacheError` on other versions or a broken file."""
    if not paths["module"].exists() or not paths["key"].exists():
        return None
    try:
        key = json.loads(paths["key"].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModuleCacheError(f"{paths['key']}: not valid JSON ({exc}); delete {paths['module'].parent} to rebuild") from exc
    now = versions()
    for pkg in PINNED_PACKAGES:
        if key.get(pkg) != now[pkg]:
            raise ModuleCacheError(
                f"{paths['module']}: built with {pkg} {key.get(pkg)}, this environment has {now[pkg]}; "
                f"a module from other versions is never loaded: delete {paths['module'].parent} to rebuild"
            )
    return key
