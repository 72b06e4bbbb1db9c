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
    assert gl.max_split_group() == 16  # 18 fitted the 107 registers of issue 21's kernel, 17 the 119 before int1
    for group in range(1, gl.max_split_group() + 1):
        threads = gl.split_threads(group)
        assert threads <= gl.MAX_THREADS_PER_BLOCK
        assert gl.register_cap(threads, gl.min_blocks_per_sm(group)) >= gl.SPLIT_REGISTERS_NEEDED, group


@pytest.mark.parametrize("hq, hkv, d, chunk, why", [
    (64, 1, 128, 64, "2048 threads per block"),            # group 64: over 1024 threads
    (32, 1, 128, 64, "64 registers per thread"),           # group 32: 1024 threads, registers capped at 64
    (28, 4, 128, 48, r"chunk \(48\).*multiples of 32"),    # capacities the split signature rejects
    (14, 2, 80, 64, r"head_dim \(80\)"),
    (17, 1, 128, 64, "120 registers per thread against the 128"),  # group 17: 544 threads, 1 block
])
def test_cuda_decoder_refuses_at_construction(cuda_lib, hq, hkv, d, chunk, why):
    with pytest.raises(ValueError, match=f"CUDA split-KV decode: .*{why}"):
        FusedDecoder(cuda_lib, hq, hkv, d, torch.float16, chunk=chunk)


def test_accepted_configs(cuda_lib, cpu_lib):
    for hq, hkv, d in ((28, 4, 128), (14, 2, 64), (12, 2, 128), (32, 4, 128), (16, 1, 64)):  # presets, group 8, 16
        assert FusedDecoder(cuda_lib, hq, hkv, d, torch.float16).split
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


#: ``__shared__`` bytes of the generated CUDA (untuned default schedule for nvidia/nvidia-h200, bits 8/4/2 + dense,
#: chunk 32, summed from the source's arrays on 2026-12-05; ptxas -v reports 42,168 / 22,144 / 51,584 / 41,136 for
#: the first four, the arrays being alignas(64)): (group, head_dim, bits, dtype bytes) -> bytes. The model must match
#: them up to that alignment or over-estimate (never under).
GENERATED_SMEM = {
    (7, 128, (8, 4, 2, 16), 2): 42152,   # llava-ov-7b f16 and bf16
    (7, 64, (8, 4, 2, 16), 2): 22144,    # llava-ov-0.5b f16
    (16, 128, (8, 4, 2, 16), 2): 51584,  # group 16 at d 128 (issue 21: sm_80 refuses it at ptxas)
    (6, 128, (8, 4, 2, 16), 2): 41104,   # Qwen2-VL-2B (12/2 heads)
    (7, 128, (4, 16), 2): 41272,         # one 4-bit bucket: TVM grows a scale tile for dense V (model: +768 B)
    (7, 128, (8, 4, 2, 16), 4): 56744,   # f32 activations (model: +1,816 B)
}


@pytest.mark.parametrize("key", list(GENERATED_SMEM))
def test_static_shared_model_matches_the_generated_cuda(key):
    group, d, bits, nbytes = key
    model = gl.split_static_shared_bytes(group, d, 32, bits, dtype_bytes=nbytes)
    assert GENERATED_SMEM[key] <= model <= GENERATED_SMEM[key] + 2048, model
    if bits == (8, 4, 2, 16) and nbytes == 2:
        assert model - GENERATED_SMEM[key] <= 48  # the 64-byte alignment of the arrays only


#: The construction check counts the int1 piece (ALL_WIDTHS: a decoder may have to build it): +128 B over 8/4/2.
#: With one staging buffer (static arrays, at most 48 KB) these were refused; two (the default, dynamic shared
#: memory up to 227 KB on sm_90) fit an H200, and one staging buffer is still refused by the model.
@pytest.mark.parametrize("hq, hkv, d, dtype, why", [
    (16, 1, 128, torch.float16, "16 query heads per KV head at head_dim 128 .* need 51,712 B of static shared"),
    (28, 4, 128, torch.float32, "7 query heads per KV head at head_dim 128 .*32-bit activations.* 58,624 B"),
    (28, 2, 128, torch.bfloat16, "14 query heads per KV head .* 49,664 B.* Use fewer query heads per KV head"),
])
def test_static_shared_memory_limits_one_staging_buffer(cuda_lib, hq, hkv, d, dtype, why):
    """Issue 21: a split kernel with one staging buffer whose tiles pass the 48 KB of static shared memory is
    refused (ptxas for sm_80 refused group 16 at d 128); the default (two buffers, dynamic) is built for them."""
    with pytest.raises(ValueError, match=f"CUDA split-KV decode: {why}") as err:
        gl.check_split_config(hq, hkv, d, 32, dtype_bytes=dtype.itemsize, stages=1, arch="sm_90a")
    assert "CUDA allows 49,152 B (sm_80, sm_90) without dynamic shared memory" in str(err.value)
    assert FusedDecoder(cuda_lib, hq, hkv, d, dtype).split


def test_dynamic_shared_memory_refused_at_construction(cuda_lib, cpu_lib):
    """Two staging buffers need up to 227 KB of dynamic shared memory per block on sm_90 (163 KB on sm_80): past it
    the decoder is refused when it is built; the same PrimFunc on llvm has no such limit."""
    with pytest.raises(ValueError, match="8 query heads per KV head at head_dim 256 .*32-bit activations.* need "
                                         "251,904 B of dynamic shared memory .* sm_90 allows 232,448 B"):
        FusedDecoder(cuda_lib, 8, 1, 256, torch.float32)
    assert FusedDecoder(cpu_lib, 8, 1, 256, torch.float32, split=True).split
    assert gl.split_config_problem(8, 1, 256, 32, arch="sm_90a") is None  # 16-bit: 186,368 B fit an H100/H200 ...
    assert "sm_80 allows 166,912 B" in gl.split_config_problem(8, 1, 256, 32, arch="sm_80")  # ... not an A100
    seven = gl.split_shared_bytes(7, 128, 32, (8, 4, 2, 16), dtype_bytes=2)  # the 7B presets: two buffers
    assert gl.smem_blocks_per_sm(seven, "sm_90") == 2
    # with an int1 bucket one buffer (two spill): the static tiles, 5 blocks' worth of shared memory
    assert gl.split_shared_bytes(7, 128, 32, gl.ALL_WIDTHS, dtype_bytes=2) == gl.split_static_shared_bytes(7, 128, 32)


def test_default_stages_follow_ptxas():
    """Issue 21: two staging buffers by default only where ptxas showed them without spills (docs/offline_tuning.md):
    the 7B and Qwen2-VL-2B shapes (head_dim 128, groups 7 and 6) without an int1 bucket; one buffer with an int1
    bucket (two spill 124 B on sm_90a), at head_dim 64 (the 0.5B: 76 B) and at Qwen2.5-VL-3B's group 8 (116 B); two
    where one buffer's static tiles cannot be built (group 16 at head_dim 128). tests/kernels/test_split_cuda.py
    compiles the 7B int1 default."""
    from wq_compile.core.models import get_preset
    from wq_compile.core.spec import KernelSpec
    from wq_compile.kernels.signatures import split_spec, split_stages

    def stages(model: str, bits: tuple[int, ...], dtype: str = "f16", **extra) -> int:
        p = get_preset(model)
        kind = "multi" if extra else "fused"
        return split_stages(split_spec(KernelSpec(kind, bits, p.head_dim, p.num_q_heads, p.num_kv_heads, chunk=32,
                                                  dtype=dtype, extra=tuple(extra.items()))))

    for dtype in ("f16", "bf16"):
        assert stages("llava-ov-7b", (8, 4, 2, 16), dtype) == 2 and stages("qwen2-vl-7b", (4, 2, 16), dtype) == 2
        assert stages("qwen2-vl-2b", (8, 4, 2, 16), dtype) == 2 and stages("qwen2-vl-2b", (8, 1, 16), dtype) == 1
        assert stages("llava-ov-7b", (8, 4, 2, 1, 16), dtype) == 1 and stages("llava-ov-7b", (1, 16), dtype) == 1
        assert stages("qwen2.5-vl-3b", (8, 4, 2, 16), dtype) == 1 and stages("llava-ov-0.5b", (8, 4, 2, 16), dtype) == 1
    assert stages("llava-ov-7b", (8, 4, 2, 16), rows=8) == 1  # the multi-token kernel's rows are its group
    assert gl.default_stages_of(split_spec(KernelSpec("fused", (8, 4, 2, 1, 16), 128, 16, 1, chunk=32))) == 2


def test_cuda_multi_token_decoder_checks_its_rows(cuda_lib, cpu_lib):
    """The multi-token kernel on CUDA runs the split form (rows per block default: the group) and is refused at
    construction where its rows need more than 1024 threads (or, with one staging buffer, 48 KB of static shared memory)."""
    from wq_compile.runtime.steps import StepDecoder

    dec = StepDecoder(cuda_lib, 28, 4, 128, torch.float16)
    assert dec.split and [s.kind for s in dec.specs((8, 4, 2))] == ["multi", "merge"]
    assert dec.specs((8, 4, 2))[0].uri.endswith("_split1") and dec.shape["chunk"] == 32
    assert StepDecoder(cuda_lib, 28, 4, 128, torch.float16, knobs={"rows": 8}).split
    assert StepDecoder(cuda_lib, 28, 4, 128, torch.float16, knobs={"rows": 16}).split  # 103,424 B: dynamic fits
    with pytest.raises(ValueError, match="CUDA multi-token: 16 query rows per block at head_dim 128 .* 51,712 B"):
        gl.check_split_config(28, 4, 128, 32, rows=16, what="multi-token", stages=1)
    with pytest.raises(ValueError, match="CUDA multi-token: .*1056 threads per block"):
        StepDecoder(cuda_lib, 14, 2, 64, torch.float16, knobs={"rows": 33})
    assert not StepDecoder(cpu_lib, 28, 4, 128, torch.float16).split  # CPUs: the CPU multi-token kernel
    with pytest.raises(ValueError, match="split-KV form there"):
        StepDecoder(cuda_lib, 28, 4, 128, torch.float16, split=False)
