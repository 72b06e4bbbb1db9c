"""A static performance model of the CUDA split-KV decode, so the first GPU run has numbers to hit (issue 21).

Derived from the kernel's own arguments and launch policy, not measured: bytes read are the split signature's input
tensors at the capacities a cache of that many tokens has (``KernelSignature.nbytes``, codes, scales, zero points,
the dense piece, padding of key groups included); ``P`` is :func:`~wq_compile.kernels.signatures.choose_splits`
at the pieces' capacities summed, as the decoder calls it (the kernel splits all pieces' chunks together); blocks are
``B x Hkv x P`` (the schedule's grid), resident ``min_blocks_per_sm`` per SM (ptxas: 2 for both presets) unless the
block's shared memory allows fewer on sm_90 (:func:`~wq_compile.kernels.gpu_limits.split_shared_bytes`). The
expected fraction of HBM bandwidth is the product of

- wave efficiency: ``waves / ceil(waves)`` (the last wave's idle SMs), and
- memory parallelism: each block has ``min(stages, chunks per split)`` chunks (32 tokens of one KV head each) of
  loads in flight: one with one staging buffer (stage, barrier, compute), two with double buffering (chunk
  ``i + 1``'s ``cp.async`` copies are issued before chunk ``i`` is computed), so an SM has
  ``blocks_per_sm x in_flight x chunk_bytes`` in flight against the ``bandwidth x latency / SMs`` Little's law
  asks for (``LATENCY_S`` = 600 ns, a loaded-HBM figure). ``stages`` is the kernel's default for its widths
  (:func:`~wq_compile.kernels.signatures.split_stages`): the default mix (8/4/2) runs two for the 7B; a cache
  with an int1 bucket runs one buffer there (two spill), i.e. the table's "1 stage" column.

Not modelled: the merge's dependent loads, compute time between loads, L2 hits. A measured time well above
``bytes / (bandwidth x fraction)`` points at those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.models import get_preset
from ..core.spec import KernelSpec
from ..kernels.gpu_limits import min_blocks_per_sm, smem_blocks_per_sm, split_shared_bytes
from ..kernels.signatures import SPLIT_CHUNK, choose_splits, signature, split_spec, split_stages

#: H200: 132 SMs, ~4.8 TB/s HBM3e.
H200_SMS = 132
H200_HBM_BYTES_S = 4.8e12
LATENCY_S = 600e-9
#: Share of the cached tokens per width in the default model case (visual windows at mixed widths) and the
#: residual of recent fp tokens (the dense piece).
DEFAULT_MIX = {8: 0.25, 4: 0.5, 2: 0.25}
DENSE_TOKENS = 128


@dataclass(frozen=True)
class PerfRow:
    model: str
    batch: int
    tokens: int
    parts: int
    blocks: int
    waves: float
    bytes_per_token: float
    in_flight: int  # chunks of loads in flight per block
    hbm_fraction: float
    expected_us: float


def split_kernel_spec(model: str, dtype: str = "f16") -> KernelSpec:
    """The split kernel the CUDA decoder of ``model`` runs (widths 8/4/2 + dense, chunk 32)."""
    p = get_preset(model)
    return split_spec(KernelSpec("fused", (8, 4, 2, 16), p.head_dim, p.num_q_heads, p.num_kv_heads, dtype=dtype,
                                 chunk=SPLIT_CHUNK))


def piece_tokens(tokens: int, mix: dict[int, float] = DEFAULT_MIX) -> dict[int, int]:
    """Tokens per piece (width -> tokens, 16 = dense) of a cache of ``tokens`` tokens per sample."""
    quantized = max(0, tokens - DENSE_TOKENS)
    out = {b: int(round(quantized * f)) for b, f in mix.items()}
    out[16] = tokens - sum(out.values())
    return out


def model_row(model: str, batch: int, tokens: int, *, sms: int = H200_SMS, hbm_bytes_s: float = H200_HBM_BYTES_S,
              mix: dict[int, float] = DEFAULT_MIX, dtype: str = "f16", stages: int | None = None) -> PerfRow:
    """The model's numbers for one (model, batch, tokens per sample), the kernel with ``stages`` staging buffers
    (None: the kernel's default)."""
    spec = split_kernel_spec(model, dtype)
    stages = split_stages(spec) if stages is None else stages
    sig = signature(spec)
    per_piece = {b: 0 for b in spec.bits} | piece_tokens(tokens, mix)  # a width without tokens: an empty bucket
    caps = {b: max(SPLIT_CHUNK, -(-n // SPLIT_CHUNK) * SPLIT_CHUNK) for b, n in per_piece.items()}
    parts = choose_splits(sms, sum(caps.values()), batch, spec.num_kv_heads, SPLIT_CHUNK)
    env: dict[str, int] = {"B": batch, "P": parts}
    for b, cap in caps.items():
        env[f"N{b}"] = cap
        if b != 16:
            env[f"G{b}"] = -(-cap // spec.k_group)
    kv_bytes = sig.nbytes(env, "inputs")
    blocks = batch * spec.num_kv_heads * parts
    smem = split_shared_bytes(spec.group_size, spec.head_dim, SPLIT_CHUNK, spec.bits, spec.k_group, spec.v_group,
                              spec.torch_dtype.itemsize, stages)
    per_sm = min(min_blocks_per_sm(spec.group_size), smem_blocks_per_sm(smem, "sm_90"))
    waves = blocks / (sms * per_sm)
    wave_eff = waves / math.ceil(waves)
    chunks = sum(caps.values()) // SPLIT_CHUNK
    chunk_bytes = kv_bytes / (batch * spec.num_kv_heads * chunks)
    chunks_in_flight = min(stages, -(-chunks // parts))  # a split of one chunk has nothing to prefetch
    in_flight = min(per_sm, math.ceil(blocks / sms)) * chunks_in_flight * chunk_bytes
    mlp = min(1.0, in_flight / (hbm_bytes_s * LATENCY_S / sms))
    fraction = wave_eff * mlp
    return PerfRow(model, batch, tokens, parts, blocks, waves, kv_bytes / (batch * tokens), chunks_in_flight,
                   fraction, kv_bytes / (hbm_bytes_s * fraction) * 1e6)


def perf_table(models: tuple[str, ...] = ("llava-ov-7b", "llava-ov-0.5b"), batches: tuple[int, ...] = (1, 8),
               lengths: tuple[int, ...] = (2048, 8192, 32768)) -> str:
    """The README's table (markdown), one row per (model, batch, tokens)."""
    lines = ["| model | batch | tokens | P | blocks | waves | bytes/token | stages | chunks in flight per block "
             "| HBM fraction | expected us/layer | HBM fraction with 1 / 2 stages |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        stages = split_stages(split_kernel_spec(m))
        for b in batches:
            for n in lengths:
                r, one, two = (model_row(m, b, n, stages=s) for s in (None, 1, 2))
                lines.append(f"| {m} | {b} | {n} | {r.parts} | {r.blocks} | {r.waves:.2f} | "
                             f"{r.bytes_per_token:.0f} | {stages} | {r.in_flight} | {r.hbm_fraction:.2f} | "
                             f"{r.expected_us:.1f} | {one.hbm_fraction:.2f} / {two.hbm_fraction:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(perf_table())
