"""Shared pieces of the kernel factories: TIR math helpers.

Every factory returns a ``tvm.tirx.PrimFunc`` whose ``global_symbol`` is ``spec.uri``, built from its argument
description (:class:`wq_compile.signature.KernelSignature`, the one the runtime checks torch tensors with).
"""

from __future__ import annotations

from tvm import tirx

#: Score of a masked token before the max; finite so that ``m_old - m_new`` never is ``-inf - -inf``.
NEG_BIG = -1.0e30


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for fp32 as a vectorizable polynomial (relative error ~2e-7); exactly 0 below -87.

    ``T.exp`` becomes a scalar libm call on llvm, which blocks vectorization of the softmax.
    """
    f32 = "float32"
    # Plain expression trees (no Let: MetaSchedule's FLOP estimator rejects prim.Let); codegen CSE merges repeats.
    xc = tirx.max(tirx.min(x, tirx.const(88.0, f32)), tirx.const(-87.0, f32))
    n = tirx.floor(xc * tirx.const(1.4426950408889634, f32) + tirx.const(0.5, f32))
    r = xc - n * tirx.const(0.693145751953125, f32) - n * tirx.const(1.428606765330187e-06, f32)
    # Taylor series of exp on |r| <= ln2/2, degree 7 (truncation < 1e-8 relative), Horner form.
    coeffs = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
    poly = tirx.const(coeffs[0], f32)
    for c in coeffs[1:]:
        poly = poly * r + tirx.const(c, f32)
    two_n = tirx.reinterpret(f32, tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32")))
    return tirx.Select(x < tirx.const(-87.0, f32), tirx.const(0.0, f32), poly * two_n)


def f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")
