"""Kernels (llvm) against the torch oracles: wq_compile.core.reference (attention, merge) and wq_compile.core.quant (format).

Tolerances: the kernel and the oracle read the same quantized data, so they agree to fp32 rounding (the kernel
uses a polynomial exp with ~2e-7 relative error and a different summation order). One table, per bit width.
"""

from __future__ import annotations

import math

import pytest
import torch
import tvm

from wq_compile.core import quant, reference
from wq_compile.kernels import KernelSignature, make_kernel, signature
from wq_compile.schedules import llvm as sched
from wq_compile.core.spec import KernelSpec
from wq_compile.compiler.device import host_device
from wq_testing import CPU_SCENARIOS, check_close as _check, fused_case, int8_dots_case, quantized_piece as _bucket

#: bits -> (atol, rtol) for o / out (fp32 outputs) and atol for lse.
TOL = {1: (1e-4, 1e-4), 2: (1e-4, 1e-4), 4: (1e-4, 1e-4), 8: (1e-4, 1e-4), 16: (1e-4, 1e-4)}
#: fp16 outputs are rounded to fp16 once at the end: half an ulp of values ~1.
TOL_F16 = (2e-3, 2e-3)
#: bf16 outputs (8-bit mantissa): half an ulp of values ~1 is 2**-9; the inputs are bf16 in both paths.
TOL_BF16 = (8e-3, 8e-3)
#: output dtype -> (atol, rtol) of the CPU fused kernel (fp32 accumulation; scales folded into the query).
TOL_OUT = {"f32": TOL[2], "f16": TOL_F16, "bf16": TOL_BF16}
LSE_ATOL = 1e-4

SHAPES = {"0.5b": dict(head_dim=64, num_q_heads=14, num_kv_heads=2), "7b": dict(head_dim=128, num_q_heads=28, num_kv_heads=4)}
#: (capacity N, lens per sample): one compiled module serves every N.
CASES = [(64, [7, 13]), (320, [0, 300]), (256, [196, 256])]
SM_SCALE = 0.125

_CACHE: dict = {}


def compiled_cpu(spec: KernelSpec):
    """The CPU fused kernel through the llvm default schedule (which leaves its plain TIR as it is)."""
    key = (spec, "cpu")
    if key not in _CACHE:
        sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec, "llvm")}))
        sched.default_schedule(sch, spec)
        _CACHE[key] = tvm.compile(sch.mod, target=host_device().target)[spec.uri]
    return _CACHE[key]


def compiled(spec: KernelSpec, knobs: dict | None = None):
    """Compile once per (spec, schedule) for the whole session (default schedule, or the tuned one with knobs)."""
    key = (spec, None if knobs is None else tuple(sorted(knobs.items())))
    if key not in _CACHE:
        sch = tvm.s_tir.Schedule(tvm.IRModule({spec.uri: make_kernel(spec)}))
        if knobs is None:
            sched.default_schedule(sch, spec)
        else:
            sched.tuned_schedule(sch, spec, knobs)
        _CACHE[key] = tvm.compile(sch.mod, target=host_device().target)[spec.uri]
    return _CACHE[key]


def _check_lse(got: torch.Tensor, want: torch.Tensor, lens: list[int]) -> None:
    for i, ln in enumerate(lens):
        if ln == 0:
            assert bool(torch.isneginf(got[i]).all()), "lse of an empty sample must be -inf"
        else:
            _check("lse", got[i], want[i], LSE_ATOL, 1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_decode_matches_reference(bits: int, shape: str) -> None:
    spec = KernelSpec("decode", (bits,), **SHAPES[shape])
    fn = compiled(spec)
    gen = torch.Generator().manual_seed(bits * 7 + len(shape))
    for n, lens in CASES:
        args, k, v = _bucket(bits, spec, n, lens, gen)
        q = torch.randn(len(lens), spec.num_q_heads, spec.head_dim, generator=gen)
        o = torch.full((len(lens), spec.num_q_heads, spec.head_dim), float("nan"))
        lse = torch.full((len(lens), spec.num_q_heads), float("nan"))
        call = (q, *args, SM_SCALE, o, lse)
        signature(spec).bind(*call)
        fn(*call)
        ro, rl = reference.attend_piece(q, k, v, args[-1], SM_SCALE)
        _check(f"o bits={bits} n={n}", o, ro, *TOL[bits])
        _check_lse(lse, rl, lens)
        for i, ln in enumerate(lens):
            if ln == 0:
                assert bool((o[i] == 0).all()), "o of an empty sample must be 0"


def test_decode_dense_f16() -> None:
    spec = KernelSpec("decode", (16,), dtype="f16", **SHAPES["7b"])
    fn = compiled(spec)
    gen = torch.Generator().manual_seed(5)
    for n, lens in CASES:
        args, k, v = _bucket(16, spec, n, lens, gen)
        q = torch.randn(len(lens), spec.num_q_heads, spec.head_dim, generator=gen).half()
        o = torch.empty(len(lens), spec.num_q_heads, spec.head_dim)
        lse = torch.empty(len(lens), spec.num_q_heads)
        fn(q, *args, SM_SCALE, o, lse)
        ro, rl = reference.attend_piece(q, k, v, args[-1], SM_SCALE)
        _check("o f16", o, ro, *TOL[16])
        _check_lse(lse, rl, lens)


@pytest.mark.parametrize("bits", [4, 16])
def test_decode_tuned_schedule(bits: int) -> None:
    """The hand-knob instance of the design space computes the same thing."""
    spec = KernelSpec("decode", (bits,), **SHAPES["0.5b"])
    fn = compiled(spec, sched.HAND_KNOBS)
    gen = torch.Generator().manual_seed(11)
    for n, lens in CASES:
        args, k, v = _bucket(bits, spec, n, lens, gen)
        q = torch.randn(len(lens), spec.num_q_heads, spec.head_dim, generator=gen)
        o, lse = torch.empty(len(lens), 14, 64), torch.empty(len(lens), 14)
        fn(q, *args, SM_SCALE, o, lse)
        ro, rl = reference.attend_piece(q, k, v, args[-1], SM_SCALE)
        _check("o tuned", o, ro, *TOL[bits])
        _check_lse(lse, rl, lens)


def _fused_case(spec: KernelSpec, caps: dict[int, int], lens: dict[int, list[int]], gen: torch.Generator):
    return fused_case(spec, caps, lens, gen, SM_SCALE)


@pytest.mark.parametrize(
    "shape,knobs", [("0.5b", None), ("0.5b", "hand"), ("7b", None)], ids=["0.5b-default", "0.5b-tuned", "7b-default"]
)
def test_fused_matches_reference(shape: str, knobs) -> None:
    spec = KernelSpec("fused", (8, 4, 2, 16), **SHAPES[shape])
    fn = compiled(spec, sched.HAND_KNOBS if knobs == "hand" else None)
    gen = torch.Generator().manual_seed(3)
    scenarios = [
        ({8: 64, 4: 320, 2: 256, 16: 64}, {8: [7, 13], 4: [300, 0], 2: [196, 256], 16: [5, 0]}),
        ({8: 64, 4: 64, 2: 128, 16: 64}, {8: [0, 0], 4: [64, 1], 2: [0, 100], 16: [0, 64]}),  # an empty bucket
        ({8: 64, 4: 64, 2: 64, 16: 64}, {8: [0, 0], 4: [0, 0], 2: [0, 0], 16: [0, 0]}),  # nothing at all -> 0
    ]
    for caps, lens in scenarios:
        call, want = _fused_case(spec, caps, lens, gen)
        out = torch.full((2, spec.num_q_heads, spec.head_dim), float("nan"))
        signature(spec).bind(*call, out)
        fn(*call, out)
        _check(f"fused {caps}", out, want, *TOL[2])


def _needs_avx512(extra: tuple) -> None:
    from wq_compile.compiler.device import isa_class

    if dict(extra).get("lut") and isa_class(host_device().target) != "x86_64-avx512":
        pytest.skip("the lut knob (vpermps table unpack) needs an AVX-512 host")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("extra", [(), (("splits", 1),), (("splits", 3), ("pvc", 8), ("qkh", 3)),
                                   (("splits", 2), ("lut", 1)), (("pvc", 8), ("lut", 1))],
                         ids=["default", "1split", "3split-pvc8-qkh3", "lut", "lut-pvc8"])
def test_cpu_fused_matches_reference(shape: str, extra: tuple) -> None:
    _needs_avx512(extra)
    spec = KernelSpec("fused", (8, 4, 2, 16), extra=extra, **SHAPES[shape])
    fn = compiled_cpu(spec)
    gen = torch.Generator().manual_seed(13)
    for caps, lens in CPU_SCENARIOS:
        call, want = _fused_case(spec, caps, lens, gen)
        out = torch.full((2, spec.num_q_heads, spec.head_dim), float("nan"))
        signature(spec).bind(*call, out)
        fn(*call, out)
        _check(f"cpu fused {shape} {caps} {lens}", out, want, *TOL_OUT["f32"])
        for i in range(2):
            if all(ln[i] == 0 for ln in lens.values()):
                assert bool((out[i] == 0).all()), "an empty sample gives 0"


@pytest.mark.parametrize("bits", [(8, 16), (4, 16), (2, 16), (4,), (8, 2), (1, 16), (8, 4, 2, 1, 16)])
def test_cpu_fused_every_bucket_mix(bits: tuple) -> None:
    spec = KernelSpec("fused", bits, **SHAPES["0.5b"])
    fn = compiled_cpu(spec)
    gen = torch.Generator().manual_seed(sum(bits))
    caps = {b: 320 for b in bits}
    lens = {b: [300, 13] for b in bits}
    call, want = _fused_case(spec, caps, lens, gen)
    out = torch.empty(2, 14, 64)
    fn(*call, out)
    _check(f"cpu fused {bits}", out, want, *TOL_OUT["f32"])


def test_cpu_fused_constant_key_groups() -> None:
    """Constant channels give scale 0 key groups: finite scores, exact zero-point term."""
    spec = KernelSpec("fused", (4, 16), **SHAPES["0.5b"])
    fn = compiled_cpu(spec)
    gen = torch.Generator().manual_seed(4)
    call, _ = _fused_case(spec, {4: 64, 16: 64}, {4: [56, 28], 16: [3, 0]}, gen)
    k = torch.randn(2, 2, 64, 64, generator=gen)
    k[:, :, :, :7] = 0.75  # constant channels
    k[0, 1] = -1.25  # a whole constant head
    v = torch.randn(2, 2, 64, 64, generator=gen)
    qs = spec.quant(4)
    qk, qv = quant.quantize_keys(k, qs), quant.quantize_values(v, qs)
    call[1:8] = [qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, call[7]]
    o4, l4 = reference.attend_piece(call[0], quant.dequantize_keys(qk, 64), quant.dequantize_values(qv), call[7], SM_SCALE)
    kd, vd = torch.nan_to_num(call[8].float()), torch.nan_to_num(call[9].float())  # NaN past lens: kernel-only
    od, ld = reference.attend_piece(call[0], kd, vd, call[10], SM_SCALE)
    want, _ = reference.merge_states([o4, od], [l4, ld])
    out = torch.empty(2, 14, 64)
    fn(*call, out)
    _check("cpu fused constant groups", out, want, *TOL_OUT["f32"])


@pytest.mark.parametrize("bits,extra", [(4, ()), (8, ()), (4, (("lut", 1),))], ids=["int4", "int8", "int4-lut"])
def test_cpu_fused_rising_and_falling_scores(bits: int, extra: tuple) -> None:
    """Scores that climb far above every earlier tile (the lazy reference max must move mid-piece, by more than
    its slack, many times) and then fall (old reference kept, later tokens underflow), in the bucket and in the
    dense piece: equal to the reference, no overflow."""
    _needs_avx512(extra)
    spec = KernelSpec("fused", (bits, 16), extra=extra, **SHAPES["0.5b"])
    fn = compiled_cpu(spec)
    gen = torch.Generator().manual_seed(8)
    call, _ = _fused_case(spec, {bits: 336, 16: 64}, {bits: [336, 200], 16: [60, 33]}, gen)
    q = call[0]
    n = 336
    ramp = torch.cat([torch.linspace(0.0, 250.0, 224), torch.linspace(250.0, -100.0, n - 224)])  # scores to ~150
    direction = q.view(2, 2, 7, 64).mean(2)  # keys along the KV head's mean query: every head's score moves
    direction = direction / direction.norm(dim=-1, keepdim=True)
    k = ramp[None, None, :, None] * direction[:, :, None, :] + 0.1 * torch.randn(2, 2, n, 64, generator=gen)
    v = torch.randn(2, 2, n, 64, generator=gen)
    qs = spec.quant(bits)
    qk, qv = quant.quantize_keys(k, qs), quant.quantize_values(v, qs)
    call[1:8] = [qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, call[7]]
    kd = torch.linspace(-100.0, 300.0, 64)[None, None, :, None] * direction[:, :, None, :]
    call[8], call[9] = kd.contiguous(), torch.randn(2, 2, 64, 64, generator=gen)
    o4, l4 = reference.attend_piece(q, quant.dequantize_keys(qk, n), quant.dequantize_values(qv), call[7], SM_SCALE)
    od, ld = reference.attend_piece(q, call[8], call[9], call[10], SM_SCALE)
    want, _ = reference.merge_states([o4, od], [l4, ld])
    out = torch.empty(2, 14, 64)
    fn(*call, out)
    assert torch.isfinite(out).all()
    _check(f"cpu fused rising scores int{bits}", out, want, *TOL_OUT["f32"])


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_fused_half_dtypes(dtype: str, shape: str) -> None:
    """Model-dtype queries, dense piece and output with fp32 accumulation, against the fp32 oracle on the same
    (half-precision) inputs: the only extra error is the final rounding of the output."""
    spec = KernelSpec("fused", (8, 4, 2, 16), dtype=dtype, **SHAPES[shape])
    fn = compiled_cpu(spec)
    gen = torch.Generator().manual_seed(21)
    for caps, lens in CPU_SCENARIOS[:2]:
        call, want = _fused_case(spec, caps, lens, gen)
        out = torch.empty(2, spec.num_q_heads, spec.head_dim, dtype=spec.torch_dtype)
        signature(spec).bind(*call, out)
        fn(*call, out)
        _check(f"cpu fused {dtype}", out, want, *TOL_OUT[dtype])


def test_cpu_kernel_is_selected_for_llvm_only() -> None:
    from wq_compile.kernels.attention_cpu import PLAIN_TIR_ATTR

    spec = KernelSpec("fused", (4, 16), **SHAPES["0.5b"])
    cpu, blocks = make_kernel(spec, "llvm"), make_kernel(spec)
    assert cpu.attrs[PLAIN_TIR_ATTR] and PLAIN_TIR_ATTR not in blocks.attrs
    assert PLAIN_TIR_ATTR not in make_kernel(spec, "cuda").attrs
    assert signature(spec).check_prim_func(cpu).args == signature(spec).check_prim_func(blocks).args
    assert PLAIN_TIR_ATTR not in make_kernel(KernelSpec("decode", (4,), **SHAPES["0.5b"]), "llvm").attrs


def test_fused_f16_output() -> None:
    spec = KernelSpec("fused", (4, 16), dtype="f16", **SHAPES["0.5b"])
    fn = compiled(spec)
    gen = torch.Generator().manual_seed(9)
    call, want = _fused_case(spec, {4: 320, 16: 64}, {4: [300, 13], 16: [7, 64]}, gen)
    out = torch.empty(2, 14, 64, dtype=torch.float16)
    fn(*call, out)
    _check("fused f16", out, want, *TOL_F16)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_merge_matches_reference(dtype: str) -> None:
    spec = KernelSpec("merge", (16,), dtype=dtype, **SHAPES["0.5b"])
    fn = compiled(spec)
    gen = torch.Generator().manual_seed(1)
    for parts in (1, 3, 5):  # one module, every P
        o = torch.randn(parts, 2, 14, 64, generator=gen)
        lse = torch.randn(parts, 2, 14, generator=gen) * 4
        lse[0, 1, :3] = float("-inf")  # an empty piece
        lse[:, 0, 5] = float("-inf")  # a row with no piece at all
        o[:, 0, 5] = 0.0
        out = torch.empty(2, 14, 64, dtype=spec.torch_dtype)
        fn(o, lse, out)
        want, _ = reference.merge_states(list(o), list(lse))
        _check(f"merge P={parts}", out, want, *(TOL[16] if dtype == "f32" else TOL_F16))
        assert bool((out[0, 5] == 0).all())


@pytest.mark.parametrize("bits,dtype", [(1, "f32"), (2, "f32"), (4, "f32"), (8, "f32"), (4, "f16")])
def test_quantize_matches_quant(bits: int, dtype: str) -> None:
    spec = KernelSpec("quantize", (bits,), dtype=dtype, **SHAPES["0.5b"])
    fn = compiled(spec)
    qs = spec.quant(bits)
    gen = torch.Generator().manual_seed(bits)
    for n in (28, 196):  # one module, every block length (whole key groups)
        k = (torch.randn(2, 2, n, 64, generator=gen) * 3).to(spec.torch_dtype)
        v = torch.randn(2, 2, n, 64, generator=gen).to(spec.torch_dtype)
        k[0, 0, :28, 5] = 1.5  # constant key group
        v[1, 1, 3, :] = -0.25  # constant value group
        w = 64 // qs.per_word
        outs = [
            torch.empty(2, 2, n // 28, 64, quant.key_words(bits, 28), dtype=torch.int32),
            torch.empty(2, 2, n // 28, 64, dtype=torch.float16),
            torch.empty(2, 2, n // 28, 64, dtype=torch.float16),
            torch.empty(2, 2, n, w, dtype=torch.int32),
            torch.empty(2, 2, n, 1, dtype=torch.float16),
            torch.empty(2, 2, n, 1, dtype=torch.float16),
        ]
        signature(spec).bind(k, v, *outs)
        fn(k, v, *outs)
        rk, rv = quant.quantize_keys(k, qs), quant.quantize_values(v, qs)
        for name, got, want in (("k_scale", outs[1], rk.scale), ("k_zero", outs[2], rk.zero)):
            assert torch.equal(got, want), name
        for name, got, want in (("v_scale", outs[4], rv.scale), ("v_zero", outs[5], rv.zero)):
            assert torch.equal(got, want), name
        # bit-exact: same words (padding slots included) as the torch reference
        assert torch.equal(outs[0], rk.codes), "k_codes"
        assert torch.equal(outs[3], rv.codes), "v_codes"
        kq = quant.QuantizedKeys(outs[0], outs[1], outs[2], qs)
        idx = torch.arange(n) // qs.k_group
        bound = quant.error_bound(k, outs[1][..., idx, :], outs[2][..., idx, :])
        assert bool(((quant.dequantize_keys(kq) - k.float()).abs() <= bound).all()), "key dequant error"
        vq = quant.QuantizedValues(outs[3], outs[4], outs[5], qs)
        vs = outs[4].repeat_interleave(qs.v_group, -1)
        vz = outs[5].repeat_interleave(qs.v_group, -1)
        assert bool(((quant.dequantize_values(vq) - v.float()).abs() <= quant.error_bound(v, vs, vz)).all())
        assert not torch.isnan(outs[1].float()).any() and not torch.isnan(outs[4].float()).any()


def test_signature_rejects_bad_tensors() -> None:
    spec = KernelSpec("decode", (4,), **SHAPES["0.5b"])
    sig: KernelSignature = signature(spec)
    assert sig.names == ("q", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "lens", "sm_scale", "o", "lse")
    gen = torch.Generator().manual_seed(0)
    args, _, _ = _bucket(4, spec, 64, [3, 5], gen)
    q = torch.randn(2, 14, 64)
    good = [q, *args, SM_SCALE, torch.empty(2, 14, 64), torch.empty(2, 14)]
    assert sig.outputs == sig.args[-2:] and [a.name for a in sig.outputs] == ["o", "lse"]
    assert sig.bind(*good) == {"B": 2, "N": 64, "G": 3}
    assert sig.bind(*good[:-2], inputs_only=True) == {"B": 2, "N": 64, "G": 3}
    with pytest.raises(TypeError, match="'q': expected dtype torch.float32"):
        sig.bind(q.double(), *good[1:])
    bad_n, _, _ = _bucket(4, spec, 70, [3, 5], gen)  # not whole chunks
    with pytest.raises(ValueError, match="'v_codes': size N=70 must be a positive multiple of 64"):
        sig.bind(q, *bad_n, *good[-3:])
    with pytest.raises(ValueError, match="'k_codes': dim 0"):
        sig.bind(q[:1], *good[1:])
    with pytest.raises(TypeError, match="expected 11"):
        sig.bind(*good[:-1])


def test_make_kernel_names_function_by_uri() -> None:
    for spec in (
        KernelSpec("decode", (2,), **SHAPES["0.5b"]),
        KernelSpec("fused", (8, 16), **SHAPES["7b"]),
        KernelSpec("merge", (16,), **SHAPES["0.5b"]),
        KernelSpec("quantize", (8,), **SHAPES["7b"]),
    ):
        func = make_kernel(spec)
        assert func.attrs["global_symbol"] == spec.uri
        # the factory's description (outputs, size rules) is exactly what the PrimFunc declares and writes
        sig = signature(spec).check_prim_func(func)
        assert KernelSignature.from_prim_func(func).args == sig.args
    with pytest.raises(ValueError, match="dense piece"):
        make_kernel(KernelSpec("fused", (16, 4), **SHAPES["0.5b"]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_llvm_design_space_samples_are_correct(seed: int) -> None:
    """Random draws of the design space (as MetaSchedule replays them) build and compute the right thing."""
    spec = KernelSpec("fused", (4, 16), **SHAPES["0.5b"])
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": make_kernel(spec)}), seed=seed)
    sched.design_space(sch, spec)
    fn = tvm.compile(sch.mod, target=host_device().target)["main"]
    gen = torch.Generator().manual_seed(seed)
    call, want = _fused_case(spec, {4: 128, 16: 64}, {4: [100, 128], 16: [3, 0]}, gen)
    out = torch.empty(2, 14, 64)
    fn(*call, out)
    _check(f"design space seed {seed}", out, want, *TOL[4])
    assert not math.isnan(out.sum().item())


def test_static_workload_for_metaschedule() -> None:
    """The tuning workload has only static shapes (MetaSchedule's ArgInfo rejects symbolic ones)."""
    from tvm.s_tir import meta_schedule as ms

    from wq_compile.kernels import static_workload

    spec = KernelSpec("fused", (4, 16), **SHAPES["0.5b"])
    func = static_workload(spec, {"B": 1, "N4": 256, "G4": 10, "N16": 64})
    infos = ms.arg_info.ArgInfo.from_prim_func(func)
    assert len(infos) == len(signature(spec).args) - 1  # sm_scale is bound
    assert all(isinstance(int(x), int) for info in infos for x in info.shape)
    with pytest.raises(ValueError, match="no value for symbols"):
        static_workload(spec, {"B": 1})


def test_example_sizes_satisfy_signature() -> None:
    from wq_compile.kernels import example_sizes

    for spec in (
        KernelSpec("fused", (8, 4, 2, 16), **SHAPES["0.5b"]),
        KernelSpec("decode", (16,), **SHAPES["7b"]),
        KernelSpec("decode", (2,), **SHAPES["7b"]),
        KernelSpec("merge", (16,), **SHAPES["0.5b"]),
        KernelSpec("quantize", (4,), **SHAPES["0.5b"]),
    ):
        sizes = example_sizes(spec, 8000)
        sig = signature(spec)
        tensors = [
            None if a.is_scalar else torch.zeros([sizes[s] if isinstance(s, str) else s for s in a.shape], dtype=a.torch_dtype)
            for a in sig.args
        ]
        bound = sig.bind(*[SM_SCALE if t is None else t for t in tensors])
        assert bound == sizes, spec.uri


def _needs_int8_dots() -> None:
    from wq_compile.runtime.decoder import int8_dots_unsupported

    why = int8_dots_unsupported(host_device(), split=False)
    if why is not None:
        pytest.skip(why)


def _int8_dots_case(spec: KernelSpec, caps: dict[int, int], lens: dict[int, list[int]], gen: torch.Generator):
    return int8_dots_case(spec, caps, lens, gen, SM_SCALE)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_fused_int8_dots_match_their_reference(shape: str) -> None:
    """The int8 dot-product mode against its own torch emulation (same query and probability rounding, float64
    sums): only summation order differs, so the fp32 tolerance applies (a probability scale of max/250 instead of
    max/255 fails it)."""
    _needs_int8_dots()
    spec = KernelSpec("fused", (8, 4, 2, 16), extra=(("splits", 2), ("dot8", 1)), **SHAPES[shape])
    fn = compiled_cpu(spec)
    gen = torch.Generator().manual_seed(21)
    for caps, lens in CPU_SCENARIOS:
        call, want = _int8_dots_case(spec, caps, lens, gen)
        out = torch.full((2, spec.num_q_heads, spec.head_dim), float("nan"))
        fn(*call, out)
        _check(f"cpu fused int8 dots {shape} {caps} {lens}", out, want, 2e-4, 2e-4)


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_int8_dots_error_is_small_next_to_quantization(bits: int) -> None:
    """What the mode costs, on keys with outlier channels (which stretch the folded query's range): the error it adds
    to the exact-query output is a fraction of the error key/value quantization already makes (relative L2;
    measured 0.167 at 4 bits, 0.042 at 2 bits, of which the uint8 probabilities add 0.002; without the
    centered-code correction of the query 0.287 and 0.099, which fail)."""
    _needs_int8_dots()
    shape = SHAPES["7b"]
    d, hq, hkv, n = shape["head_dim"], shape["num_q_heads"], shape["num_kv_heads"], 1024
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(1, hkv, n, d, generator=gen) * 2 + 0.5
    k[..., :4] *= 6
    v = torch.randn(1, hkv, n, d, generator=gen)
    q = torch.randn(1, hq, d, generator=gen) * 2
    spec = KernelSpec("fused", (bits, 16), extra=(("splits", 1), ("dot8", 1)), **shape)
    qk, qv = quant.quantize_keys(k, spec.quant(bits)), quant.quantize_values(v, spec.quant(bits))
    lens = torch.tensor([n], dtype=torch.int32)
    exact, _ = reference.attend_piece(q, k, v, lens, d**-0.5)
    deq, _ = reference.attend_piece(q, quant.dequantize_keys(qk, n), quant.dequantize_values(qv), lens, d**-0.5)
    out = torch.empty(1, hq, d)
    dense, none = torch.zeros(1, hkv, 16, d), torch.zeros(1, dtype=torch.int32)
    compiled_cpu(spec)(q, qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, lens, dense, dense, none,
                       d**-0.5, out)
    added = ((out - deq).norm() / deq.norm()).item()
    quantization = ((deq - exact).norm() / exact.norm()).item()
    assert added < {4: 0.22, 2: 0.07, 1: 0.03}[bits] * quantization, f"int8 dots add {added:.3f} (quantization error {quantization:.3f})"
