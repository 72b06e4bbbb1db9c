"""``kind="merge"``: combine P normalized partial states (o_p, lse_p) into the final attention output.

``out = sum_p o_p * exp(lse_p - M) / sum_p exp(lse_p - M)`` with ``M = max_p lse_p``; pieces with ``lse = -inf``
(empty) weigh 0 and a row whose pieces are all empty gives 0. ``P`` is symbolic unless ``spec.extra`` has ``("p", n)``.

The CUDA schedule computes every block of a row (batch, query head) in one thread block: one launch
(``merge_w`` is inlined into its two consumers, so no buffer of symbolic size ``P`` is materialized).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.spec import KernelSpec
from .common import f32
from .signatures import merge_signature as signature
from .signatures import num_parts as _num_parts

_F32 = "float32"

#: Block names, in program order.
MERGE_BLOCKS = ("merge_max", "merge_w", "merge_wsum", "merge_out", "merge_cast")


def build_merge(spec: KernelSpec) -> tirx.PrimFunc:
    if spec.kind != "merge":
        raise ValueError(f"kind: expected 'merge', got {spec.kind!r}")
    sig = signature(spec)
    hq, d = spec.num_q_heads, spec.head_dim
    syms: dict[str, tirx.Var] = {}

    def dim(x):
        return x if isinstance(x, int) else syms.setdefault(x, tirx.Var(x, "int32"))

    neg_inf = f32(float("-inf"))
    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(spec.uri)
            T.func_attr({"tirx.noalias": True})
            o_parts, lse_parts, out = (T.arg(a.name, T.buffer(tuple(dim(s) for s in a.shape), a.dtype)) for a in sig.args)
            bsz, n_parts = syms["B"], dim(_num_parts(spec))
            with T.sblock("root"):
                mx = IRBuilder.name("mx", T.sblock_alloc_buffer((bsz, hq), _F32))
                w = IRBuilder.name("w", T.sblock_alloc_buffer((n_parts, bsz, hq), _F32))
                wsum = IRBuilder.name("wsum", T.sblock_alloc_buffer((bsz, hq), _F32))
                acc = IRBuilder.name("acc", T.sblock_alloc_buffer((bsz, hq, d), _F32))
                with T.grid(bsz, hq, n_parts) as (b, h, p):
                    with T.sblock("merge_max"):
                        vb, vh, vp = T.axis.remap("SSR", [b, h, p])
                        with T.init():  # the max reducer's identity (TVM lowers it to warp shuffles on GPUs)
                            T.buffer_store(mx, tirx.min_value(_F32), [vb, vh])
                        T.buffer_store(mx, tirx.max(mx[vb, vh], lse_parts[vp, vb, vh]), [vb, vh])
                with T.grid(bsz, hq, n_parts) as (b, h, p):
                    with T.sblock("merge_w"):
                        vb, vh, vp = T.axis.remap("SSS", [b, h, p])
                        lse = lse_parts[vp, vb, vh]
                        ok = tirx.all(lse > neg_inf, mx[vb, vh] > neg_inf)
                        T.buffer_store(w, tirx.Select(ok, tirx.exp(lse - mx[vb, vh]), f32(0.0)), [vp, vb, vh])
                with T.grid(bsz, hq, n_parts) as (b, h, p):
                    with T.sblock("merge_wsum"):
                        vb, vh, vp = T.axis.remap("SSR", [b, h, p])
                        with T.init():
                            T.buffer_store(wsum, f32(0.0), [vb, vh])
                        T.buffer_store(wsum, wsum[vb, vh] + w[vp, vb, vh], [vb, vh])
                with T.grid(bsz, hq, d, n_parts) as (b, h, dd, p):
                    with T.sblock("merge_out"):
                        vb, vh, vd, vp = T.axis.remap("SSSR", [b, h, dd, p])
                        with T.init():
                            T.buffer_store(acc, f32(0.0), [vb, vh, vd])
                        # unconditional: an empty split's o is 0 (split_decode writes 0 where den = 0) and its w 0, so
                        # the load of o need not wait for the weight (issue 21: the merge was a dependent-load chain)
                        T.buffer_store(acc, acc[vb, vh, vd] + o_parts[vp, vb, vh, vd] * w[vp, vb, vh], [vb, vh, vd])
                with T.grid(bsz, hq, d) as (b, h, dd):
                    with T.sblock("merge_cast"):
                        vb, vh, vd = T.axis.remap("SSS", [b, h, dd])
                        tot = wsum[vb, vh]
                        val = tirx.Select(tot > f32(0.0), acc[vb, vh, vd] / tot, f32(0.0))
                        T.buffer_store(out, val.astype(spec.tvm_dtype), [vb, vh, vd])
    return ib.get()
