"""CPU kernels' parallel loops on torch's OpenMP threads (wq_compile.compiler.cpu_threads)."""

from __future__ import annotations

import ctypes
import json
import os

import pytest
import torch

from wq_testing import run_python


def test_fused_kernel_runs_on_torch_threads_with_the_same_results(tmp_path):
    """In a fresh process: the decoder's kernel is attached (its launch slot holds the OpenMP launcher), its output
    matches the reference with 1, 2 and 3 OpenMP threads (an odd team splits the work items unevenly), and
    ``WQ_CPU_THREADS=tvm`` keeps TVM's pool with the same output."""
    body = """
        import ctypes, json, os, sys, warnings
        import torch
        warnings.simplefilter("ignore")
        from wq_compile.compiler import cpu_threads
        from wq_compile.tools.bench.decode import MIXES, make_layer
        from wq_compile.runtime.decoder import FusedDecoder
        from wq_compile.compiler.cache_files import cache_root
        from wq_compile.core.reference import decode_attention
        from wq_compile.runtime.library import KernelLibrary

        lib = KernelLibrary("llvm")
        layer = make_layer(700, MIXES["mixed"], 2, 64, torch.float32, residual=30)
        q = torch.randn(1, 14, 64, generator=torch.Generator().manual_seed(0))
        dec = FusedDecoder(lib, 14, 2, 64, torch.float32)
        kernel = dec.kernel(tuple(sorted(layer.buckets, reverse=True)))
        slot = ctypes.c_void_p.in_dll(ctypes.CDLL(str(kernel.path), mode=os.RTLD_NOLOAD | os.RTLD_NOW),
                                      "__TVMBackendParallelLaunch").value
        want = decode_attention(q, layer, 0.125)
        errs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            errs[n] = float((dec(q, layer, 0.125) - want).abs().max())
        print(json.dumps(dict(threads=kernel.threads, errs=errs, slot=slot,
                              launcher=cpu_threads.launcher(str(cache_root())).address)))
    """
    env = {**os.environ, "WQ_CACHE_DIR": str(tmp_path)}
    env.pop("WQ_CPU_THREADS", None)
    got = []
    for mode in ("omp", "tvm"):
        if mode == "tvm":
            env["WQ_CPU_THREADS"] = "tvm"
        proc = run_python(body, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    omp, tvm = got
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch runs without OpenMP here")
    assert omp["threads"] == "torch OpenMP" and omp["slot"] == omp["launcher"] is not None
    assert tvm["threads"].startswith("TVM pool") and tvm["slot"] != omp["launcher"]
    for n in ("1", "2", "3"):
        assert omp["errs"][n] < 1e-4 and tvm["errs"][n] < 1e-4, got


def test_launcher_is_built_once_and_atomically(tmp_path):
    from wq_compile.compiler import cpu_threads
    from wq_compile.compiler.verified_file import DIGEST_SUFFIX, verify_with_digest

    lib = cpu_threads._build(tmp_path)
    assert lib.exists() and ctypes.CDLL(str(lib)).wq_launch
    mtime = lib.stat().st_mtime_ns
    assert cpu_threads._build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # no temporary left behind; the size+sha256 checked before every load lies beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [lib.name, lib.name + DIGEST_SUFFIX]
    assert verify_with_digest(lib) is None
