"""Qwen2-VL / Qwen2.5-VL end to end on tiny random-weight models: the grid locator, generate() on a
WindowQuantCache (16-bit equals DynamicCache, mixed precision, padding, images + videos, beams, compiled decode)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from wq_compile import ATTN_IMPLEMENTATION, WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.families import visual_layout
from wq_compile.integrations.qwen2_vl import QwenVisualLayout, locate_qwen
from wq_compile.integrations.tiny_qwen import FAMILIES, Visual, qwen_prompt, tiny_qwen_model

NEW = 12
#: 196 x 224 px -> grid (t, 14, 16) -> 56 tokens (two key groups) per temporal patch; 392 x 224 image -> 112 tokens.
VIDEO, IMAGE = Visual(8), Visual(0, 392, 224)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.set_grad_enabled(False)
    return tiny_qwen_model(request.param, ATTN_IMPLEMENTATION)


def _generate(model, prompt, cache, new: int = NEW, **kw) -> torch.Tensor:
    out = model.generate(**prompt.inputs, cache=cache, max_new_tokens=new, do_sample=False, **kw)
    return out[:, prompt.inputs["input_ids"].shape[1]:]


def _wq(model, prompt, **kw) -> WindowQuantCache:
    kw.setdefault("backend", "reference")
    return WindowQuantCache(model.config, WindowQuantConfig(**kw)).prepare(**prompt.inputs)


# ---- the locator, no model ---------------------------------------------------------------------------------------
def test_layout_reads_the_released_ids_from_the_default_configs() -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    for cfg in (Qwen2VLConfig(), Qwen2_5_VLConfig()):
        layout = visual_layout(cfg)
        assert layout == QwenVisualLayout(151656, 151655, 151652, 151653, 2)


def test_windows_follow_the_grids_with_padding_and_several_inputs() -> None:
    lay = QwenVisualLayout(9, 8, 6, 7, 2)
    # sample 0 (left-padded by 3): video (2, 4, 6) = 2 x 6 tokens, image (1, 4, 4) = 4 tokens, video (1, 2, 2) = 1
    s0 = [0, 0, 0, 1, 6] + [9] * 12 + [7, 6] + [8] * 4 + [7, 6, 9, 7, 5, 5]
    s1 = [1, 2, 6] + [9] * 16 + [7, 3, 4, 5, 5, 5, 5, 5, 5, 5]  # video (2, 4, 8) = 2 x 8 tokens
    ids = torch.tensor([s0, s1])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[3], [0]])).long()
    vg, ig = torch.tensor([[2, 4, 6], [1, 2, 2], [2, 4, 8]]), torch.tensor([[1, 4, 4]])
    a, b = locate_qwen(ids, mask, lay, "frame", vg, ig)
    assert list(zip(a.windows.starts.tolist(), a.windows.lengths.tolist())) == [(5, 6), (11, 6), (19, 4), (25, 1)]
    assert list(zip(b.windows.starts.tolist(), b.windows.lengths.tolist())) == [(3, 8), (11, 8)]
    assert a.text_mask.nonzero().flatten().tolist() == [27, 28] and not bool(a.valid[:3].any())
    assert b.text_mask.nonzero().flatten().tolist() == list(range(20, 29))  # markers are not the question
    a, b = locate_qwen(ids, mask, lay, 5, vg, ig)  # token-count windows never span two inputs
    assert a.windows.lengths.tolist() == [5, 5, 2, 4, 1] and b.windows.lengths.tolist() == [5, 5, 5, 1]
    # back-to-back videos with no marker between them share a run: still cut at the grids
    ids2 = torch.tensor([[1] + [9] * 7 + [5]])
    (c,) = locate_qwen(ids2, None, lay, "frame", torch.tensor([[1, 2, 6], [1, 2, 8]]))
    assert c.windows.starts.tolist() == [1, 4] and c.windows.lengths.tolist() == [3, 4]


def test_locator_refuses_grids_that_disagree_with_the_tokens() -> None:
    lay = QwenVisualLayout(9, 8, 6, 7, 2)
    ids = torch.tensor([[1, 6] + [9] * 12 + [7, 5]])
    with pytest.raises(ValueError, match="video_grid_thw: grid .* needs 16 tokens"):
        locate_qwen(ids, None, lay, "frame", torch.tensor([[2, 4, 8]]))
    with pytest.raises(ValueError, match="more video tokens"):
        locate_qwen(ids, None, lay, "frame", torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="1 of 2 grids have no video tokens"):
        locate_qwen(ids, None, lay, "frame", torch.tensor([[2, 4, 6], [2, 4, 6]]))
    with pytest.raises(ValueError, match="no grids were given"):
        locate_qwen(ids, None, lay, "frame")
    assert locate_qwen(ids, None, lay, 4)[0].windows.lengths.tolist() == [4, 4, 4]  # a count needs no grid
    with pytest.raises(ValueError, match=r"expected \[num, 3\]"):
        locate_qwen(ids, None, lay, "frame", torch.tensor([2, 4, 6]))


def test_unknown_vlm_family_is_refused() -> None:
    from transformers import LlavaConfig

    with pytest.raises(ValueError, match="no window locator for model_type 'llava'"):
        WindowQuantCache(LlavaConfig(), WindowQuantConfig(backend="reference"))


def test_presets_and_kernel_specs_of_the_released_shapes() -> None:
    from wq_compile.core.models import PRESETS
    from wq_compile.kernels.catalog import kernel_specs

    shapes = {name: (p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim) for name, p in PRESETS.items()}
    assert shapes["qwen2.5-vl-7b"] == shapes["qwen2-vl-7b"] == (28, 28, 4, 128)
    assert shapes["qwen2.5-vl-3b"] == (36, 16, 2, 128) and shapes["qwen2-vl-2b"] == (28, 12, 2, 128)
    for name, group in (("qwen2-vl-2b", 6), ("qwen2.5-vl-7b", 7), ("qwen2.5-vl-3b", 8)):
        fused = next(s for s in kernel_specs(name) if s.kind == "fused")
        assert fused.head_dim == 128 and fused.num_q_heads // fused.num_kv_heads == group


# ---- end to end --------------------------------------------------------------------------------------------------
def test_all_16_bit_matches_dynamic_cache(model) -> None:
    p = qwen_prompt(model, [[VIDEO]])
    want = _generate(model, p, DynamicCache(config=model.config))
    cache = _wq(model, p, avg_bits=16.0)
    assert torch.equal(_generate(model, p, cache), want)
    assert cache.samples[0].windows.lengths.tolist() == [56] * 4  # one window per temporal patch (2 frames)
    assert cache.plan(0).histogram()[16] == 2 * 4


def test_lower_budget_mixes_widths(model) -> None:
    p = qwen_prompt(model, [[Visual(16)]])
    cache = _wq(model, p, avg_bits=5.0)
    assert _generate(model, p, cache).shape == (1, NEW)
    plan = cache.plan(0)
    used = {w for w, n in plan.histogram().items() if n}
    assert len(used) >= 2, plan.histogram()
    assert plan.effective_avg_bits() <= 5.0 + 1e-6
    report = cache.memory_report()
    assert report["quantized_bytes"] < 0.5 * report["visual_fp16_bytes"]


def test_batch_of_two_with_padding_images_and_videos(model) -> None:
    p = qwen_prompt(model, [[VIDEO, IMAGE, Visual(4, 224, 392)], [Visual(4)]])
    assert bool((p.inputs["attention_mask"][1] == 0).any())  # sample 1 is left-padded
    want = _generate(model, p, DynamicCache(config=model.config))
    cache = _wq(model, p, avg_bits=16.0)
    assert torch.equal(_generate(model, p, cache), want)
    assert [s.windows.lengths.tolist() for s in cache.samples] == [[56] * 4 + [112] * 3, [56] * 2]
    cache = _wq(model, p, avg_bits=4.0)
    assert _generate(model, p, cache).shape == (2, NEW)
    assert cache.plan(0).bits.shape == (2, 7) and cache.plan(1).bits.shape == (2, 2)
    assert cache.memory_report()["quantized_bytes"] > 0


def test_beam_search(model) -> None:
    p = qwen_prompt(model, [[VIDEO, IMAGE]])
    kw = dict(num_beams=2, num_return_sequences=2)
    want = _generate(model, p, DynamicCache(config=model.config), new=8, **kw)
    assert torch.equal(_generate(model, p, _wq(model, p, avg_bits=16.0), new=8, **kw), want)
    cache = _wq(model, p, avg_bits=4.0, residual=0)
    assert _generate(model, p, cache, new=8, **kw).shape == (2, 8)
    assert cache.layers[0].store.dense.lens.shape[0] == 2


def test_embedding_scorer(model) -> None:
    p = qwen_prompt(model, [[VIDEO, IMAGE]])
    cache = WindowQuantCache(model.config, WindowQuantConfig(avg_bits=5.0, scorer="embedding", backend="reference"))
    cache.prepare(**p.inputs, model=model)
    _generate(model, p, cache, new=4)
    assert cache.embed_scores is not None and cache.embed_scores[0].shape == (5,)
    assert torch.equal(cache.plan(0).scores[0], cache.plan(0).scores[1])  # one score per window, all layers


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_two_videos_and_an_image_decode_on_the_compiled_kernels(model) -> None:
    """Zero reference calls at decode: every step of every layer is one compiled fused-kernel call; the tokens
    equal the torch reference path's (same quantized data)."""
    p = qwen_prompt(model, [[VIDEO, IMAGE, Visual(4, 224, 392)]])
    ref = _generate(model, p, _wq(model, p, avg_bits=4.0), new=8)
    cache = _wq(model, p, avg_bits=4.0, backend="tvm")
    got = _generate(model, p, cache, new=8)
    layers = model.config.text_config.num_hidden_layers
    assert cache.stats.reference_calls == 0 and cache.stats.kernel_calls == layers * 7
    assert cache.backend(torch.float32, torch.device("cpu")).name.startswith("tvm:")
    assert torch.equal(got, ref)


# ---- the tools take the family ---------------------------------------------------------------------------------------
def test_cli_takes_the_qwen_presets_and_tiny_models(capsys: pytest.CaptureFixture) -> None:
    from wq_compile.tools.cli import main_eval
    from wq_compile.tools.cli.wq_tune import tune_parser

    assert tune_parser().parse_args(["--model", "qwen2.5-vl-7b"]).model == "qwen2.5-vl-7b"
    rc = main_eval(["--model", "tiny-qwen2.5-vl", "--frames", "4", "--new-tokens", "4", "--repeats", "1",
                    "--avg-bits", "4", "--backend", "reference"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dense (DynamicCache)" in text and "WindowQuant avg 4 bits" in text
