"""The module cache: key, file lock, atomic export, integrity check before load.

Layout (``WQ_CACHE_DIR`` overrides the root ``~/.cache/wq_compile``)::

    <root>/<tvm-version>-<tvm-ffi-version>/<device-tag>/<uri>.so      compiled module
                                                        <uri>.json    key + size/sha256 of the module + provenance
                                                        <uri>.fatbin  CUDA only: nvcc output for the GPU machine

The key is made of cheap, stable inputs only (:func:`expected_key`): kernel URI, pinned versions, target, a digest
of the kernel factories' source, of the schedule module's source and of the tuning logs that may serve the kernel
as stored. A warm load is therefore file reads plus ``load_module``: nothing is rebuilt or replayed to decide
whether the cached module is current. A module from other versions or another target is refused
(:class:`ModuleCacheError`); one whose key differs, or whose file does not match its recorded size and hash
(truncated, corrupt), is rebuilt. Writes go to a temporary file renamed into place under a file lock; files get the
permissions the umask allows (shared caches stay readable).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .. import kernels
from . import tuning_log
from .record_rule import slower_than_default
from .build import BuiltKernel, build_kernel, schedule_code_digest
from .cache_files import atomic_write, cache_root
from .device import PINNED_PACKAGES, Device, versions
from .cuda_binary import prebuilt_cuda_binary
from ..core.spec import KernelSpec
from .tuning_log import Provenance


class ModuleCacheError(RuntimeError):
    """A cached module was built with other versions or for another target."""


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
    return {
        "uri": spec.uri,
        **{pkg: v[pkg] for pkg in PINNED_PACKAGES},
        "target": device.target_json,
        "device_tag": device.tag,
        "kernel_source": kernels.source_digest(),
        "schedule_code": schedule_code_digest(device.kind),
        "logs": tuning_log.digest(sources),
    }


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store(built: BuiltKernel, key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> ModulePaths:
    """Write the module (and for CUDA the nvcc binary) atomically, then the key file with the module's size and
    sha256 and where its schedule came from."""
    paths = module_paths(built.spec, built.device, cache_dir)
    paths.module.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths.lock)):
        atomic_write(paths.module, built.module.export_library)
        if built.binary is not None:
            binary = built.binary
            atomic_write(paths.binary, lambda p: Path(p).write_bytes(binary))
        record = {**key, "provenance": built.provenance.to_json(), "module_size": paths.module.stat().st_size,
                  "module_sha256": _file_digest(paths.module)}
        if built.binary is not None:
            record["binary_sha256"] = hashlib.sha256(built.binary).hexdigest()
        atomic_write(paths.key, lambda p: Path(p).write_text(json.dumps(record, indent=1, sort_keys=True)))
    return paths


def read_key(paths: ModulePaths) -> dict[str, Any] | None:
    """The key file of a cached module (None when absent or unreadable: rebuild); raises
    :class:`ModuleCacheError` for a module of other versions."""
    if not paths.module.exists() or not paths.key.exists():
        return None
    try:
        key = json.loads(paths.key.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    now = versions()
    for pkg in PINNED_PACKAGES:
        if key.get(pkg) != now[pkg]:
            raise ModuleCacheError(
                f"{paths.module}: built with {pkg} {key.get(pkg)}, this environment has {now[pkg]}; "
                f"a module from other versions is never loaded: delete {paths.module.parent} to rebuild")
    return key


def lookup(paths: ModulePaths, key: dict[str, Any]) -> Provenance | None:
    """Provenance of the cached module when it is current and intact, else None (build it). Raises
    :class:`ModuleCacheError` for other versions or another target."""
    cached = read_key(paths)
    if cached is None:
        return None
    if cached.get("target") != key["target"]:
        raise ModuleCacheError(f"{paths.module}: built for target {cached.get('target')}, this library targets "
                               f"{key['target']}; delete it to rebuild")
    if any(cached.get(k) != v for k, v in key.items()):
        return None
    if paths.module.stat().st_size != cached.get("module_size") or _file_digest(paths.module) != cached.get(
            "module_sha256"):
        return None  # truncated or corrupt: never handed to dlopen (a short file would SIGBUS on first call)
    if "binary_sha256" in cached and (not paths.binary.exists() or hashlib.sha256(
            paths.binary.read_bytes()).hexdigest() != cached["binary_sha256"]):
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
                  cache_dir: str | os.PathLike | None = None, *, allow_untuned: bool = True
                  ) -> tuple[ModulePaths, Provenance, bool]:
    """Make sure the module cache holds a current module of ``spec``: ``(paths, provenance, compiled now)``.

    A warm call reads files only (key, hash); a miss compiles (:func:`wq_compile.compiler.build.build_kernel`) and stores.
    """
    paths = module_paths(spec, device, cache_dir)
    key = expected_key(spec, device, logs_dir)
    provenance = lookup(paths, key)
    if provenance is not None:
        return paths, provenance, False
    built = build_kernel(spec, device, logs_dir=logs_dir, allow_untuned=allow_untuned)
    store(built, key, cache_dir)
    return paths, built.provenance, True
