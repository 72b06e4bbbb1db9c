"""CUDA kernels checked without a GPU: codegen, nvcc/ptxas resource usage for sm_90a (H100/H200) and sm_80 (A100),
warp-shuffle reductions, vectorized code loads, the merge in one launch, and the launch configuration of the
split-KV decode at 8K tokens on an H200.

ptxas' report (``-Xptxas -v``, nvcc run with the build's flags by :mod:`wq_compile.compiler.nvcc`) is read back:
no stack frame and no register spills at the default stage count, int1 bucket included (the running state lives in
registers), shared memory within the per-block limit, and registers and shared memory small enough for at least
2 resident blocks per SM (65536 registers per SM). The computation of the PrimFunc these schedules transform is
checked on llvm against the torch reference in tests/kernels/test_split_decode.py (``test_cuda_specs_on_llvm``).
No test here runs a kernel: that needs a GPU (see the issue's GPU visit).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tvm

from wq_compile.kernels import make_kernel
from wq_compile.kernels import gpu_limits as gl
from wq_compile.kernels.signatures import split_stages, with_split_stages
from wq_compile.kernels.split_decode import MAX_SPLITS, choose_splits, merge_spec, split_spec
from wq_compile.schedules import cuda as sched
from wq_compile.core.spec import KernelSpec

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed: CUDA source generated, ptxas not run")

SHAPES = {"0.5b": dict(head_dim=64, num_q_heads=14, num_kv_heads=2), "7b": dict(head_dim=128, num_q_heads=28, num_kv_heads=4)}
#: Split chunk: 32 tokens, so that batch 1 at 8K tokens of the 0.5B shape (2 KV heads) has 264 blocks for 132 SMs.
CHUNK = 32
#: Per-block shared-memory limits (opt-in maximum), shared memory and registers per SM.
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
SMEM_PER_SM = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024}
REGS_PER_SM = 65536
H200_SMS = 132
#: One per inlined exp in the generated CUDA: fast_exp's ``2^n`` (``(n + 127) << 23``); the source repeats the rest.
EXP_MARK = "127) << 23"


def split_kernel(shape: str, dtype: str, bits=(8, 4, 2, 16)) -> KernelSpec:
    return split_spec(KernelSpec("fused", bits, chunk=CHUNK, dtype=dtype, **SHAPES[shape]))


#: Every CUDA kernel of the decode loop. The 7B bf16 split kernel carries the int1 bucket (widths 8/4/2/1, which a
#: decoder may have to build): its default is one staging buffer, where two spill 124 B on sm_90a and 120 B on
#: sm_80 with the build's nvcc flags (issue 21); the 7B f16 kernel is the presets' 8/4/2 at two buffers.
KERNELS = {
    **{f"split-{s}-{dt}": split_kernel(s, dt) for s in SHAPES for dt in ("f16", "bf16") if (s, dt) != ("7b", "bf16")},
    "split-7b-bf16-int1": split_kernel("7b", "bf16", bits=(8, 4, 2, 1, 16)),
    **{f"merge-{s}-{dt}": merge_spec(split_kernel(s, dt)) for s in SHAPES for dt in ("f16", "bf16")},
    **{f"quantize{b}-7b-bf16": KernelSpec("quantize", (b,), dtype="bf16", **SHAPES["7b"]) for b in (2, 4, 8)},
    "quantize4-0.5b-f16": KernelSpec("quantize", (4,), dtype="f16", **SHAPES["0.5b"]),
    "dense-decode-7b-f16": KernelSpec("decode", (16,), dtype="f16", **SHAPES["7b"]),
    "dense-split-0.5b-bf16": split_spec(KernelSpec("decode", (16,), chunk=CHUNK, dtype="bf16", **SHAPES["0.5b"])),
}

_SRC: dict[KernelSpec, tuple[str, int]] = {}


def _generate(spec: KernelSpec) -> tuple[str, int]:
    """(CUDA C, dynamic shared memory bytes per block) of ``spec`` under the default (hand) schedule, lowered as the
    compiler builds CUDA (``pass_config``: staging copies in ``async_scope`` become ``cp.async``). The dynamic size
    is the merged ``shared.dyn`` allocation of the lowered device function (ptxas counts only static arrays); the
    steps are ``tvm.tirx.build``'s, split so that the lowered module can be read before code generation."""
    import importlib

    from wq_compile.compiler.build import pass_config

    tb = importlib.import_module("tvm.tirx.build")
    sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec, "cuda")}))
    sched.default_schedule(sch, spec)
    target = tvm.target.Target(sched.target()).with_host("llvm")
    with tvm.transform.PassContext(config=pass_config("cuda")):
        mod = tvm.tirx.transform.BindTarget(target)(sch.mod)
        pipeline, host_passes, device_passes = tvm.tirx.get_default_tir_pipeline(target)
        host, devices = tb.split_host_device_mods(pipeline(mod))
        text = "\n".join(m.script() for m in devices.values())
        dyn = [int(n) for n in re.findall(r'buf_dyn_shmem = T\.alloc_buffer\(\((\d+),\), "uint8", scope="shared\.dyn"', text)]
        assert len(dyn) <= 1, dyn
        lib = tb.tir_to_runtime(host_passes()(host), {t: device_passes()(m) for t, m in devices.items()}, target.host)
    return lib.imports[0].inspect_source(), (dyn[0] if dyn else 0)


def cuda_source(spec: KernelSpec) -> str:
    """CUDA C of ``spec`` under the default (hand) schedule, generated once per session."""
    if spec not in _SRC:
        _SRC[spec] = _generate(spec)
    return _SRC[spec][0]


def dynamic_smem(spec: KernelSpec) -> int:
    """Dynamic shared memory bytes per block of ``spec``'s kernel (0: static arrays only)."""
    cuda_source(spec)
    return _SRC[spec][1]


@dataclass(frozen=True)
class Resources:
    """ptxas' resource usage of one kernel function."""

    name: str
    registers: int
    smem: int
    stack: int
    spill_stores: int
    spill_loads: int
    threads: int

    def blocks_per_sm(self, arch: str, dyn: int = 0) -> int:
        by_regs = REGS_PER_SM // max(1, self.registers * self.threads)
        smem = self.smem + dyn
        by_smem = (SMEM_PER_SM[arch] // (smem + 1024)) if smem else 32  # CUDA reserves 1 KB per resident block
        return min(by_regs, by_smem, 32)


def ptxas_report(src: str, arch: str) -> list[Resources]:
    """Compile with nvcc as the build does (:func:`wq_compile.compiler.nvcc.compile_cuda`: TVM's flags, ``-O3``,
    fast math, ``--register-usage-level=10``) to a cubin for ``arch`` and read ptxas' report per kernel function
    with the build's own parser (the one that warns of spills at build time)."""
    from wq_compile.compiler.nvcc import compile_cuda

    usage = compile_cuda(src, arch, "cubin").usage
    threads = {m.group(2): int(m.group(1)) for m in re.finditer(r"__launch_bounds__\((\d+)(?:,\s*\d+)?\)\s+(\w+)\(", src)}
    for u in usage:
        assert u.name in threads, f"{u.name}: no __launch_bounds__ in the generated source"
    assert usage, f"no ptxas resource report for {arch}"
    return [Resources(u.name, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads, threads[u.name])
            for u in usage]


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("key", list(KERNELS))
def test_ptxas_resources(key: str, arch: str) -> None:
    spec = KERNELS[key]
    src, dyn = cuda_source(spec), dynamic_smem(spec)
    reports = ptxas_report(src, arch)
    # two staging buffers (the 7B's default) of 94 KB of dynamic shared memory leave 1 block per SM of an A100 (164 KB)
    want = 1 if arch == "sm_80" and dyn > SMEM_PER_SM[arch] // 2 - 1024 else 2
    for res in reports:
        assert res.spill_stores == 0 and res.spill_loads == 0, f"{key} {arch}: register spills {res}"
        assert res.smem + dyn <= SMEM_LIMIT[arch], f"{key} {arch}: shared memory {res.smem} + {dyn} B over the limit"
        assert res.blocks_per_sm(arch, dyn) >= want, (f"{key} {arch}: {res.registers} regs x {res.threads} threads, "
                                                       f"{res.smem} + {dyn} B smem: < {want} blocks/SM")
    if key.startswith("split"):  # its running state (m, l, acc per lane) and partial sums are registers
        (res,) = reports
        assert res.stack == 0, f"{key} {arch}: {res.stack} bytes stack frame (a local array ptxas could not promote)"
        assert res.threads == 32 * spec.group_size, res


def _shuffle_reductions(src: str) -> list[int]:
    """Widest offset of each shuffle reduction in ``src`` (TVM emits one mask variable per reduction and a
    ``__shfl_down_sync(mask, value, offset, 32)`` per halving step)."""
    widest: dict[str, int] = {}
    for m in re.finditer(r"__shfl_down_sync\((\w+)\[0\], \w+\[0\], (\d+), 32\)", src):
        widest[m.group(1)] = max(widest.get(m.group(1), 0), int(m.group(2)))
    return list(widest.values())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_split_reductions_are_warp_shuffles(shape: str) -> None:
    """Scores: the head_dim slices of ``dl`` lanes are summed with shuffles (widest offset dl / 2), one reduction
    per piece; chunk max, chunk sum and the value zero-point term: whole-warp shuffles (widest offset 16)."""
    spec = split_kernel(shape, "f16")
    red = _shuffle_reductions(cuda_source(spec))
    n_pieces, n_quant = len(spec.bits), sum(1 for b in spec.bits if b != 16)
    assert red.count(sched.DEFAULT_DL // 2) >= n_pieces, f"score reductions over head_dim lanes: {sorted(red)}"
    # per piece: max and sum; per quantized piece: the zero-point term; and the split's lse
    assert red.count(16) >= 2 * n_pieces + n_quant, f"token reductions over the warp: {sorted(red)}"


def test_merge_is_one_launch() -> None:
    for shape in SHAPES:
        src = cuda_source(merge_spec(split_kernel(shape, "f16")))
        kernels = sorted(set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([\d, ]+\)\s+)?(\w+)\(", src)))
        assert len(kernels) == 1, f"{shape}: the merge launches {len(kernels)} kernels: {kernels}"
        assert _shuffle_reductions(src), f"{shape}: the merge's max / weight sum are not warp shuffles"


def _loaded_16_bytes(src: str, buf: str, vec: str) -> bool:
    """Whether ``buf`` is staged with 16-byte copies: ``cp.async`` of 16 bytes (two staging buffers) or a plain
    ``int4`` / ``uint4`` load (one)."""
    return bool(re.search(rf"ptx_cp_async_legacy_cg_16_\d+_\d+\(\w+, [^;]*\b{buf}_ptr, ", src)
                or re.search(rf"\*\({vec}\*\)\({buf}_ptr \+", src))


def test_code_loads_are_128_bit() -> None:
    """Key codes, key scale/zero, value codes and the dense piece are staged with 16-byte global loads (``cp.async``
    with two staging buffers, the default) and no other global load of them remains."""
    for shape in SHAPES:
        src = cuda_source(split_kernel(shape, "f16"))
        for piece in ("q8", "q4", "q2"):
            for buf in ("k_codes", "v_codes"):
                assert _loaded_16_bytes(src, f"{piece}_{buf}", "int4"), f"{shape}: {piece}_{buf} not loaded 16 B"
            for buf in ("k_scale", "k_zero"):
                assert _loaded_16_bytes(src, f"{piece}_{buf}", "uint4"), f"{shape}: {piece}_{buf} not loaded 16 B"
        for buf in ("dense_k", "dense_v"):
            assert _loaded_16_bytes(src, buf, "uint4"), f"{shape}: {buf} not loaded 16 B"


def launch_config(spec: KernelSpec, batch: int, parts: int) -> dict[str, int]:
    """Extents of the thread-bound loops (blockIdx.x/y, threadIdx.x) of the scheduled kernel at ``B``, ``P``,
    read off the scheduled TIR (``T.thread_binding(extent, thread=...)``) and evaluated."""
    sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}))
    sched.default_schedule(sch, spec)
    text = sch.mod.script()
    found: dict[str, int] = {}
    for m in re.finditer(r"T\.thread_binding\((.+?), thread=\"(\w+\.\w)\"\)", text):
        expr = m.group(1).replace("T.min", "min").replace("T.max", "max")
        value = eval(expr, {"__builtins__": {}, "min": min, "max": max}, {"B": batch, "P": parts})  # noqa: S307
        found.setdefault(m.group(2), value)
    return found


@pytest.mark.parametrize("shape", list(SHAPES))
def test_launch_fills_h200_at_8k(shape: str) -> None:
    """Batch 1 at 8K tokens: choose_splits + the schedule's grid give >= 2 blocks per SM of an H200."""
    spec = split_kernel(shape, "f16")
    p = choose_splits(H200_SMS, 8192, 1, spec.num_kv_heads, spec.chunk)
    cfg = launch_config(spec, 1, p)
    assert set(cfg) == {"blockIdx.x", "blockIdx.y", "threadIdx.x", "threadIdx.y", "threadIdx.z"}, cfg
    assert cfg["threadIdx.x"] * cfg["threadIdx.y"] == 32 and cfg["threadIdx.z"] == spec.group_size, cfg
    assert cfg["blockIdx.y"] == p <= min(MAX_SPLITS, 8192 // spec.chunk)  # never more splits than chunks
    blocks = cfg["blockIdx.x"] * cfg["blockIdx.y"]
    assert blocks >= 2 * H200_SMS, f"{shape}: {blocks} blocks for {H200_SMS} SMs"


def test_design_space_builds_split_kernel() -> None:
    spec = split_kernel("0.5b", "f16", bits=(4, 16))
    for seed in (1, 2):
        sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}), seed=seed)
        sched.design_space(sch, spec)
        kinds = [i.kind.name for i in sch.trace.insts]
        assert kinds.count("SampleCategorical") >= 3, "threads, unroll and vector width are sampled"
        src = tvm.compile(sch.mod, target=sched.target()).mod.imports[0].inspect_source()
        assert spec.uri in src


def test_offsets_are_32_bit_and_oversized_calls_are_refused() -> None:
    """Issue 21, item 1: the generated CUDA indexes with ``int`` (the symbolic sizes are int32, so any size, however
    large, gives the same source: ``((int)blockIdx.x * N16) * 128`` for the 7B dense piece); the signature therefore
    refuses a tensor of more than 2^31 - 1 elements before the kernel sees it."""
    from wq_compile.kernels.signature import MAX_INDEXED_ELEMENTS, KernelArgumentError
    from wq_compile.kernels.signatures import signature

    src = cuda_source(KERNELS["split-7b-f16"])
    assert re.search(r"\(\(\(int\)blockIdx\.x\) \* N16\) \* 128\)", src), "the dense offset is no longer 32-bit"
    assert "(int64_t)" not in src, "64-bit offsets appeared: the guard (MAX_INDEXED_ELEMENTS) may be relaxed"
    import torch

    dense = split_spec(KernelSpec("decode", (16,), chunk=CHUNK, dtype="f16", **SHAPES["7b"]))
    sig = signature(dense)
    q = torch.zeros(1, 28, 128, dtype=torch.float16)
    n = (MAX_INDEXED_ELEMENTS + 1) // (4 * 128)  # B * N16 = 4,194,304 tokens: 2^31 elements of dense K
    k = torch.zeros(1, dtype=torch.float16).expand(1, 4, n, 128)  # no memory behind it
    with pytest.raises(KernelArgumentError, match=r"argument 'k'.*2,147,483,648 elements.*32-bit offsets"):
        sig.bind(q, k, k, torch.zeros(1, dtype=torch.int32), 1.0, inputs_only=True)
    ok = torch.zeros(1, dtype=torch.float16).expand(1, 4, n - CHUNK, 128)  # just below: only contiguity complains
    with pytest.raises(KernelArgumentError, match="contiguous"):
        sig.bind(q, ok, ok, torch.zeros(1, dtype=torch.int32), 1.0, inputs_only=True)


def _split_source_with_unroll(spec: KernelSpec, unroll: int) -> str:
    """CUDA of ``spec`` scheduled as the design space does with a fixed unroll, after the design space's
    postprocessors that rewrite (RewriteParallelVectorizeUnroll lowers the unroll annotation)."""
    from tvm.s_tir import meta_schedule as ms

    from wq_compile.schedules.cuda_split import schedule_split
    from wq_compile.schedules.llvm import work_on_kernel

    sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}))
    work_on_kernel(sch)
    schedule_split(sch, spec, sched.DEFAULT_DL, unroll, sched.DEFAULT_CODE_VECTOR)
    assert any(isinstance(p, ms.postproc.RewriteParallelVectorizeUnroll) for p in sched.postprocs())
    assert ms.postproc.RewriteParallelVectorizeUnroll().apply(sch)
    return tvm.compile(sch.mod, target=sched.target()).mod.imports[0].inspect_source()


def test_unroll_knob_changes_the_cuda() -> None:
    """Issue 21, item 4: the sampled unroll is lowered (it used to be an annotation nothing read: unroll 0 and 512
    gave byte-identical CUDA). The split design space varies dl, the code vector width and unroll."""
    spec = split_spec(KernelSpec("decode", (16,), chunk=CHUNK, dtype="f16", head_dim=64, num_q_heads=4, num_kv_heads=2))
    plain, unrolled = (_split_source_with_unroll(spec, u) for u in (0, 16))
    assert plain != unrolled, "unroll 0 and 16 give the same CUDA: the unroll knob is not lowered"
    assert len(unrolled) > len(plain)  # unrolled loop bodies


def _scheduled(spec: KernelSpec) -> tvm.s_tir.Schedule:
    sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}))
    sched.default_schedule(sch, spec)
    return sch


def test_quantized_tiles_are_dequantized_once_per_kv_head() -> None:
    """Issue 21, item 3: each quantized piece's K tile is dequantized once per (KV head, chunk) into shared fp32 by
    all the block's warps, and the score loop of every query head reads it (inlined, each of the group's warps
    unpacked every code and loaded its scale and zero again). Rows of the K tile (stride ``d + 4`` floats) and of the
    staged dense K (``d + 8`` halves) are padded so the score loop's 8 tokens x 4 channels per warp hit 32 banks
    (256 B rows put all 8 tokens on the same banks: 8-way conflicts). Read off the scheduled TIR (no compile)."""
    spec = with_split_stages(split_kernel("0.5b", "f16", bits=(4, 16)), 1)  # padding by the schedule (one buffer)
    sch = _scheduled(spec)
    blk = sch.get(sch.get_sblock("q4_kdeq"))
    (buf,) = [w.source for w in blk.writes]
    assert buf.scope() == "shared", f"q4_kdeq: {buf.scope()}"
    assert any(r.source.same_as(buf) for r in sch.get(sch.get_sblock("q4_qk")).reads)
    # storage_align of the token axis: (buffer 0, axis 2, factor d, offset): K tile + 4 floats, dense K + 8 halves
    text = sch.mod.script()
    aligns = [(re.findall(r'T\.sblock\("(\w+)"\)', text[:m.start()])[-1], *m.groups())
              for m in re.finditer(r'"buffer_dim_align": \[\[0, 2, (\d+), (\d+)\]\]', text)]
    assert ("q4_kdeq", "64", "4") in aligns and ("dense_kload", "64", "8") in aligns, aligns
    # no V tile (value codes are unpacked in place: a word serves several channels, no scale / zero loads), and the
    # dense piece's fp16 K is read in place (a cast)
    for name in ("q4_vdeq", "dense_vdeq", "dense_kdeq"):
        with pytest.raises(tvm.s_tir.schedule.ScheduleError, match=name):
            sch.get_sblock(name)


def test_softmax_state_is_per_head() -> None:
    """Issue 21, item 3: one online-softmax state per split for all pieces, (m, l) and the chunk's rescale factors per
    query head: one exp per piece for the probabilities and two per chunk for the state, none at the end (per channel
    and per piece it was 2 exps per channel per chunk and a combine of the pieces per channel)."""
    for shape in SHAPES:
        spec = split_kernel(shape, "f16")
        src = cuda_source(spec)
        exps = src.count(EXP_MARK)
        # one per piece (probabilities) + two (alpha, beta) for the split's one state; was 100 (0.5B) / 180 (7B)
        assert 0 < exps <= len(spec.bits) + 2, f"{shape}: {exps} inlined exps"


def test_stages_knob_double_buffers_the_staging_copies() -> None:
    """Issue 21, item 6: ``stages`` 2 (the default) issues chunk ``i + 1``'s staging copies as ``cp.async`` (16 bytes
    each) into the second buffer before chunk ``i`` is computed: one commit group per iteration, then
    ``cp.async.wait_group 1`` (all but the newest group landed) and a barrier before any thread reads the chunk.
    Its tiles live in dynamic shared memory (94 KB for the 7B: past the 48 KB of static arrays); ``stages`` 1 is
    the kernel before, static arrays and plain loads (the head_dim-64 default: two buffers spill there). Both
    PrimFuncs are checked against the reference on llvm (tests/kernels/test_split_decode.py). The dynamic size
    matches the construction check's model (``gpu_limits.split_shared_bytes``) or is below it by less than 1 KB."""
    one = KERNELS["dense-split-0.5b-bf16"]
    two = with_split_stages(one, 2)
    src2, src1 = cuda_source(two), cuda_source(one)
    assert src1 != src2
    for mark in ("cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 1", "extern __shared__"):
        assert mark in src2, f"two stages: no {mark}"
        assert mark not in src1, f"one stage: {mark}"
    loop = src2[src2.index("for (int ci = 0;"):]
    calls = re.findall(r"(ptx_cp_async_legacy\w+|\w+commit_group\w*|\w+wait_group_1|__syncthreads)\(", loop)
    first = calls.index(next(c for c in calls if "wait_group" in c))
    assert calls[first + 1] == "__syncthreads", calls[:first + 2]  # the barrier right after the wait
    assert "commit_group" in calls[first - 1] and calls[0] == "__syncthreads", calls[:first + 1]  # WAR barrier first
    assert dynamic_smem(one) == 0 and dynamic_smem(two) > 0
    # an int1 bucket at head_dim 128: one buffer by default (two spill; test_ptxas_resources holds it to none)
    int1 = KERNELS["split-7b-bf16-int1"]
    assert split_stages(int1) == 1 and dynamic_smem(int1) == 0 and "cp.async" not in cuda_source(int1)
    assert split_stages(KERNELS["split-7b-f16"]) == 2
    for spec in (two, KERNELS["split-7b-f16"]):
        model = gl.split_shared_bytes(spec.group_size, spec.head_dim, spec.chunk, spec.bits, spec.k_group,
                                      spec.v_group, spec.torch_dtype.itemsize, stages=2)
        assert dynamic_smem(spec) <= model < dynamic_smem(spec) + 1024, (spec.uri, dynamic_smem(spec), model)
