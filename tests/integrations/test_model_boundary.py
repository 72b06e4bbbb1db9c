"""Bad or unusual input at the model boundary (issue 18, item 4): a batch mixing a text-only sample and a 32-frame
video, a prompt longer than the model's context, a video of identical frames, a generation long enough that the
residual flushes many times (the flushed blocks checked against the model's own keys/values), NaN pixels."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from wq_compile import ATTN_IMPLEMENTATION, WindowQuantCache, WindowQuantConfig
from wq_compile.core.reference import decode_attention
from wq_compile.integrations.tiny import text_prompt, tiny_model, video_prompt


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return tiny_model(ATTN_IMPLEMENTATION)


def _tokens(model, inputs, cache, new):
    out = model.generate(**inputs, cache=cache, max_new_tokens=new, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _wq(model, inputs, **kw) -> WindowQuantCache:
    kw.setdefault("backend", "reference")
    return WindowQuantCache(model.config, WindowQuantConfig(**kw)).prepare(**inputs)


def test_batch_of_a_text_only_sample_and_a_32_frame_video(model):
    """Sample 0 has no visual token at all, sample 1 a 32-frame video: windows per sample, both generate."""
    p = video_prompt(model, [0, 32])
    ids = p.inputs["input_ids"]
    assert int((ids[0] == 999).sum()) == 0 and int((ids[1] == 999).sum()) == 32 * 196 + 1
    dense = _tokens(model, p.inputs, DynamicCache(config=model.config), 8)
    cache16 = _wq(model, p.inputs, avg_bits=16)
    assert torch.equal(_tokens(model, p.inputs, cache16, 8), dense)
    cache = _wq(model, p.inputs, avg_bits=3.5)
    got = _tokens(model, p.inputs, cache, 8)
    assert len(cache.samples[0].windows) == 0 and len(cache.samples[1].windows) == 32
    assert torch.equal(got[0], dense[0])  # nothing of sample 0 was quantized: its attention is exact
    assert set(cache.plan(1).histogram()) and cache.plan(0) is None or len(cache.plan(0).windows) == 0


def test_prompt_longer_than_the_models_context_is_refused(model):
    cfg = copy.deepcopy(model.config)
    cfg.text_config.max_position_embeddings = 100
    p = text_prompt(tokens=120)
    with pytest.raises(ValueError, match="120 tokens, more than the model's context of 100 positions"):
        WindowQuantCache(cfg, WindowQuantConfig(backend="reference")).prepare(**p.inputs)
    WindowQuantCache(cfg, WindowQuantConfig(backend="reference")).prepare(**text_prompt(tokens=100).inputs)


def test_video_of_identical_frames(model):
    """Every frame the same picture: equal scores, windows equal but for RoPE; nothing degenerates (no NaN), 16 bits
    is exactly dense, and a mixed budget still plans and generates."""
    p = video_prompt(model, [6])
    pv = p.inputs["pixel_values_videos"]
    p.inputs["pixel_values_videos"] = pv[:, :1].expand_as(pv).contiguous()
    dense = _tokens(model, p.inputs, DynamicCache(config=model.config), 8)
    assert torch.equal(_tokens(model, p.inputs, _wq(model, p.inputs, avg_bits=16), 8), dense)
    cache = _wq(model, p.inputs, avg_bits=3.5)
    out = model.generate(**p.inputs, cache=cache, max_new_tokens=8, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    assert all(bool(torch.isfinite(s).all()) for s in out.scores)
    assert cache.plan(0).effective_avg_bits() <= 3.5 + 1e-6


def test_residual_flushes_many_times_and_the_flushed_blocks_match(model):
    """A 32-token residual and 200 new tokens: the residual flushes its oldest 56 tokens into the 8-bit bucket again
    and again (through the compiled quantizer). Layer 0's flushed blocks dequantize to the model's own keys/values
    at those positions (recomputed densely: layer 0's K/V depend on the tokens only; deeper layers' K/V of generated
    tokens already carry the quantized attention below them) within int8 tolerance, and in every layer the compiled
    decode over the final cache equals the reference's."""
    p = video_prompt(model, [2])
    new = 200
    cache = _wq(model, p.inputs, avg_bits=3.5, widths=(16, 4, 2), residual=32, backend="tvm")
    out = model.generate(**p.inputs, cache=cache, max_new_tokens=new, do_sample=False)
    assert cache.stats.reference_calls == 0 and cache.stats.kernel_calls > 0
    seq = out[:, :-1]  # the last token was sampled but never fed back: the cache holds the rest
    full = model(input_ids=seq, attention_mask=torch.ones_like(seq),
                 pixel_values_videos=p.inputs["pixel_values_videos"], past_key_values=DynamicCache(config=model.config),
                 use_cache=True).past_key_values
    windows = cache.samples[0].windows
    in_window = torch.zeros(seq.shape[1], dtype=torch.bool)
    for s, n in zip(windows.starts.tolist(), windows.lengths.tolist()):
        in_window[s:s + n] = True
    residual_order = torch.nonzero(~in_window).flatten()  # text, then generated tokens, in position order
    for li, layer in enumerate(cache.layers):
        bucket = layer.store.buckets[8]
        n8 = int(bucket.lens[0])
        assert n8 >= 3 * 56 and n8 % 56 == 0, f"layer {li}: {n8} tokens flushed"
        if li == 0:
            k8, v8 = bucket.dequantize()
            pos = residual_order[:n8]
            want_k, want_v = full.layers[0].keys[0][:, pos], full.layers[0].values[0][:, pos]
            for got, want in ((k8[0, :, :n8], want_k), (v8[0, :, :n8], want_v)):
                span = float(want.abs().max())
                assert float((got - want).abs().max()) <= span / 127, "layer 0: a flushed block differs"
        q = torch.randn(1, cache.num_q_heads, cache.head_dim)
        sm = cache.head_dim ** -0.5
        got = cache.backend(torch.float32, torch.device("cpu")).decode(q, layer.store, sm)
        torch.testing.assert_close(got, decode_attention(q[:, :, None], layer.store, sm)[:, :, 0].float(),
                                   rtol=1e-4, atol=1e-4)


def test_nan_pixels_are_refused_at_prepare(model):
    p = video_prompt(model, [2])
    p.inputs["pixel_values_videos"][0, 1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="pixel_values_videos: 1 of .* NaN or inf"):
        _wq(model, p.inputs)
