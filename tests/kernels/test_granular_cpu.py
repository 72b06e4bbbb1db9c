"""Token-granular baseline with per-key-group dispatch to the fused kernel's SIMD tiles: correct against its torch
reference on irregular width sequences (every knob form), its reference agrees with the bucket layout's where both
hold the same tokens, and bad widths are refused when packing."""

from __future__ import annotations

import pytest
import torch

from wq_compile.kernels.attention_cpu import CpuKnobs
from wq_compile.compiler.baselines import compile_group_dispatch
from wq_compile.kernels.granular_cpu import dispatch_spec, pack_group_dispatch, reference_group_dispatch
from tolerances import ATOL, RTOL
from wq_testing import check_matches_bucket_layout


@pytest.fixture(scope="module", params=[CpuKnobs(splits=1), CpuKnobs(splits=3, pv_channels=8, qk_heads=3)],
                ids=["1split", "3split-pvc8-qkh3"])
def kernel(request):
    spec = dispatch_spec(64, 14, 2, request.param)
    return spec, compile_group_dispatch(spec)


@pytest.mark.parametrize("groups,tail,dense", [([2, 4, 8, 2, 8, 4, 2], 0, 13), ([8], 0, 1), ([2] * 11, 9, 70),
                                                ([4, 2, 4, 1, 8, 8, 2, 1, 2, 4], 27, 0)])
def test_kernel_matches_reference(kernel, groups: list[int], tail: int, dense: int) -> None:
    spec, fn = kernel
    gen = torch.Generator().manual_seed(len(groups) * 100 + dense + tail)
    n = 28 * len(groups) - (28 - tail if tail else 0)  # a partial last key group when tail > 0
    k, v = torch.randn(2, n, 64, generator=gen) * 2, torch.randn(2, n, 64, generator=gen)
    k[:, :28, 3] = 0.7  # a constant key group in one channel
    dk, dv = torch.randn(2, dense, 64, generator=gen), torch.randn(2, dense, 64, generator=gen)
    cache = pack_group_dispatch(spec, k, v, torch.tensor(groups), dk, dv)
    q = torch.randn(1, 14, 64, generator=gen)
    out = torch.full((1, 14, 64), float("nan"))
    fn(q, *cache.args(), 0.125, out)
    # the same quantized data on both sides: fp32 summation order only (the shared table, widest bucket)
    assert torch.allclose(out, reference_group_dispatch(q, cache, 0.125), atol=ATOL[2], rtol=RTOL[2])


def test_reference_agrees_with_the_bucket_layout() -> None:
    """Tokens in order at one width: the same numbers as one bucket of the layout (independent quantizer path)."""
    spec = dispatch_spec(64, 4, 2)
    check_matches_bucket_layout(lambda *kv: pack_group_dispatch(spec, *kv), reference_group_dispatch)


def test_packer_refuses_bad_widths_and_counts() -> None:
    spec = dispatch_spec(64, 4, 2)
    k = torch.randn(2, 56, 64)
    with pytest.raises(ValueError, match="one per key group"):
        pack_group_dispatch(spec, k, k, torch.tensor([4]), k[:, :0], k[:, :0])
    with pytest.raises(ValueError, match=r"widths \[3\]"):
        pack_group_dispatch(spec, k, k, torch.tensor([4, 3]), k[:, :0], k[:, :0])
    cache = pack_group_dispatch(spec, k, k, torch.tensor([2, 8]), k[:, :0], k[:, :0])
    t = cache.tensors
    assert t["gbits"].tolist() == [[2, 8]] and t["koff"].tolist() == [[0, 64 * 8]]  # 2-bit group: 8 B per channel
    assert t["voff"].tolist() == [[0, 28 * 16]] and t["k_stream"].shape[-1] == 64 * 8 + 64 * 32
