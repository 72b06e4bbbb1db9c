"""nvcc for CUDA modules, with ptxas' resource report kept: registers, spills, stack and shared memory per kernel.

TVM's own nvcc call (``tvm.support.nvcc.compile_cuda(..., compiler="nvcc")``) passes ``-Xptxas -v`` and throws the
report away; a kernel that spills registers builds silently. This runs the same command (the flags of
``tvm.support.nvcc._compile_cuda_nvcc`` in the pinned TVM 0.27: ``-O3``, fast math, ptxas
``--register-usage-level=10``) and parses the report, so the build (``wq-tune --build-only`` included) can say
which kernel spills (:class:`RegisterSpillWarning`) and tests can hold kernels to no spills with the flags that ship.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

#: TVM 0.27's nvcc flags besides the arch, output and format (``_compile_cuda_nvcc``; ``TVM_CUDA_PTXAS_REG_LEVEL``
#: and ``TVM_CUDA_NVCC_NO_FAST_MATH`` honoured as there).
_DEFINES = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
            "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda"]


class RegisterSpillWarning(UserWarning):
    """A CUDA kernel spills registers to local memory (ptxas' report at build time)."""


@dataclass(frozen=True)
class PtxasUsage:
    """ptxas' resource usage of one kernel function for one arch."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int  # static shared memory (dynamic shared memory is sized at launch)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


class NvccOutput(NamedTuple):
    """What one nvcc run gave: the binary, ptxas' report per kernel function, and the flags it ran with."""

    binary: bytes
    usage: list[PtxasUsage]
    flags: list[str]


def nvcc_flags(arch: str, register_level: int | None = None) -> list[str]:
    """The nvcc flags TVM's nvcc build uses for ``arch`` (``sm_90a``), with ptxas' verbose report.

    ``register_level``: ptxas ``--register-usage-level`` (0-10) for a kernel that measured to need its own
    (:func:`wq_compile.kernels.signatures.ptxas_register_level`: 10, TVM's, makes ptxas take every register the
    launch bounds give and still spill the multi-token split kernel); None: TVM's (``TVM_CUDA_PTXAS_REG_LEVEL``,
    default 10)."""
    fast = [] if os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH") else ["--use_fast_math"]
    if register_level is not None and not (isinstance(register_level, int) and 0 <= register_level <= 10):
        raise ValueError(f"register_level: ptxas takes a register usage level 0-10, got {register_level!r}")
    level = os.environ.get("TVM_CUDA_PTXAS_REG_LEVEL", "10") if register_level is None else str(register_level)
    return ["-O3", "-arch", arch, *_DEFINES, *fast,
            f"--ptxas-options=-v,--register-usage-level={level},--warn-on-local-memory-usage"]


def compile_cuda(source: str, arch: str, target_format: str = "fatbin",
                 register_level: int | None = None) -> NvccOutput:
    """nvcc ``source`` for ``arch`` (no GPU needed) with :func:`nvcc_flags`: the binary, ptxas' report per kernel
    function and the flags."""
    if target_format not in ("fatbin", "cubin", "ptx"):
        raise ValueError(f"target_format: expected fatbin, cubin or ptx, got {target_format!r}")
    if not arch:
        raise ValueError("arch: a CUDA arch such as 'sm_90a' is needed to run nvcc")
    exe = shutil.which("nvcc")
    if exe is None:
        raise RuntimeError("nvcc not found on PATH: CUDA modules are compiled with it (install the CUDA toolkit)")
    with tempfile.TemporaryDirectory(prefix="wq-nvcc-") as tmp:
        cu, out = Path(tmp) / "tvm_kernels.cu", Path(tmp) / f"tvm_kernels.{target_format}"
        cu.write_text(source)
        flags = nvcc_flags(arch, register_level)
        r = subprocess.run([exe, f"--{target_format}", *flags, "-o", str(out), str(cu)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{r.stdout}{r.stderr}")
        binary = out.read_bytes()
    if not binary:
        raise RuntimeError(f"nvcc for {arch}: empty output")
    return NvccOutput(binary, parse_ptxas(r.stdout + r.stderr), flags)


def parse_ptxas(log: str) -> list[PtxasUsage]:
    """The kernel functions of a ``ptxas -v`` report (``Compiling entry function``, ``bytes stack frame``,
    ``Used N registers``) in order."""
    out, name, frame = [], None, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name, frame = m.group(1), None
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = tuple(int(x) for x in m.groups())
        elif (m := re.search(r"Used (\d+) registers", line)) and name is not None:
            if frame is None:
                raise ValueError(f"ptxas report: no stack frame line for {name}:\n{log}")
            smem = re.search(r"(\d+) bytes smem", line)
            out.append(PtxasUsage(name, int(m.group(1)), frame[1], frame[2], frame[0],
                                  int(smem.group(1)) if smem else 0))
            name = frame = None
    return out


def spill_message(kernel: str, arch: str, usage: list[PtxasUsage]) -> str | None:
    """What to tell a user about ``kernel``'s spills on ``arch`` (None: no function spills)."""
    bad = [u for u in usage if u.spills]
    if not bad:
        return None
    parts = ", ".join(f"{u.name}: {u.registers} registers, {u.spill_stores} B spill stores / {u.spill_loads} B "
                      f"loads, {u.stack} B stack" for u in bad)
    return (f"{kernel}: ptxas for {arch} spills registers to local memory ({parts}); it runs correctly but slower. "
            f"A split kernel's non-default ('stages', n) is the usual cause (the default never spills at the "
            f"shipped shapes: docs/offline_tuning.md)")
