"""The module cache: key, file lock, atomic export, integrity check before load.

Layout (``WQ_CACHE_DIR`` overrides the root ``~/.cache/wq_compile``)::

    <root>/<tvm-version>-<tvm-ffi-version>/<device-tag>/<uri>.so      compiled module
                                                        <uri>.json    key + size/sha256 of the module + provenance
                                                        <uri>.fatbin  CUDA only: nvcc output for the GPU machine

The key is made of cheap, stable inputs only (:func:`expected_key`): kernel URI, pinned versions, target, a digest
of the kernel factories' source, of the schedule module's source and of the tuning logs that may serve the kernel
as stored. A warm load is therefore file reads plus ``load_module``: nothing is rebuilt or replayed to decide
whether the cached module is current. A module from other versions or another target is never loaded; it, one
whose key differs, and one whose file does not match its recorded size and hash (truncated, corrupt) are rebuilt,
with a warning naming the file when the file was bad (:mod:`wq_compile.verified_file`). A cache that cannot be
written (read-only, full) leaves the module in a private temporary folder for the process, with a warning. Writes
go to a temporary file renamed into place under a file lock; files get the permissions the umask allows (shared
caches stay readable).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from .. import kernels
from . import tuning_log
from .record_rule import slower_than_default
from .build import BuiltKernel, build_kernel, cuda_build_flags, schedule_code_digest
from .cache_files import CACHE_ENV, atomic_write, cache_root
from .device import PINNED_PACKAGES, Device, versions
from .cuda_binary import prebuilt_cuda_binary
from ..core.spec import KernelSpec
from .tuning_log import Provenance, TuningLogError
from .verified_file import BadFileError, check, file_sha256, read_json, warn_bad


class ModuleCacheError(RuntimeError):
    """A module cache that cannot be used (kept for callers; bad cached files are rebuilt with a warning)."""


@dataclass(frozen=True)
class ModulePaths:
    module: Path
    key: Path
    binary: Path
    lock: Path


def module_paths(spec: KernelSpec, device: Device, cache_dir: str | os.PathLike | None = None) -> ModulePaths:
    folder = cache_root(cache_dir) / device.tag
    return ModulePaths(*(folder / f"{spec.uri}{ext}" for ext in (".so", ".json", ".fatbin", ".lock")))


def expected_key(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None) -> dict[str, Any]:
    """What a cached module of ``spec`` must have been built from (file reads and hashes only)."""
    from ..kernels import knobs

    v = versions()
    if knobs.has_knobs(spec, device.kind):  # plain TIR: its knob record (under the URI without knobs) is what serves it
        sources = tuning_log.candidate_logs(logs_dir, device, knobs.record_uri(spec), strict=False)
    else:
        sources = tuning_log.candidate_logs(logs_dir, device, spec.uri)
    # logs the rule refuses serve nothing: a module cached from one (before the rule) no longer matches its key
    sources = [s for s in sources if slower_than_default(s.meta) is None]
    key = {
        "uri": spec.uri,
        **{pkg: v[pkg] for pkg in PINNED_PACKAGES},
        "target": device.target_json,
        "device_tag": device.tag,
        "kernel_source": kernels.source_digest(),
        "schedule_code": schedule_code_digest(device.kind),
        "logs": tuning_log.digest(sources),
    }
    if device.kind == "cuda":  # the binary's nvcc command (a kernel's own ptxas level; TVM's env knobs)
        key["nvcc_flags"] = cuda_build_flags(spec, device)
    return key


_file_digest = file_sha256


def build_lock(paths: ModulePaths) -> FileLock:
    """The cross-process lock of one module (one instance per path in a process: re-entered, never self-blocked),
    held while it is looked up again, built and stored: concurrent processes build each module once."""
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(paths.lock), is_singleton=True)


def store_private(built: BuiltKernel, why: BaseException) -> ModulePaths:
    """The module exported to a private temporary folder when the cache cannot take it (read-only, full, a
    directory in the way): this process runs, loudly, and the next one builds again. Raises
    :class:`ModuleCacheError` when that cannot be written either (a full disk)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="wq-uncached-"))
        atexit.register(shutil.rmtree, folder, True)  # this process's copy only: removed when it exits
        paths = ModulePaths(*(folder / f"{built.spec.uri}{ext}" for ext in (".so", ".json", ".fatbin", ".lock")))
        built.module.export_library(str(paths.module))
        if built.binary is not None:
            paths.binary.write_bytes(built.binary)
    except Exception as exc:  # noqa: BLE001 - TVM's export raises its own error types on a failed write or link
        raise ModuleCacheError(f"{built.spec.uri}: the module cannot be written to the module cache "
                               f"({type(why).__name__}: {why}) nor to a temporary folder ({type(exc).__name__}: "
                               f"{exc}); free disk space, or point {CACHE_ENV} at a writable folder") from exc
    warn_bad(paths.module.name, f"the module cache cannot store it ({type(why).__name__}: {why})",
             f"built into {folder} for this process only; every new process builds it again until the cache "
             f"({CACHE_ENV}) is writable")
    return paths


def store(built: BuiltKernel, key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> ModulePaths:
    """Write the module (and for CUDA the nvcc binary) atomically, then the key file with the module's size and
    sha256 and where its schedule came from."""
    paths = module_paths(built.spec, built.device, cache_dir)
    with build_lock(paths):
        atomic_write(paths.module, built.module.export_library)
        if built.binary is not None:
            binary = built.binary
            atomic_write(paths.binary, lambda p: Path(p).write_bytes(binary))
        record = {**key, "provenance": built.provenance.to_json(), "module_size": paths.module.stat().st_size,
                  "module_sha256": _file_digest(paths.module)}
        if built.binary is not None:
            record["binary_sha256"] = hashlib.sha256(built.binary).hexdigest()
            record["binary_size"] = len(built.binary)
        if built.nvcc is not None:  # the flags nvcc ran with (the key expects the same: else a rebuild) and ptxas
            record["nvcc_flags"] = list(built.nvcc.flags)
            record["ptxas"] = [dataclasses.asdict(u) for u in built.nvcc.usage]
        atomic_write(paths.key, lambda p: Path(p).write_text(json.dumps(record, indent=1, sort_keys=True)))
    return paths


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def read_key(paths: ModulePaths) -> dict[str, Any] | None:
    """The key file of a cached module (None when absent, or bad: unreadable, not a key, of other versions,
    each warned naming the file: rebuild). A module of other versions is never loaded."""
    if not os.path.lexists(paths.module) or not os.path.lexists(paths.key):
        return None
    try:
        key = read_json(paths.key)
    except (OSError, BadFileError) as exc:
        warn_bad(paths.key, str(exc).removeprefix(f"{paths.key}: "), "rebuilding its module")
        return None
    if not isinstance(key, dict):
        warn_bad(paths.key, "not a module key (JSON object expected)", "rebuilding its module")
        return None
    now = versions()
    for pkg in PINNED_PACKAGES:
        if key.get(pkg) != now[pkg]:
            warn_bad(paths.key, f"its module {paths.module.name} was built with {pkg} {key.get(pkg)}, this "
                     f"environment has {now[pkg]}; a module from other versions is never loaded",
                     "rebuilding it")
            return None
    return key


def lookup(paths: ModulePaths, key: dict[str, Any]) -> Provenance | None:
    """Provenance of the cached module when it is current and intact, else None (build it). Raises
    :class:`ModuleCacheError` for other versions or another target."""
    cached = read_key(paths)
    if cached is None:
        return None
    if cached.get("target") != key["target"]:
        warn_bad(paths.key, f"its module was built for target {cached.get('target')}, this library targets "
                 f"{key['target']}", "rebuilding it")
        return None
    if any(cached.get(k) != v for k, v in key.items()):
        return None
    why = check(paths.module, cached.get("module_size"), cached.get("module_sha256"))
    if why is not None:  # truncated or corrupt: never handed to dlopen (a short file would SIGBUS on first call)
        warn_bad(paths.module, why, "rebuilding it")
        return None
    if "binary_sha256" in cached:
        why = check(paths.binary, cached.get("binary_size", _size(paths.binary)), cached["binary_sha256"])
        if why is not None:
            warn_bad(paths.binary, why, "rebuilding its module")
            return None
    return Provenance.from_json(cached.get("provenance"))


def load(paths: ModulePaths, device: Device) -> Any:
    """Load a cached module that :func:`lookup` found current. CPU modules: through the TVM runtime library alone
    while TVM is not imported (:mod:`wq_compile.compiler.light_load`: a warm process never pays ``import tvm``). CUDA
    modules keep ``tvm.runtime.load_module`` with the prebuilt nvcc binary answering ``tvm_callback_cuda_compile``,
    on a machine with a GPU: the runtime-only path is unverified there (no GPU to check it on)."""
    if device.kind != "cuda":
        from .light_load import load_module

        return load_module(paths.module)
    import tvm

    from .device import has_local_gpu

    if not has_local_gpu():
        raise RuntimeError(f"{paths.module}: compiled for {device.tag} (with an nvcc binary), but no CUDA GPU is "
                           "usable here to load it; load it on the GPU machine")
    binary = paths.binary.read_bytes() if paths.binary.exists() else None
    with prebuilt_cuda_binary(binary):
        return tvm.runtime.load_module(str(paths.module))


def ensure_module(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None,
                  cache_dir: str | os.PathLike | None = None, *, allow_untuned: bool = True,
                  on_build: Callable[[KernelSpec], None] | None = None) -> tuple[ModulePaths, Provenance, bool]:
    """Make sure the module cache holds a current module of ``spec``: ``(paths, provenance, compiled now)``.

    ``on_build(spec)`` is called just before a compile starts (never on a warm load): progress bars hook in here.

    A warm call reads files only (key, hash); a miss takes the module's lock (concurrent processes build it once),
    compiles (:func:`wq_compile.compiler.build.build_kernel`) and stores. Never fatal for a bad file: a tuning log of this
    device that cannot be read is named in a warning and the default schedule built; a cache that cannot take the
    module (read-only, a directory in the way) leaves it in a private folder, with a warning.
    """
    try:
        return _ensure_module(spec, device, logs_dir, cache_dir, allow_untuned, on_build)
    except TuningLogError as exc:  # a log of this device that cannot be read or replayed: named, not fatal
        if not allow_untuned or logs_dir is None:
            raise
        warn_bad(logs_dir, str(exc), f"{spec.uri} is compiled from its default schedule instead", stacklevel=4)
        return _ensure_module(spec, device, None, cache_dir, allow_untuned, on_build)


def _ensure_module(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None,
                   cache_dir: str | os.PathLike | None, allow_untuned: bool,
                   on_build: Callable[[KernelSpec], None] | None = None) -> tuple[ModulePaths, Provenance, bool]:
    paths = module_paths(spec, device, cache_dir)
    key = expected_key(spec, device, logs_dir)
    provenance = lookup(paths, key)
    if provenance is not None:
        return paths, provenance, False
    try:
        lock: Any = build_lock(paths)
        lock.acquire()
    except OSError as exc:  # an unwritable cache: build anyway, store privately below
        lock, unwritable = None, exc
    try:
        if lock is not None:
            provenance = lookup(paths, key)  # another process may have built it meanwhile
            if provenance is not None:
                return paths, provenance, False
        if on_build is not None:
            on_build(spec)
        built = build_kernel(spec, device, logs_dir=logs_dir, allow_untuned=allow_untuned)
        if lock is None:
            return store_private(built, unwritable), built.provenance, True
        try:
            store(built, key, cache_dir)
        except Exception as exc:  # noqa: BLE001 - full disk (TVM's export raises its own types), read-only cache,
            # a directory in the way: nothing torn is left (atomic writes), the module goes to a private folder
            return store_private(built, exc), built.provenance, True
        return paths, built.provenance, True
    finally:
        if lock is not None:
            lock.release()
