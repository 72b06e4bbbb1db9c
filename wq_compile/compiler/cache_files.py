"""Where the module cache lives (and the atomic write its files go through, :mod:`.verified_file`): the one small
module both cache readers (the full module cache and the warm path without TVM) share, so neither imports the
other."""

from __future__ import annotations

import os
from pathlib import Path

from .device import versions
from .verified_file import atomic_write  # noqa: F401 - the one atomic write, for the cache readers


CACHE_ENV = "WQ_CACHE_DIR"

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $WQ_CACHE_DIR or ~/.cache/wq_compile>/<tvm>-<tvm-ffi>``."""
    base = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wq_compile"
    v = versions()
    return Path(base) / f"{v['apache-tvm']}-{v['apache-tvm-ffi']}"
