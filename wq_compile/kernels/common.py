"""Shared pieces of the kernel factories: argument descriptions, symbolic sizes, TIR math helpers.

Every factory returns a ``tvm.tirx.PrimFunc`` whose ``global_symbol`` is ``spec.uri``; its argument list is
described by a :class:`KernelSignature` so the runtime can check torch tensors before calling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm import tirx

#: Score of a masked token before the max; finite so that ``m_old - m_new`` never is ``-inf - -inf``.
NEG_BIG = -1.0e30

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}


@dataclass(frozen=True)
class ArgSpec:
    """One kernel argument: a tensor (``shape`` of ints and symbol names) or a scalar (``shape == ()``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # TVM dtype string: "float32", "float16", "int32", ...
    is_scalar: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.dtype]


@dataclass(frozen=True)
class KernelSignature:
    """The argument list of one kernel, in call order.

    ``multiple_of`` lists ``(symbol, k)``: that size must be a multiple of ``k`` (token capacities are whole
    chunks; quantize blocks are whole key groups). ``at_least`` lists ``(symbol, other, factor)``:
    ``symbol * factor >= other`` (key groups cover every stored token); ``groups`` the same with ``==``.
    """

    name: str
    args: tuple[ArgSpec, ...]
    multiple_of: tuple[tuple[str, int], ...] = ()
    at_least: tuple[tuple[str, str, int], ...] = ()
    groups: tuple[tuple[str, str, int], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def bind(self, *values: object) -> dict[str, int]:
        """Check ``values`` (torch tensors / python scalars, in order); return the symbol sizes. Raises on mismatch."""
        if len(values) != len(self.args):
            raise TypeError(f"{self.name}: expected {len(self.args)} arguments {self.names}, got {len(values)}")
        sizes: dict[str, int] = {}
        for arg, val in zip(self.args, values):
            if arg.is_scalar:
                if not isinstance(val, (int, float)) or isinstance(val, bool):
                    raise TypeError(f"{self.name}: {arg.name} must be a python number, got {type(val).__name__}")
                continue
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"{self.name}: {arg.name} must be a torch.Tensor, got {type(val).__name__}")
            if val.dtype != arg.torch_dtype:
                raise TypeError(f"{self.name}: {arg.name} must be {arg.torch_dtype}, got {val.dtype}")
            if not val.is_contiguous():
                raise ValueError(f"{self.name}: {arg.name} must be contiguous")
            if val.dim() != len(arg.shape):
                raise ValueError(f"{self.name}: {arg.name} must have shape {arg.shape}, got {tuple(val.shape)}")
            for axis, (want, got) in enumerate(zip(arg.shape, val.shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ValueError(f"{self.name}: {arg.name} dim {axis} must be {want}, got {got}")
                elif sizes.setdefault(want, got) != got:
                    raise ValueError(
                        f"{self.name}: {arg.name} dim {axis} ({want}) is {got}, but another argument set it to {sizes[want]}"
                    )
        for sym, k in self.multiple_of:
            if sizes[sym] % k or sizes[sym] == 0:
                # zero-size torch tensors do not have the compact strides TVM checks: pass one chunk with lens 0
                raise ValueError(f"{self.name}: size {sym}={sizes[sym]} must be a positive multiple of {k}")
        for sym, other, factor in self.at_least:
            if sizes[sym] * factor < sizes[other]:
                raise ValueError(f"{self.name}: {sym}={sizes[sym]} groups of {factor} do not cover {other}={sizes[other]}")
        for sym, other, factor in self.groups:
            if sizes[sym] * factor != sizes[other]:
                raise ValueError(f"{self.name}: {sym}={sizes[sym]} groups of {factor} must equal {other}={sizes[other]}")
        return sizes


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
