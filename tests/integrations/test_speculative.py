"""Issue 19 item 4: ``crop`` on a WindowQuantCache, so prompt-lookup and assisted decoding run on it and give the
tokens plain greedy gives."""

from __future__ import annotations

import pytest
import torch

from wq_compile import ATTN_IMPLEMENTATION, WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.tiny import tiny_model, video_prompt

NEW = 24


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return tiny_model(ATTN_IMPLEMENTATION, seed=1)  # seed 1 generates a varied sequence (seed 0 repeats one token)


def _cache(model, prompt, **kw) -> WindowQuantCache:
    kw.setdefault("backend", "reference")
    return WindowQuantCache(model.config, WindowQuantConfig(**kw)).prepare(**prompt.inputs)


def _recording_crops(cache: WindowQuantCache) -> list[int]:
    """Record every crop ``generate`` asks of ``cache`` (tokens removed)."""
    seen: list[int] = []
    real = cache.crop

    def crop(n: int) -> None:
        seen.append(-n)
        real(n)

    cache.crop = crop  # type: ignore[method-assign]
    return seen


def _greedy(model, prompt, cache, **kw) -> torch.Tensor:
    out = model.generate(**prompt.inputs, cache=cache, max_new_tokens=NEW, do_sample=False, **kw)
    return out[:, prompt.inputs["input_ids"].shape[1]:]


def _same_tokens_and_logits(model, prompt, want_cache, cache, **kw) -> None:
    """Tokens equal, and each token's logits close (this random model's tokens hardly depend on the cache: the
    logits show a cropped-out draft token left behind)."""
    opts = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = model.generate(**prompt.inputs, cache=want_cache, **opts)
    got = model.generate(**prompt.inputs, cache=cache, **opts, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bits", [16.0, 3.0])
def test_prompt_lookup_gives_plain_greedy_tokens(model, bits: float) -> None:
    p = video_prompt(model, [2])
    cache = _cache(model, p, avg_bits=bits)
    crops = _recording_crops(cache)
    _same_tokens_and_logits(model, p, _cache(model, p, avg_bits=bits), cache, prompt_lookup_num_tokens=3)
    assert cache.stats.reference_calls > 0  # several-token verification steps ran on the filled cache
    assert crops and cache.get_seq_length() == p.inputs["input_ids"].shape[1] + NEW - 1


def test_assisted_decoding_with_a_draft_model_gives_plain_greedy_tokens(model) -> None:
    p = video_prompt(model, [2])
    draft = tiny_model(seed=7, layers=1)  # same vocabulary, different weights: most drafts are rejected
    cache = _cache(model, p, avg_bits=3.0)
    crops = _recording_crops(cache)
    _same_tokens_and_logits(model, p, _cache(model, p, avg_bits=3.0), cache, assistant_model=draft)
    assert any(n > 0 for n in crops)  # rejected drafts were cropped out of the residual


def test_crop_refuses_to_reach_into_buckets_or_windows(model) -> None:
    p = video_prompt(model, [2], question=44)
    cache = _cache(model, p, avg_bits=3.0, residual=0)
    _greedy(model, p, cache)  # 48 prompt tokens + 23 decoded: a 56-token block was flushed into int8
    layer = cache.layers[0]
    assert layer.store.stats["flushes"] > 0
    resid = int((layer.store.dense.lens - layer.store.dense.pinned).min())
    before = [int(lay.store.dense.lens[0]) for lay in cache.layers]
    with pytest.raises(ValueError, match="would reach into a bucket"):
        cache.crop(-(resid + 1))
    assert [int(lay.store.dense.lens[0]) for lay in cache.layers] == before  # refused: nothing changed
    cache.crop(-resid)
    assert cache.get_seq_length() == p.inputs["input_ids"].shape[1] + NEW - 1 - resid
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(3)

    q = video_prompt(model, [2], question=0)  # the prompt ends with the video (and its newline token)
    cache = _cache(model, q, avg_bits=3.0)
    _greedy(model, q, cache)
    after_window = cache.get_seq_length() - cache.layers[0].frozen
    assert after_window == NEW - 1 + 1  # the decoded tokens and the video's newline
    with pytest.raises(ValueError, match="visual windows"):
        cache.crop(-(after_window + 1))
    cache.crop(-after_window)


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_short_steps_on_a_filled_cache_run_the_compiled_kernel(model) -> None:
    """Draft verification and a short follow-up run the compiled multi-token kernel once per layer and step (causal
    among the step's tokens), no reference call; results match the reference backend's causal path."""
    p = video_prompt(model, [2])
    ref = _cache(model, p, avg_bits=3.0)
    cache = _cache(model, p, avg_bits=3.0, backend="tvm")
    opts = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
                prompt_lookup_num_tokens=3)
    want = model.generate(**p.inputs, cache=ref, **opts)
    got = model.generate(**p.inputs, cache=cache, **opts)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    assert ref.stats.reference_calls > 0 and cache.stats.reference_calls == 0
    layers = model.config.text_config.num_hidden_layers
    assert cache.stats.kernel_calls >= layers * (NEW // 4)  # one launch per layer and verification step
    ids = torch.cat([got.sequences, torch.arange(100, 140)[None]], 1)  # a 40-token follow-up question
    calls = cache.stats.kernel_calls
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=2,
                         do_sample=False)
    assert out.shape[1] == ids.shape[1] + 2 and cache.stats.reference_calls == 0
    assert cache.stats.kernel_calls - calls == layers * (1 + 1)  # the 41-token step in one launch, then a decode


def test_long_step_attention_equals_the_reference_causal_path() -> None:
    """The long-step path (dequantize once + SDPA) against the reference: batch of 2 with different lengths,
    every bucket filled, the step's own tokens causal."""
    from wq_compile.core.layout import LayerCache
    from wq_compile.core.reference import decode_attention
    from wq_compile.core.windows import Windows
    from wq_compile.integrations.multi_token import dequantized_attention

    gen = torch.Generator().manual_seed(4)
    store = LayerCache.empty(2, 2, 64, torch.float32, residual=64)
    for b, t in enumerate((700, 500)):
        k, v = torch.randn(2, t, 64, generator=gen), torch.randn(2, t, 64, generator=gen)
        w = Windows(torch.tensor([0, 196, 392]), torch.tensor([196, 196, 100]), torch.tensor([8, 4, 2]))
        store.fill_sample(b, k, v, w)
    s = 90
    store.append(torch.randn(2, 2, s, 64, generator=gen), torch.randn(2, 2, s, 64, generator=gen))
    q = torch.randn(2, 4, s, 64, generator=gen)
    want = decode_attention(q, store, 0.125, causal_tail=s).transpose(1, 2)
    got = dequantized_attention(q, store, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
