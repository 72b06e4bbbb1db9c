"""Model presets and the kernel set a model needs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from wq_compile.core.models import PRESETS, ModelPreset, get_preset
from wq_compile.kernels.catalog import kernel_specs


def test_model_presets_and_kernel_sets():
    p = PRESETS["llava-ov-7b"]
    assert (p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim) == (28, 28, 4, 128)
    specs = kernel_specs("llava-ov-0.5b")
    kinds = [s.kind for s in specs]
    # quantize: one per width and the int2 recode kernel (the default 8-bit scale/zero of the 2-bit bucket)
    assert kinds.count("decode") == 4 and kinds.count("quantize") == 4
    assert sum(s.kind == "quantize" and ("given", 1) in s.extra for s in specs) == 1
    fused = next(s for s in specs if s.kind == "fused")
    assert fused.bits == (8, 4, 2, 16) and fused.num_q_heads == 14 and fused.num_kv_heads == 2
    assert ("meta8", 2) in fused.extra and ("meta8", 2) not in next(s for s in specs if s.kind == "merge").extra
    assert all(("meta8", 2) not in s.extra for s in kernel_specs("llava-ov-0.5b", meta_bits=16))
    assert len({s.uri for s in specs}) == len(specs)
    cfg = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=24, num_attention_heads=14,
                                                      num_key_value_heads=2, hidden_size=896))
    assert ModelPreset.from_config(cfg, "x") == ModelPreset("x", 24, 14, 2, 64)
    assert get_preset(cfg) == ModelPreset.from_config(cfg)
    with pytest.raises(ValueError, match="unknown preset"):
        kernel_specs("llama")
    with pytest.raises(ValueError, match="not a multiple"):
        ModelPreset("bad", 1, 14, 4, 64)
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        kernel_specs("tiny", kinds=("bogus",))


def test_split_kind_is_what_the_cuda_decoder_runs():
    """``--kernels split`` tunes/exports the split-KV fused kernel and its merge, with the decoder's chunk, and a
    tuning workload whose split count fills a 132-SM GPU (the symbol ``P`` has a value)."""
    from wq_compile.compiler.build import kernel_def
    from wq_compile.runtime.decoder import FusedDecoder
    from wq_compile.kernels import example_sizes
    from wq_compile.kernels.split_decode import choose_splits, is_split

    split, merge = kernel_specs("llava-ov-0.5b", dtype="f16", kinds=("split",))
    assert is_split(split) and split.kind == "fused" and merge.kind == "merge"
    dec = FusedDecoder.__new__(FusedDecoder)  # the spec the CUDA decoder would load, without a library
    dec.split, dec.int8_dots, dec.shape = True, False, dict(head_dim=64, num_q_heads=14, num_kv_heads=2, k_group=28, v_group=64,
                                      dtype="f16", chunk=split.chunk)
    assert dec.spec((8, 4, 2)) == split
    sizes = example_sizes(split, 8192)
    assert sizes["P"] == choose_splits(132, 8192, 1, 2, split.chunk) == 132
    kernel_def(split, "cuda", 8192).workload()  # every symbol bound
