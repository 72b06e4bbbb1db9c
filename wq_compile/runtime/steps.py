"""Several new query tokens per layer on a filled cache (a follow-up question, draft verification, a new clip's turn):
the compiled multi-token kernel (:mod:`wq_compile.kernels.multi_token_cpu`), one launch per layer for up to
:data:`~wq_compile.kernels.signatures.MAX_STEP_CHUNK` tokens.

A longer step runs in chunks of that many tokens, each causal at its own offset: chunk ``[c0, c1)`` of an ``S``-token
step is a ``c1 - c0``-token step over a dense piece cut at ``dense_lens - (S - c1)`` (its later tokens are the
step's own later queries, which it must not see). One compiled module serves every ``S`` (a run-time size).

On CUDA (or with ``split=True``) the split-KV form (:mod:`wq_compile.kernels.multi_token_split`): one launch for the
partials of every (token, head) row over ``P`` ranges of the pieces' chunks, one merge launch (the split decode's
merge kernel, reading the ``B * S`` rows as samples).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core.spec import KernelSpec, dtype_tag
from ..kernels import piece_fields
from ..kernels.knobs import with_knobs
from ..kernels.gpu_limits import check_split_config
from ..kernels.signatures import MAX_STEP_CHUNK, META8_KEY, SPLIT_CHUNK, choose_splits, merge_spec, split_spec
from .decoder import _parallel_units
from .library import CompiledKernel, KernelLibrary


class StepDecoder:
    """``decode_steps(query [B, Hq, S, D], layer, sm_scale, stats) -> [B, S, Hq, D]`` (transformers' output layout):
    attention of the ``S`` newest tokens of ``layer``'s dense piece over every bucket and, causally, the dense piece.

    ``knobs``: hand-given structure knobs (benchmarks, tests); None builds with the knob record's (or defaults).
    ``split`` (default: on CUDA targets): the split-KV form and its merge; ``sm_count`` the SMs (or cores) its
    split count fills (default: the device's)."""

    def __init__(self, library: KernelLibrary, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, *, k_group: int = 28, v_group: int = 64, chunk: int = 64,
                 max_steps: int = MAX_STEP_CHUNK, knobs: Mapping[str, int] | None = None,
                 split: bool | None = None, sm_count: int | None = None) -> None:
        self.split = library.device.kind != "llvm" if split is None else bool(split)
        if not self.split and library.device.kind != "llvm":
            raise ValueError(f"target {library.device.tag}: the multi-token kernel runs in its split-KV form there "
                             "(split=True)")
        if max_steps < 1:
            raise ValueError(f"max_steps: expected a positive token count, got {max_steps}")
        if self.split:  # refused here, not at the first several-token step (or on the GPU)
            rows = int((knobs or {}).get("rows", num_q_heads // max(1, num_kv_heads)))
            check_split_config(num_q_heads, num_kv_heads, head_dim, SPLIT_CHUNK, layout_chunk=chunk,
                               gpu=library.device.kind == "cuda", k_group=k_group, v_group=v_group,
                               dtype_bytes=dtype.itemsize, arch=library.device.arch, rows=rows, what="multi-token")
            chunk = SPLIT_CHUNK
        self.sm_count = sm_count or _parallel_units(library.device)
        self.library = library
        self.shape = dict(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          k_group=k_group, v_group=v_group, dtype=dtype_tag(dtype), chunk=chunk)
        self.out_dtype = dtype
        self.max_steps = max_steps
        self.knobs = dict(knobs or {})
        # keyed by (bucket widths, widest width with 8-bit scale/zero read natively or 0)
        self._kernels: dict[tuple[tuple[int, ...], int], CompiledKernel] = {}
        self._merge: CompiledKernel | None = None
        self._sources: dict[tuple[tuple[int, ...], int], list[tuple[int | None, str] | None]] = {}
        self._checked: set[tuple[Any, ...]] = set()

    def spec(self, widths: tuple[int, ...], meta8: int = 0) -> KernelSpec:
        extra = ((META8_KEY, meta8),) if meta8 and not self.split else ()
        spec = KernelSpec("multi", tuple(widths) + (16,), extra=extra, **self.shape)
        spec = with_knobs(spec, self.knobs) if self.knobs else spec
        return split_spec(spec) if self.split else spec

    def specs(self, widths: tuple[int, ...], meta8: int = 0) -> list[KernelSpec]:
        """Every kernel a several-token step over ``widths`` launches: the kernel, and its merge (split form)."""
        spec = self.spec(widths, meta8)
        return [spec, merge_spec(spec)] if self.split else [spec]

    def kernel(self, widths: tuple[int, ...], meta8: int = 0) -> CompiledKernel:
        key = (widths, 0 if self.split else meta8)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = self.library.load(self.spec(*key))
            # where each input after q comes from: (bucket width or None for the dense piece, field), None: sm_scale
            fields = [None if a.is_scalar else piece_fields(a.name) for a in kernel.signature.inputs[1:]]
            self._sources[key] = [None if f is None else (None if f[0] == "dense" else int(f[0][1:]), f[1])
                                     for f in fields]
            if self.split and self._merge is None:
                self._merge = self.library.load(merge_spec(kernel.spec))
        return kernel

    def __call__(self, query: torch.Tensor, layer: Any, sm_scale: float, stats: Any = None) -> torch.Tensor:
        if query.dim() != 4:
            raise ValueError(f"query: expected [B, Hq, S, D], got shape {tuple(query.shape)}")
        bsz, hq, s, d = query.shape
        if hq != self.shape["num_q_heads"] or d != self.shape["head_dim"]:
            raise ValueError(f"query: expected {self.shape['num_q_heads']} heads of {self.shape['head_dim']}, got "
                             f"[{bsz}, {hq}, {s}, {d}]")
        dense = layer.dense
        if s == 0 or bsz == 0:
            return torch.empty(bsz, s, hq, d, dtype=self.out_dtype, device=query.device)
        if bool((dense.lens - dense.pinned < s).any()):
            raise ValueError(f"layer: the dense residual holds fewer than the {s} new tokens of this step")
        widths = tuple(sorted(layer.buckets, reverse=True))
        meta8 = 0 if self.split else layer.meta8_width
        kernel = self._kernels.get((widths, meta8)) or self.kernel(widths, meta8)
        q = query.transpose(1, 2)  # token-major, as transformers computes it: usually free
        scale = float(sm_scale)
        outs = []
        # the CPU kernel reads 8-bit scale/zero natively; the split form gets the fp16 expansion, per call
        buckets = {b: (bk.kernel_view() if self.split else bk) for b, bk in layer.buckets.items()}
        for c0 in range(0, s, self.max_steps):
            c1 = min(s, c0 + self.max_steps)
            lens = dense.lens if c1 == s else dense.lens - (s - c1)  # the chunk's own tokens end the dense piece
            inputs = [scale if src is None else (lens if src == (None, "lens") else
                                                  getattr(dense if src[0] is None else buckets[src[0]], src[1]))
                      for src in self._sources[(widths, meta8)]]
            out = torch.empty(bsz, c1 - c0, hq, d, dtype=self.out_dtype, device=query.device)
            if self.split:
                self._split_call(kernel, layer, [q[:, c0:c1].contiguous(), *inputs], out)
            else:
                self._call(kernel, [q[:, c0:c1].contiguous(), *inputs], [out])
            outs.append(out)
            if stats is not None and hasattr(stats, "kernel_calls"):
                stats.kernel_calls += 1
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _split_call(self, kernel: CompiledKernel, layer: Any, inputs: list[Any], out: torch.Tensor) -> None:
        """The split-KV kernel over ``P`` ranges of all pieces' chunks (``P`` fills the SMs with the row tiles'
        blocks), then the merge of the ``B * S`` rows."""
        bsz, s, hq, d = out.shape
        rows = int(dict(kernel.spec.extra).get("rows", hq // self.shape["num_kv_heads"]))
        tiles = -(-s * (hq // self.shape["num_kv_heads"]) // rows)
        total = layer.dense.capacity + sum(b.capacity for b in layer.buckets.values())
        parts = choose_splits(self.sm_count, total, bsz * tiles, self.shape["num_kv_heads"], self.shape["chunk"])
        o_parts = torch.empty(parts, bsz, s, hq, d, dtype=torch.float32, device=out.device)
        lse_parts = torch.empty(parts, bsz, s, hq, dtype=torch.float32, device=out.device)
        self._call(kernel, inputs, [o_parts, lse_parts])
        assert self._merge is not None
        self._call(self._merge, [o_parts.view(parts, bsz * s, hq, d), lse_parts.view(parts, bsz * s, hq)],
                   [out.view(bsz * s, hq, d)])

    def _call(self, kernel: CompiledKernel, inputs: list[Any], outs: list[torch.Tensor]) -> None:
        """Every argument checked once per distinct set of shapes, then unchecked calls (the layer allocates its
        tensors contiguous, in its dtype and device; ``q`` and the outputs are made contiguous here)."""
        key = (kernel.spec.uri, tuple(a.shape for a in inputs if isinstance(a, torch.Tensor)),
               tuple(o.shape for o in outs))
        if key not in self._checked:
            kernel(*inputs, *outs)
            self._checked.add(key)
        else:
            kernel.call_unchecked(*inputs, *outs)
