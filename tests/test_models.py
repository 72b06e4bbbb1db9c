"""Model presets and the kernel set a model needs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from wq_compile.models import PRESETS, ModelPreset, get_preset, kernel_specs


def test_model_presets_and_kernel_sets():
    p = PRESETS["llava-ov-7b"]
    assert (p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim) == (28, 28, 4, 128)
    specs = kernel_specs("llava-ov-0.5b")
    kinds = [s.kind for s in specs]
    assert kinds.count("decode") == 4 and kinds.count("quantize") == 3
    fused = next(s for s in specs if s.kind == "fused")
    assert fused.bits == (8, 4, 2, 16) and fused.num_q_heads == 14 and fused.num_kv_heads == 2
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
