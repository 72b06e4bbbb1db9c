"""CPU (llvm) fused decode attention over token-packed quantized buckets and a dense piece: explicit SIMD structure.

Same arguments as the fused kernel of :mod:`wq_compile.kernels.attention` (``signature`` is shared); written as
plain (non-block) TIR whose vector loops LLVM turns into the instructions named below, because the work is
vectorized over *tokens* for QK and over *channels* for P @ V, which needs byte views of the packed words.

Per work item ``(b, kh, split)`` (a parallel loop; ``splits`` token ranges per KV head, merged flash-decoding
style at the end), for each piece, for each tile (one key group of a quantized piece: ``key_slots`` token slots;
one vector of tokens of the dense piece)::

    qs[h, d] = qf[h, d] * k_scale[g, d]            # per-channel key scale folded into the query, once per group
    z[h]     = sum_d qf[h, d] * k_zero[g, d]        # the key zero point: one number per head and group
    S[h, s]  = z[h] + sum_d qs[h, d] * code(g, d, s) # s = token slot: the L bytes of (g, d) are one vector load,
                                                     # zero-extended to int32 lanes, F = 8/bits shift+mask fields
    online softmax over the tile (vector exp), P folded with the per-token value scale (Pv = P * v_scale[t])
    acc[h, f, j] += Pv[h, t] * code_v(t, byte j, field f)   # V bytes zero-extended, channel = j * F + f
    zacc[h, vg]  += sum_t P[h, t] * v_zero[t, vg]            # the value zero point, per head and value group

so the inner loops are a byte load + vpmovzxbd + shift/and + vcvtdq2ps, and FMAs with a broadcast query/probability
for every query head of the GQA group (all in registers): no horizontal sums except one max and one sum per tile
and head. Empty pieces and tokens past ``lens`` cost nothing (tile loops run to ``ceil(lens / tile)``).

Vector unit (:class:`~wq_compile.kernels.cpu_isa.CpuIsa`, derived from the target by the compiler): vector loops
are ``lanes`` wide (16 fp32 on AVX-512, 8 on AVX2) and the register tiles (QK score accumulators, P @ V channel
accumulators) are cut into passes over the query heads so that they fit the register file (32 zmm / 16 ymm); the
storage format (``key_slots``, ``key_lane_bytes``) does not depend on it.

Int8 dot-product mode (``("dot8", 1)`` in ``spec.extra``, :func:`int8_dots`), for 4- and 2-bit buckets: ``qs`` is
quantized to int8 per head and key group, and 4 channels x ``lanes`` token slots of key codes are shuffled into
one dot-product operand (:meth:`QuantTiles._scores_int8`); ``P * v_scale`` is quantized to uint8 per head, value
group and key group, and 4 tokens x ``lanes`` bytes of value codes are shuffled the same way
(:meth:`QuantTiles._pv_int8`). The dot product is ``vpdpbusd`` (AVX-512 VNNI on zmm, AVX-VNNI on ymm) or, on
AVX2, ``vpmaddubsw`` + ``vpmaddwd`` (the same integers: one operand is a code of at most 4 bits, so no int16 pair
sum saturates). Zero-point terms, the softmax and the accumulators across key groups stay fp32; the torch
emulation is :func:`wq_compile.core.reference.int8_dots_attend_piece`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.quant import key_lane_bytes, key_slots
from ..core.spec import KernelSpec
from .attention import Piece, pieces, signature
from .cpu_isa import AVX512, CpuIsa
from .common import NEG_BIG, arg_params, declare_params, f32, fast_exp

_F32, _I32, _U8 = "float32", "int32", "uint8"

#: Function attribute marking a kernel whose schedule is written into its TIR (no blocks for a Schedule to
#: transform): the llvm ``default_schedule`` leaves it as it is.
PLAIN_TIR_ATTR = "wq.plain_tir"
#: Widest vector the factory asks for on AVX-512 (16 fp32 lanes; LLVM splits wider ones). Targets with narrower
#: registers get their own width (:class:`~wq_compile.kernels.cpu_isa.CpuIsa`), which is also the token tile of the
#: dense piece (one vector of tokens for its scores).
LANES = AVX512.lanes


@dataclass(frozen=True)
class CpuKnobs:
    """Structure knobs of the CPU kernel (factory parameters; they change the generated code, not the results).

    ``splits``: token ranges per (batch, KV head) work item, merged at the end (flash-decoding); more work items
    than cores balance better, each costs one merge. ``pv_channels``: channel bytes of V per pass over a tile's
    tokens (the P @ V register tile: group size x fields x pv_channels fp32 accumulators)."""

    splits: int = 2
    pv_channels: int = 16
    qk_heads: int = 8
    lut: int = 0

    @staticmethod
    def of(spec: KernelSpec) -> "CpuKnobs":
        extra = dict(spec.extra)
        return CpuKnobs(splits=int(extra.get("splits", 2)), pv_channels=int(extra.get("pvc", 16)),
                        qk_heads=int(extra.get("qkh", 8)), lut=int(extra.get("lut", 0)))


@contextmanager
def _vec(n: int, width: int = LANES):
    """``for i in range(n)`` as unrolled vectors of at most ``width`` lanes (one register each): wider vector
    types make LLVM split, mask and reshuffle them through scalar extracts."""
    lanes = min(width, n)
    if n % lanes:
        raise ValueError(f"vector loop of {n} is not a multiple of {lanes} lanes")
    if n == lanes:
        with T.vectorized(0, n) as i:
            yield i
    else:
        with T.unroll(0, n // lanes) as k:
            with T.vectorized(0, lanes) as ln:
                yield k * lanes + ln


def _u8(x: tirx.PrimExpr) -> tirx.PrimExpr:
    return x.astype(_I32)


#: LLVM's AVX-512 ``vpermps`` (16 fp32 table entries, index = low 4 bits of each int32 lane).
_PERMPS = "llvm.x86.avx512.permvar.sf.512"


#: LLVM's VNNI ``vpdpbusd``: acc += 4 unsigned x signed byte products per int32 lane, on zmm (AVX-512 VNNI) or
#: ymm (``.256``: AVX-VNNI's VEX form where the target has no AVX-512 VL). The LLVM that the pinned TVM links
#: declares them ``(<N x i32>, <4N x i8>, <4N x i8>)`` (TVM's own ``dot_16x4_vnni`` intrinsic passes ``<16 x i32>``
#: operands and fails LLVM's verifier).
_VPDPBUSD = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}
#: AVX2 without VNNI: ``vpmaddubsw`` (unsigned x signed byte pairs summed into int16, saturating) and ``vpmaddwd``
#: (int16 pairs summed into int32; with ones it adds the two halves of each dword).
_PMADDUBSW, _PMADDWD = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"


#: x86 float -> int32 conversion that rounds (to nearest even) in one instruction (``vcvtps2dq``): the int8 mode's
#: roundings were ``vrndscaleps`` + ``vcvttps2dq``. AVX-512 form: (src, passthrough, mask, rounding 8 = {rn-sae}).
_CVTPS2DQ = {16: "llvm.x86.avx512.mask.cvtps2dq.512", 8: "llvm.x86.avx.cvt.ps2dq.256"}


def _round_i32(x: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """``round(x)`` (half to even, as ``torch.round``) of a ``float32 x lanes`` vector as ``int32 x lanes`` (x86;
    8 or 16 lanes: the int8 mode's vectors, whose head_dim is a multiple of 8 as 4- and 2-bit codes require)."""
    if lanes not in _CVTPS2DQ:
        raise ValueError(f"lanes: vcvtps2dq rounds 8 or 16 fp32 lanes, got {lanes}")
    vt = f"int32x{lanes}"
    if lanes == 16:
        return tirx.call_llvm_pure_intrin(vt, _CVTPS2DQ[16], x, tirx.Broadcast(tirx.const(0, _I32), 16),
                                          tirx.const(-1, "int16"), tirx.const(8, _I32))
    return tirx.call_llvm_pure_intrin(vt, _CVTPS2DQ[8], x)


def int8_dots(spec: KernelSpec) -> bool:
    """True when ``spec`` asks for int8 dot products (``("dot8", 1)`` in ``spec.extra``): QK with an int8 query and
    P @ V with uint8 probabilities over 4/2-bit buckets. A precision mode, not a structure knob (it changes results);
    needs one of the dot-product flavours of :class:`~wq_compile.kernels.cpu_isa.CpuIsa` (AVX-512 VNNI + VBMI,
    AVX-VNNI, or AVX2)."""
    return bool(dict(spec.extra).get("dot8", 0))


def _dword_bcast(word: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """One int32 (4 packed bytes) in every lane, typed as the ``4 lanes`` bytes a dot-product operand is."""
    return tirx.reinterpret(f"int8x{4 * lanes}", tirx.Broadcast(word, lanes))


def dot4_accumulate(cpu: CpuIsa, acc, index: list, unsigned: tirx.PrimExpr, signed: tirx.PrimExpr) -> None:
    """``acc[*index, 0:lanes] += 4-byte dot products of unsigned x signed``: one ``vpdpbusd`` (zmm or ymm), or on
    AVX2 ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``. The AVX2 form is exact (the same integers as VNNI) only while
    no int16 pair sum saturates: every caller has an operand of at most 4 bits (codes <= 15), so a pair is at most
    2 x 15 x 255 = 7650 (uint8 probabilities) or 2 x 15 x 127 = 3810 (int8 query), far below 32767."""
    lanes = cpu.lanes
    where = [*index, tirx.Ramp(0, 1, lanes)]
    old = tirx.BufferLoad(acc, where)
    if cpu.dot in ("vnni512", "avxvnni"):
        val = tirx.call_llvm_pure_intrin(f"int32x{lanes}", _VPDPBUSD[lanes], old, unsigned, signed)
    elif cpu.dot == "maddubs":
        pairs = tirx.call_llvm_pure_intrin(f"int16x{2 * lanes}", _PMADDUBSW, unsigned, signed)
        ones = tirx.Broadcast(tirx.const(1, "int16"), 2 * lanes)
        val = old + tirx.call_llvm_pure_intrin(f"int32x{lanes}", _PMADDWD, pairs, ones)
    else:
        raise ValueError(f"dot8: no int8 dot-product instructions on this target ({cpu})")
    T.buffer_store(acc, val, where)


def _int8_scales(red, rows: int, width: int, levels: float, scale, inv) -> None:
    """Per row ``r`` of ``red[rows, 0:width]`` (non-negative values): ``scale[r] = max / levels`` (what one code
    step is worth) and ``inv[r] = levels / max`` (0 for an all-zero row: every code 0), the factor to round by; the
    maxima of all rows reduced together (:func:`_tree_rows`) and the divisions done as one vector."""
    n = _rows_out(rows, width)
    mx = T.alloc_buffer((n,), _F32, scope="local")
    _tree_rows(tirx.max, red, rows, width, mx)
    for r0, lanes in _row_chunks(rows, width):
        with T.vectorized(0, lanes) as ln:
            r = r0 + ln
            T.buffer_store(scale, mx[r] * f32(1.0 / levels), [r])
            T.buffer_store(inv, tirx.Select(mx[r] > f32(0.0), f32(levels) / tirx.max(mx[r], f32(1e-30)), f32(0.0)),
                           [r])


def _lut_nibbles(buf, start: tirx.PrimExpr, out, row0: int = 0) -> None:
    """``out[row0, 0:16]`` / ``out[row0 + 1, 0:16]`` = the low / high nibbles of the 16 bytes at ``buf[start]``,
    as fp32: one zero-extension, one shift, two table lookups (``vpermps`` of the table 0.0 .. 15.0)."""
    x = tirx.BufferLoad(buf, [tirx.Ramp(start, 1, LANES)]).astype(f"int32x{LANES}")
    table = tirx.Ramp(f32(0.0), f32(1.0), LANES)
    hi = tirx.shift_right(x, tirx.Broadcast(tirx.const(4, _I32), LANES))
    for f, idx in enumerate((x, hi)):
        val = tirx.call_llvm_pure_intrin(f"float32x{LANES}", _PERMPS, table, idx)
        T.buffer_store(out, val, [row0 + f, tirx.Ramp(0, 1, LANES)])


def build_fused_cpu(spec: KernelSpec, cpu: CpuIsa = AVX512) -> tirx.PrimFunc:
    """Plain TIR of the fused decode kernel for llvm targets (see the module docstring), written for ``cpu``'s
    vector unit (lanes, register tiles, int8 dot-product flavour)."""
    if spec.kind != "fused":
        raise ValueError(f"kind: the CPU kernel is a fused kernel, got {spec.kind!r}")
    if int8_dots(spec) and cpu.dot is None:
        raise ValueError(f"{spec.uri}: dot8=1 needs int8 dot-product instructions, which {cpu} lacks")
    ps = pieces(spec)
    knobs = CpuKnobs.of(spec)

    def body(bufs, b, kh, sp, qf, m_all, l_all, acc, scratch) -> None:
        for p in ps:
            if p.quantized:
                _quant_piece(spec, p, knobs, bufs, b, kh, sp, qf, m_all, l_all, acc, scratch, cpu)
            else:
                _dense_piece(spec, p, bufs, b, kh, sp, qf, m_all, l_all, acc, scratch, cpu)

    return decode_frame(spec, spec.uri, signature(spec).args, knobs.splits, 1, body, cpu.lanes)


def decode_frame(spec: KernelSpec, name: str, args, nsplit: int, pacc_views: int, body,
                 lanes: int = LANES) -> tirx.PrimFunc:
    """A plain-TIR decode kernel around ``body``: the parameters ``args`` (``ArgDesc``; ``q``, ``sm_scale`` and
    ``out`` among them), one parallel work item per (sample, KV head, token split) with its scaled query ``qf``,
    its (m, l, acc) state and a scratch arena (``pacc_views`` accumulator views ``pacc``, ``pacc1``, ... plus
    ``qs`` and ``kt``), then the flash-decoding merge of the splits into ``out``.
    ``body(bufs, b, kh, sp, qf, m_all, l_all, acc, scratch)`` emits the pieces of one work item; vector loops are
    ``lanes`` wide (also the dense piece's token tile, the width of ``kt``)."""
    hkv, d, gs = spec.num_kv_heads, spec.head_dim, spec.group_size
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, PLAIN_TIR_ATTR: True})
            bufs, syms = declare_params(arg_params(args))
            bsz = syms["B"]
            q, sm_scale, out = bufs["q"], bufs["sm_scale"], bufs["out"]
            items = bsz * hkv * nsplit
            # partial states of every work item, merged after the parallel loop
            ws_m = T.alloc_buffer((items * gs,), _F32)
            ws_l = T.alloc_buffer((items * gs,), _F32)
            ws_acc = T.alloc_buffer((items * gs * d,), _F32)
            IRBuilder.name_many(["ws_m", "ws_l", "ws_acc"], [ws_m, ws_l, ws_acc])
            with T.parallel(0, items) as wi:
                b = tirx.floordiv(wi, hkv * nsplit)
                kh = tirx.floormod(tirx.floordiv(wi, nsplit), hkv)
                sp = tirx.floormod(wi, nsplit)
                # one scratch allocation per work item for every buffer over the stack limit (each separate one is
                # a workspace allocation call: ~0.25 us, dozens per call), carved into views at fixed offsets
                nviews = 3 + pacc_views
                arena = T.alloc_buffer((nviews * gs * d + d * lanes,), _F32, scope="local")
                IRBuilder.name("arena", arena)

                def view(shape, k):
                    return T.decl_buffer(shape, _F32, data=arena.data, elem_offset=k * gs * d, scope="local")

                qf, acc = view((gs, d), 0), view((gs, d), 1)
                scratch = {"qs": view((gs, d), 2), "kt": view((d, lanes), nviews)}
                for i in range(pacc_views):
                    scratch["pacc" if i == 0 else f"pacc{i}"] = view((gs, d), 3 + i)
                m_all = T.alloc_buffer((gs,), _F32, scope="local")
                l_all = T.alloc_buffer((gs,), _F32, scope="local")
                with T.serial(0, gs) as h:
                    with _vec(d, lanes) as dd:
                        T.buffer_store(qf, q[b, kh * gs + h, dd].astype(_F32) * sm_scale, [h, dd])
                        T.buffer_store(acc, f32(0.0), [h, dd])
                    T.buffer_store(m_all, f32(NEG_BIG), [h])
                    T.buffer_store(l_all, f32(0.0), [h])
                body(bufs, b, kh, sp, qf, m_all, l_all, acc, scratch)
                with T.serial(0, gs) as h:
                    T.buffer_store(ws_m, m_all[h], [wi * gs + h])
                    T.buffer_store(ws_l, l_all[h], [wi * gs + h])
                    with _vec(d, lanes) as dd:
                        T.buffer_store(ws_acc, acc[h, dd], [(wi * gs + h) * d + dd])
            # merge the splits of each (b, kh): out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M)
            with T.serial(0, bsz * hkv) as bk:  # tiny: one thread, no second pool launch
                mm = T.alloc_buffer((gs,), _F32, scope="local")
                ll = T.alloc_buffer((gs,), _F32, scope="local")
                w = T.alloc_buffer((gs, nsplit), _F32, scope="local")
                with T.serial(0, gs) as h:
                    T.buffer_store(mm, f32(NEG_BIG), [h])
                    with T.serial(0, nsplit) as s:
                        T.buffer_store(mm, tirx.max(mm[h], ws_m[(bk * nsplit + s) * gs + h]), [h])
                    T.buffer_store(ll, f32(0.0), [h])
                    with T.serial(0, nsplit) as s:
                        i = (bk * nsplit + s) * gs + h
                        T.buffer_store(w, fast_exp(ws_m[i] - mm[h]), [h, s])
                        T.buffer_store(ll, ll[h] + ws_l[i] * w[h, s], [h])
                    with _vec(d, lanes) as dd:
                        tot = f32(0.0)
                        for s in range(nsplit):
                            tot = tot + ws_acc[((bk * nsplit + s) * gs + h) * d + dd] * w[h, s]
                        val = tirx.Select(ll[h] > f32(0.0), tot / ll[h], f32(0.0))
                        b_ = tirx.floordiv(bk, hkv)
                        kh_ = tirx.floormod(bk, hkv)
                        T.buffer_store(out, val.astype(spec.tvm_dtype), [b_, kh_ * gs + h, dd])
    return ib.get()


def _split_range(n_tiles: tirx.PrimExpr, sp: tirx.PrimExpr, nsplit: int) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    return tirx.floordiv(n_tiles * sp, nsplit), tirx.floordiv(n_tiles * (sp + 1), nsplit)


def _tree_rows(op, red, rows: int, width: int, out) -> None:
    """``out[r]`` = the reduction of the local row ``red[r, 0:width]`` for every ``r < rows``, all rows at once:
    rows are paired by two-source shuffles (each level halves every row's lanes and doubles the rows per vector)
    until one vector holds one lane per row: independent shuffles instead of one dependent halving chain per row.
    The per-head reductions of a tile (zero point, query scale, softmax max, probability scale) were such chains
    and left the vector units idle. ``out`` holds at least ``rows`` rounded up to ``width``."""
    for r0, npad in _row_chunks(rows, width):
        n = min(width, rows - r0)
        vecs = [tirx.BufferLoad(red, [r0 + i, tirx.Ramp(0, 1, width)]) for i in range(n)]
        vecs += [vecs[-1]] * (npad - n)  # padding rows: reduced, stored, never read
        k, bw = 1, width  # rows per vector, lanes per row
        while len(vecs) > 1:
            half = bw // 2
            lo = [tirx.const(v * width + j * bw + i, _I32) for v in range(2) for j in range(k) for i in range(half)]
            hi = [tirx.const(ix.value + half, _I32) for ix in lo]
            vecs = [op(tirx.Shuffle([a, b], lo), tirx.Shuffle([a, b], hi)) for a, b in zip(vecs[::2], vecs[1::2])]
            k, bw = 2 * k, half
        v = vecs[0]
        while bw > 1:
            half = bw // 2
            lo = [tirx.const(j * bw + i, _I32) for j in range(k) for i in range(half)]
            v = op(tirx.Shuffle([v], lo), tirx.Shuffle([v], [tirx.const(ix.value + half, _I32) for ix in lo]))
            bw = half
        T.buffer_store(out, v, [tirx.Ramp(r0, 1, npad)] if npad > 1 else [r0])


def _row_chunks(rows: int, width: int) -> list[tuple[int, int]]:
    """The (first row, lanes) of each vector :func:`_tree_rows` stores: ``width`` rows at a time, the last chunk's
    rows rounded up to a power of two. Vector code reading the results reads these same vectors (a wider load of a
    narrower store misses store forwarding: a ~15-cycle stall per read)."""
    return [(r0, 1 << (min(width, rows - r0) - 1).bit_length()) for r0 in range(0, rows, width)]


def _rows_out(rows: int, width: int) -> int:
    """Size of a :func:`_tree_rows` result buffer for ``rows`` rows."""
    return -(-rows // width) * width


#: LLVM's AVX-512 ``vscalefps`` (``a * 2^floor(b)``, masked form: passthrough, mask, rounding).
_SCALEF = "llvm.x86.avx512.mask.scalef.ps.512"
#: 2^f on [-1/2, 1/2], degree 5, fitted for relative error on Chebyshev nodes (highest power first): 2.2e-7 relative
#: evaluated in fp32, as :func:`~wq_compile.kernels.common.fast_exp`'s degree-7 Taylor series.
_EXP2_POLY = (0.0013266970386772681, 0.009675459745569718, 0.055507426160023784, 0.2402212175356099,
              0.6931469491610649, 1.0000000710297008)


def _exp_scalef(x: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """``exp(x)`` of a ``float32 x lanes`` vector (AVX-512): ``t = x log2(e)``, ``n = round(t)``, a degree-5
    polynomial of ``2^(t - n)``, then ``vscalefps`` by ``n`` (which also gives 0 for very negative ``x``): 9
    instructions where :func:`~wq_compile.kernels.common.fast_exp` (clamps, two-constant reduction, degree 7, exponent
    bits) takes about 20. The softmax's exps were a sixth of the int8 kernel's vector instructions."""
    vt = f"float32x{lanes}"
    t = x * tirx.Broadcast(f32(1.4426950408889634), lanes)
    n = tirx.floor(t + tirx.Broadcast(f32(0.5), lanes))
    f = t - n
    p = tirx.Broadcast(f32(_EXP2_POLY[0]), lanes)
    for c in _EXP2_POLY[1:]:
        p = p * f + tirx.Broadcast(f32(c), lanes)
    zero = tirx.Broadcast(f32(0.0), lanes)
    return tirx.call_llvm_pure_intrin(vt, _SCALEF, p, n, zero, tirx.const(-1, "int16"), tirx.const(4, _I32))


#: Lazy rescaling: a head's reference max moves only when a tile's max exceeds it by more than this (natural
#: log units). Probabilities are then ``exp(s - m_ref) <= e^8`` (no overflow in fp32, and the output is a ratio,
#: so it is exact up to rounding), and the common tile needs no rescale of the accumulators and no scalar exp:
#: the vector exps start from the reference max, off the max tree's latency chain.
RESCALE_SLACK = 8.0


def _tile_softmax(gs: int, slots: int, nvalid, s_buf, p_buf, pm, pl, rescale, width: int = LANES,
                  scalef: bool = False) -> None:
    """Online softmax of one tile with lazy rescaling: scores ``s_buf[h, slot]`` (slots >= nvalid masked; ``nvalid``
    may be a function of the row ``h``, e.g. each query token's causal bound in the multi-token kernel) ->
    ``p_buf[h, slot] = exp(s - pm[h])``; ``pl[h, lane]`` (:func:`sum_state`) accumulates their sum per lane. Only
    when the tile's max exceeds the reference max ``pm[h]`` by :data:`RESCALE_SLACK` (always on a piece's first
    tile) does ``pm`` move, with the head's sum and accumulators scaled by ``exp(old - new)`` (``rescale(h,
    factor)`` emits the latter). The tile maxima of all heads are reduced together (:func:`_tree_rows`); the sums
    stay lane partials until :func:`_merge_piece`, so a tile has no per-head horizontal reduction. ``scalef``: the
    exps by :func:`_exp_scalef` (AVX-512)."""
    lanes = min(width, slots)
    red = T.alloc_buffer((gs, lanes), _F32, scope="local")
    tmax = T.alloc_buffer((_rows_out(gs, lanes),), _F32, scope="local")

    def nv_of(h):
        return nvalid(h) if callable(nvalid) else nvalid

    with T.serial(0, gs) as h:
        nv = nv_of(h)

        def masked(slot):
            return tirx.Select(slot < nv, s_buf[h, slot], f32(NEG_BIG))

        with T.vectorized(0, lanes) as ln:
            mx = masked(ln)
            for k in range(1, slots // lanes):
                mx = tirx.max(mx, masked(k * lanes + ln))
            T.buffer_store(red, mx, [h, ln])
    _tree_rows(tirx.max, red, gs, lanes, tmax)
    with T.serial(0, gs) as h:
        nv = nv_of(h)
        with T.If(tmax[h] > pm[h] + f32(RESCALE_SLACK)):
            with T.Then():
                fac = T.alloc_buffer((1,), _F32, scope="local")
                T.buffer_store(fac, fast_exp(pm[h] - tmax[h]), [0])
                with T.vectorized(0, int(pl.shape[1])) as ln:
                    T.buffer_store(pl, pl[h, ln] * fac[0], [h, ln])
                rescale(h, fac[0])
                T.buffer_store(pm, tmax[h], [h])
        if scalef:
            for k in range(slots // lanes):
                where = [h, tirx.Ramp(k * lanes, 1, lanes)]
                x = tirx.BufferLoad(s_buf, where) - tirx.Broadcast(pm[h], lanes)
                ok = tirx.Ramp(k * lanes, 1, lanes) < tirx.Broadcast(nv, lanes)
                T.buffer_store(p_buf, tirx.Select(ok, _exp_scalef(x, lanes), tirx.Broadcast(f32(0.0), lanes)), where)
        else:
            with _vec(slots, lanes) as s:
                T.buffer_store(p_buf, tirx.Select(s < nv, fast_exp(s_buf[h, s] - pm[h]), f32(0.0)), [h, s])
        with T.vectorized(0, lanes) as ln:
            sm = pl[h, ln] + p_buf[h, ln]
            for k in range(1, slots // lanes):
                sm = sm + p_buf[h, k * lanes + ln]
            T.buffer_store(pl, sm, [h, ln])


def sum_state(rows: int, width: int = LANES):
    """The running softmax sums of ``rows`` rows as ``width`` lane partials, zeroed where a piece starts, for
    :func:`_tile_softmax` and :func:`_merge_piece`."""
    pl = T.alloc_buffer((rows, width), _F32, scope="local")
    with T.serial(0, rows) as h:
        with T.vectorized(0, width) as ln:
            T.buffer_store(pl, f32(0.0), [h, ln])
    return pl


def _merge_piece(gs: int, d: int, pm, pl, m_all, l_all, acc, piece_acc, width: int = LANES) -> None:
    """Fold a piece's state (pm, the lane-partial sums pl, piece_acc(h, channel)) into the work item's state
    (m_all, l_all, acc)."""
    pw = int(pl.shape[1])
    lsum = T.alloc_buffer((_rows_out(gs, pw),), _F32, scope="local")
    _tree_rows(lambda a, b: a + b, pl, gs, pw, lsum)
    with T.serial(0, gs) as h:
        mn = tirx.max(m_all[h], pm[h])
        ea = T.alloc_buffer((2,), _F32, scope="local")
        T.buffer_store(ea, fast_exp(m_all[h] - mn), [0])
        T.buffer_store(ea, fast_exp(pm[h] - mn), [1])
        with _vec(d, width) as dd:
            T.buffer_store(acc, acc[h, dd] * ea[0] + piece_acc(h, dd) * ea[1], [h, dd])
        T.buffer_store(l_all, l_all[h] * ea[0] + lsum[h] * ea[1], [h])
        T.buffer_store(m_all, mn, [h])


class QuantTiles:
    """The state and the tile body of one quantized width (see the module docstring): the fused kernel runs one
    per bucket over the bucket's key groups in storage order; a caller may instead feed it key groups from
    anywhere (the token-granular dispatch baseline feeds them in token order from an in-place stream).

    Created inside a work item (it allocates its local buffers and zeroes its online-softmax state there);
    :meth:`tile` emits one key group, :meth:`finish` folds the state into the work item's (m, l, acc)."""

    def __init__(self, spec: KernelSpec, bits: int, knobs: CpuKnobs, scratch: dict, opaque_zero,
                 cpu: CpuIsa = AVX512) -> None:
        self.spec, self.knobs, self.bits, self.cpu = spec, knobs, bits, cpu
        self.lanes = lanes = cpu.lanes
        d, gs, kg = spec.head_dim, spec.group_size, spec.k_group
        self.qspec = qspec = spec.quant(bits)
        self.fields = fields = 8 // bits
        self.slots, self.lb = key_slots(kg), key_lane_bytes(bits, kg)  # slot s = field s // lb of byte s % lb
        self.vbytes = vbytes = d * bits // 8  # value bytes per token: byte j holds channels j*F .. j*F+F-1
        self.nvg = nvg = d // qspec.v_group
        self.vg_bytes = qspec.v_group * bits // 8
        pvc = min(knobs.pv_channels, vbytes)
        while vbytes % pvc or self.vg_bytes % pvc and pvc > 1:
            pvc //= 2
        self.pvc = pvc
        # register tiles (accumulators that must stay in registers through their loop), sized to the register file:
        # QK: slots / lanes per head beside the unpacked codes (as many); P @ V: fields x pvc / lanes per head
        # beside one token's unpacked codes (as many). On AVX-512 they cover every head of a qwen2 GQA group
        # (the knob decides); 16 ymm registers on AVX2 hold fewer, so the heads go in passes.
        svec = max(1, self.slots // lanes)
        # narrower registers: the key codes of a group are unpacked once into fp32 (L1) and every QK pass loads them
        # (one load for the pass's heads; unpacked per pass they would cost as much as the FMAs); AVX-512 unpacks in
        # registers. A pass holds its heads' accumulators and one channel's codes (LLVM spills beyond that).
        self.stage_keys = lanes < LANES and not (int8_dots(spec) and bits < 8)
        self.qk_heads = min(knobs.qk_heads, cpu.heads_per_pass(gs, svec, svec if self.stage_keys else svec + 1))
        pvec = fields * max(1, pvc // lanes)
        # AVX-512 keeps one P @ V pass over all heads: its shipped knob records (pvc 32 among them) were tuned with it
        self.pv_pass = cpu.heads_per_pass(gs, pvec, pvec) if lanes < LANES else gs
        self.opaque_zero = opaque_zero
        slots = self.slots
        self.pm = T.alloc_buffer((gs,), _F32, scope="local")
        self.pl = sum_state(gs, min(lanes, self.slots))
        self.pacc = T.decl_buffer((gs, fields, vbytes), _F32, data=scratch["pacc"].data,
                                  elem_offset=scratch["pacc"].elem_offset, scope="local")  # channel = byte*F + field
        # value zero-point sums per (head, value group) as lane partials, reduced once in :meth:`finish`
        self.zacc = T.alloc_buffer((gs * nvg, lanes), _F32, scope="local")
        self.qs = scratch["qs"]
        self.zt = T.alloc_buffer((gs, lanes), _F32, scope="local")
        # staged QK passes run as one loop over passes of qk_heads heads: rows padded to whole passes (a padded
        # head's query is 0 and its row is never read)
        self.qk_rows = -(-gs // self.qk_heads) * self.qk_heads if self.stage_keys else gs
        self.s_buf = T.alloc_buffer((self.qk_rows, slots), _F32, scope="local")
        self.p_buf = T.alloc_buffer((gs, slots), _F32, scope="local")
        self.pv = T.alloc_buffer((gs, nvg, slots), _F32, scope="local")
        self.vsf = T.alloc_buffer((nvg, slots), _F32, scope="local")
        self.vzf = T.alloc_buffer((nvg, slots), _F32, scope="local")
        # 16 slots per nibble: one lookup each (vpermps on zmm: AVX-512 only, refused elsewhere by the compiler)
        self.use_lut = bool(knobs.lut) and bits == 4 and self.lb == LANES == lanes
        self.kv = T.alloc_buffer((fields, self.lb), _F32, scope="local")
        if self.stage_keys:
            self.kall = T.alloc_buffer((d, slots), _F32, scope="local")
        self.vv = T.alloc_buffer((fields, pvc), _F32, scope="local")
        self.int8_dots = int8_dots(spec) and bits < 8  # int8 codes: the query's rounding would dominate
        if self.int8_dots:  # the query of a key group as int8 (+ one scale per head), read 4 channels at a time
            self.qi = T.alloc_buffer((gs * d,), "int8", scope="local")
            self.qi32 = T.decl_buffer((gs * d // 4,), _I32, data=self.qi.data, scope="local")
            self.qsc = T.alloc_buffer((_rows_out(gs, lanes),), _F32, scope="local")
            self.qinv = T.alloc_buffer((_rows_out(gs, lanes),), _F32, scope="local")
            self.qred = T.alloc_buffer((gs, lanes), _F32, scope="local")
            self.iacc = T.alloc_buffer((gs, slots // lanes, lanes), _I32, scope="local")
            # QK heads per pass (:meth:`_scores_int8`): slots / lanes accumulators each beside the query and two
            # temporaries; with passes, the shuffled key codes of a group are staged once for all of them
            nvec = slots // lanes
            self.qk8_heads = gs if cpu.dot == "vnni512" else cpu.heads_per_pass(gs, nvec, 3)
            self.kstage = T.alloc_buffer((d // 4, nvec, lanes), "uint32", scope="local") \
                if self.qk8_heads < gs else None
        # P @ V as uint8 probabilities x value codes where blocks of `lanes` bytes of V stay in one value group
        self.int_pv = self.int8_dots and vbytes % lanes == 0 and self.vg_bytes % lanes == 0
        if self.int_pv:
            self.pq = T.alloc_buffer((gs * nvg * slots,), "uint8", scope="local")
            self.pq32 = T.decl_buffer((gs * nvg * slots // 4,), _I32, data=self.pq.data, scope="local")
            self.psc = T.alloc_buffer((_rows_out(gs * nvg, lanes),), _F32, scope="local")
            self.pinv = T.alloc_buffer((_rows_out(gs * nvg, lanes),), _F32, scope="local")
            self.pred = T.alloc_buffer((gs * nvg, lanes), _F32, scope="local")
            # fields x heads int32 accumulators per pass: half the register file
            self.pv_heads = max(1, min(gs, cpu.vector_regs // 2 // fields))
            self.vacc = T.alloc_buffer((self.pv_heads, fields, lanes), _I32, scope="local")
        with T.serial(0, gs) as h:
            T.buffer_store(self.pm, f32(NEG_BIG), [h])
            with T.serial(0, fields) as f:
                with _vec(vbytes, lanes) as j:
                    T.buffer_store(self.pacc, f32(0.0), [h, f, j])
            with T.serial(0, nvg) as vg:
                with T.vectorized(0, lanes) as ln:
                    T.buffer_store(self.zacc, f32(0.0), [h * nvg + vg, ln])

    def tile(self, qf, nvalid, kb, kbase, k_scale, k_zero, vb, vbase, v_scale, v_zero) -> None:
        """One key group of ``nvalid`` tokens: key bytes ``kb[kbase ...]`` (channel-major, ``lb`` per channel),
        ``k_scale(dd)`` / ``k_zero(dd)`` its per-channel scale and zero, value bytes of token ``t`` at
        ``vb[vbase(t) ...]`` (rows of ``vbytes``, contiguous within the group: ``vbase(t) = vbase(0) + t vbytes``),
        ``v_scale(slot, vg)`` / ``v_zero(slot, vg)`` per token slot (slots past ``nvalid``
        are read clamped and masked)."""
        spec, lanes = self.spec, self.lanes
        d, gs = spec.head_dim, spec.group_size
        bits, mask, fields, slots, lb = self.bits, (1 << self.bits) - 1, self.fields, self.slots, self.lb
        vbytes, nvg, pvc, vg_bytes = self.vbytes, self.nvg, self.pvc, self.vg_bytes
        qs, zt, s_buf, p_buf, kv, vv = self.qs, self.zt, self.s_buf, self.p_buf, self.kv, self.vv
        pacc, zacc, pv, vsf, vzf = self.pacc, self.zacc, self.pv, self.vsf, self.vzf
        # ---- scale / zero folded into the query ----
        zl = min(lanes, d)
        # opaque trip count (== gs): LLVM must not fully unroll this loop and then hoist all gs x d loads of qf
        # out of the group loop (28+ vector registers live across the QK loop spill its accumulators)
        with T.serial(0, gs + self.opaque_zero) as h:
            with T.vectorized(0, zl) as ln:
                T.buffer_store(zt, f32(0.0), [h, ln])
            with T.serial(0, d // zl) as do:
                with T.vectorized(0, zl) as ln:
                    dd = do * zl + ln
                    T.buffer_store(qs, qf[h, dd] * k_scale(dd).astype(_F32), [h, dd])
                    T.buffer_store(zt, zt[h, ln] + qf[h, dd] * k_zero(dd).astype(_F32), [h, ln])
        # ---- scores over token slots: S[h, f * lb + j] ----
        if self.int8_dots:
            self._scores_int8(kb, kbase)
        with T.unroll(0, self.qk_rows if not self.int8_dots else 0) as h:
            with _vec(slots, lanes) as s:
                T.buffer_store(s_buf, f32(0.0), [h, s])
        def unpack(dd, out, row):
            with T.unroll(0, fields) as f:
                with _vec(lb, lanes) as j:
                    code = tirx.bitwise_and(tirx.shift_right(_u8(kb[kbase + dd * lb + j]), f * bits),
                                            tirx.const(mask, _I32))
                    T.buffer_store(out, code.astype(_F32), row(f, j))

        if self.stage_keys and not self.int8_dots:
            with T.serial(0, d) as dd:
                unpack(dd, self.kall, lambda f, j: [dd, f * lb + j])
            # one loop over the passes (not one copy per pass: LLVM's register allocator spilled the accumulators
            # of some unrolled copies and not others)
            hp = self.qk_heads
            with T.serial(0, self.qk_rows // hp) as pi:
                with T.serial(0, d) as dd:
                    with T.unroll(0, hp) as hi:
                        h = pi * hp + hi
                        qv = tirx.Select(h < gs, qs[tirx.min(h, gs - 1), dd], f32(0.0))
                        with T.unroll(0, fields) as f:
                            with _vec(lb, lanes) as j:
                                T.buffer_store(s_buf, s_buf[h, f * lb + j] + qv * self.kall[dd, f * lb + j],
                                               [h, f * lb + j])
        # heads in passes of qk_heads: (qk_heads x slots / lanes) accumulators must stay in registers
        for h0 in range(0, gs, self.qk_heads) if not (self.int8_dots or self.stage_keys) else ():
            hn = min(self.qk_heads, gs - h0)
            with T.serial(0, d) as dd:
                if self.use_lut:
                    _lut_nibbles(kb, kbase + dd * lb, kv)
                else:
                    unpack(dd, kv, lambda f, j: [f, j])
                with T.unroll(0, hn) as hi:
                    h = h0 + hi
                    with T.unroll(0, fields) as f:
                        with _vec(lb, lanes) as j:
                            T.buffer_store(s_buf, s_buf[h, f * lb + j] + qs[h, dd] * kv[f, j], [h, f * lb + j])
        # per head: the key zero point's term (and the int8 query's exact correction, folded into zt) for every slot
        zsum = T.alloc_buffer((_rows_out(gs, zl),), _F32, scope="local")
        _tree_rows(lambda a, b: a + b, zt, gs, zl, zsum)
        with T.serial(0, gs) as h:
            with _vec(slots, lanes) as s:
                if self.int8_dots:
                    dot = self.iacc[h, s // lanes, s % lanes].astype(_F32) * self.qsc[h]
                else:
                    dot = s_buf[h, s]
                T.buffer_store(s_buf, dot + zsum[h], [h, s])

        def rescale(h, a):
            with T.serial(0, nvg) as vg:
                with T.vectorized(0, lanes) as ln:
                    T.buffer_store(zacc, zacc[h * nvg + vg, ln] * a, [h * nvg + vg, ln])
            with T.serial(0, fields) as f:
                with _vec(vbytes, lanes) as j:
                    T.buffer_store(pacc, pacc[h, f, j] * a, [h, f, j])

        _tile_softmax(gs, slots, nvalid, s_buf, p_buf, self.pm, self.pl, rescale, lanes, self.cpu.scalef)
        # ---- P folded with the per-token value scale; zero-point sums (v scale / zero read once per tile) ----
        with T.serial(0, nvg) as vg:
            with _vec(slots, lanes) as s:
                ok = s < nvalid
                T.buffer_store(vsf, tirx.Select(ok, v_scale(s, vg).astype(_F32), f32(0.0)), [vg, s])
                T.buffer_store(vzf, tirx.Select(ok, v_zero(s, vg).astype(_F32), f32(0.0)), [vg, s])
        with T.serial(0, gs) as h:
            with T.serial(0, nvg) as vg:
                with _vec(slots, lanes) as s:
                    T.buffer_store(pv, p_buf[h, s] * vsf[vg, s], [h, vg, s])
                with T.vectorized(0, lanes) as ln:
                    zz = p_buf[h, ln] * vzf[vg, ln]
                    for k in range(1, slots // lanes):
                        zz = zz + p_buf[h, k * lanes + ln] * vzf[vg, k * lanes + ln]
                    T.buffer_store(zacc, zacc[h * nvg + vg, ln] + zz, [h * nvg + vg, ln])
        if self.int_pv:
            self._pv_int8(nvalid, vb, vbase)
            return
        # ---- P @ V: channel-vectorized, pvc bytes (F * pvc channels) of V per pass over the tile's tokens, the
        # heads in passes of pv_pass (one pass on AVX-512: F x pvc / lanes accumulators per head must fit) ----
        with T.unroll(0, vbytes // pvc) as c:
            vg = tirx.floordiv(c * pvc, vg_bytes)
            for h0 in range(0, gs, self.pv_pass):
                with T.serial(0, nvalid) as t:
                    vb0 = vbase(t) + c * pvc
                    if self.use_lut and pvc == lanes:
                        _lut_nibbles(vb, vb0, vv)
                    else:
                        with T.unroll(0, fields) as f:
                            with T.vectorized(0, pvc) as j:
                                code = tirx.bitwise_and(tirx.shift_right(_u8(vb[vb0 + j]), f * bits),
                                                        tirx.const(mask, _I32))
                                T.buffer_store(vv, code.astype(_F32), [f, j])
                    with T.unroll(0, min(self.pv_pass, gs - h0)) as hi:
                        h = hi + h0 if h0 else hi
                        with T.unroll(0, fields) as f:
                            with T.vectorized(0, pvc) as j:
                                idx = [h, f, c * pvc + j]
                                T.buffer_store(pacc, pacc[idx[0], idx[1], idx[2]] + pv[h, vg, t] * vv[f, j], idx)

    def _scores_int8(self, kb, kbase) -> None:
        """Integer key codes x the int8 query: ``iacc[h, k, lane]`` = the code dot product of slot
        ``lanes k + lane``. The scaled query ``qs`` is quantized per head (symmetric, scale ``qsc[h] = max|qs| /
        127``); the ``4 lb`` key bytes of 4 channels are shuffled into one dword of 4 channel codes per token slot
        (``vpermb``/``vpermt2b`` on AVX-512 VBMI; byte unpacks and ``vpshufb`` on AVX2), the fields shifted out per
        lane, and one dot-product step per head and ``lanes`` slots does ``4 lanes`` multiply-adds
        (:func:`dot4_accumulate`; the fp32 path: ``lanes`` FMAs plus an unpack per channel). Where the register
        file cannot hold every head's accumulators (AVX2), the heads go in passes over the channels."""
        spec, cpu, lanes = self.spec, self.cpu, self.lanes
        d, gs = spec.head_dim, spec.group_size
        bits, lb, slots = self.bits, self.lb, self.slots
        qs, qi, qi32, qsc, qinv, iacc = self.qs, self.qi, self.qi32, self.qsc, self.qinv, self.iacc
        zl = min(lanes, d)
        red = self.qred
        with T.serial(0, gs + self.opaque_zero) as h:
            with T.vectorized(0, zl) as ln:
                mx = tirx.abs(qs[h, ln])
                for k in range(1, d // zl):
                    mx = tirx.max(mx, tirx.abs(qs[h, k * zl + ln]))
                T.buffer_store(red, mx, [h, ln])
        _int8_scales(red, gs, zl, 127.0, qsc, qinv)
        c0 = f32(((1 << bits) - 1) / 2.0)
        with T.serial(0, gs + self.opaque_zero) as h:
            # sum_d code * (qs - qsc qi) = sum_d (code - c0)(...) + c0 sum_d (qs - qsc qi): the second term is known
            # exactly, so only the centered codes (half the magnitude) carry the query's rounding error; it is a
            # per-head constant of the tile, added to the zero point's lane partials (one reduction for both)
            # one rounding conversion per vector, the rounded sum kept in int32
            sq = sr = None
            for k in range(d // zl):
                x = tirx.BufferLoad(qs, [h, tirx.Ramp(k * zl, 1, zl)])
                r = _round_i32(x * tirx.Broadcast(qinv[h], zl), zl)
                T.buffer_store(qi, r.astype(f"int8x{zl}"), [tirx.Ramp(h * d + k * zl, 1, zl)])
                sq, sr = (x, r) if sq is None else (sq + x, sr + r)
            zw = [h, tirx.Ramp(0, 1, zl)]
            corr = (sq - sr.astype(f"float32x{zl}") * tirx.Broadcast(qsc[h], zl)) * tirx.Broadcast(c0, zl)
            T.buffer_store(self.zt, tirx.BufferLoad(self.zt, zw) + corr, zw)
        nvec = slots // lanes
        opw = 4 * lanes  # bytes of one dot-product operand
        nin = max(1, 4 * lb // opw)  # input vectors of the 4 channels' bytes (opw bytes each, or one of 4 lb)
        inw = 4 * lb // nin
        mask = ((1 << bits) - 1) * 0x01010101
        def shuffled(c4) -> list:
            """The nvec operands of channels 4 c4 .. 4 c4 + 3: one dword of 4 channel codes per slot."""
            xs = [tirx.BufferLoad(kb, [tirx.Ramp(kbase + c4 * 4 * lb + i * inw, 1, inw)]) for i in range(nin)]
            xs = xs * max(1, opw // (inw * nin))  # fewer bytes than an operand: listed again (a shuffle yields at
            # most its input lanes)
            codes = []
            for k in range(nvec):
                idx = [tirx.const(ch * lb + (k * lanes + ln) % lb, _I32) for ln in range(lanes) for ch in range(4)]
                y = tirx.reinterpret(f"uint32x{lanes}", tirx.Shuffle(xs, idx))
                if lb < slots:  # slot s is field s // lb of its byte: shift it down (per lane)
                    field = tirx.floordiv(tirx.Ramp(k * lanes, 1, lanes), lb)
                    y = tirx.shift_right(y, (field * bits).astype(f"uint32x{lanes}"))
                if bits < 8:
                    y = tirx.bitwise_and(y, tirx.Broadcast(tirx.const(mask, "uint32"), lanes))
                codes.append(y)
            return codes

        # heads per pass: nvec accumulators each, beside the query and two temporaries (and the nvec code vectors
        # where they are shuffled in the pass); with passes, the shuffled codes are staged once (L1) for all of them
        hp, staged = self.qk8_heads, self.kstage
        if staged is not None:
            with T.serial(0, d // 4) as c4:
                for k, y in enumerate(shuffled(c4)):
                    T.buffer_store(staged, y, [c4, k, tirx.Ramp(0, 1, lanes)])
        for h0 in range(0, gs, hp):
            hn = min(hp, gs - h0)
            with T.unroll(0, hn) as hi:
                with T.unroll(0, nvec) as k:
                    with T.vectorized(0, lanes) as ln:
                        # the opaque 0: LLVM merged constant-zero stores of the accumulators into a memset call
                        # (a vzeroupper and a libc call per tile and bucket: ~5% of the int8 kernel)
                        T.buffer_store(iacc, self.opaque_zero, [hi + h0 if h0 else hi, k, ln])
            with T.serial(0, d // 4) as c4:
                if staged is None:
                    codes = shuffled(c4)
                else:
                    codes = [tirx.BufferLoad(staged, [c4, k, tirx.Ramp(0, 1, lanes)]) for k in range(nvec)]
                codes = [tirx.reinterpret(f"int8x{opw}", y) for y in codes]
                with T.unroll(0, hn) as hi:
                    h = hi + h0 if h0 else hi
                    qv = _dword_bcast(qi32[h * (d // 4) + c4], lanes)
                    for k in range(nvec):
                        dot4_accumulate(cpu, iacc, [h, k], codes[k], qv)  # key codes unsigned, query signed

    def _pv_int8(self, nvalid, vb, vbase) -> None:
        """P @ V in int8: per head and value group the tile's ``P * v_scale`` (>= 0) is quantized to uint8
        (scale ``max / 255``), 4 tokens' bytes of a ``lanes``-byte block of V are interleaved into one dword per
        byte (the same shuffle as the keys'), each field shifted out uniformly: one dot-product step per head,
        field and 4 tokens adds ``4 lanes`` products into the int32 accumulators of ``lanes`` channels
        (``pacc``'s layout: byte x field), which are scaled into ``pacc`` once per tile. Tokens past ``nvalid``
        have probability 0 and read a valid token's bytes."""
        spec, cpu, lanes = self.spec, self.cpu, self.lanes
        gs = spec.group_size
        bits, fields, slots, vbytes, nvg, vg_bytes = self.bits, self.fields, self.slots, self.vbytes, self.nvg, \
            self.vg_bytes
        pv, pq, pq32, psc, vacc, pacc = self.pv, self.pq, self.pq32, self.psc, self.vacc, self.pacc
        red, pinv = self.pred, self.pinv
        with T.serial(0, gs + self.opaque_zero) as h:
            with T.serial(0, nvg) as vg:
                with T.vectorized(0, lanes) as ln:
                    mx = pv[h, vg, ln]
                    for k in range(1, slots // lanes):
                        mx = tirx.max(mx, pv[h, vg, k * lanes + ln])
                    T.buffer_store(red, mx, [h * nvg + vg, ln])
        _int8_scales(red, gs * nvg, lanes, 255.0, psc, pinv)
        with T.serial(0, gs + self.opaque_zero) as h:
            with T.serial(0, nvg) as vg:
                for k in range(slots // lanes):
                    x = tirx.BufferLoad(pv, [h, vg, tirx.Ramp(k * lanes, 1, lanes)])
                    r = _round_i32(x * tirx.Broadcast(pinv[h * nvg + vg], lanes), lanes)
                    T.buffer_store(pq, r.astype(f"uint8x{lanes}"), [tirx.Ramp((h * nvg + vg) * slots + k * lanes, 1,
                                                                               lanes)])
        mask = ((1 << bits) - 1) * 0x01010101
        idx = [tirx.const(ti * lanes + ln, _I32) for ln in range(lanes) for ti in range(4)]
        last = tirx.max(nvalid - 1, 0)
        opw = 4 * lanes  # bytes of one dot-product operand
        for jb in range(vbytes // lanes):
            vg = jb * lanes // vg_bytes
            for h0 in range(0, gs, self.pv_heads):
                hn = min(self.pv_heads, gs - h0)
                with T.unroll(0, hn) as hi:
                    with T.unroll(0, fields) as f:
                        with T.vectorized(0, lanes) as ln:
                            T.buffer_store(vacc, self.opaque_zero, [hi, f, ln])  # no memset (see QK)
                def step(t4, xs, idx) -> None:
                    y = tirx.reinterpret(f"uint32x{lanes}", tirx.Shuffle(xs, idx))
                    codes = []
                    for f in range(fields):
                        yf = tirx.shift_right(y, tirx.Broadcast(tirx.const(f * bits, "uint32"), lanes)) if f else y
                        yf = tirx.bitwise_and(yf, tirx.Broadcast(tirx.const(mask, "uint32"), lanes))
                        codes.append(tirx.reinterpret(f"int8x{4 * lanes}", yf))
                    with T.unroll(0, hn) as hi:
                        pb = _dword_bcast(pq32[((h0 + hi) * nvg + vg) * (slots // 4) + t4], lanes)
                        for f in range(fields):
                            dot4_accumulate(cpu, vacc, [hi, f], pb, codes[f])  # probabilities unsigned, codes signed

                # whole quads of tokens: their 4 vbytes rows are contiguous; where the block's bytes lie in at most
                # two operand-wide loads, those are loaded and permuted (one vpermt2b on AVX-512 VBMI)
                with T.serial(0, tirx.floordiv(nvalid, 4)) as t4:
                    want = [ti * vbytes + jb * lanes for ti in range(4)]
                    c0, c1 = want[0] // opw, (want[-1] + lanes - 1) // opw
                    if cpu.dot == "vnni512" and c1 - c0 <= 1:
                        xs = [tirx.BufferLoad(vb, [tirx.Ramp(vbase(t4 * 4) + c * opw, 1, opw)])
                              for c in range(c0, c1 + 1)]
                        step(t4, xs, [tirx.const(want[ti] + ln - c0 * opw, _I32) for ln in range(lanes)
                                      for ti in range(4)])
                    else:
                        step(t4, [tirx.BufferLoad(vb, [tirx.Ramp(vbase(t4 * 4 + ti) + jb * lanes, 1, lanes)])
                                  for ti in range(4)], idx)
                # the last partial quad: rows past nvalid read the last valid row (probability 0)
                with T.serial(tirx.floordiv(nvalid, 4), tirx.floordiv(nvalid + 3, 4)) as t4:
                    rows = [vbase(tirx.min(t4 * 4 + ti, last)) + jb * lanes for ti in range(4)]
                    step(t4, [tirx.BufferLoad(vb, [tirx.Ramp(r, 1, lanes)]) for r in rows], idx)
                with T.unroll(0, hn) as hi:
                    with T.unroll(0, fields) as f:
                        with T.vectorized(0, lanes) as ln:
                            j = jb * lanes + ln
                            T.buffer_store(pacc, pacc[h0 + hi, f, j] + vacc[hi, f, ln].astype(_F32)
                                           * psc[(h0 + hi) * nvg + vg], [h0 + hi, f, j])

    def finish(self, m_all, l_all, acc) -> None:
        pacc, fields, vgrp, gs, nvg = self.pacc, self.fields, self.qspec.v_group, self.spec.group_size, self.nvg
        zacc = T.alloc_buffer((_rows_out(gs * nvg, self.lanes),), _F32, scope="local")
        _tree_rows(lambda a, b: a + b, self.zacc, gs * nvg, self.lanes, zacc)

        def piece_acc(h, dd):
            return (pacc[h, tirx.floormod(dd, fields), tirx.floordiv(dd, fields)]
                    + zacc[h * nvg + tirx.floordiv(dd, vgrp)])

        _merge_piece(self.spec.group_size, self.spec.head_dim, self.pm, self.pl, m_all, l_all, acc, piece_acc,
                     self.lanes)


def _quant_piece(spec: KernelSpec, p: Piece, knobs: CpuKnobs, bufs, b, kh, sp, qf, m_all, l_all, acc, scratch,
                 cpu: CpuIsa = AVX512) -> None:
    """One bucket: its key groups in storage order through :class:`QuantTiles`."""
    hkv, d, kg = spec.num_kv_heads, spec.head_dim, spec.k_group
    pre = f"{p.tag}_"
    k_codes, k_scale, k_zero = bufs[pre + "k_codes"], bufs[pre + "k_scale"], bufs[pre + "k_zero"]
    v_codes, v_scale, v_zero, lens = bufs[pre + "v_codes"], bufs[pre + "v_scale"], bufs[pre + "v_zero"], bufs[pre + "lens"]
    nv = lens[b]
    st = QuantTiles(spec, p.bits, knobs, scratch, tirx.min(nv, 0), cpu)  # lens >= 0: an opaque 0
    n_grp, n_tok, bsz = k_codes.shape[2], v_codes.shape[2], k_codes.shape[0]
    # byte views of the packed words (same memory; little-endian)
    kb = T.decl_buffer((bsz * hkv * n_grp * d * st.lb,), _U8, data=k_codes.data)
    vb = T.decl_buffer((bsz * hkv * n_tok * st.vbytes,), _U8, data=v_codes.data)
    IRBuilder.name_many([f"{pre}kb", f"{pre}vb"], [kb, vb])
    n_tiles = tirx.floordiv(nv + kg - 1, kg)
    t0, t1 = _split_range(n_tiles, sp, knobs.splits)
    with T.serial(t0, t1) as g:
        tok0 = g * kg

        def tok(s):
            return tok0 + tirx.min(s, kg - 1)

        ks, kz = (lambda dd: k_scale[b, kh, g, dd]), (lambda dd: k_zero[b, kh, g, dd])
        vs, vz = (lambda s, vg: v_scale[b, kh, tok(s), vg]), (lambda s, vg: v_zero[b, kh, tok(s), vg])
        if p.meta8:  # 8-bit codes on the bases of the group's run (a tile is one key group: keys and values share it)
            k_base, v_base, run = bufs[pre + "k_base"], bufs[pre + "v_base"], bufs[pre + "run_of"][b, g]
            ks8, kz8 = _meta8_pair(ks, kz, lambda f, dd: k_base[b, kh, run, f, dd])
            vs, vz = _meta8_pair(vs, vz, lambda f, vg, s: v_base[b, kh, run, f, vg], values=True)
            # the tile reads a channel's key scale/zero once per query head: decode them once per group
            ksb = T.alloc_buffer((d,), "float16", scope="local")
            kzb = T.alloc_buffer((d,), "float16", scope="local")
            with _vec(d, cpu.lanes) as dd:
                T.buffer_store(ksb, ks8(dd), [dd])
                T.buffer_store(kzb, kz8(dd), [dd])
            ks, kz = (lambda dd: ksb[dd]), (lambda dd: kzb[dd])
        st.tile(qf, tirx.min(kg, nv - g * kg), kb, ((b * hkv + kh) * n_grp + g) * (d * st.lb), ks, kz,
                vb, lambda t: ((b * hkv + kh) * n_tok + tok0 + t) * st.vbytes, vs, vz)
    st.finish(m_all, l_all, acc)


def _meta8_pair(scale_code, zero_code, base, values: bool = False):
    """fp16 scale and zero accessors from 8-bit code accessors and a run-base accessor ``base(field, ...)``:
    ``fp16(base_s * code / 255)`` and ``fp16(z_lo + code * z_step)`` in fp32, as :func:`wq_compile.core.meta8.
    decode` (which the reference and every other kernel read)."""
    def scale(*ix):
        x = base(0, ix[-1], *ix[:-1]) if values else base(0, *ix)
        return (x.astype(_F32) * scale_code(*ix).astype(_F32) / f32(255.0)).astype("float16")

    def zero(*ix):
        lo, step = (base(1, ix[-1], *ix[:-1]), base(2, ix[-1], *ix[:-1])) if values else (base(1, *ix), base(2, *ix))
        return (lo.astype(_F32) + zero_code(*ix).astype(_F32) * step.astype(_F32)).astype("float16")

    return scale, zero


def _dense_piece(spec: KernelSpec, p: Piece, bufs, b, kh, sp, qf, m_all, l_all, acc, scratch,
                 cpu: CpuIsa = AVX512) -> None:
    """The dense (fp16 residual) piece in tiles of ``lanes`` tokens (one vector of scores per head)."""
    d, gs = spec.head_dim, spec.group_size
    tile = lanes = cpu.lanes
    pre = f"{p.tag}_"
    k, v, lens = bufs[pre + "k"], bufs[pre + "v"], bufs[pre + "lens"]
    knobs = CpuKnobs.of(spec)
    nv = lens[b]
    n_tiles = tirx.floordiv(nv + tile - 1, tile)
    t0, t1 = _split_range(n_tiles, sp, knobs.splits)
    pm = T.alloc_buffer((gs,), _F32, scope="local")
    pl = sum_state(gs, lanes)
    pacc = scratch["pacc"]
    s_buf = T.alloc_buffer((gs, tile), _F32, scope="local")
    p_buf = T.alloc_buffer((gs, tile), _F32, scope="local")
    kt = scratch["kt"]
    with T.serial(0, gs) as h:
        T.buffer_store(pm, f32(NEG_BIG), [h])
        with _vec(d, lanes) as dd:
            T.buffer_store(pacc, f32(0.0), [h, dd])
    pc = min(lanes, d)
    with T.serial(t0, t1) as ti:
        tok0 = ti * tile
        nvalid = tirx.min(tile, nv - tok0)
        # transpose the tile's keys (rows past lens are clamped to a valid row: finite, masked below)
        with T.serial(0, tile) as t:
            with _vec(d, lanes) as dd:
                T.buffer_store(kt, k[b, kh, tok0 + tirx.min(t, nvalid - 1), dd].astype(_F32), [dd, t])
        with T.unroll(0, gs) as h:
            with _vec(tile, lanes) as t:
                T.buffer_store(s_buf, f32(0.0), [h, t])
        with T.serial(0, d) as dd:
            with T.unroll(0, gs) as h:
                with _vec(tile, lanes) as t:
                    T.buffer_store(s_buf, s_buf[h, t] + qf[h, dd] * kt[dd, t], [h, t])
        def rescale_d(h, a):
            with _vec(d, lanes) as dd:
                T.buffer_store(pacc, pacc[h, dd] * a, [h, dd])

        _tile_softmax(gs, tile, nvalid, s_buf, p_buf, pm, pl, rescale_d, lanes)
        with T.unroll(0, d // pc) as c:
            with T.serial(0, nvalid) as t:
                with T.unroll(0, gs) as h:
                    with T.vectorized(0, pc) as j:
                        dd = c * pc + j
                        val = pacc[h, dd] + p_buf[h, t] * v[b, kh, tok0 + t, dd].astype(_F32)
                        T.buffer_store(pacc, val, [h, dd])
    _merge_piece(gs, d, pm, pl, m_all, l_all, acc, lambda h, dd: pacc[h, dd], lanes)
