"""Configurations the CUDA split kernel cannot run are refused when the decoder is built (issue 21, item 2); batch 0
returns an empty output without a launch. Nothing here compiles: construction loads no module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wq_compile.kernels import gpu_limits as gl
from wq_compile.runtime.decoder import FusedDecoder
from wq_compile.runtime.library import KernelLibrary


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory) -> KernelLibrary:
    return KernelLibrary("nvidia/nvidia-h200", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cpu_lib(tmp_path_factory) -> KernelLibrary:
    return KernelLibrary("llvm", cache_dir=tmp_path_factory.mktemp("cache"))


def test_launch_bounds_leave_the_registers_the_kernel_needs():
    # the presets (group 7) keep 2 blocks per SM and 144 registers; group 16 asks for 1 block: 128 registers
    assert gl.min_blocks_per_sm(7) == 2 and gl.register_cap(224, 2) == 144
    assert gl.min_blocks_per_sm(16) == 1 and gl.register_cap(512, 1) == 128 >= gl.SPLIT_REGISTERS_NEEDED
    assert gl.max_split_group() == 17  # 18 fitted the 107 registers of the kernel before issue 21 item 3
    for group in range(1, gl.max_split_group() + 1):
        threads = gl.split_threads(group)
        assert threads <= gl.MAX_THREADS_PER_BLOCK
        assert gl.register_cap(threads, gl.min_blocks_per_sm(group)) >= gl.SPLIT_REGISTERS_NEEDED, group


@pytest.mark.parametrize("hq, hkv, d, chunk, why", [
    (64, 1, 128, 64, "2048 threads per block"),            # group 64: over 1024 threads
    (32, 1, 128, 64, "64 registers per thread"),           # group 32: 1024 threads, registers capped at 64
    (28, 4, 128, 48, r"chunk \(48\).*multiples of 32"),    # capacities the split signature rejects
    (14, 2, 80, 64, r"head_dim \(80\)"),
    (18, 1, 128, 64, "112 registers per thread against the 119"),  # group 18: 576 threads, 1 block
])
def test_cuda_decoder_refuses_at_construction(cuda_lib, hq, hkv, d, chunk, why):
    with pytest.raises(ValueError, match=f"CUDA split-KV decode: .*{why}"):
        FusedDecoder(cuda_lib, hq, hkv, d, torch.float16, chunk=chunk)


def test_accepted_configs(cuda_lib, cpu_lib):
    for hq, hkv in ((28, 4), (14, 2), (16, 1)):  # presets, and groups up to 16
        assert FusedDecoder(cuda_lib, hq, hkv, 128, torch.float16).split
    # the same PrimFunc on llvm has no thread or register limit, but the chunk still must tile
    assert FusedDecoder(cpu_lib, 64, 1, 128, torch.float32, split=True).split
    with pytest.raises(ValueError, match=r"^split-KV decode: chunk \(48\)"):
        FusedDecoder(cpu_lib, 28, 4, 128, torch.float32, chunk=48, split=True)
    assert not FusedDecoder(cpu_lib, 28, 4, 128, torch.float32, chunk=48).split  # the CPU fused kernel: any chunk


@pytest.mark.parametrize("split", [False, True])
def test_batch_zero_is_an_empty_output_without_a_launch(cpu_lib, split):
    dec = FusedDecoder(cpu_lib, 4, 2, 64, torch.float32, split=split)
    stats = SimpleNamespace(kernel_calls=0)
    out = dec(torch.empty(0, 4, 64), SimpleNamespace(buckets={}, dense=None), 0.125, stats)
    assert out.shape == (0, 4, 64) and stats.kernel_calls == 0 and not dec._kernels  # nothing loaded or launched
