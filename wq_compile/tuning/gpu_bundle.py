"""What to carry to a GPU machine without TVM: the runtime-only tvm package, tvm-ffi for the machine's Python and
the export folders, with a size report against what one device call may carry (``python -m wq_compile.tuning.gpu_visit
--bundle DIR``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: What one device call may carry (tree + carried paths), from the device README.
CARRY_LIMIT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BundleReport:
    """Sizes (bytes) of an assembled bundle's parts and whether it fits one device call."""

    root: Path
    parts: dict[str, int]
    total: int
    limit: int
    ffi_python_tag: str

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


#: Parts of the tvm package the runtime does not need: the compiler library, C++ sources and headers, caches.
_TVM_SKIP = ("libtvm_compiler.so", "3rdparty", "src", "include", "__pycache__", "*.pyc")


def assemble_bundle(out: str | os.PathLike, exports: Sequence[Path] = (), *, ffi_wheel: Path | None = None,
                    limit: int = CARRY_LIMIT_BYTES) -> BundleReport:
    """Copy the runtime-only tvm package (no ``libtvm_compiler.so``), tvm-ffi (from ``ffi_wheel``, e.g. the cp312
    wheel the GPU machine's Python needs, else this environment's package) and the export folders into
    ``out/site`` and ``out/exports/<i>``; report the sizes against ``limit`` (the tree that travels adds to it)."""
    import tvm as _tvm_probe  # noqa: F401 - only to locate the installed package

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    site = out / "site"
    tvm_src = Path(importlib.util.find_spec("tvm").origin).parent  # type: ignore[union-attr, arg-type]
    shutil.copytree(tvm_src, site / "tvm", ignore=shutil.ignore_patterns(*_TVM_SKIP))
    if ffi_wheel is not None:
        with zipfile.ZipFile(ffi_wheel) as z:
            z.extractall(site)
        tag = Path(ffi_wheel).name.split("-")[2]
    else:
        ffi_src = Path(importlib.util.find_spec("tvm_ffi").origin).parent  # type: ignore[union-attr, arg-type]
        shutil.copytree(ffi_src, site / "tvm_ffi", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for i, export in enumerate(exports):
        shutil.copytree(export, out / "exports" / str(i))
    parts = {"tvm (runtime only)": _tree_size(site / "tvm"),
             "tvm_ffi": sum(_tree_size(p) for p in site.iterdir() if p.name.startswith(("tvm_ffi", "apache_tvm"))),
             "exports": _tree_size(out / "exports") if exports else 0}
    return BundleReport(out, parts, sum(parts.values()), limit, tag)
