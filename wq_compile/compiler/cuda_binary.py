"""Loading a CUDA module with the binary nvcc built offline: TVM asks ``tvm_callback_cuda_compile`` for the device
code, and this answers with the stored binary, so the loading machine needs no CUDA compiler.

Self-contained on purpose (standard library and tvm-ffi only): the module cache uses it, and the offline export
copies this file beside ``measure_candidates.py`` so a GPU machine without the package can use it too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def prebuilt_cuda_binary(binary: bytes | None) -> Iterator[None]:
    """While loading, answer ``tvm_callback_cuda_compile`` with the binary built offline (no compiler needed)."""
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
