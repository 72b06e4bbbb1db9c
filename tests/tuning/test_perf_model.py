"""The static H200 model of the split-KV decode (issue 21, item 6): derived from the kernel's signature and launch
policy, and the README's table is its output."""

from __future__ import annotations

from pathlib import Path

from wq_compile.kernels.signatures import choose_splits
from wq_compile.tuning import perf_model as pm


def test_rows_follow_the_kernel_and_the_launch_policy():
    r = pm.model_row("llava-ov-7b", 1, 8192)
    assert r.parts == choose_splits(pm.H200_SMS, 8192 - 128, 1, 4, 32) == 66
    assert r.blocks == 1 * 4 * r.parts and abs(r.waves - r.blocks / (2 * pm.H200_SMS)) < 1e-9
    # 4-bit only, 7B, 2800 quantized + 128 fp16 tokens, counted by hand per KV head at the capacities the cache has
    # (N4 = 2816 tokens, G4 = 101 key groups; empty 8/2-bit buckets hold one chunk, 2 groups):
    q4 = 101 * 128 * 4 * 4 + 2 * 101 * 128 * 2 + 2816 * 16 * 4 + 2 * 2816 * 2 * 2  # K codes, K scale+zero, V ...
    q8 = 2 * 128 * 8 * 4 + 2 * 2 * 128 * 2 + 32 * 32 * 4 + 2 * 32 * 2 * 2
    q2 = 2 * 128 * 2 * 4 + 2 * 2 * 128 * 2 + 32 * 8 * 4 + 2 * 32 * 2 * 2
    dense = 2 * 128 * 128 * 2
    total = 4 * (q4 + q8 + q2 + dense) + 4 * 4 + 28 * 128 * 2  # + the 4 lens and the query
    only4 = pm.model_row("llava-ov-7b", 1, 2800 + 128, mix={4: 1.0})
    assert abs(only4.bytes_per_token - total / 2928) < 1e-6, (only4.bytes_per_token, total / 2928)
    assert 0 < r.hbm_fraction <= 1 and r.expected_us > 0
    # batch 1 at 2K tokens (issue 21, item 3): P follows the chunks of all pieces together (the kernel splits them
    # as one sequence), not the longest piece's: 7B fills both resident slots of nearly every SM (it launched 120
    # blocks, 0.45 waves, with P from the longest piece), 0.5B (2 KV heads, 64 chunks) one block on 128 of 132 SMs
    small = pm.model_row("llava-ov-7b", 1, 2048)
    assert small.parts == 64 and small.blocks == 256 and small.waves > 0.95, small
    assert pm.model_row("llava-ov-0.5b", 1, 2048).blocks == 128
    # double buffering (issue 21, item 6): two chunks of loads in flight per block where a split has two or more
    # chunks (the 0.5B at 8K: 264 blocks, 4 chunks each), one where it has one (7B at 2K: 64 chunks, P = 64)
    one, two = (pm.model_row("llava-ov-0.5b", 1, 8192, stages=s) for s in (1, 2))
    assert (one.in_flight, two.in_flight) == (1, 2) and abs(two.hbm_fraction - 2 * one.hbm_fraction) < 1e-9
    assert pm.model_row("llava-ov-7b", 1, 2048).in_flight == 1 and pm.model_row("llava-ov-7b", 1, 2048).parts == 64


def test_readme_table_is_the_models_output():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert pm.perf_table() in readme, "README's H200 table is stale: paste python -m wq_compile.tuning.perf_model"
