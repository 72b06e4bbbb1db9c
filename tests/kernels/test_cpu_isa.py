"""The CPU fused kernel written for the AVX2 class (kernels/cpu_isa.py, compiler/isa_variants.cpu_isa): 8 fp32
lanes, register tiles for 16 ymm registers, int8 dots by ``vpmaddubsw`` + ``vpmaddwd``. Built for haswell and run
here (an AVX-512 host runs AVX2 code) against the references; LLVM's assembly is checked for ymm FMAs and the int8
instructions, with no zmm and no scalar fallback. AVX-VNNI (alderlake) is built only: its assembly is checked for
``vpdpbusd`` on ymm (this host may lack the instruction)."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import replace

import pytest
import torch

pytest.importorskip("tvm")

from wq_compile.compiler.build import build_kernel  # noqa: E402
from wq_compile.compiler.device import Device, host_device, resolve_device  # noqa: E402
from wq_compile.compiler.isa_variants import cpu_isa, int8_dot_flavour  # noqa: E402
from wq_compile.core.spec import KernelSpec  # noqa: E402
from wq_compile.kernels import make_kernel  # noqa: E402
from wq_compile.kernels.cpu_isa import AVX2, AVX512, CpuIsa  # noqa: E402
from wq_testing import CPU_SCENARIOS, check_close, fused_case, int8_dots_case  # noqa: E402

HASWELL = {"kind": "llvm", "mcpu": "haswell", "mtriple": "x86_64-linux-gnu", "num-cores": 2}
ALDERLAKE = {"kind": "llvm", "mcpu": "alderlake", "mtriple": "x86_64-linux-gnu", "num-cores": 2}
SHAPE = dict(head_dim=64, num_q_heads=14, num_kv_heads=2)  # llava-ov-0.5b
SM_SCALE = 0.125
_OP = re.compile(r"\s+(?:\{[a-z]+\}\s+)?([a-z][a-z0-9]*)\s+(.*)")  # "{vex} vpdpbusd ...": AVX-VNNI's form


def op_counts(asm: str) -> Counter:
    """(mnemonic, widest vector register it names: "zmm" / "ymm" / "xmm" / "") -> count, over LLVM's assembly."""
    out: Counter = Counter()
    for line in asm.splitlines():
        m = _OP.match(line)
        if m and not m.group(1).startswith("."):
            ops = m.group(2)
            width = next((w for w in ("zmm", "ymm", "xmm") if f"%{w}" in ops), "")
            out[(m.group(1), width)] += 1
    return out


def count(ops: Counter, pattern: str, width: str | None = None) -> int:
    rx = re.compile(pattern)
    return sum(n for (op, w), n in ops.items() if rx.fullmatch(op) and (width is None or w == width))


def _host_runs_avx2() -> None:
    host = host_device()
    if not host.isa.startswith("x86_64-avx") or not host.has_features("avx2"):
        pytest.skip(f"running AVX2 code needs an x86-64 host with AVX2 ({host.isa})")


@pytest.fixture(scope="module")
def haswell():
    """The 0.5B fused kernel (8/4/2 bits + dense) built for haswell, exact and with int8 dots: (device, {mode:
    (module function, op counts)})."""
    device = resolve_device(HASWELL)
    assert device.isa == "x86_64-avx2" and cpu_isa(device) == AVX2
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untuned: logs_dir=None
        for mode, extra in (("exact", ()), ("dots", (("dot8", 1),))):
            spec = KernelSpec("fused", (8, 4, 2, 16), extra=extra, **SHAPE)
            k = build_kernel(spec, device, logs_dir=None)
            built[mode] = (spec, k.module.get_function(spec.uri), op_counts(k.module.inspect_source("asm")))
    return device, built


def test_avx2_exact_kernel_is_ymm_code_without_scalar_fallback(haswell):
    _, built = haswell
    ops = built["exact"][2]
    assert count(ops, r".*", "zmm") == 0  # nothing wider than the target's registers
    fma_ymm, fma_scalar = count(ops, r"vfn?madd\d+ps", "ymm"), count(ops, r"vfn?madd\d+ss")
    # QK and P @ V are ymm FMAs (8 lanes); the scalar FMAs are the per-head softmax / merge tails' exp polynomials
    # (146 here, as many as in the AVX-512 build: none comes from a scalarized vector loop)
    assert fma_ymm >= 600 and fma_scalar * 5 < fma_ymm, (fma_ymm, fma_scalar)
    # the packed codes are widened and converted as vectors, never one element at a time (one scalar conversion in
    # the whole function, as in the AVX-512 build)
    assert count(ops, r"vcvtdq2ps", "ymm") >= 32 and count(ops, r"vpmovzxbd", "ymm") >= 16
    assert count(ops, r"vcvtsi2ssl?") <= 1
    # lane extracts: at most one per token slot of a key group and width (the per-slot value scale/zero addresses,
    # 3 widths x 32 slots; 94 here and in the AVX-512 build), none per channel or token
    assert count(ops, r"vpextr[bwdq]") + count(ops, r"vpinsr[bwdq]") <= 3 * 32, ops


def test_avx2_int8_dots_use_pmaddubsw_and_pmaddwd(haswell):
    _, built = haswell
    ops = built["dots"][2]
    assert count(ops, r".*", "zmm") == 0 and count(ops, r"vpdpbusd") == 0
    madd, wd = count(ops, r"vpmaddubsw", "ymm"), count(ops, r"vpmaddwd", "ymm")
    # QK: 4 slot vectors per head and 4 channels; P @ V: fields per head and 4 tokens (4- and 2-bit buckets)
    assert madd >= 40 and wd >= madd, (madd, wd)


@pytest.mark.parametrize("mode", ["exact", "dots"])
def test_avx2_kernel_matches_its_reference(haswell, mode):
    """Exact: against the fp32 reference over the dequantized cache; int8 dots: against the mode's torch emulation
    (the same query / probability rounding; vpmaddubsw's int16 pair sums never saturate with 4-bit codes), 4- and
    2-bit buckets, irregular lengths, empty buckets."""
    _host_runs_avx2()
    _, built = haswell
    spec, fn, _ = built[mode]
    case, tol = (fused_case, (1e-4, 1e-4)) if mode == "exact" else (int8_dots_case, (2e-4, 2e-4))
    gen = torch.Generator().manual_seed(17)
    for caps, lens in CPU_SCENARIOS:
        call, want = case(spec, caps, lens, gen, SM_SCALE)
        out = torch.full((2, spec.num_q_heads, spec.head_dim), float("nan"))
        fn(*call, out)
        check_close(f"haswell {mode} {caps} {lens}", out, want, *tol)


def test_avx_vnni_target_uses_vpdpbusd_on_ymm():
    """alderlake (AVX2 class with AVX-VNNI): the int8 dots are ``vpdpbusd`` on ymm (VEX), not the AVX2 pair; where
    this host has AVX-VNNI too (Sapphire Rapids does) the kernel also runs against the emulation."""
    device = resolve_device(ALDERLAKE)
    assert device.isa == "x86_64-avx2" and cpu_isa(device) == CpuIsa(8, 16, "avxvnni", scalef=False)
    spec = KernelSpec("fused", (8, 4, 2, 16), extra=(("dot8", 1),), **SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = build_kernel(spec, device, logs_dir=None).module
    ops = op_counts(module.inspect_source("asm"))
    assert count(ops, r"vpdpbusd", "ymm") >= 16 and count(ops, r"vpmaddubsw") == 0, ops
    assert count(ops, r".*", "zmm") == 0
    if not host_device().has_features("avxvnni"):
        return  # built only: this host cannot run VEX vpdpbusd
    gen = torch.Generator().manual_seed(19)
    for caps, lens in CPU_SCENARIOS[:2]:
        call, want = int8_dots_case(spec, caps, lens, gen, SM_SCALE)
        out = torch.full((2, spec.num_q_heads, spec.head_dim), float("nan"))
        module.get_function(spec.uri)(*call, out)
        check_close(f"alderlake dots {caps} {lens}", out, want, 2e-4, 2e-4)


@pytest.mark.parametrize("mcpu,flavour", [("sapphirerapids", "vnni512"), ("skylake-avx512", None),
                                          ("haswell", "maddubs"), ("znver3", "maddubs"), ("alderlake", "avxvnni")])
def test_vector_unit_and_int8_flavour_follow_the_target(mcpu, flavour):
    """From the target's features, and the same from a device's recorded facts (the light path, no TVM target)."""
    dev = resolve_device({"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu", "num-cores": 2})
    light = Device.from_facts(dev.facts())
    assert int8_dot_flavour(dev) == int8_dot_flavour(light) == flavour and light.built_target is None
    assert cpu_isa(dev).lanes == (8 if dev.isa == "x86_64-avx2" else 16)
    assert cpu_isa(dev).scalef == (dev.isa == "x86_64-avx512")


def test_vscalefps_only_where_the_target_has_it():
    """The softmax's exp by vscalefps (AVX-512) in the fused and multi-token kernels built for AVX-512, never in
    those built for AVX2 or another ISA's 16-lane form (LLVM cannot select the instruction there)."""
    fused, multi = KernelSpec("fused", (4, 16), **SHAPE), KernelSpec("multi", (4, 16), **SHAPE)
    assert "scalef" in make_kernel(fused, "llvm", AVX512).script()
    assert "scalef" in make_kernel(multi, "llvm", None).script()
    for cpu in (AVX2, replace(AVX512, dot=None, scalef=False)):
        assert "scalef" not in make_kernel(fused, "llvm", cpu).script()
        assert "scalef" not in make_kernel(multi, "llvm", cpu).script()


def test_vector_unit_is_checked():
    for bad in (dict(lanes=4), dict(lanes=8, dot="vnni512"), dict(lanes=16, dot="maddubs"), dict(dot="amx"),
                dict(vector_regs=4), dict(lanes=8, dot=None, scalef=True)):
        with pytest.raises(ValueError):
            CpuIsa(**bad)
    spec = KernelSpec("fused", (4, 16), extra=(("dot8", 1),), **SHAPE)
    with pytest.raises(ValueError, match="dot8=1 needs int8 dot-product instructions"):
        make_kernel(spec, "llvm", replace(AVX512, dot=None))
    # register tiles: every head of a qwen2 group in one pass on AVX-512, passes of what 16 ymm registers hold on AVX2
    assert AVX512.heads_per_pass(7, 2, 3) == 7 and AVX2.heads_per_pass(7, 4, 5) == 2
    assert AVX2.heads_per_pass(7, 2, 2) == 4  # 6 fit: two balanced passes of 4 and 3


def test_host_facts_are_keyed_on_the_checked_features(monkeypatch):
    """Facts recorded before a feature joined CHECKED_FEATURES must not be found (they would read it as absent and
    refuse int8 dots on an AVX2 host): the list is part of the host fingerprint."""
    from wq_compile.compiler import device as device_mod

    before = device_mod.host_fingerprint(2)
    monkeypatch.setattr(device_mod, "CHECKED_FEATURES", device_mod.CHECKED_FEATURES[:-1])
    assert device_mod.host_fingerprint(2) != before
