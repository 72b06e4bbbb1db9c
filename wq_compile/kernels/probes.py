"""Machine probes: kernels that measure the arithmetic peak of one CPU core in the instruction forms the CPU decode
kernel uses, so a benchmark can say how far a kernel is from what the core can do, not only from the copy
bandwidth (a decode kernel that reads 4-bit codes for a GQA group is bound by multiply-adds long before bytes).

:func:`peak_probe` is a pure factory: ``chains`` independent accumulators (more than the instruction's latency x
throughput, so the loop is bound by throughput), each updated once per iteration with the kernel's own step:
an fp32 FMA of ``lanes`` lanes, or one int8 dot-product step (:func:`~wq_compile.kernels.attention_cpu.
dot4_accumulate`: ``vpdpbusd``, or ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` on AVX2) of ``4 lanes``
multiply-adds. The operands are loaded from an argument, and a dot-product step's unsigned operand is its own
accumulator's bytes (nothing constant-folds or leaves the loop); the accumulators are summed into ``out`` so
nothing is dead.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .attention_cpu import dot4_accumulate
from .common import declare_params
from .cpu_isa import CpuIsa

#: Probe kinds: ``fma`` (fp32 FMA, the exact kernel's inner product) and ``dot8`` (the int8 dot-product mode's).
PROBE_KINDS: tuple[str, ...] = ("fma", "dot8")


def probe_macs_per_step(cpu: CpuIsa, kind: str) -> int:
    """Multiply-adds one probe step does: ``lanes`` for an FMA, ``4 lanes`` for an int8 dot-product step."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"kind: expected one of {PROBE_KINDS}, got {kind!r}")
    return cpu.lanes * (4 if kind == "dot8" else 1)


def peak_probe(cpu: CpuIsa, kind: str, chains: int = 12) -> tirx.PrimFunc:
    """``main(ops: uint8[2, 4 lanes], n: int32, out[lanes])``: ``n x chains`` steps of ``kind`` (see the module
    docstring); ``out`` (int32 for ``dot8``, fp32 for ``fma``) is the sum of the accumulators."""
    probe_macs_per_step(cpu, kind)
    if kind == "dot8" and cpu.dot is None:
        raise ValueError(f"dot8: {cpu} has no int8 dot-product instructions")
    if chains < 1:
        raise ValueError(f"chains: expected at least 1, got {chains}")
    lanes = cpu.lanes
    acc_t = "int32" if kind == "dot8" else "float32"
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main")
            T.func_attr({"tirx.noalias": True})
            bufs, _ = declare_params([("ops", (2, 4 * lanes), "uint8"), ("n", None, "int32"),
                                      ("out", (lanes,), acc_t)])
            ops, n, out = bufs["ops"], bufs["n"], bufs["out"]
            acc = T.alloc_buffer((chains, lanes), acc_t, scope="local")
            with T.unroll(0, chains) as c:
                with T.vectorized(0, lanes) as ln:
                    T.buffer_store(acc, tirx.const(0, acc_t), [c, ln])
            if kind == "dot8":
                s = tirx.reinterpret(f"int8x{4 * lanes}", tirx.BufferLoad(ops, [1, tirx.Ramp(0, 1, 4 * lanes)]))
            else:
                x = tirx.BufferLoad(ops, [0, tirx.Ramp(0, 1, lanes)]).astype(f"float32x{lanes}")
                y = tirx.BufferLoad(ops, [1, tirx.Ramp(0, 1, lanes)]).astype(f"float32x{lanes}")
            with T.serial(0, n):
                for c in range(chains):
                    if kind == "dot8":  # the accumulator's own bytes as the unsigned operand: nothing to hoist
                        u = tirx.reinterpret(f"int8x{4 * lanes}", tirx.BufferLoad(acc, [c, tirx.Ramp(0, 1, lanes)]))
                        dot4_accumulate(cpu, acc, [c], u, s)
                    else:
                        where = [c, tirx.Ramp(0, 1, lanes)]
                        T.buffer_store(acc, tirx.BufferLoad(acc, where) * x + y, where)
            with T.vectorized(0, lanes) as ln:
                tot = acc[0, ln]
                for c in range(1, chains):
                    tot = tot + acc[c, ln]
                T.buffer_store(out, tot, [ln])
    return ib.get()
