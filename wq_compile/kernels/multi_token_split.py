"""The multi-token kernel in split-KV form (``kind="multi"`` with ``("split", 1)``): its CUDA form, and the same
PrimFunc on llvm, where the tests run it against the reference.

``S`` new query tokens (a run-time size, at most :data:`~wq_compile.kernels.signatures.MAX_STEP_CHUNK` per launch)
attend to every bucket (all their valid tokens) and causally to the dense piece: token ``i`` sees dense tokens
``< dense_lens[b] - (S - 1 - i)``. The body is the split-KV decode's (:func:`.split_decode.build_split_rows`), with
*rows* = (token, head) pairs in place of the GQA group: row ``r`` of the ``S * G`` rows of a KV head is token
``r // G``, head ``kh * G + r % G``. A block takes ``R`` rows (``rows`` in ``spec.extra``, default ``G``: one token
per block, the split kernel's thread map, registers and shared memory), one warp per row; the row tile is folded
into the block's batch index (``B * ceil(S * G / R)`` block rows), so the grid is
``(B * row tiles * Hkv, P)``. Each block stages and dequantizes a key chunk once for its ``R`` rows. Rows past
``S * G`` repeat the last row (same values, same stores). Outputs are the partials of every row::

    o_parts [P, B, S, Hq, D] f32, lse_parts [P, B, S, Hq] f32  --(merge, read as B * S samples)-->  out [B, S, Hq, D]

so the split decode's merge kernel (:mod:`.merge`, ``merge_spec(spec)``) serves it unchanged. One module per bucket
mix and dtype serves every ``S``, batch, length and ``P``. Its CUDA binary is built with its own ptxas register-usage
level (:func:`.signatures.ptxas_register_level`): TVM's 10 spills it at the 7B shapes.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

from ..core.spec import KernelSpec
from .signatures import is_split, multi_split_signature, split_stages
from .split_decode import Rows, build_split_rows


def multi_rows(spec: KernelSpec) -> int:
    """Query rows per block of the CUDA multi-token kernel: ``rows`` in ``spec.extra``, default the GQA group."""
    rows = int(dict(spec.extra).get("rows", spec.group_size))
    if rows < 1:
        raise ValueError(f"rows: expected a positive row count per block, got {rows}")
    return rows


def rows_spec(spec: KernelSpec) -> KernelSpec:
    """The split-KV fused spec whose GQA group is the block's ``R`` rows: what the split body and the CUDA split
    schedule are built for (its intermediates are per row; its staging buffers: the multi-token spec's, resolved
    here, so that the construction check of the multi spec and the kernel agree even where a default depends on
    the tiles of the rows)."""
    rows = multi_rows(spec)
    return KernelSpec("fused", spec.bits, spec.head_dim, spec.num_kv_heads * rows, spec.num_kv_heads, spec.k_group,
                      spec.v_group, spec.dtype, spec.chunk, (("split", 1), ("stages", split_stages(spec))))


def build_multi_split(spec: KernelSpec, async_copy: bool = False) -> tirx.PrimFunc:
    """TIR of the split-KV multi-token kernel -> o_parts, lse_parts (see the module docstring; ``async_copy``: see
    :func:`.split_decode.build_split_attention`)."""
    if spec.kind != "multi" or not is_split(spec):
        raise ValueError(f"spec: expected a split-KV multi-token spec (split_spec of kind 'multi'), got {spec.uri}")
    sig = multi_split_signature(spec)  # checks the dense piece is there
    gs, rows = spec.group_size, multi_rows(spec)

    def rows_of(rspec: KernelSpec, bufs, syms) -> Rows:
        steps, q, lens = syms["S"], bufs["q"], bufs["dense_lens"]
        nrows = steps * gs
        ntiles = tirx.floordiv(nrows + rows - 1, rows)

        def sample(vb: Any) -> Any:
            return tirx.floordiv(vb, ntiles)

        def row(vb: Any, vg: Any) -> Any:
            return tirx.min(tirx.floormod(vb, ntiles) * rows + vg, nrows - 1)

        def token_head(vb: Any, vkh: Any, vg: Any) -> tuple[Any, Any]:
            r = row(vb, vg)
            return tirx.floordiv(r, gs), vkh * gs + tirx.floormod(r, gs)

        def query(vb, vkh, vg, vd):
            return q[(sample(vb), *token_head(vb, vkh, vg), vd)]

        def dense_limit(vb, vg):
            return lens[sample(vb)] - (steps - 1 - tirx.floordiv(row(vb, vg), gs))

        return Rows(syms["B"] * ntiles, sample, query, dense_limit,
                    lambda vb, vkh, vg: (sample(vb), *token_head(vb, vkh, vg)))

    return build_split_rows(rows_spec(spec), spec.uri, sig, rows_of, async_copy)
