"""Warm module-cache loads without importing TVM: the TVM runtime library alone, and the host device from a file.

``import tvm`` costs over a second (most of it Python modules a loaded kernel never uses), and a warm load needs
none of it: the cache key is file reads (:func:`wq_compile.compiler.module_cache.expected_key`), the argument description
is plain metadata (:mod:`wq_compile.kernels.signatures`), and a compiled CPU module needs only
``libtvm_runtime.so``, loaded through ``tvm_ffi`` (its functions take torch tensors through DLPack as before).

* :func:`load_module` loads ``libtvm_runtime.so`` the way ``import tvm`` does (the same ``tvm_ffi`` call, the
  same search path, ``RTLD_GLOBAL``) and then the module with ``tvm_ffi.load_module``; once TVM is imported it is
  ``tvm.runtime.load_module``.
* :func:`host_device`: the facts ``wq_compile.compiler.device.host_device`` asks LLVM for (``mcpu``, target JSON, ISA
  class, tag) are recorded in ``<cache root>/host_devices.json`` by any process that resolved them with TVM, keyed
  by :func:`wq_compile.compiler.device.host_fingerprint` (CPU model and flags, machine, cores; the root is per tvm version).
  When they are missing, corrupt or of another fingerprint they are resolved with TVM (never guessed) and recorded.

Whatever else needs TVM (a cold or stale module, a foreign log without an ISA class in its meta, CUDA modules,
which need the prebuilt-binary hook of ``tvm_callback_cuda_compile``) imports it in this process as before. That
is safe after a runtime-only load in apache-tvm 0.27 (checked, docs/TVM_NOTES.md): ``import tvm`` itself loads
``libtvm_runtime.so`` with ``RTLD_GLOBAL`` and then ``libtvm_compiler.so``, which links against it, so the already
mapped runtime is reused and no global registration exists twice. The hazard is a *second copy* of the runtime
(another file), which is why the search path here is TVM's own; no child process is needed to build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import device as device_mod
from .device import Device
from .cache_files import atomic_write, cache_root
from .ffi_import import import_tvm_ffi
from .verified_file import read_json, warn_bad

#: The host-facts file in the module cache root (one per tvm / tvm-ffi version).
FACTS_FILE = "host_devices.json"


def tvm_library_dirs() -> list[Path] | None:
    """The directories ``import tvm`` searches for its libraries (``tvm.libinfo.package_lib_paths``, computed
    without importing the package), or None when TVM is not installed."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    return dirs + [pkg / "lib", pkg / ".." / ".." / "build" / "lib", pkg / ".." / ".." / "lib"]


@lru_cache(maxsize=1)
def runtime_library() -> Any:
    """``libtvm_runtime.so`` loaded (once) exactly as ``tvm/base.py`` loads it: same ``tvm_ffi`` call, same search
    path, ``RTLD_GLOBAL``; a later ``import tvm`` then maps nothing twice. ``tvm_ffi`` is imported without
    ``ml_dtypes`` (:mod:`wq_compile.compiler.ffi_import`)."""
    import_tvm_ffi()
    from tvm_ffi import libinfo

    dirs = tvm_library_dirs()
    if dirs is None:
        raise ImportError("tvm is not installed: no libtvm_runtime to load compiled modules with")
    return libinfo.load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=dirs)


def load_module(path: str | os.PathLike) -> Any:
    """A compiled CPU module: through ``tvm_ffi`` and the runtime library alone while TVM is not imported, else
    ``tvm.runtime.load_module`` (the same loader underneath)."""
    if "tvm" in sys.modules:
        import tvm

        return tvm.runtime.load_module(str(path))
    runtime_library()
    import tvm_ffi

    return tvm_ffi.load_module(os.path.realpath(path))


def facts_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / FACTS_FILE


def read_facts(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The host-facts file (empty when absent or bad, a bad one warned naming it: the caller resolves with TVM and
    rewrites it)."""
    path = facts_path(cache_dir)
    try:
        data = read_json(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:  # BadFileError too: a directory, a FIFO, random bytes, a torn write
        warn_bad(path, str(exc).removeprefix(f"{path}: "), "the host is resolved with TVM and the file rewritten")
        return {}
    if not isinstance(data, dict):
        warn_bad(path, "not a JSON object", "the host is resolved with TVM and the file rewritten")
        return {}
    return data


def record_facts(device: Device, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Record ``device`` (resolved with TVM) under ``fingerprint``; a no-op when already recorded. Written
    atomically; two processes racing may drop each other's new entry, which costs the loser's next process one
    ``import tvm``, never a wrong device."""
    facts = read_facts(cache_dir)
    if facts.get(fingerprint) == device.facts():
        return
    facts[fingerprint] = device.facts()
    text = json.dumps(facts, indent=1, sort_keys=True)
    atomic_write(facts_path(cache_dir), lambda p: Path(p).write_text(text))


def host_device(cache_dir: str | os.PathLike | None = None, num_cores: int | None = None) -> Device:
    """This host's llvm device (as :func:`wq_compile.compiler.device.host_device`): from the facts file while TVM is not
    imported, else resolved with TVM and recorded for the next process."""
    fingerprint = device_mod.host_fingerprint(num_cores)
    if "tvm" not in sys.modules:
        entry = read_facts(cache_dir).get(fingerprint)
        if entry is not None:
            try:
                return Device.from_facts(entry)
            except ValueError as exc:  # corrupt entry: resolve with TVM below, which rewrites it
                warn_bad(facts_path(cache_dir), f"bad entry for this host ({exc})",
                         "the host is resolved with TVM and the entry rewritten")
    device = device_mod.resolve_device("llvm", num_cores)
    try:
        record_facts(device, fingerprint, cache_dir)
    except OSError as exc:  # a read-only cache still works, through TVM
        warn_bad(facts_path(cache_dir), f"cannot be written ({exc})",
                 "every process resolves the host with TVM (slower start)")
    return device
