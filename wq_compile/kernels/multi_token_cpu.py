"""CPU (llvm) fused attention of several new query tokens over the bucketed cache: ``kind="multi"``.

A step of ``S`` new tokens on a filled cache (a follow-up question, draft verification, a chunk of a new clip's
turn) in one launch. Arguments are the fused kernel's pieces with token-major query and output
(:func:`~wq_compile.kernels.signatures.multi_signature`: ``q, out [B, S, Hq, D]``); ``S`` is a run-time size, so
one module per bucket mix and dtype serves every step length (the runtime cuts steps longer than
:data:`~wq_compile.kernels.signatures.MAX_STEP_CHUNK` into chunks, each causal at its offset by its own
``dense_lens``). A per-``S`` module would cost one compile (and one knob record) per length for nothing: the loop
structure below does not depend on ``S``.

Structure: the decode kernel of :mod:`.attention_cpu` with *query rows* = (token, head) pairs. Row ``r`` of the
``S * G`` rows of one KV head (``G`` query heads per KV head) is token ``r // G``, head ``r % G``. A work item is
``(b, kh, row tile, split)``; its ``R`` rows (the ``rows`` knob: ``R`` accumulators per SIMD register tile) go
through the fused kernel's tile body (:class:`~wq_compile.kernels.attention_cpu.QuantTiles`, with ``R`` in place of
the GQA group), so each key group's codes are unpacked once per row tile and feed ``R`` rows (the one-token kernel
called ``S`` times unpacks them once per token)::

    for b, kh, row tile, split:                       # parallel
      qf[j, :] = q[b, tok_j, kh * G + head_j, :] * sm_scale        (rows past S * G repeat the last row, unwritten)
      for bucket: QuantTiles over its key groups      # no mask: every cached token precedes the step
      dense piece (tiles of 16 tokens): row j sees dense tokens t < dense_lens[b] - (S - 1 - tok_j)   # causal
      (m, l, acc) of the pieces merged; splits == 1: out = acc / l directly, else partials + a merge

The ``S`` new tokens are the last ``S`` valid tokens of each sample's dense piece (the cache appends them before
attention), exactly as the per-token path :func:`wq_compile.integrations.multi_token.causal_steps` assumed; a
left-padded batch has its own ``dense_lens`` per sample. A row with no valid token gives 0.

Knobs (``spec.extra``, tuned by the same sweep as the fused kernel): ``rows`` plus :class:`CpuKnobs` (``splits``,
``pvc``, ``qkh``, ``lut``). No int8 dot-product mode: the rows run the exact fp32 path.

CUDA form: :mod:`.multi_token_split`, the split-KV kernel of :mod:`.split_decode` with the same rows: its grid
``(B * Hkv, P)`` becomes ``(B * row tiles * Hkv, P)`` with the GQA group axis replaced by ``R`` (token, head) rows
(the staged key/value chunk in shared memory serves ``R`` rows instead of ``G``), its dense-piece mask compares each
token with the row's causal bound instead of ``lens``, and ``o_parts / lse_parts`` gain the token axis
(``[P, B, S, Hq, D]``), which the unchanged merge kernel reads as ``B * S`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..core.spec import KernelSpec
from .attention_cpu import (LANES, PLAIN_TIR_ATTR, CpuKnobs, _merge_piece, _quant_piece, _split_range, _tile_softmax,
                            _vec, int8_dots, sum_state)
from .common import NEG_BIG, declare_params, f32, fast_exp, signature_params
from .cpu_isa import AVX512, CpuIsa
from .signatures import multi_signature, pieces

_F32, _I32 = "float32", "int32"

#: Token tile of the dense piece: one AVX-512 vector of tokens. The multi-token kernel is written for the AVX-512
#: vector unit only (no per-ISA variant like the fused kernel's :mod:`.cpu_isa`; LLVM splits its vectors on AVX2).
DENSE_TILE = LANES

#: Query rows per work item by default: 8 rows x 32 token slots of scores are 16 AVX-512 accumulators.
DEFAULT_ROWS = 8
#: Most rows a tile may hold (the register tiles of QK and P @ V grow with it).
MAX_ROWS = 32


@dataclass(frozen=True)
class MultiKnobs:
    """Structure knobs of the multi-token kernel: the fused kernel's :class:`CpuKnobs` and ``rows``, the (token,
    head) query rows per work item."""

    cpu: CpuKnobs = CpuKnobs()
    rows: int = DEFAULT_ROWS

    @staticmethod
    def of(spec: KernelSpec) -> "MultiKnobs":
        rows = int(dict(spec.extra).get("rows", DEFAULT_ROWS))
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"rows: the multi-token kernel takes 1..{MAX_ROWS} query rows per tile, got {rows}")
        return MultiKnobs(CpuKnobs.of(spec), rows)


def row_spec(spec: KernelSpec, rows: int) -> KernelSpec:
    """The fused spec whose GQA group is ``rows`` query rows: what :class:`QuantTiles` is built for."""
    return KernelSpec("fused", spec.bits, spec.head_dim, spec.num_kv_heads * rows, spec.num_kv_heads, spec.k_group,
                      spec.v_group, spec.dtype, spec.chunk)


def build_multi_cpu(spec: KernelSpec, cpu: CpuIsa | None = None) -> tirx.PrimFunc:
    """Plain TIR of the multi-token kernel for llvm targets (see the module docstring). It keeps the 16-lane
    structure on every target (LLVM splits it on narrower registers); of ``cpu`` (None: AVX-512) it takes only
    whether ``vscalefps`` exists for the quantized pieces' exps."""
    if spec.kind != "multi":
        raise ValueError(f"kind: expected a multi-token spec, got {spec.kind!r}")
    if int8_dots(spec):
        raise ValueError("extra: the multi-token kernel has no int8 dot-product mode (dot8); its rows run in fp32")
    sig = multi_signature(spec)  # checks the dense piece is there
    ps = pieces(spec)
    knobs = MultiKnobs.of(spec)
    rows, nsplit = knobs.rows, knobs.cpu.splits
    rspec = row_spec(spec, rows)
    qcpu = replace(AVX512, dot=None, scalef=AVX512.scalef if cpu is None else cpu.scalef)
    hkv, d, gs = spec.num_kv_heads, spec.head_dim, spec.group_size
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.uri)
            T.func_attr({"tirx.noalias": True, PLAIN_TIR_ATTR: True})
            bufs, syms = declare_params(signature_params(sig))
            bsz, steps = syms["B"], syms["S"]
            q, sm_scale, out = bufs["q"], bufs["sm_scale"], bufs["out"]
            nrows = steps * gs
            ntiles = tirx.floordiv(nrows + rows - 1, rows)
            items = bsz * hkv * ntiles * nsplit
            if nsplit > 1:  # partial states of every work item, merged after the parallel loop
                ws_m = T.alloc_buffer((items * rows,), _F32)
                ws_l = T.alloc_buffer((items * rows,), _F32)
                ws_acc = T.alloc_buffer((items * rows * d,), _F32)
                IRBuilder.name_many(["ws_m", "ws_l", "ws_acc"], [ws_m, ws_l, ws_acc])
            with T.parallel(0, items) as wi:
                sp = tirx.floormod(wi, nsplit)
                rt = tirx.floormod(tirx.floordiv(wi, nsplit), ntiles)
                kh = tirx.floormod(tirx.floordiv(wi, nsplit * ntiles), hkv)
                b = tirx.floordiv(wi, nsplit * ntiles * hkv)
                # one scratch arena per work item (see attention_cpu.decode_frame): qf, acc, qs, pacc, then kt
                arena = T.alloc_buffer((4 * rows * d + d * DENSE_TILE,), _F32, scope="local")
                IRBuilder.name("arena", arena)

                def view(shape, k):
                    return T.decl_buffer(shape, _F32, data=arena.data, elem_offset=k * rows * d, scope="local")

                qf, acc = view((rows, d), 0), view((rows, d), 1)
                scratch = {"qs": view((rows, d), 2), "pacc": view((rows, d), 3), "kt": view((d, DENSE_TILE), 4)}
                m_all = T.alloc_buffer((rows,), _F32, scope="local")
                l_all = T.alloc_buffer((rows,), _F32, scope="local")
                tok = T.alloc_buffer((rows,), _I32, scope="local")  # the new token of each row
                with T.serial(0, rows) as j:
                    r = tirx.min(rt * rows + j, nrows - 1)
                    T.buffer_store(tok, tirx.floordiv(r, gs), [j])
                    with _vec(d) as dd:
                        qv = q[b, tirx.floordiv(r, gs), kh * gs + tirx.floormod(r, gs), dd]
                        T.buffer_store(qf, qv.astype(_F32) * sm_scale, [j, dd])
                        T.buffer_store(acc, f32(0.0), [j, dd])
                    T.buffer_store(m_all, f32(NEG_BIG), [j])
                    T.buffer_store(l_all, f32(0.0), [j])
                for p in ps:
                    if p.quantized:
                        _quant_piece(rspec, p, knobs.cpu, bufs, b, kh, sp, qf, m_all, l_all, acc, scratch, qcpu)
                    else:
                        _causal_dense_piece(spec, rows, nsplit, bufs, b, kh, sp, steps, tok, qf, m_all, l_all, acc,
                                            scratch)
                with T.serial(0, rows) as j:
                    r = rt * rows + j
                    if nsplit == 1:
                        with T.If(r < nrows):
                            with T.Then():
                                _write_row(spec, out, b, kh, r, acc, j, l_all[j])
                    else:
                        i = wi * rows + j
                        T.buffer_store(ws_m, m_all[j], [i])
                        T.buffer_store(ws_l, l_all[j], [i])
                        with _vec(d) as dd:
                            T.buffer_store(ws_acc, acc[j, dd], [i * d + dd])
            if nsplit > 1:
                _merge_splits(spec, rows, nsplit, bsz * hkv * ntiles, ntiles, nrows, ws_m, ws_l, ws_acc, out)
    return ib.get()


def _write_row(spec: KernelSpec, out, b, kh, r, acc, j, total) -> None:
    """``out[b, token, head] = acc[j] / total`` for query row ``r`` (0 where no token was valid)."""
    gs = spec.group_size
    with _vec(spec.head_dim) as dd:
        val = tirx.Select(total > f32(0.0), acc[j, dd] / total, f32(0.0))
        T.buffer_store(out, val.astype(spec.tvm_dtype), [b, tirx.floordiv(r, gs), kh * gs + tirx.floormod(r, gs), dd])


def _merge_splits(spec: KernelSpec, rows: int, nsplit: int, n_tiles, ntiles, nrows, ws_m, ws_l, ws_acc, out) -> None:
    """Merge the splits of every (b, kh, row tile): ``out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M)``.
    One thread (a second pool launch costs more than these few rows)."""
    hkv, d = spec.num_kv_heads, spec.head_dim
    with T.serial(0, n_tiles) as bt:
        b = tirx.floordiv(bt, hkv * ntiles)
        kh = tirx.floormod(tirx.floordiv(bt, ntiles), hkv)
        rt = tirx.floormod(bt, ntiles)
        mm = T.alloc_buffer((rows,), _F32, scope="local")
        ll = T.alloc_buffer((rows,), _F32, scope="local")
        w = T.alloc_buffer((rows, nsplit), _F32, scope="local")
        tot = T.alloc_buffer((rows, d), _F32, scope="local")
        with T.serial(0, rows) as j:
            with T.If(rt * rows + j < nrows):
                with T.Then():
                    T.buffer_store(mm, f32(NEG_BIG), [j])
                    with T.serial(0, nsplit) as s:
                        T.buffer_store(mm, tirx.max(mm[j], ws_m[(bt * nsplit + s) * rows + j]), [j])
                    T.buffer_store(ll, f32(0.0), [j])
                    with T.serial(0, nsplit) as s:
                        i = (bt * nsplit + s) * rows + j
                        T.buffer_store(w, fast_exp(ws_m[i] - mm[j]), [j, s])
                        T.buffer_store(ll, ll[j] + ws_l[i] * w[j, s], [j])
                    with _vec(d) as dd:
                        val = f32(0.0)
                        for s in range(nsplit):
                            val = val + ws_acc[((bt * nsplit + s) * rows + j) * d + dd] * w[j, s]
                        T.buffer_store(tot, val, [j, dd])
                    _write_row(spec, out, b, kh, rt * rows + j, tot, j, ll[j])


def _causal_dense_piece(spec: KernelSpec, rows: int, nsplit: int, bufs, b, kh, sp, steps, tok, qf, m_all, l_all,
                        acc, scratch) -> None:
    """The dense piece in tiles of :data:`DENSE_TILE` tokens, row ``j`` masked at its token's causal bound
    ``dense_lens[b] - (S - 1 - tok[j])`` (the fused kernel's ``_dense_piece`` with one bound per row)."""
    d, tile = spec.head_dim, DENSE_TILE
    k, v, lens = bufs["dense_k"], bufs["dense_v"], bufs["dense_lens"]
    nv = lens[b]
    n_tiles = tirx.floordiv(nv + tile - 1, tile)
    t0, t1 = _split_range(n_tiles, sp, nsplit)
    pm = T.alloc_buffer((rows,), _F32, scope="local")
    pl = sum_state(rows, min(LANES, tile))
    lim = T.alloc_buffer((rows,), _I32, scope="local")
    pacc, kt = scratch["pacc"], scratch["kt"]
    s_buf = T.alloc_buffer((rows, tile), _F32, scope="local")
    p_buf = T.alloc_buffer((rows, tile), _F32, scope="local")
    with T.serial(0, rows) as h:
        T.buffer_store(pm, f32(NEG_BIG), [h])
        T.buffer_store(lim, nv - (steps - 1 - tok[h]), [h])
        with _vec(d) as dd:
            T.buffer_store(pacc, f32(0.0), [h, dd])
    pc = min(LANES, d)
    with T.serial(t0, t1) as ti:
        tok0 = ti * tile
        nvalid = tirx.min(tile, nv - tok0)
        # the tile's keys transposed (rows past lens clamped to a valid row: finite, masked below)
        with T.serial(0, tile) as t:
            with _vec(d) as dd:
                T.buffer_store(kt, k[b, kh, tok0 + tirx.min(t, nvalid - 1), dd].astype(_F32), [dd, t])
        with T.unroll(0, rows) as h:
            with _vec(tile) as t:
                T.buffer_store(s_buf, f32(0.0), [h, t])
        with T.serial(0, d) as dd:
            with T.unroll(0, rows) as h:
                with _vec(tile) as t:
                    T.buffer_store(s_buf, s_buf[h, t] + qf[h, dd] * kt[dd, t], [h, t])

        def rescale(h, a):
            with _vec(d) as dd:
                T.buffer_store(pacc, pacc[h, dd] * a, [h, dd])

        _tile_softmax(rows, tile, lambda h: lim[h] - tok0, s_buf, p_buf, pm, pl, rescale, LANES)
        with T.unroll(0, d // pc) as c:
            with T.serial(0, nvalid) as t:
                with T.unroll(0, rows) as h:
                    with T.vectorized(0, pc) as j:
                        dd = c * pc + j
                        val = pacc[h, dd] + p_buf[h, t] * v[b, kh, tok0 + t, dd].astype(_F32)
                        T.buffer_store(pacc, val, [h, dd])
    _merge_piece(rows, d, pm, pl, m_all, l_all, acc, lambda h, dd: pacc[h, dd])
