"""Run the parallel loops of compiled CPU kernels on torch's OpenMP threads instead of TVM's own thread pool.

Why: a WindowQuant kernel runs between torch ops (the layer's projections before it, the output projection after).
With two thread pools on the same cores, every kernel call pays for the other pool: TVM's worker sleeps between
calls (spinning would starve torch, see :func:`share_cores_with_torch`) and takes 15-25 us to
wake, and when it wakes, torch's OpenMP worker is still spinning on its core after the previous op, so the two
share one core until the scheduler preempts one of them. Measured here (0.5B shapes, 2K int4 tokens, 2 cores): the
fused decode call 109 -> 77 us, and a model-like matvec + attention sequence 257 -> 199 us, with the same results.

How: TVM's generated CPU code calls its parallel runtime through a function-pointer variable of the module
(``__TVMBackendParallelLaunch``, filled in when the module is loaded). :func:`attach` points it at a 20-line C
launcher (compiled once per machine into the module cache) that runs the tasks with ``GOMP_parallel`` of the
OpenMP runtime torch itself loaded, with torch's thread count. Kernels whose code needs TVM's barrier (none of
WindowQuant's do) keep TVM's pool. ``WQ_CPU_THREADS=tvm`` keeps TVM's pool for every kernel (for comparisons).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from .verified_file import NO_DIGEST, verify_with_digest, warn_bad, write_with_digest

THREADS_ENV = "WQ_CPU_THREADS"

#: The launcher: ``TVMBackendParallelLaunch``'s signature, tasks on the OpenMP team (``task_id`` = thread number,
#: ``num_task`` = team size, which is what the generated code partitions its loop by).
_LAUNCHER_C = r"""
#include <stddef.h>
typedef struct { void* sync_handle; int num_task; } Env;
typedef int (*Lambda)(int, Env*, void*);
typedef void (*GompParallel)(void (*)(void*), void*, unsigned, unsigned);
typedef int (*OmpInt)(void);
static GompParallel gomp_parallel;
static OmpInt thread_num, num_threads, max_threads;
typedef struct { Lambda f; void* cdata; volatile int err; } Job;
static void body(void* p) {
  Job* j = (Job*)p;
  Env env = {NULL, num_threads()};
  int r = j->f(thread_num(), &env, j->cdata);
  if (r) j->err = r;
}
int wq_launch(Lambda f, void* cdata, int num_task) {
  Job j = {f, cdata, 0};
  unsigned n = num_task > 0 ? (unsigned)num_task : (unsigned)max_threads();
  if (n <= 1) { Env env = {NULL, 1}; return f(0, &env, cdata); }
  gomp_parallel(body, &j, n, 0);
  return j.err;
}
void wq_init(void* gp, void* tn, void* nt, void* mt) {
  gomp_parallel = (GompParallel)gp; thread_num = (OmpInt)tn; num_threads = (OmpInt)nt; max_threads = (OmpInt)mt;
}
"""


class Launcher:
    """The launcher's address, or why there is none (``address`` None)."""

    def __init__(self, address: int | None, why: str) -> None:
        self.address = address
        self.why = why


def _torch_openmp_library() -> str | None:
    """Path of the OpenMP runtime torch loaded (libgomp, or Intel's libiomp5, which exports the GOMP ABI)."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp5")) and ".so" in name:
                    return path
    except OSError:
        return None
    return None


def _build(folder: Path) -> Path:
    """The launcher's shared library under ``folder`` (compiled once; named by the source's digest)."""
    digest = hashlib.sha256(_LAUNCHER_C.encode()).hexdigest()[:16]
    lib = folder / f"wq_omp_launch-{digest}.so"
    why = verify_with_digest(lib)  # a short .so would SIGBUS this process on dlopen or first call
    if why is None:
        return lib
    if why != "missing" and not why.startswith(NO_DIGEST):  # no digest file: an older cache or a cut build
        warn_bad(lib, why, "rebuilding the OpenMP launcher", stacklevel=4)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) to build the OpenMP launcher")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "launch.c", Path(tmp) / lib.name
        src.write_text(_LAUNCHER_C)
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build the OpenMP launcher: {proc.stderr[-500:]}")
        write_with_digest(lib, out.read_bytes())  # atomic, then its size+sha256 beside it
    return lib


@functools.lru_cache(maxsize=None)
def launcher(cache_root: str) -> Launcher:
    """The process's launcher (built under ``cache_root`` on first use), initialized with torch's OpenMP runtime."""
    if os.environ.get(THREADS_ENV, "").lower() == "tvm":
        return Launcher(None, f"{THREADS_ENV}=tvm")
    omp = _torch_openmp_library()
    if omp is None:
        return Launcher(None, "torch runs without an OpenMP runtime this process could find")
    try:
        lib = ctypes.CDLL(str(_build(Path(cache_root))))
        gomp = ctypes.CDLL(omp, mode=os.RTLD_NOLOAD | os.RTLD_NOW)  # the instance torch uses, not a second one
        fns = [ctypes.cast(getattr(gomp, n), ctypes.c_void_p) for n in
               ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "omp_get_max_threads")]
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"WindowQuant: CPU kernels keep TVM's thread pool ({exc}); each call then wakes a TVM worker "
                      "and competes with torch's threads", RuntimeWarning, stacklevel=3)
        return Launcher(None, str(exc))
    lib.wq_init(*fns)
    return Launcher(ctypes.cast(lib.wq_launch, ctypes.c_void_p).value, f"torch's OpenMP threads ({omp})")


def load_attached(module: object, folder: str | os.PathLike, cache_root: str | os.PathLike) -> tuple[object, str]:
    """A just-built CPU module as the runtime runs it: exported to ``folder``, loaded, attached (:func:`attach`).
    What a knob sweep times, so its ranking holds for the threads the kernels will run on."""
    import tvm

    path = Path(folder) / f"m{len(list(Path(folder).glob('m*.so')))}.so"
    module.export_library(str(path))  # type: ignore[attr-defined]
    loaded = tvm.runtime.load_module(str(path))
    return loaded, attach(path, cache_root)


def attach(module_path: str | os.PathLike, cache_root: str | os.PathLike) -> str:
    """Point the loaded CPU module at ``module_path`` to the OpenMP launcher; returns which threads it runs on
    ("torch OpenMP" or "TVM pool (<why>)"). The module must already be loaded by this process (TVM dlopen'ed it;
    this opens the same handle without loading anything)."""
    found = launcher(str(cache_root))
    if found.address is None:
        return f"TVM pool ({found.why})"
    try:
        handle = ctypes.CDLL(str(module_path), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError as exc:
        return f"TVM pool (module not open here: {exc})"
    try:
        ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelBarrier")
        return "TVM pool (its code uses TVM's barrier)"
    except ValueError:
        pass  # no barrier: the tasks are independent, any launcher runs them
    try:
        slot = ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch")
    except ValueError:
        return "single-threaded (no parallel loop)"
    slot.value = found.address
    return "torch OpenMP"


def share_cores_with_torch(threads: int | None = None) -> None:
    """Size TVM's CPU thread pool to ``threads`` (default: the physical cores) and make it yield between launches,
    unless the user set these. Takes effect when the pool starts, at the first parallel launch.

    * ``TVM_NUM_THREADS``: without it TVM halves ``hardware_concurrency()`` on x86 (it assumes hyper-threading),
      so on a VM whose vCPUs are real cores (2 vCPUs, 1 thread per core) every kernel ran on one core: measured
      here, the fused int4 decode at 8K tokens took 0.39 ms instead of 0.20.
    * ``TVM_BIND_THREADS`` / ``TVM_THREAD_POOL_SPIN_COUNT``: by default its workers are pinned and spin for
      300000 yields after every kernel, which starves torch's own threads running the rest of the model (and any
      baseline timed next to it) on the same cores. Even 300 yields, unpinned, made the tiny model's decode 3.5x
      slower end to end here (25 -> 88 ms per token: torch's threads run the layer between two attention calls
      while a TVM worker spins beside them), so workers sleep at once and every launch pays a futex wake-up
      (~20 us per call measured here, visible at 2K tokens in ``wq-bench``)."""
    from .device import physical_cores

    os.environ.setdefault("TVM_NUM_THREADS", str(threads or physical_cores()))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
