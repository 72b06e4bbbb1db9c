"""LLaVA-OneVision end to end on a tiny random-weight model: generate() on a WindowQuantCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from wq_compile import ATTN_IMPLEMENTATION, WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.llava import VisualLayout, locate
from wq_compile.integrations.tiny import image_prompt, text_prompt, tiny_model, video_prompt

NEW = 32


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return tiny_model(ATTN_IMPLEMENTATION)


def _generate(model, prompt, cache, new: int = NEW) -> torch.Tensor:
    out = model.generate(**prompt.inputs, cache=cache, max_new_tokens=new, do_sample=False)
    return out[:, prompt.inputs["input_ids"].shape[1]:]


def _wq(model, prompt, **kw) -> WindowQuantCache:
    kw.setdefault("backend", "reference")
    return WindowQuantCache(model.config, WindowQuantConfig(**kw)).prepare(**prompt.inputs)


def test_locator_reads_frames_from_config(model) -> None:
    layout = VisualLayout.from_config(model.config)
    assert layout.tokens_per_frame == 196 and layout.video_token_id == 999
    p = video_prompt(model, [3])
    (s,) = locate(p.inputs["input_ids"], p.inputs["attention_mask"], layout)
    assert s.windows.lengths.tolist() == [196] * 3 and s.windows.starts.tolist() == [4, 200, 396]
    assert int(s.text_mask.sum()) == 12 and bool(s.text_mask[-1])  # the question only


def test_all_16_bit_matches_dynamic_cache(model) -> None:
    p = video_prompt(model, [4])
    want = _generate(model, p, DynamicCache(config=model.config))
    cache = _wq(model, p, avg_bits=16.0)
    assert torch.equal(_generate(model, p, cache), want)
    assert cache.plan(0).histogram()[16] == 2 * 4


def test_8_bit_logits_stay_close(model) -> None:
    p = video_prompt(model, [4])
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**p.inputs, cache=DynamicCache(config=model.config), **kw)
    got = model.generate(**p.inputs, cache=_wq(model, p, avg_bits=9.0, widths=(8,)), **kw)
    for a, b in zip(ref.logits[1:], got.logits[1:]):  # decode steps read the 8-bit cache
        assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_3_bit_memory_and_budget(model) -> None:
    p = video_prompt(model, [4])
    cache = _wq(model, p, avg_bits=3.0)
    tokens = _generate(model, p, cache)
    assert tokens.shape == (1, NEW)
    plan = cache.plan(0)
    assert plan.effective_avg_bits() <= 3.0
    report = cache.memory_report()
    assert report["quantized_bytes"] < 0.3 * report["visual_fp16_bytes"]


def test_batch_of_two_with_different_frame_counts(model) -> None:
    p = video_prompt(model, [2, 5])
    want = _generate(model, p, DynamicCache(config=model.config))
    cache = _wq(model, p, avg_bits=16.0)
    assert torch.equal(_generate(model, p, cache), want)
    assert [len(s.windows) for s in cache.samples] == [2, 5]
    cache = _wq(model, p, avg_bits=4.0)
    assert _generate(model, p, cache).shape == (2, NEW)
    assert cache.plan(0).bits.shape == (2, 2) and cache.plan(1).bits.shape == (2, 5)


def test_text_only_prompt_has_nothing_to_quantize(model) -> None:
    p = text_prompt(40)
    want = _generate(model, p, DynamicCache(config=model.config))
    cache = _wq(model, p)
    assert torch.equal(_generate(model, p, cache), want)
    assert len(cache.samples[0].windows) == 0 and cache.memory_report()["quantized_bytes"] == 0


def test_image_prompt(model) -> None:
    p = image_prompt(model)
    cache = _wq(model, p, avg_bits=5.0, window=196)
    assert _generate(model, p, cache, new=8).shape == (1, 8)
    assert len(cache.samples[0].windows) > 1 and cache.memory_report()["quantized_bytes"] > 0


def test_missing_prepare_warns_and_stays_dense(model) -> None:
    p = video_prompt(model, [2])
    want = _generate(model, p, DynamicCache(config=model.config), new=4)
    cache = WindowQuantCache(model.config, WindowQuantConfig(backend="reference"))
    with pytest.warns(UserWarning, match="prepare"):
        got = _generate(model, p, cache, new=4)
    assert torch.equal(got, want)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="avg_bits"):
        WindowQuantConfig(avg_bits=0)
    with pytest.raises(ValueError, match="scorer"):
        WindowQuantConfig(scorer="cosine")
    with pytest.raises(ValueError, match="widths"):
        WindowQuantConfig(widths=(3,))
    with pytest.raises(ValueError, match="window"):
        WindowQuantConfig(window="scene")


def test_embedding_scorer(model) -> None:
    p = video_prompt(model, [3])
    cache = WindowQuantCache(model.config, WindowQuantConfig(avg_bits=5.0, scorer="embedding", backend="reference"))
    cache.prepare(**p.inputs, model=model)
    _generate(model, p, cache, new=4)
    assert cache.embed_scores is not None and cache.embed_scores[0].shape == (3,)
    assert torch.equal(cache.plan(0).scores[0], cache.plan(0).scores[1])  # one score per window, all layers


@pytest.mark.filterwarnings("ignore::wq_compile.compile.UntunedKernelWarning")
def test_decode_runs_the_compiled_module(model) -> None:
    """Every decode step of every layer is one fused-kernel call; windows are quantized by the compiled kernel;
    the result matches the torch reference path (same quantized data, fp32 accumulation order differs)."""
    p = video_prompt(model, [2, 3])
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_cache = _wq(model, p, avg_bits=4.0)
    ref = model.generate(**p.inputs, cache=ref_cache, **kw)
    cache = _wq(model, p, avg_bits=4.0, backend="tvm")
    got = model.generate(**p.inputs, cache=cache, **kw)
    layers = model.config.text_config.num_hidden_layers
    assert cache.stats.kernel_calls == layers * 5 and cache.stats.reference_calls == 0
    backend = cache.backend(torch.float32, torch.device("cpu"))
    assert backend.name.startswith("tvm:") and backend.quantize.calls > 0
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    # the compiled quantizer is bit-exact with the torch one on this data
    for i in range(layers):
        for bits, bucket in cache.layers[i].store.buckets.items():
            want = ref_cache.layers[i].store.buckets[bits]
            n = int(bucket.lens.max())
            assert torch.equal(bucket.lens, want.lens)
            assert torch.equal(bucket.k_codes[:, :, :n], want.k_codes[:, :, :n])


def test_back_to_back_videos_are_cut_at_their_newlines(model) -> None:
    layout = VisualLayout.from_config(model.config)
    ids = torch.tensor([[1, 5] + [999] * (2 * (2 * 196 + 1)) + [7, 8]])
    (s,) = locate(ids, None, layout)
    assert s.windows.starts.tolist() == [2, 198, 395, 591] and s.windows.lengths.tolist() == [196] * 4


def test_prepare_starts_a_new_conversation(model) -> None:
    p = video_prompt(model, [2])
    cache = _wq(model, p, avg_bits=4.0)
    first = _generate(model, p, cache, new=4)
    second = _generate(model, p, cache.prepare(**p.inputs), new=4)
    assert torch.equal(first, second) and cache.get_seq_length() == p.inputs["input_ids"].shape[1] + 3


def test_budget_below_what_partial_windows_allow_warns_and_clamps(model) -> None:
    p = image_prompt(model)
    cache = _wq(model, p, avg_bits=2.5, window=196)
    with pytest.warns(UserWarning, match="avg_bits=2.5 is below"):
        assert _generate(model, p, cache, new=2).shape == (1, 2)
    with pytest.raises(ValueError, match="window"):
        WindowQuantConfig(window=100)
