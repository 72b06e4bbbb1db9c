"""Shared pieces of the kernel factories: TIR math helpers.

Every factory returns a ``tvm.tirx.PrimFunc`` whose ``global_symbol`` is ``spec.uri``, built from its argument
description (:class:`wq_compile.kernels.signature.KernelSignature`, the one the runtime checks torch tensors with).
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


# ----------------------------------------------------------------------------------------------------------------
# Emitters shared by the block-style factories (attention, split_decode, token_granular). They are pure functions
# called inside an ``IRBuilder`` prim_func frame; each emits TIR and returns what it declared.
# ----------------------------------------------------------------------------------------------------------------

#: One kernel parameter for :func:`declare_params`: ``(name, shape or None for a scalar, dtype)``; shape entries
#: are ints or symbol names (one ``int32`` variable per distinct name).
Param = tuple


def declare_params(params, syms: dict | None = None) -> tuple[dict, dict]:
    """Declare the function parameters in order: ``(buffers and scalar vars by name, symbols by name)``."""
    from tvm.script.ir_builder import tirx as T

    syms = {} if syms is None else syms

    def dim(x):
        return x if isinstance(x, int) else syms.setdefault(x, tirx.Var(x, "int32"))

    bufs: dict = {}
    for name, shape, dtype in params:
        if shape is None:
            bufs[name] = T.arg(name, tirx.Var(name, dtype))
        else:
            bufs[name] = T.arg(name, T.buffer(tuple(dim(s) for s in shape), dtype))
    return bufs, syms


def signature_params(sig) -> list[Param]:
    """:func:`declare_params` entries of a :class:`~wq_compile.kernels.signature.KernelSignature`."""
    return arg_params(sig.args)


def arg_params(args) -> list[Param]:
    """:func:`declare_params` entries of signature arguments (``ArgDesc``: scalars have no shape)."""
    return [(a.name, None if a.is_scalar else a.shape, a.dtype) for a in args]


def alloc(name: str, shape, dtype: str = "float32"):
    """An intermediate buffer of the root block (``T.sblock_alloc_buffer``: declared at the top level it would
    look like an output and ``compute_at`` fails, see docs/TVM_NOTES.md)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    return IRBuilder.name(name, T.sblock_alloc_buffer(shape, dtype))


def online_merge(m_old, l_old, m_new_part, l_new_part, exp=fast_exp):
    """The online-softmax step of a running state ``(m, l)`` with a chunk's ``(m_c, l_c)``:
    ``(m', alpha, beta, l')`` with ``m' = max(m, m_c)``, ``alpha = e^(m - m')``, ``beta = e^(m_c - m')``,
    ``l' = l alpha + l_c beta``; the caller scales ``acc' = acc alpha + acc_c beta``. Plain expression trees
    (no Let: MetaSchedule's FLOP estimator rejects them), so each use gets fresh subtrees."""
    m_new = tirx.max(m_old, m_new_part)
    alpha = exp(m_old - m_new)
    beta = exp(m_new_part - m_new)
    return m_new, alpha, beta, l_old * alpha + l_new_part * beta


def emit_state_update(name: str, axes, m, l, acc, chunk_m, chunk_l, chunk_acc, head_dim: int,
                      per_channel: bool = False) -> None:
    """The block that merges a chunk into the running ``(m, l, acc)`` state: a reduction over chunks (init:
    ``m = NEG_BIG, l = 0, acc = 0``), the only writer of the state.

    ``axes()`` declares the block's iter vars (the chunk one a reduction) and returns ``(row, dd)``: ``row`` indexes
    ``m``/``l`` and, with one more channel index, ``acc``; ``chunk_m(row)``, ``chunk_l(row)`` and
    ``chunk_acc(row, dd)`` read the chunk's statistics. ``per_channel=False``: one block instance per row, channels in
    a serial loop of ``head_dim`` inside it (``dd`` is ignored). ``per_channel=True``: one instance per (row,
    channel ``dd``), each with its own copy of ``m`` and ``l`` (indexed ``row + (dd,)``): no instance reads what
    another writes, so the channels can be spread over threads and the state stays in their registers.
    """
    from tvm.script.ir_builder import tirx as T

    with T.sblock(name):
        row, dd = axes()
        row = tuple(row)
        mrow = row + (dd,) if per_channel else row
        with T.init():
            T.buffer_store(m, f32(NEG_BIG), list(mrow))
            T.buffer_store(l, f32(0.0), list(mrow))
            if per_channel:
                T.buffer_store(acc, f32(0.0), [*row, dd])
            else:
                with T.serial(0, head_dim) as c:
                    T.buffer_store(acc, f32(0.0), [*row, c])

        def step():
            return online_merge(m[mrow], l[mrow], chunk_m(row), chunk_l(row))

        if per_channel:
            _, alpha, beta, _ = step()
            T.buffer_store(acc, acc[(*row, dd)] * alpha + chunk_acc(row, dd) * beta, [*row, dd])
        else:
            with T.serial(0, head_dim) as c:
                _, alpha, beta, _ = step()
                T.buffer_store(acc, acc[(*row, c)] * alpha + chunk_acc(row, c) * beta, [*row, c])
        m_new, _, _, l_new = step()
        T.buffer_store(l, l_new, list(mrow))
        T.buffer_store(m, m_new, list(mrow))
