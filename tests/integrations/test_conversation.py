"""Issue 19 items 2 and 5: follow-up turns on the same cache, and a cache saved, loaded and continued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from wq_compile import ATTN_IMPLEMENTATION, WindowQuantCache, WindowQuantConfig
from wq_compile.integrations.tiny import tiny_model, video_prompt

NEW = 8


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return tiny_model(ATTN_IMPLEMENTATION, seed=1)


def _config(**kw) -> WindowQuantConfig:
    kw.setdefault("backend", "reference")
    return WindowQuantConfig(**kw)


def _turn(model, cache, **inputs):
    """One turn: generate on the whole conversation so far (cached tokens are skipped by generate)."""
    return model.generate(**inputs, cache=cache, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def _follow_up(seq: torch.Tensor, tokens: int = 10, seed: int = 5) -> dict:
    """The next user turn appended to the conversation so far: text ids only, no pixel values."""
    q = torch.randint(3, 990, (seq.shape[0], tokens), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([seq, q], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_follow_up_turn_at_16_bits_equals_dynamic_cache(model) -> None:
    p = video_prompt(model, [2])
    caches = {"dynamic": DynamicCache(config=model.config),
              "wq": WindowQuantCache(model.config, _config(avg_bits=16.0)).prepare(**p.inputs)}
    outs = {}
    for name, cache in caches.items():
        first = _turn(model, cache, **p.inputs)
        second = _turn(model, cache, **_follow_up(first.sequences))
        outs[name] = (first.sequences, second.sequences, second.logits)
    assert torch.equal(outs["wq"][0], outs["dynamic"][0]) and torch.equal(outs["wq"][1], outs["dynamic"][1])
    for a, b in zip(outs["dynamic"][2], outs["wq"][2]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    n = outs["wq"][1].shape[1]
    assert caches["wq"].get_seq_length() == n - 1  # the follow-up and its answer joined the same cache


@pytest.mark.parametrize("widths,meta_bits", [((16, 8, 4, 2), 16), ((16, 8, 4, 2, 1), 16), ((16, 8, 4, 2, 1), 8)],
                         ids=["default-widths", "with-1-bit", "8-bit-scale-zero"])
def test_saved_and_loaded_cache_continues_the_conversation(model, tmp_path: Path, widths: tuple,
                                                           meta_bits: int) -> None:
    p = video_prompt(model, [4], question=60)
    # decode flushes into the int8 bucket: every storage kind is saved (the int1 bucket too, when allowed; at
    # meta_bits=8 the int2/int1 buckets' 8-bit scale/zero codes, run bases and run index)
    cfg = _config(avg_bits=3.5 if 1 not in widths else 2.6, residual=0, widths=widths, meta_bits=meta_bits)
    cache = WindowQuantCache(model.config, cfg).prepare(**p.inputs)
    first = _turn(model, cache, **p.inputs)
    store = cache.layers[0].store
    need = (8, 1) if 1 in widths else tuple(store.buckets)  # at 2.6 bits over 4 frames int4 may stay empty
    assert store.stats["flushes"] and all(int(store.buckets[b].lens[0]) for b in need)
    assert sorted(store.buckets) == sorted(cfg.bucket_widths)
    assert [store.buckets[w].meta_bits for w in (8, 2)] == [16, meta_bits]
    cache.save(str(tmp_path / "clip"))
    loaded = WindowQuantCache.load(str(tmp_path / "clip"), cfg, model.config)
    assert loaded.get_seq_length() == cache.get_seq_length()
    assert torch.equal(loaded.plan(0).bits, cache.plan(0).bits)
    follow = _follow_up(first.sequences)
    want = _turn(model, cache, **follow)
    got = _turn(model, loaded, **follow)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(want.logits, got.logits):
        assert torch.equal(a, b)  # the same quantized data and the same kernels: bit-identical
    report = cache.memory_report()
    size = (tmp_path / "clip" / "tensors.safetensors").stat().st_size
    assert report["quantized_bytes"] > 0 and size < 1.25 * report["total_bytes"] + 64 * 1024, (size, report)


def test_load_refuses_a_mismatch(model, tmp_path: Path) -> None:
    p = video_prompt(model, [2])
    cfg = _config(avg_bits=3.0)
    cache = WindowQuantCache(model.config, cfg).prepare(**p.inputs)
    _turn(model, cache, **p.inputs)
    folder = tmp_path / "clip"
    cache.save(str(folder))
    with pytest.raises(ValueError, match="config.avg_bits: the saved cache has 3.0, this one 4.0"):
        WindowQuantCache.load(str(folder), _config(avg_bits=4.0), model.config)
    with pytest.raises(TypeError, match="WindowQuantConfig"):
        WindowQuantCache.load(str(folder), model.config, cfg)
    other = tiny_model(ATTN_IMPLEMENTATION, layers=3)
    with pytest.raises(ValueError, match="model.num_layers: the saved cache has 2, this one 3"):
        WindowQuantCache.load(str(folder), cfg, other.config)
    meta = json.loads((folder / "cache.json").read_text())
    meta["format"] = 99
    (folder / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format: the saved cache has 99"):
        WindowQuantCache.load(str(folder), cfg, model.config)
    with pytest.raises(ValueError, match="not a saved WindowQuantCache"):
        WindowQuantCache.load(str(tmp_path / "nothing"), cfg, model.config)
    with pytest.raises(ValueError, match="nothing to save yet"):
        WindowQuantCache(model.config, cfg).save(str(tmp_path / "empty"))


def _next_turn(seq: torch.Tensor, mask: torch.Tensor, tokens: int, clip_frames: int = 0, seed: int = 5) -> dict:
    """The next user turn of every sample (a question, optionally after a clip of ``clip_frames``), appended to the
    conversation so far; ``mask`` keeps the first turn's left padding."""
    from wq_compile.integrations.tiny import VIDEO_TOKEN

    gen = torch.Generator().manual_seed(seed)
    clip = [5, 6] + [VIDEO_TOKEN] * (clip_frames * 196 + 1) if clip_frames else []
    new = torch.cat([torch.tensor(clip, dtype=torch.long).expand(seq.shape[0], -1),
                     torch.randint(3, 990, (seq.shape[0], tokens), generator=gen)], 1)
    ids = torch.cat([seq, new], 1)
    inputs = {"input_ids": ids, "attention_mask": torch.cat([mask, torch.ones_like(ids[:, mask.shape[1]:])], 1)}
    if clip_frames:
        inputs["pixel_values_videos"] = torch.randn(seq.shape[0], clip_frames, 3, 378, 378, generator=gen)
    return inputs


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
@pytest.mark.parametrize("frames", [[2], [2, 1]], ids=["one", "left-padded-batch"])
def test_conversation_on_the_compiled_backend_runs_no_reference_step(model, frames: list[int]) -> None:
    """A follow-up question (11 new tokens) and, for one sample, a second clip (a 211-token step: four launches of
    at most 64 tokens, causal at their offsets): every several-token step runs the multi-token kernel, none the
    torch reference, and the tokens and logits are the reference backend's (same quantized cache)."""
    p = video_prompt(model, frames)
    caches = {be: WindowQuantCache(model.config, _config(avg_bits=3.0, backend=be)).prepare(**p.inputs)
              for be in ("reference", "tvm")}
    outs: dict[str, list] = {}
    for be, cache in caches.items():
        first = _turn(model, cache, **p.inputs)
        follow = _next_turn(first.sequences, p.inputs["attention_mask"], 10)
        second = _turn(model, cache, **follow)
        outs[be] = [first, second]
        if len(frames) == 1:
            clip = _next_turn(second.sequences, follow["attention_mask"], 10, clip_frames=1, seed=6)
            outs[be].append(_turn(model, cache.extend(**clip), **clip))
    for want, got in zip(outs["reference"], outs["tvm"]):
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(want.logits, got.logits):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    layers = model.config.text_config.num_hidden_layers
    assert caches["reference"].stats.reference_calls >= layers * len(outs["tvm"][1:])
    assert caches["tvm"].stats.reference_calls == 0
