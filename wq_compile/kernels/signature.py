"""The argument description of a kernel: the one :class:`KernelSignature` of the project.

Each kernel factory (``wq_compile.kernels.signature(spec)``) describes its parameters in call order, with the
outputs marked and the size rules the TIR cannot express (token capacities in whole chunks, key groups covering
their tokens); it builds its PrimFunc from that description, and the runtime reads a bucket's tensors in that order
by argument name. :meth:`KernelSignature.check_prim_func` checks a description against the PrimFunc (parameters
read by :meth:`KernelSignature.from_prim_func`: dimensions are constants or symbols, outputs the stored buffers).

Shapes keep the kernel's symbolic dimensions (token counts): :meth:`KernelSignature.bind` checks torch tensors
against the description, binds the symbols consistently across arguments, applies the size rules and raises a
:class:`KernelArgumentError` naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}

#: A dimension: a constant or the name of a symbol.
Dim = int | str


#: Elements a kernel argument may have: TVM indexes buffers of ``int32`` shapes with 32-bit arithmetic (the
#: generated CUDA computes e.g. ``((int)blockIdx.x * N16) * 128``); every offset is a sum of non-negative terms no
#: larger than the flat offset of an element, so a tensor of at most 2^31 - 1 elements cannot overflow it. 7B dense
#: K at batch x tokens >= 4,194,304 is the first to reach it (issue 21); it is refused, not silently wrapped.
MAX_INDEXED_ELEMENTS = 2**31 - 1


class KernelArgumentError(TypeError, ValueError):
    """A kernel was called with an argument that does not match its description (message names the argument).

    Both a ``TypeError`` (wrong type, dtype or number of arguments) and a ``ValueError`` (wrong shape or size), so
    callers catching either kind keep working.
    """


def torch_dtype(tvm_dtype: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[str(tvm_dtype)]
    except KeyError:
        raise TypeError(f"dtype: TVM dtype {tvm_dtype!r} has no torch equivalent") from None


@dataclass(frozen=True)
class ArgDesc:
    """One kernel parameter: a tensor (shape of ints and symbol names, dtype) or a scalar.

    Kernel factories build these with :meth:`tensor` / :meth:`scalar`; :meth:`KernelSignature.from_prim_func`
    reads them off a compiled function. ``dtype`` is a TVM dtype string (``"float32"``, ``"int32"``, ...).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None  # None for scalars
    is_output: bool = False

    @classmethod
    def tensor(cls, name: str, shape: Sequence[Dim], dtype: str, *, output: bool = False) -> "ArgDesc":
        return cls(name, str(dtype), tuple(shape), output)

    @classmethod
    def scalar(cls, name: str, dtype: str) -> "ArgDesc":
        return cls(name, str(dtype), None)

    @property
    def is_scalar(self) -> bool:
        return self.shape is None

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def shape_at(self, env: Mapping[str, Any]) -> tuple[Any, ...]:
        assert self.shape is not None
        return tuple(d if isinstance(d, int) else env[d] for d in self.shape)


def _stored_buffers(func: Any) -> set[str]:
    """Names of the buffers a PrimFunc's body stores into (its outputs)."""
    from tvm import tirx

    out: set[str] = set()
    stack = [func.body]
    while stack:  # every statement kind a kernel body is made of nests through these fields
        node = stack.pop()
        if isinstance(node, tirx.BufferStore):
            out.add(str(node.buffer.name))
        if isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
            continue
        for attr in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(node, attr, None)
            if isinstance(child, tirx.Stmt):
                stack.append(child)
    return out


def _dim(expr: Any, pname: str) -> Dim:
    from tvm import tirx

    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        return str(expr.name)
    raise ValueError(f"parameter '{pname}': dimension {expr} is an expression; describe the kernel's arguments "
                     "with ArgDesc (symbols and constants only)")


@dataclass(frozen=True)
class KernelSignature:
    """Parameters of a kernel in call order, with symbolic shapes, the outputs marked and the size rules."""

    name: str
    args: tuple[ArgDesc, ...]
    #: ``(symbol, k)``: the size must be a multiple of ``k`` (token capacities are whole chunks).
    multiple_of: tuple[tuple[str, int], ...] = ()
    #: ``(symbol, other, factor)``: ``symbol * factor >= other`` (key groups cover every stored token).
    at_least: tuple[tuple[str, str, int], ...] = ()
    #: ``(symbol, other, factor)``: ``symbol * factor == other`` exactly (derivable when ``other`` is bound).
    groups: tuple[tuple[str, str, int], ...] = ()

    def default_sizes(self, n_tokens: int, batch: int = 1) -> dict[str, int]:
        """Symbol values for tuning and timing: batch ``B``, token capacities ``n_tokens`` rounded up to their
        multiple, group counts just covering their tokens, anything else ``n_tokens``."""
        sizes: dict[str, int] = {}
        mult = dict(self.multiple_of)
        for s in self.symbols:
            if s == "B":
                sizes[s] = batch
            else:
                k = mult.get(s, 1)
                sizes[s] = -(-n_tokens // k) * k
        for s, other, factor in self.at_least + self.groups:
            if s in sizes and other in sizes:
                sizes[s] = -(-sizes[other] // factor)
        return sizes

    @classmethod
    def from_prim_func(cls, func: Any, name: str | None = None) -> "KernelSignature":
        """The parameters of ``func`` (no size rules: the PrimFunc does not carry them)."""
        stored = _stored_buffers(func)
        args = []
        for p in func.params:
            shape = getattr(p, "shape", None)
            pname = str(p.name)
            if shape is None or getattr(p, "dtype", None) is None:
                args.append(ArgDesc(pname, str(p.ty.dtype if hasattr(p.ty, "dtype") else p.ty), None))
            else:
                args.append(ArgDesc(pname, str(p.dtype), tuple(_dim(d, pname) for d in shape), pname in stored))
        if not any(a.is_output for a in args):
            raise ValueError(f"{name or 'kernel'}: no parameter is written by the kernel; cannot tell outputs apart")
        gsym = func.attrs["global_symbol"] if func.attrs is not None and "global_symbol" in func.attrs else None
        return cls(str(name or gsym or "kernel"), tuple(args))

    def check_prim_func(self, func: Any) -> "KernelSignature":
        """Raise ``ValueError`` unless ``func``'s parameters are exactly these (names, dtypes, shapes, outputs);
        return ``self`` (the description, with its size rules)."""
        read = KernelSignature.from_prim_func(func, self.name).args
        if len(read) != len(self.args):
            raise ValueError(
                f"{self.name}: the description lists {len(self.args)} parameters {self.names}, the PrimFunc has "
                f"{len(read)} {tuple(a.name for a in read)}"
            )
        for want, got in zip(self.args, read):
            if want != got:
                raise ValueError(f"{self.name}: parameter '{want.name}' is described as {want}, the PrimFunc has {got}")
        return self

    # ---- views ---------------------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def inputs(self) -> tuple[ArgDesc, ...]:
        return tuple(a for a in self.args if not a.is_output)

    @property
    def outputs(self) -> tuple[ArgDesc, ...]:
        return tuple(a for a in self.args if a.is_output)

    @property
    def symbols(self) -> tuple[str, ...]:
        """Free symbols (symbolic dimensions that appear bare in some shape), in first-use order."""
        seen: list[str] = []
        for a in self.args:
            for d in a.shape or ():
                if isinstance(d, str) and d not in seen:
                    seen.append(d)
        return tuple(seen)

    def output_symbols_bound_by_inputs(self) -> bool:
        bound = {d for a in self.inputs for d in (a.shape or ()) if isinstance(d, str)}
        bound |= {s for s, other, _ in self.groups if other in bound}
        for a in self.outputs:
            for d in a.shape or ():
                if isinstance(d, str) and d not in bound:
                    return False
        return True

    # ---- checking ------------------------------------------------------------------------------------------------
    @staticmethod
    def _arg_of(symbol: str, descs: Sequence[ArgDesc]) -> str:
        for d in descs:
            if symbol in (d.shape or ()):
                return d.name
        return symbol

    def _err(self, arg: str, msg: str) -> KernelArgumentError:
        return KernelArgumentError(f"{self.name}: argument '{arg}': {msg}")

    def bind(self, *values: Any, inputs_only: bool = False, device_type: str | None = None) -> dict[str, Any]:
        """Check ``values`` (torch tensors / Python numbers in call order: every parameter, or only the inputs when
        ``inputs_only``) and return the symbol values. ``device_type`` (``"cpu"``, ``"cuda"``) checks where the
        tensors live. Raises :class:`KernelArgumentError` naming the argument."""
        descs = self.inputs if inputs_only else self.args
        if len(values) != len(descs):
            names = ", ".join(d.name for d in descs)
            raise KernelArgumentError(f"{self.name}: expected {len(descs)} arguments ({names}), got {len(values)}")
        env: dict[str, Any] = {}
        for desc, value in zip(descs, values):
            if desc.is_scalar:
                if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise self._err(desc.name, f"expected a Python number ({desc.dtype}), got {type(value).__name__}")
                if desc.dtype.startswith("int") and not isinstance(value, int):
                    raise self._err(desc.name, f"expected an int ({desc.dtype}), got {value!r}")
                continue
            if not isinstance(value, torch.Tensor):
                raise self._err(desc.name, f"expected a torch.Tensor, got {type(value).__name__}")
            want = torch_dtype(desc.dtype)
            if value.dtype != want:
                raise self._err(desc.name, f"expected dtype {want}, got {value.dtype}")
            assert desc.shape is not None
            if value.dim() != len(desc.shape):
                raise self._err(
                    desc.name, f"expected {len(desc.shape)} dims {list(desc.shape)}, got shape {tuple(value.shape)}"
                )
            if device_type is not None and value.device.type != device_type:
                raise self._err(desc.name, f"expected a tensor on {device_type}, got one on {value.device}")
            if value.numel() > MAX_INDEXED_ELEMENTS:  # before the contiguity check: the size is the cause
                raise self._err(desc.name, f"{value.numel():,} elements (shape {tuple(value.shape)}) exceed the "
                                f"{MAX_INDEXED_ELEMENTS:,} the kernels' 32-bit offsets address; use a smaller batch "
                                f"or fewer tokens per call")
            if not value.is_contiguous():
                raise self._err(desc.name, f"expected a contiguous tensor, got strides {tuple(value.stride())}")
            for axis, (dim, size) in enumerate(zip(desc.shape, value.shape)):
                if isinstance(dim, int):
                    if size != dim:
                        raise self._err(
                            desc.name, f"dim {axis} must be {dim} (shape {list(desc.shape)}), got {tuple(value.shape)}"
                        )
                else:
                    if dim in env and env[dim] != size:
                        raise self._err(
                            desc.name,
                            f"dim {axis} is '{dim}' = {env[dim]} from an earlier argument, got {size} "
                            f"(shape {tuple(value.shape)})",
                        )
                    env.setdefault(dim, size)
        for sym, k in self.multiple_of:
            if sym in env and (env[sym] % k or env[sym] == 0):
                # zero-size torch tensors lack the compact strides TVM checks: pass one chunk with lens 0 instead
                raise self._err(self._arg_of(sym, descs), f"size {sym}={env[sym]} must be a positive multiple of {k}")
        for sym, other, factor in self.at_least:
            if sym in env and other in env and env[sym] * factor < env[other]:
                raise self._err(
                    self._arg_of(sym, descs),
                    f"{sym}={env[sym]} groups of {factor} tokens do not cover {other}={env[other]} tokens",
                )
        for sym, other, factor in self.groups:
            if other in env:
                if sym not in env:
                    env[sym] = env[other] // factor
                elif env[sym] * factor != env[other]:
                    raise self._err(
                        self._arg_of(sym, descs),
                        f"{sym}={env[sym]} groups of {factor} tokens must exactly cover {other}={env[other]} tokens",
                    )
        return env

    # ---- allocation ----------------------------------------------------------------------------------------------
    def allocate_outputs(self, env: Mapping[str, Any], device: torch.device | str) -> list[torch.Tensor]:
        return [torch.empty(a.shape_at(env), dtype=torch_dtype(a.dtype), device=device) for a in self.outputs]

    def nbytes(self, env: Mapping[str, Any], which: str = "inputs") -> int:
        """Bytes of the input (or output) tensors at the symbol values ``env``."""
        descs = self.inputs if which == "inputs" else self.outputs
        total = 0
        for a in descs:
            if a.shape is None:
                continue
            total += math.prod(a.shape_at(env)) * torch.empty((), dtype=torch_dtype(a.dtype)).element_size()
        return total
