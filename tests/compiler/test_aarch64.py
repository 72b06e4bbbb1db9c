"""aarch64 kernels, built here (cross-compiled; running them needs an ARM machine): the CPU fused kernel and the
quantize kernel compile for a NEON target (neoverse-n1) and an SVE one (neoverse-v1 with +sve), and LLVM's
assembly has vector loads and vector multiply-adds in the main loops (no scalar fallback); the x86-intrinsic
variants are refused with a clear error before LLVM (which would abort the process)."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import replace

import pytest

pytest.importorskip("tvm")

from wq_compile.compiler.build import build_kernel  # noqa: E402
from wq_compile.compiler.device import resolve_device  # noqa: E402
from wq_compile.kernels.catalog import kernel_specs  # noqa: E402
from wq_compile.kernels.knobs import with_knobs  # noqa: E402

TARGETS = {
    "aarch64-neon": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1", "num-cores": 2},
    "aarch64-sve": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1", "mattr": ["+sve"],
                    "num-cores": 2},
}
#: A NEON / SVE vector register operand: v0.4s, q0, { v0.s }, z0.s.
_VEC = re.compile(r"\bv\d+\.(?:16b|8b|8h|4h|4s|2s|2d|b|h|s|d)\b|\bq\d+\b|\bz\d+\.")
_LOADS = ("ldr", "ldp", "ldur", "ld1", "ld1r", "ld1b", "ld1w", "ld1rw")


def op_counts(asm: str) -> Counter:
    """(mnemonic, uses a vector register) -> count, over every instruction line of LLVM's assembly."""
    out: Counter = Counter()
    for line in asm.splitlines():
        m = re.match(r"\s+([a-z][a-z0-9.]*)\s+(.*)", line)
        if m and not m.group(1).startswith("."):
            out[(m.group(1), bool(_VEC.search(m.group(2))))] += 1
    return out


def vector_loads(ops: Counter) -> int:
    return sum(ops[(op, True)] for op in _LOADS)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def arm(request):
    """(device, {kind: op counts}) of the 0.5B shapes' fused kernel (8/4/2 bits + dense) and 4-bit quantizer."""
    device = resolve_device(TARGETS[request.param])
    assert device.isa == request.param
    specs = kernel_specs("llava-ov-0.5b", bits=(2, 4, 8), kinds=("fused", "quantize"))
    fused = specs[0]
    quant = next(s for s in specs if s.kind == "quantize" and s.bits == (4,))
    counts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untuned: no aarch64 logs are shipped
        for spec in (fused, quant):
            built = build_kernel(spec, device, logs_dir=None)
            counts[spec.kind] = op_counts(built.module.inspect_source("asm"))
    return device, counts, fused


def test_fused_kernel_is_vector_code_on_aarch64(arm):
    _, counts, _ = arm
    ops = counts["fused"]
    fmla_vec, fmla_scalar = ops[("fmla", True)], ops[("fmla", False)] + ops[("fmadd", False)]
    # QK and P @ V are vector FMAs over 4-lane fp32 registers; scalar FMAs are the per-head softmax / merge tails
    assert fmla_vec >= 500 and fmla_scalar * 4 < fmla_vec, (fmla_vec, fmla_scalar)
    assert vector_loads(ops) >= 500, vector_loads(ops)
    # the packed codes are widened and converted as vectors (ushll / ucvtf on v registers)
    assert ops[("ucvtf", True)] > 0 and ops[("ucvtf", False)] == 0


def test_quantize_kernel_is_vector_code_on_aarch64(arm):
    _, counts, _ = arm
    ops = counts["quantize"]
    # min/max over a group, the scaling and the rounding to codes run on vectors (LLVM picks fminnm or a
    # negated fmaxnm, fdiv or fmul, per target: counted together)
    minmax = sum(ops[(op, True)] for op in ("fmaxnm", "fminnm", "fmax", "fmin"))
    to_int = (ops[("fcvtzu", True)] + ops[("fcvtzs", True)], ops[("fcvtzu", False)] + ops[("fcvtzs", False)])
    scale = (ops[("fdiv", True)] + ops[("fmul", True)], ops[("fdiv", False)] + ops[("fmul", False)])
    assert minmax >= 16 and to_int[0] >= 8 and to_int[1] < to_int[0] and scale[1] < scale[0], (minmax, to_int, scale)
    assert vector_loads(ops) >= 20, vector_loads(ops)


def test_x86_variants_are_refused_before_llvm_on_aarch64(arm):
    device, _, fused = arm
    with pytest.raises(ValueError, match="lut=1 is built from x86 intrinsics"):
        build_kernel(with_knobs(fused, {"lut": 1}), device, logs_dir=None)
    with pytest.raises(ValueError, match="dot8=1 is built from x86 intrinsics"):
        build_kernel(replace(fused, extra=fused.extra + (("dot8", 1),)), device, logs_dir=None)
