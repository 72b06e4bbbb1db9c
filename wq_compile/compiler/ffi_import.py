"""``import tvm_ffi`` on the light path without paying for ``ml_dtypes``, which it does not use there.

``tvm_ffi.core`` (``cython/dtype.pxi``) and ``tvm_ffi._dtype`` import ``ml_dtypes`` *optionally* (``try: import
ml_dtypes except ImportError``) only to map its numpy dtypes (bfloat16, float8, int4, ...) to DLPack types; its C
extension registers a dozen numpy dtypes and takes ~0.6 s of a ~0.7 s warm ``make_backend`` (``python -X
importtime``), while a warm load passes torch tensors through DLPack and never a numpy dtype.

:func:`import_tvm_ffi` therefore imports ``tvm_ffi`` with ``sys.modules["ml_dtypes"] = None`` (the documented way to
make one import raise ``ImportError``, which tvm_ffi handles as "not installed") and removes that entry right after,
so the real ``ml_dtypes`` imports normally later. Because tvm_ffi then registered none of its mappings, a one-shot
import hook (:class:`_CompleteOnImport`) waits for the first ``import ml_dtypes`` of the process (``import tvm``
does it in ``tvm.runtime._tensor``) and adds the mappings tvm_ffi keeps in Python (``tvm_ffi.dtype``'s numpy-name
table, which ``tvm.runtime.Tensor.copyfrom`` reads for bfloat16 / float8 arrays), so TVM works as after a normal
import. What cannot be completed: tvm_ffi's Cython-private table of numpy dtype *objects* (a bare
``numpy.dtype(ml_dtypes.bfloat16)`` passed as an FFI argument or to ``tvm_ffi.convert``; strings such as
``"bfloat16"`` work). Code that needs that imports ``ml_dtypes`` (or TVM) before ``wq_compile`` loads a module, and
then nothing is deferred: the shim only acts when neither ``tvm_ffi`` nor ``ml_dtypes`` is imported yet.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

_LOCK = threading.Lock()

#: The numpy-name entries ``tvm_ffi/_dtype.py`` registers when ``ml_dtypes`` imports (ml_dtypes attribute names;
#: ``float4_e2m1fn`` needs ml_dtypes >= 0.5).
ML_DTYPE_NAMES: tuple[str, ...] = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")


def import_tvm_ffi() -> ModuleType:
    """``tvm_ffi``, imported without ``ml_dtypes`` when neither is imported yet (see the module docstring)."""
    with _LOCK:
        if "tvm_ffi" in sys.modules or "ml_dtypes" in sys.modules or importlib.util.find_spec("ml_dtypes") is None:
            import tvm_ffi

            return tvm_ffi
        sys.modules["ml_dtypes"] = None  # type: ignore[assignment]  # tvm_ffi's optional import: ImportError
        try:
            import tvm_ffi
        finally:
            if "ml_dtypes" in sys.modules and sys.modules["ml_dtypes"] is None:
                del sys.modules["ml_dtypes"]
        sys.meta_path.insert(0, _CompleteOnImport())
        return tvm_ffi


def register_ml_dtypes(ml_dtypes: Any) -> None:
    """Add the numpy-name entries ``tvm_ffi._dtype`` adds when it finds ``ml_dtypes`` at import."""
    import numpy as np
    import tvm_ffi

    table = tvm_ffi.dtype._NUMPY_DTYPE_TO_STR
    for name in ML_DTYPE_NAMES:
        if hasattr(ml_dtypes, name):
            table.setdefault(np.dtype(getattr(ml_dtypes, name)), name)


class _CompleteOnImport(importlib.abc.MetaPathFinder):
    """One-shot hook: the first ``import ml_dtypes`` runs as usual (found by the other finders) and is then
    registered with ``tvm_ffi`` (:func:`register_ml_dtypes`); the hook removes itself on that first import."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "ml_dtypes":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real package, through the remaining finders
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """The real loader of ``ml_dtypes``, followed by :func:`register_ml_dtypes` (other attributes delegate)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register_ml_dtypes(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
