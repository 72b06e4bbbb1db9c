"""The argument description of a kernel: the one :class:`KernelSignature` of the project.

Each kernel factory (``wq_compile.kernels.signature(spec)``) describes its parameters in call order, with the
outputs marked and the size rules the TIR cannot express (token capacities in whole chunks, key groups covering
their tokens); it builds its PrimFunc from that description. A kernel without one (e.g. a test kernel) is described
by :meth:`KernelSignature.from_prim_func`, which reads the parameters off the PrimFunc (outputs = the buffers the
body stores into); :meth:`KernelSignature.check_prim_func` checks a factory's description against its PrimFunc.

Shapes keep the kernel's symbolic dimensions (token counts): :meth:`KernelSignature.bind` checks torch tensors
against the description, binds the symbols consistently across arguments, applies the size rules and raises a
:class:`KernelArgumentError` naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

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

#: A dimension: a constant, the name of a symbol, or an expression of symbols.
Dim = Any


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


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "FloorDiv": lambda a, b: a // b,
    "FloorMod": lambda a, b: a % b,
    "Div": lambda a, b: a // b,
    "Mod": lambda a, b: a % b,
    "Min": min,
    "Max": max,
}


@dataclass(frozen=True)
class ShapeExpr:
    """A dimension that is an expression of symbols, e.g. ``(n + 27) // 28``; evaluated in Python."""

    text: str
    fn: Callable[[Mapping[str, Any]], Any]
    symbols: tuple[str, ...]

    def __call__(self, env: Mapping[str, Any]) -> Any:
        return self.fn(env)

    def __repr__(self) -> str:
        return self.text


def _convert(expr: Any) -> tuple[Callable[[Mapping[str, Any]], Any], set[str]]:
    name = type(expr).__name__
    if name == "IntImm":
        value = int(expr.value)
        return (lambda env: value), set()
    if name in ("Var", "SizeVar"):
        var = str(expr.name)
        return (lambda env: env[var]), {var}
    if name in _BINOPS:
        fa, sa = _convert(expr.a)
        fb, sb = _convert(expr.b)
        op = _BINOPS[name]
        return (lambda env: op(fa(env), fb(env))), sa | sb
    if name == "Cast":
        return _convert(expr.value)
    raise TypeError(f"shape expression {expr} ({name}) is not supported")


def _dim(expr: Any) -> Dim:
    name = type(expr).__name__
    if name == "IntImm":
        return int(expr.value)
    if name in ("Var", "SizeVar"):
        return str(expr.name)
    fn, symbols = _convert(expr)
    return ShapeExpr(str(expr), fn, tuple(sorted(symbols)))


@dataclass(frozen=True)
class ArgDesc:
    """One kernel parameter: a tensor (shape of ints, symbol names and :class:`ShapeExpr`, dtype) or a scalar.

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
        return tuple(d if isinstance(d, int) else (env[d] if isinstance(d, str) else d(env)) for d in self.shape)


def _stored_buffers(node: Any, out: set[str], depth: int = 0) -> None:
    """Names of the buffers a TIR body stores into (walks the statement kinds a kernel body is made of)."""
    if node is None or depth > 400:
        return
    kind = type(node).__name__
    if kind == "BufferStore":
        out.add(str(node.buffer.name))
    if kind == "SeqStmt":
        for s in node.seq:
            _stored_buffers(s, out, depth + 1)
        return
    for attr in ("body", "block", "then_case", "else_case", "init"):
        try:
            child = getattr(node, attr)
        except AttributeError:
            continue
        if child is not None and not isinstance(child, (int, float, str)):
            _stored_buffers(child, out, depth + 1)


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
        stored: set[str] = set()
        _stored_buffers(func.body, stored)
        args = []
        for p in func.params:
            shape = getattr(p, "shape", None)
            pname = str(p.name)
            if shape is None or getattr(p, "dtype", None) is None:
                args.append(ArgDesc(pname, str(p.ty.dtype if hasattr(p.ty, "dtype") else p.ty), None))
            else:
                args.append(ArgDesc(pname, str(p.dtype), tuple(_dim(d) for d in shape), pname in stored))
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
                need = {d} if isinstance(d, str) else set(getattr(d, "symbols", ()))
                if not need <= bound:
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
        deferred: list[tuple[ArgDesc, int, Any, Any]] = []
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
            if not value.is_contiguous():
                raise self._err(desc.name, f"expected a contiguous tensor, got strides {tuple(value.stride())}")
            for axis, (dim, size) in enumerate(zip(desc.shape, value.shape)):
                if isinstance(dim, int):
                    if size != dim:
                        raise self._err(
                            desc.name, f"dim {axis} must be {dim} (shape {list(desc.shape)}), got {tuple(value.shape)}"
                        )
                elif isinstance(dim, str):
                    if dim in env and env[dim] != size:
                        raise self._err(
                            desc.name,
                            f"dim {axis} is '{dim}' = {env[dim]} from an earlier argument, got {size} "
                            f"(shape {tuple(value.shape)})",
                        )
                    env.setdefault(dim, size)
                else:
                    deferred.append((desc, axis, dim, size))
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
        for desc, axis, dim, size in deferred:
            missing = [s for s in dim.symbols if s not in env]
            if missing:
                continue
            want_size = dim(env)
            if want_size != size:
                raise self._err(desc.name, f"dim {axis} must be {dim} = {want_size}, got {size}")
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

    def example_args(
        self,
        env: Mapping[str, int],
        device: torch.device | str = "cpu",
        scalars: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> list[Any]:
        """Arguments with plausible contents (random floats, random codes, lengths = their axis) for timing."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        args: list[Any] = []
        for a in self.args:
            if a.is_scalar:
                args.append((scalars or {}).get(a.name, 0.125 if a.dtype.startswith("float") else 1))
                continue
            shape = a.shape_at(env)
            dt = torch_dtype(a.dtype)
            if dt.is_floating_point:
                t = torch.rand(shape, generator=gen, dtype=torch.float32).to(dt)
                if a.name.endswith("scale"):
                    t = t * 0.1
            elif a.name.endswith("lens"):
                # valid lengths: the token capacity (the largest chunk-aligned symbol)
                caps = [env[s] for s, _ in self.multiple_of if s in env] or list(env.values()) or [1]
                fill = max(caps)
                t = torch.full(shape, int(fill), dtype=dt)
            else:
                t = torch.randint(0, 2**30, shape, generator=gen, dtype=torch.int64).to(dt)
            args.append(t.to(device))
        return args
