"""Where the module cache lives and how its files are written: the one small module both cache readers (the full
module cache and the warm path without TVM) share, so neither imports the other."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .device import versions


CACHE_ENV = "WQ_CACHE_DIR"

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $WQ_CACHE_DIR or ~/.cache/wq_compile>/<tvm>-<tvm-ffi>``."""
    base = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wq_compile"
    v = versions()
    return Path(base) / f"{v['apache-tvm']}-{v['apache-tvm-ffi']}"

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

def atomic_write(path: Path, writer: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: a shared cache must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
