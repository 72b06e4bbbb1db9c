"""Helpers shared by the compiler-layer tests: a tiny spec, a real (measured) tuning log without a MetaSchedule run
(under this device's tag or another one), a toy kernel for the MetaSchedule driver tests of test_tune, a kernel built
with the llvm default schedule plus the quantized inputs and the closeness check of the kernel tests, and a fresh
Python process for what must not run in the test process (a crash, a SIGKILL, a torn file it still maps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from wq_compile.core import quant
from wq_compile.compiler import tuning_log
from wq_compile.compiler.build import KernelDef, kernel_def
from wq_compile.compiler.device import Device, host_device
from wq_compile.compiler.measure import example_args, time_function
from wq_compile.kernels.signature import KernelSignature
from wq_compile.core.spec import KernelSpec, QuantSpec

TINY_DECODE = KernelSpec("decode", (4,), head_dim=64, num_q_heads=4, num_kv_heads=2)
N_TOKENS = 128


def measured_log(spec: KernelSpec | KernelDef, device: Device, logs_dir: Path, seed: int = 1,
                 as_device: dict | None = None) -> Path:
    """A tuning log with one record: a design-space sample, measured here (its time is real).

    ``as_device`` (``{"tag": ..., "target": {...}}``) files it as another device's log (same record, another tag and
    target in meta.json), as a log committed from another machine would be.
    """
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    kdef = spec if isinstance(spec, KernelDef) else kernel_def(spec, device.kind, N_TOKENS)
    workload = kdef.workload()
    sch = s_tir.Schedule(workload, seed=seed)
    kdef.schedules.design_space(sch, kdef.spec)
    with device.target:
        lib = tvm.driver.build(sch.mod, target=device.target)
    args = example_args(kdef.signature, kdef.sizes)
    static_args = [a for a, d in zip(args, kdef.signature.args) if not d.is_scalar]
    f = lib.get_function("main")
    secs = time_function(lambda: f(*static_args), repeat=3)
    tag = as_device["tag"] if as_device else device.tag
    folder = tuning_log.log_dir(logs_dir, tag, kdef.spec.uri)
    meta = tuning_log.new_meta(device, kdef.spec.uri, {}, kdef.sizes, kdef.scalars, seed)
    if as_device:
        target = tvm.target.Target(as_device["target"])
        meta.update(device_tag=tag, target=str(target), isa=None, num_cores=as_device["target"].get("num-cores"))
    tuning_log.write_meta(folder, meta)
    db = ms.database.JSONDatabase(str(folder / tuning_log.WORKLOAD_FILE), str(folder / tuning_log.RECORD_FILE))
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(workload), run_secs=[secs], target=device.target,
        args_info=ArgInfo.from_prim_func(workload["main"]),
    ))
    return folder


def _toy_kernel(spec: KernelSpec):
    """scores[b, h, n] = sum_d q[b, h, d] * k[b, h // group, n, d] * sm_scale, n symbolic."""
    from tvm.script import tirx as T

    hq, hkv, d, g = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.group_size

    @T.prim_func(s_tir=True)
    def toy(q: T.Buffer((1, hq, d), "float32"), k_handle: T.handle, sm_scale: T.float32, o_handle: T.handle):
        n = T.int32()
        k = T.match_buffer(k_handle, (1, hkv, n, d), "float32")
        o = T.match_buffer(o_handle, (1, hq, n), "float32")
        for b, h, i, j in T.grid(1, hq, n, d):
            with T.sblock("s"):
                vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                with T.init():
                    o[vb, vh, vi] = T.float32(0)
                o[vb, vh, vi] = o[vb, vh, vi] + q[vb, vh, vj] * k[vb, vh // g, vi, vj] * sm_scale

    return toy.with_attr("global_symbol", spec.uri)


def _toy_llvm_default(sch, spec: KernelSpec) -> None:
    sch.parallel(sch.get_loops(sch.get_sblock("s"))[1])


def _toy_llvm_space(sch, spec: KernelSpec) -> None:
    """Token loop in fixed chunks of 64 (replays on symbolic n); tile and unroll sampled inside the chunk."""
    blk = sch.get_sblock("s")
    b, h, i, j = sch.get_loops(blk)
    io, ii = sch.split(i, [None, 64])
    i1, i2 = sch.split(ii, sch.sample_perfect_tile(ii, n=2, max_innermost_factor=16))
    sch.reorder(b, h, io, i1, i2, j)
    sch.parallel(h)
    sch.annotate(h, "meta_schedule.unroll_explicit", sch.sample_categorical([0, 16, 64], [1 / 3] * 3))


def toy_kernel(spec: KernelSpec | None = None) -> KernelDef:
    """A toy kernel with llvm schedules following the schedule-module protocol, for the MetaSchedule driver tests
    of test_tune only: those run several real tunes, and a toy candidate builds and runs in well under a second
    (a decode/fused candidate takes seconds each). Every build, runtime and CUDA test uses the real kernels."""
    from tvm.s_tir import meta_schedule as ms

    spec = spec or TOY_SPEC
    func = _toy_kernel(spec)
    schedules = SimpleNamespace(
        default_schedule=_toy_llvm_default,
        design_space=_toy_llvm_space,
        postprocs=lambda: [ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()],
        mutator_probs=lambda: {ms.mutator.MutateTileSize(): 0.5, ms.mutator.MutateUnroll(): 0.5},
    )
    sig = KernelSignature.from_prim_func(func, spec.uri)
    return KernelDef(spec, func, sig, schedules, {"n": N_TOKENS}, {"sm_scale": 0.125})


TOY_SPEC = KernelSpec("decode", (16,), head_dim=64, num_q_heads=4, num_kv_heads=2)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Kernels built with the llvm default schedule, their quantized inputs, and the closeness check
# ---------------------------------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def compiled_default(spec: KernelSpec, kind: str | None = None):
    """The kernel's ``main`` through the llvm default schedule, built once per (spec, factory kind) for the session
    (``kind`` picks a target's factory, e.g. ``"llvm"`` for the CPU fused kernel; None: the block-style one)."""
    import tvm

    from wq_compile.kernels import make_kernel
    from wq_compile.schedules import llvm as llvm_sched

    key = (spec, kind)
    if key not in _COMPILED:
        func = make_kernel(spec) if kind is None else make_kernel(spec, kind)
        sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: func}))
        llvm_sched.default_schedule(sch, spec)
        _COMPILED[key] = _compile_shared(sch.mod, spec.uri)
    return _COMPILED[key]


def _compile_shared(mod: Any, uri: str):
    """``tvm.compile(mod)[uri]`` for this host, the library shared through ``$WQ_CACHE_DIR/tests-llvm-default`` by
    the test processes of a run (CI runs the suite in one clone with one cache folder; several test files build the
    same spec): keyed by the sha256 of the scheduled module's TVMScript, the target and TVM's version, so any change
    to a kernel or its schedule is a new file, never a stale one. A file lock lets one process build while the others
    wait. Without ``WQ_CACHE_DIR``: built in-process, nothing written."""
    import fcntl
    import hashlib

    import tvm

    target = host_device().target
    folder = os.environ.get("WQ_CACHE_DIR")
    if not folder:
        return tvm.compile(mod, target=target)[uri]
    digest = hashlib.sha256("\n".join((mod.script(), str(target), tvm.__version__)).encode()).hexdigest()[:24]
    path = Path(folder) / "tests-llvm-default" / f"{uri}-{digest}.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_name(f".{path.stem}-{os.getpid()}.so")
            tvm.compile(mod, target=target).export_library(str(tmp))
            os.replace(tmp, path)
    return tvm.runtime.load_module(str(path))[uri]


def quantized_piece(bits: int, spec: KernelSpec, n: int, lens: list[int], gen: torch.Generator):
    """Random K/V of one piece (capacity ``n``, ``lens`` valid tokens per sample) quantized by the reference format:
    ``(kernel args, dense fp32 k, v the oracle attends over)``. Everything past ``lens`` is NaN in the kernel's
    arguments (dense k/v, or the value scales), so garbage past the length can never reach an output unnoticed."""
    b, hkv, d = len(lens), spec.num_kv_heads, spec.head_dim
    k = torch.randn(b, hkv, n, d, generator=gen) * 2 + 0.5
    v = torch.randn(b, hkv, n, d, generator=gen)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    if bits == 16:
        k, v = k.to(spec.torch_dtype), v.to(spec.torch_dtype)
        kp, vp = k.clone(), v.clone()
        for i, ln in enumerate(lens):
            kp[i, :, ln:] = float("nan")
            vp[i, :, ln:] = float("nan")
        return [kp, vp, lens_t], k.float(), v.float()
    qs = QuantSpec(bits, spec.k_group, spec.v_group)
    qk, qv = quant.quantize_keys(k, qs), quant.quantize_values(v, qs)
    v_scale = qv.scale.clone()
    for i, ln in enumerate(lens):
        v_scale[i, :, ln:] = float("nan")
    args = [qk.codes, qk.scale, qk.zero, qv.codes, v_scale, qv.zero, lens_t]
    return args, quant.dequantize_keys(qk, n), quant.dequantize_values(qv)


#: (capacities, lens) per width of the CPU fused kernel's tests: irregular lengths, partial key groups, empty
#: buckets, batch 2 with different lens.
CPU_SCENARIOS = [
    ({8: 64, 4: 320, 2: 256, 16: 64}, {8: [7, 13], 4: [300, 0], 2: [196, 256], 16: [5, 0]}),
    ({8: 64, 4: 64, 2: 128, 16: 64}, {8: [0, 0], 4: [64, 1], 2: [0, 100], 16: [0, 64]}),  # empty buckets
    ({8: 64, 4: 64, 2: 64, 16: 64}, {8: [0, 0], 4: [0, 0], 2: [0, 0], 16: [0, 0]}),  # nothing at all -> 0
    ({8: 64, 4: 64, 2: 64, 16: 192}, {8: [0, 28], 4: [0, 0], 2: [0, 56], 16: [180, 17]}),  # mostly dense
]


def fused_case(spec: KernelSpec, caps: dict[int, int], lens: dict[int, list[int]], gen: torch.Generator,
               sm_scale: float):
    """Arguments of a fused kernel over one piece per width of ``spec.bits`` (capacity ``caps[bits]``, ``lens[bits]``
    per sample) and the expected output: every piece by :func:`wq_compile.core.reference.attend_piece` over its
    dequantized k/v, merged. Returns ``(args without out, expected out)``."""
    args, want, _ = fused_case_with_lse(spec, caps, lens, gen, sm_scale)
    return args, want


def fused_case_with_lse(spec: KernelSpec, caps: dict[int, int], lens: dict[int, list[int]], gen: torch.Generator,
                        sm_scale: float):
    """:func:`fused_case` plus the expected log-sum-exp of the merged scores (what split kernels also return)."""
    from wq_compile.core import reference

    args, outs, lses = [], [], []
    b = len(next(iter(lens.values())))
    q = torch.randn(b, spec.num_q_heads, spec.head_dim, generator=gen).to(spec.torch_dtype)
    for bits in spec.bits:
        a, k, v = quantized_piece(bits, spec, caps[bits], lens[bits], gen)
        args += a
        o, lse = reference.attend_piece(q, k, v, a[-1], sm_scale)
        outs.append(o)
        lses.append(lse)
    want, want_lse = reference.merge_states(outs, lses)
    return [q, *args, sm_scale], want, want_lse


def int8_dots_case(spec: KernelSpec, caps: dict[int, int], lens: dict[int, list[int]], gen: torch.Generator,
                   sm_scale: float):
    """Like :func:`fused_case`, the expected output of quantized pieces from the int8 dot-product mode's emulation
    (:func:`wq_compile.core.reference.int8_dots_attend_piece`)."""
    from wq_compile.core import reference

    args, outs, lses = [], [], []
    b = len(next(iter(lens.values())))
    q = torch.randn(b, spec.num_q_heads, spec.head_dim, generator=gen) * 3
    for bits in spec.bits:
        a, k, v = quantized_piece(bits, spec, caps[bits], lens[bits], gen)
        args += a
        if bits < 16:
            qk = quant.QuantizedKeys(a[0], a[1], a[2], spec.quant(bits))
            qv = quant.QuantizedValues(a[3], a[4], a[5], spec.quant(bits))
            o, lse = reference.int8_dots_attend_piece(q, qk, qv, a[-1], sm_scale)
        else:
            o, lse = reference.attend_piece(q, k, v, a[-1], sm_scale)
        outs.append(o)
        lses.append(lse)
    want, _ = reference.merge_states(outs, lses)
    return [q, *args, sm_scale], want


def check_matches_bucket_layout(pack, reference) -> None:
    """A token-granular cache whose key groups all have one width, tokens in order, attends like one bucket of the
    layout (independent quantizer path): ``pack(k, v, widths per key group, dense k, dense v) -> cache`` and
    ``reference(q, cache, sm_scale) -> out`` of the baseline under test, at 2, 4 and 8 bits."""
    from wq_compile.core.layout import LayerCache
    from wq_compile.core.windows import WindowAssignment
    from wq_compile.core.reference import decode_attention

    gen = torch.Generator().manual_seed(3)
    for bits in (2, 4, 8):
        n, nd = 196, 20
        k, v = torch.randn(2, n + nd, 64, generator=gen), torch.randn(2, n + nd, 64, generator=gen)
        cache = pack(k[:, :n], v[:, :n], torch.full((n // 28,), bits), k[:, n:], v[:, n:])
        layer = LayerCache.empty(1, 2, 64, torch.float32, residual=nd + 1)
        layer.fill_sample(0, k, v, WindowAssignment(torch.tensor([0]), torch.tensor([n]), torch.tensor([bits])))
        q = torch.randn(1, 4, 64, generator=gen)
        assert torch.allclose(reference(q, cache, 0.125), decode_attention(q, layer, 0.125), atol=1e-5), bits


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """Every element finite and within ``atol + rtol * |want|`` (the message names the worst error)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.float() - want.float()).abs()
    bound = atol + rtol * want.float().abs()
    assert bool((err <= bound).all()), f"{name}: max err {err.max().item():.3g} (atol {atol}, rtol {rtol})"


# ---------------------------------------------------------------------------------------------------------------------
# A fresh Python process
# ---------------------------------------------------------------------------------------------------------------------
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


#: Fresh-process code (no indentation; :func:`small_decode` indents it): the backend of the small shapes (4 query
#: heads, 2 KV heads, d 64), one decode over 8/4/2-bit windows and a dense residual, compared with the torch
#: reference; leaves the backend ``b`` and the max error ``err``.
SMALL_DECODE = """\
import torch
from wq_compile import WindowQuantConfig
from wq_compile.runtime.backend import make_backend
from wq_compile.core.layout import LayerCache
from wq_compile.core.windows import Windows
from wq_compile.core.reference import decode_attention

b = make_backend(WindowQuantConfig(backend="tvm"), 4, 2, 64, torch.float32, "cpu")
gen = torch.Generator().manual_seed(0)
k, v = torch.randn(2, 3 * 196 + 20, 64, generator=gen), torch.randn(2, 3 * 196 + 20, 64, generator=gen)
layer = LayerCache.empty(1, 2, 64, torch.float32, residual=64, quantizer=b.quantize,
                         meta_bits=WindowQuantConfig().meta_bits)  # the default storage format
layer.fill_sample(0, k, v, Windows(torch.tensor([0, 196, 392]), torch.tensor([196, 196, 196]),
                                   torch.tensor([8, 4, 2])))
q = torch.randn(1, 4, 64, generator=gen)
err = float((b.decode(q, layer, 0.125, None) - decode_attention(q, layer, 0.125)).abs().max())
"""


def small_decode(indent: int) -> str:
    """:data:`SMALL_DECODE` indented by ``indent`` spaces, to be pasted into a :func:`run_python` body."""
    return textwrap.indent(SMALL_DECODE, " " * indent)


def run_python(body: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``body`` (dedented) in a fresh Python with tests/ importable (for wq_testing); output captured as text."""
    script = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=env)


#: Modules a cold :data:`SMALL_DECODE` builds: the fused and multi-token kernels (their 8-bit scale/zero form, the
#: default storage format), quantize x 3 and the int2 recode kernel.
SMALL_MODULES = 6


def warm_small_cache(tmp_path_factory) -> Path:
    """A module cache after one cold :data:`SMALL_DECODE` (no tuning logs): its six modules, the OpenMP launcher
    and the host facts. Built once per test run and shared by the xdist workers (their base temps share a parent;
    a file lock lets one build while the others wait), so a test that needs warm modules but is not about the cold
    build copies it (:func:`copy_warm_cache`) instead of building the six modules again. Read-only by contract."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "warm-small-cache"
    root.mkdir(exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built.json").exists():
            env = {**os.environ, "WQ_CACHE_DIR": str(root / "cache"), "WQ_TUNING_LOGS": str(root / "no-logs"),
                   "OMP_NUM_THREADS": "1"}
            proc = run_python(small_decode(0) + "import json; print(json.dumps(dict(compiled=b.compiled, err=err)))",
                              env=env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            assert out["compiled"] == SMALL_MODULES and out["err"] < 1e-4, out
            (root / "built.json").write_text(json.dumps(out))
    return root / "cache"


def copy_warm_cache(warm: Path, dest: Path) -> Path:
    """A private copy of :func:`warm_small_cache`'s cache at ``dest`` (a test may damage its copy)."""
    import shutil

    shutil.copytree(warm, dest, symlinks=True)
    return dest


def load_tiny_decode(logs: Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """In a fresh process: load TINY_DECODE through a KernelLibrary over ``logs`` and ``cache``, run it once and print
    ``compiled <n>`` (how many modules that process had to build)."""
    return run_python(f"""
        from wq_compile.runtime.library import KernelLibrary
        from wq_compile.compiler.measure import example_args
        from wq_testing import TINY_DECODE
        lib = KernelLibrary("llvm", logs_dir={str(logs)!r}, cache_dir={str(cache)!r})
        k = lib.load(TINY_DECODE)
        k(*example_args(k.signature, {{"B": 1, "N": 64, "G": 3}}))
        print("compiled", lib.stats.compiled)
    """, timeout)


# ---- several-token steps (the multi-token kernels) ---------------------------------------------------------
def step_layer(shape: tuple[int, int, int], dtype: torch.dtype, prompts: list[int], steps: int,
               gen: torch.Generator, bits: tuple[int, ...] = (8, 4, 2, 4), meta_bits: int = 16
               ) -> tuple[Any, torch.Tensor]:
    """A cache as a left-padded batch leaves it: per sample a prompt of its own length (windows of irregular
    lengths at ``bits``, default 8/4/2/4, group tails dense; sample 1 of a 2-sample batch keeps only 16-bit
    windows, so its buckets are empty; a prompt of 0 tokens is a padding sample: it holds the step alone), then
    ``steps`` new tokens appended; and the step's query ``[B, Hq, S, D]``."""
    from wq_compile.core.layout import LayerCache
    from wq_compile.core.spec import bucket_widths
    from wq_compile.core.windows import WindowAssignment

    hq, hkv, d = shape  # query heads, KV heads, head_dim
    layer = LayerCache.empty(len(prompts), hkv, d, dtype, residual=512, widths=bucket_widths(bits),  # int1 if filled
                             meta_bits=meta_bits)
    for b, t in enumerate(prompts):
        if t == 0:
            continue
        k, v = torch.randn(hkv, t, d, generator=gen) * 2 + 0.5, torch.randn(hkv, t, d, generator=gen)
        cuts = [0, 30, 43, 239, t - 30]  # windows of 30, 13, 196 and t - 269 tokens; the last 30 tokens text
        widths = list(bits) if b == 0 else [16, 16, 16, 16]
        w = WindowAssignment(torch.tensor(cuts[:4]), torch.tensor([cuts[i + 1] - cuts[i] for i in range(4)]),
                             torch.tensor(widths))
        layer.fill_sample(b, k.to(dtype), v.to(dtype), w)
    layer.append(torch.randn(len(prompts), hkv, steps, d, generator=gen).to(dtype),
                 torch.randn(len(prompts), hkv, steps, d, generator=gen).to(dtype))
    q = torch.randn(len(prompts), hq, steps, d, generator=gen).to(dtype)
    return layer, q


def poison_past_lens(layer: Any) -> None:
    """NaN past every sample's valid tokens (dense K/V, bucket value scales): a read past ``lens`` shows."""
    for b in range(layer.dense.lens.shape[0]):
        layer.dense.k[b, :, int(layer.dense.lens[b]):] = float("nan")
        layer.dense.v[b, :, int(layer.dense.lens[b]):] = float("nan")
        for bk in layer.buckets.values():
            bk.v_scale[b, :, int(bk.lens[b]):] = float("nan")
