"""Issue 19 item 3: a second clip in a later turn joins the cached conversation under the cache-wide budget."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from wq_compile import ATTN_IMPLEMENTATION, WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.tiny import VIDEO_TOKEN, tiny_model, video_prompt

NEW = 6


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return tiny_model(ATTN_IMPLEMENTATION, seed=1)


def _wq(model, prompt, bits: float) -> WindowQuantCache:
    return WindowQuantCache(model.config, WindowQuantConfig(avg_bits=bits, backend="reference")).prepare(
        **prompt.inputs)


def _second_clip(seq: torch.Tensor, frames: int = 3, seed: int = 9) -> dict:
    """The next user turn: a little text, a new clip, a question; with the new clip's pixel values only."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(3, 990, (10,), generator=gen)
    ids = torch.cat([seq[0], torch.tensor([5, 6] + [VIDEO_TOKEN] * (frames * 196 + 1)), q])[None]
    px = torch.randn(1, frames, 3, 378, 378, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": px}


def _gen(model, cache, **inputs):
    return model.generate(**inputs, cache=cache, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def test_second_clip_at_16_bits_equals_dynamic_cache(model) -> None:
    p = video_prompt(model, [2])
    dyn, wq = DynamicCache(config=model.config), _wq(model, p, 16.0)
    first = _gen(model, dyn, **p.inputs)
    assert torch.equal(_gen(model, wq, **p.inputs).sequences, first.sequences)
    turn = _second_clip(first.sequences)
    want = _gen(model, dyn, **turn)
    got = _gen(model, wq.extend(**turn), **turn)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(want.logits, got.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert [len(s.windows) for s in wq.samples] == [5] and wq.turn is None
    assert wq.plan(0).bits.shape == (2, 5)
    clip_end = first.sequences.shape[1] + 2 + 3 * 196  # the second clip's last frame ends here
    assert wq.layers[0].frozen == clip_end  # a crop may not reach into the new windows either


def test_second_clip_is_quantized_under_the_whole_cache_budget(model, tmp_path) -> None:
    p = video_prompt(model, [3])
    cache = _wq(model, p, 4.0)
    first = _gen(model, cache, **p.inputs)
    old = [cache.plans[i][0].clone() for i in range(cache.num_layers)]
    quantized_before = cache.memory_report()["quantized_bytes"]
    turn = _second_clip(first.sequences, frames=4)
    second = _gen(model, cache.extend(**turn), **turn)
    plan = cache.plan(0)
    assert plan.bits.shape == (2, 7)
    for i in range(cache.num_layers):
        assert torch.equal(plan.bits[i, :3], old[i])  # windows already stored keep their width
    assert plan.effective_avg_bits() <= 4.0 + 1e-6  # the budget holds for the whole cache
    assert bool((plan.bits[:, 3:] < 16).any())
    visual = 7 * 196
    stored = sum(int(bk.lens[0]) for bk in cache.layers[0].store.buckets.values())
    assert stored >= visual - 7 * (196 % 28) - 196 * int((plan.bits[0] == 16).sum())  # new windows in buckets
    assert cache.memory_report()["quantized_bytes"] > 1.8 * quantized_before
    cache.save(str(tmp_path / "two_clips"))
    loaded = WindowQuantCache.load(str(tmp_path / "two_clips"), cache.wq, model.config)
    assert torch.equal(loaded.plan(0).bits, plan.bits) and loaded.layers[0].frozen == cache.layers[0].frozen
    follow = torch.cat([second.sequences, torch.tensor([[11, 12, 13]])], 1)
    out = _gen(model, cache, input_ids=follow, attention_mask=torch.ones_like(follow))  # a text follow-up after
    assert out.sequences.shape[1] == follow.shape[1] + NEW
    again = _gen(model, loaded, input_ids=follow, attention_mask=torch.ones_like(follow))
    assert torch.equal(again.sequences, out.sequences)  # the two-clip conversation, saved and continued


def test_extend_refuses_ids_that_do_not_extend_the_conversation(model) -> None:
    p = video_prompt(model, [2])
    with pytest.raises(ValueError, match="holds no conversation yet"):
        WindowQuantCache(model.config, WindowQuantConfig(backend="reference")).extend(**p.inputs)
    cache = _wq(model, p, 4.0)
    first = _gen(model, cache, **p.inputs)
    with pytest.raises(ValueError, match="do not extend the cached conversation"):
        cache.extend(first.sequences[:, :-3])
    turn = _second_clip(first.sequences)
    moved = turn["input_ids"].clone()
    moved[0, 3:6] = VIDEO_TOKEN  # the first clip would start earlier: not the cached conversation
    with pytest.raises(ValueError, match="do not match the cached conversation"):
        cache.extend(moved)
    other = _second_clip(first.sequences, frames=2)
    cache.extend(**turn)
    with pytest.raises(ValueError, match="pass generate the ids given to extend"):
        _gen(model, cache, **other)
