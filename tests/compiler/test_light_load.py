"""A warm module cache loads in a fresh process without importing TVM (wq_compile.compiler.light_load); everything that is
not warm (no host facts, a cold kernel, a stale key, other versions) still takes the TVM path and is never used
stale. Each check runs in a fresh process over one warm cache of the small shapes (4 q heads, 2 KV heads, d 64)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wq_compile.compiler.light_load import FACTS_FILE
from wq_testing import SMALL_MODULES, run_python, small_decode

#: Fresh process: the backend of the small shapes, one decode over 8/4/2-bit windows and a dense residual,
#: compared with the torch reference; prints what the process did as JSON (last line).
DECODE = f"""
    import json, sys, warnings
    warnings.simplefilter("ignore")
{small_decode(4)}
    out = dict(tvm="tvm" in sys.modules, compiled=b.compiled, cached=b.cached, err=err, name=b.name,
               quantize_calls=b.quantize.calls)
"""


def _run(cache: Path, body: str, tail: str = "") -> dict:
    env = {**os.environ, "WQ_CACHE_DIR": str(cache)}
    proc = run_python(body + tail + "\n    print(json.dumps(out))\n", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _facts(cache: Path) -> Path:
    (path,) = cache.glob(f"*/{FACTS_FILE}")
    return path


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> Path:
    """A module cache holding the small shapes' six modules and the host facts (one cold process)."""
    cache = tmp_path_factory.mktemp("light") / "cache"
    out = _run(cache, DECODE)
    assert out["compiled"] == SMALL_MODULES and out["tvm"] and out["err"] < 1e-4, out
    assert json.loads(_facts(cache).read_text())  # recorded by the process that resolved the host with TVM
    return cache


def _modules(cache: Path, kind: str) -> list[Path]:
    return sorted(cache.glob(f"*/cpu-*/{kind}_*.json"))


def test_warm_backend_loads_without_tvm_and_decodes_as_the_reference(warm):
    out = _run(warm, DECODE)
    assert out == {**out, "tvm": False, "compiled": 0, "cached": SMALL_MODULES}, out
    assert out["name"].startswith("tvm:cpu-") and out["quantize_calls"] > 0 and out["err"] < 1e-4


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_host_facts_take_the_tvm_path_and_are_rewritten(warm, damage):
    """Incomplete entries are refused the same way (tests/compiler/test_device.py, Device.from_facts)."""
    facts = _facts(warm)
    good = json.loads(facts.read_text())
    if damage == "missing":
        facts.unlink()
    else:
        facts.write_text('{"' + next(iter(good)) + '": {"tag": "cpu-x')  # a torn write
    out = _run(warm, DECODE)
    assert out == {**out, "tvm": True, "compiled": 0, "cached": SMALL_MODULES}, out
    assert out["err"] < 1e-4
    assert json.loads(facts.read_text()) == good  # rewritten as it was: the next process is light again


def test_cold_kernel_after_a_light_load_is_built_and_loaded_in_process(warm, tmp_path):
    """After the warm kernels are loaded through the runtime library alone, a kernel missing from the cache makes
    this process import TVM and build it. apache-tvm 0.27 loads the same libtvm_runtime.so (one mapping), and both
    the light-loaded and the newly built modules compute the same results."""
    out = _run(warm, DECODE, f"""
    from wq_compile.runtime.library import KernelLibrary, shared_library
    from wq_compile.core.spec import KernelSpec
    light = shared_library("llvm")
    assert "tvm" not in sys.modules and light.stats.cache_hits == {SMALL_MODULES}
    spec = b.quantize.spec(next(iter(layer.buckets.values())).spec)      # a kernel the warm library loaded
    cold = KernelLibrary(light.device, logs_dir=light.logs_dir, cache_dir={str(tmp_path / "cold")!r})
    built = cold.load(spec)                                              # not in that cache: built here
    kv = torch.randn(1, 2, 56, 64, generator=gen), torch.randn(1, 2, 56, 64, generator=gen)
    same = all(torch.equal(x, y) for x, y in zip(built.run(*kv), light.load(spec).run(*kv)))
    err2 = float((b.decode(q, layer, 0.125, None) - decode_attention(q, layer, 0.125)).abs().max())
    maps = {{line.split()[-1] for line in open("/proc/self/maps") if "libtvm_runtime.so" in line}}
    out.update(cold_compiled=cold.stats.compiled, same=same, err2=err2, runtime_files=len(maps),
               tvm_after=("tvm" in sys.modules))
    """)
    assert out == {**out, "tvm": False, "tvm_after": True, "cold_compiled": 1, "same": True, "runtime_files": 1}, out
    assert out["err2"] < 1e-4 and out["compiled"] == 0 and out["cached"] == SMALL_MODULES


def test_stale_or_foreign_modules_are_rebuilt_or_refused_on_the_light_path(warm):
    """The light path checks keys exactly as before: a stale key rebuilds (in-process, through TVM), a module
    of other versions is never loaded: rebuilt, with a warning naming its key file."""
    (key,) = _modules(warm, "fused")
    good = json.loads(key.read_text())
    key.write_text(json.dumps({**good, "kernel_source": "an-older-factory"}))
    out = _run(warm, DECODE)
    assert out == {**out, "compiled": 1, "cached": SMALL_MODULES - 1, "tvm": True}, out
    assert out["err"] < 1e-4 and json.loads(key.read_text())["kernel_source"] == good["kernel_source"]

    good = json.loads(key.read_text())  # the rebuilt module's key
    key.write_text(json.dumps({**good, "apache-tvm": "0.1"}))
    proc = run_python(DECODE.replace('warnings.simplefilter("ignore")', 'warnings.simplefilter("default")'),
                      env={**os.environ, "WQ_CACHE_DIR": str(warm)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BadFileWarning" in proc.stderr and f"{key}: its module" in proc.stderr
    assert "built with apache-tvm 0.1" in proc.stderr
    assert json.loads(key.read_text())["apache-tvm"] == good["apache-tvm"]


def test_warm_load_skips_ml_dtypes_and_tvm_imported_later_still_has_it(warm):
    """The light path imports tvm_ffi without ml_dtypes (wq_compile.compiler.ffi_import: ~0.6 s of a warm load);
    importing TVM afterwards in the same process imports the real ml_dtypes, registers its dtypes with tvm_ffi,
    and numpy bfloat16 / float8 arrays convert both ways; a cold kernel still builds and agrees."""
    out = _run(warm, DECODE, """
    ml_after_load = "ml_dtypes" in sys.modules
    import numpy as np
    import tvm, tvm_ffi
    import ml_dtypes
    x = np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16)
    t = tvm.runtime.tensor(x)
    f8 = tvm.runtime.tensor(np.ones(4, dtype=ml_dtypes.float8_e4m3fn))
    back = t.numpy()
    err2 = float((b.decode(q, layer, 0.125, None) - decode_attention(q, layer, 0.125)).abs().max())
    out.update(ml_after_load=ml_after_load, dtype=str(t.dtype), back=str(back.dtype),
               same=bool((back == x).all()), f8=str(f8.dtype),
               named=tvm_ffi.dtype._NUMPY_DTYPE_TO_STR.get(np.dtype(ml_dtypes.bfloat16)),
               ml_real=hasattr(sys.modules["ml_dtypes"], "bfloat16"), err2=err2)
    """)
    assert out == {**out, "tvm": False, "cached": SMALL_MODULES, "ml_after_load": False, "dtype": "bfloat16",
                   "back": "bfloat16", "same": True, "f8": "float8_e4m3fn", "named": "bfloat16",
                   "ml_real": True}, out
    assert out["err"] < 1e-4 and out["err2"] < 1e-4
