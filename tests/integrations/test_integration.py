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


def test_eviction_drops_windows_and_generation_still_runs(model) -> None:
    """Width 0 allowed under a budget below int2's 2.61 effective bits: some frames are evicted (not stored), the
    plan's bits stay within the budget, and decoding runs over what is left; the positions of new tokens do not
    move (the cache counts what it was given, not what it keeps)."""
    p = video_prompt(model, [4])
    cache = _wq(model, p, avg_bits=2.0, widths=(4, 2, 0))
    tokens = _generate(model, p, cache, new=4)
    assert tokens.shape == (1, 4)
    plan = cache.plan(0)
    assert plan.histogram()[0] > 0 and plan.effective_avg_bits() <= 2.0
    full = _wq(model, p, avg_bits=3.0, widths=(2,))
    _generate(model, p, full, new=4)
    assert cache.get_seq_length() == full.get_seq_length()
    assert cache.memory_report()["quantized_bytes"] < full.memory_report()["quantized_bytes"]
    evicted = int((plan.windows.lengths[None].to(plan.bits.device) * (plan.bits == 0)).sum())  # all layers
    assert cache.memory_report()["cached_tokens"] == full.memory_report()["cached_tokens"] - evicted


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


def test_config_is_checked_against_the_model_and_defaults_fit_it() -> None:
    """Issue 10 items 3 and 6: nonsense is refused when the cache is built (not ~38 tokens into generate), and the
    default v_group fits a head_dim-32 model (it used to fail inside generate)."""
    small = tiny_model(ATTN_IMPLEMENTATION, layers=1, text_shapes=dict(hidden_size=128))  # head_dim 32
    with pytest.raises(ValueError, match="v_group: 64 does not divide the model's head_dim 32"):
        WindowQuantCache(small.config, WindowQuantConfig(v_group=64))
    with pytest.raises(ValueError, match="residual"):
        WindowQuantCache(small.config, WindowQuantConfig(residual=-1))
    p = video_prompt(small, [2])
    cache = WindowQuantCache(small.config, WindowQuantConfig(avg_bits=4.0, backend="reference")).prepare(**p.inputs)
    assert cache.wq.v_group == 32 and WindowQuantConfig().v_group is None
    assert _generate(small, p, cache, new=4).shape == (1, 4)
    assert cache.plan(0).histogram()[16] < 2  # windows were quantized with the resolved v_group


def test_embedding_scorer(model) -> None:
    p = video_prompt(model, [3])
    cache = WindowQuantCache(model.config, WindowQuantConfig(avg_bits=5.0, scorer="embedding", backend="reference"))
    cache.prepare(**p.inputs, model=model)
    _generate(model, p, cache, new=4)
    assert cache.embed_scores is not None and cache.embed_scores[0].shape == (3,)
    assert torch.equal(cache.plan(0).scores[0], cache.plan(0).scores[1])  # one score per window, all layers


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
@pytest.mark.parametrize("config", [dict(avg_bits=4.0), dict(avg_bits=2.5, widths=(16, 8, 4, 2, 1))],
                         ids=["default-widths", "with-1-bit"])
def test_decode_runs_the_compiled_module(model, config: dict) -> None:
    """Every decode step of every layer is one fused-kernel call; windows are quantized by the compiled kernel;
    the result matches the torch reference path (same quantized data, fp32 accumulation order differs). With 1 bit
    allowed at 2.5 bits, windows land in the int1 bucket and the compiled kernels read it."""
    p = video_prompt(model, [2, 3])
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_cache = _wq(model, p, **config)
    ref = model.generate(**p.inputs, cache=ref_cache, **kw)
    cache = _wq(model, p, backend="tvm", **config)
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
    if 1 in config.get("widths", ()):
        assert int(cache.layers[0].store.buckets[1].lens.sum()) > 0  # the plan used the 1-bit width
        assert any("k1v1" in uri for uri in backend.kernels)


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


# ---- issue 10: non-finite / out-of-range K/V (item 2), video-only prompts (item 4), beams (item 11) -------------------
def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, T, D] -> [B, Hq, D] in fp64: the exact answer a dense cache gives."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    p = torch.softmax(torch.einsum("bhd,bhtd->bht", q.double(), kk) * sm_scale, -1)
    return torch.einsum("bht,bhtd->bhd", p, vv)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 7e4, 1e5])
def test_unquantizable_window_stays_dense_and_attention_is_exact(model, poison: float) -> None:
    from wq_compile.core.reference import decode_attention

    p = video_prompt(model, [3])
    cache = _wq(model, p, avg_bits=10.0, widths=(16, 8))  # int8 elsewhere: small error, so the poisoned one shows
    t = p.inputs["input_ids"].shape[1]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, t, 64, generator=gen) for h in (4, 2, 2))
    start = int(cache.samples[0].windows.starts[1])
    k[0, 1, start + 5, 3] = poison  # window 1: one key element ...
    v[0, 0, start + 9, 60] = poison  # ... and one value element
    with pytest.warns(UserWarning, match="NaN/inf or K/V beyond the fp16 range"):
        cache.store_prompt(0, q, k, v, 0.125)
    bits = cache.plans[0][0]
    assert int(bits[1]) == 16 and bool((bits[[0, 2]] < 16).any())  # the others are still searched and quantized
    store = cache.layers[0].store
    qd = torch.randn(1, 4, 64, generator=gen)
    got = decode_attention(qd, store, 0.125).double()
    want = _dense_attention(qd, k, v, 0.125)
    dense_k = store.dense.k[0, :, : int(store.dense.pinned[0])]
    assert bool((dense_k == poison).any()) or (poison != poison and bool(dense_k.isnan().any()))  # stored as is
    if poison != poison:  # NaN propagates exactly as in a dense cache
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got).any())
        return
    if poison == float("inf"):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)) or not bool(torch.isfinite(want).all())
        return
    # large values are stored exactly (a coded 7e4 had relative error 1.0): only the int8 windows' error remains
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_flushed_block_with_nan_stays_dense() -> None:
    from wq_compile.core.layout import LayerCache
    from wq_compile.core.reference import decode_attention

    gen = torch.Generator().manual_seed(2)
    layer = LayerCache.empty(1, 2, 64, torch.float32, residual=0, k_group=28)
    ks, vs = [], []
    for step in range(130):
        k, v = torch.randn(1, 2, 1, 64, generator=gen), torch.randn(1, 2, 1, 64, generator=gen)
        if step == 70:  # inside the second flushed block (tokens 56..111)
            k[0, 1, 0, 7] = float("nan")
        ks.append(k)
        vs.append(v)
        layer.append(k, v)
    assert layer.stats["flushes"] == 1 and layer.stats["dense_blocks"] == 1  # block 2 kept dense, not coded
    q = torch.randn(1, 4, 64, generator=gen)
    got = decode_attention(q, layer, 0.125)
    want = _dense_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), 0.125)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got[0, 2:]).all())
    assert (got[0, :2].double() - want[0, :2]).abs().max() < 0.1  # the finite head group: int8 block + dense


def test_video_only_prompt_uses_uniform_scores(model) -> None:
    p = video_prompt(model, [3], question=0)
    ids = p.inputs["input_ids"][:, 4:]  # drop [BOS, 5, 6, 7]: video tokens only
    p.inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    cache = _wq(model, p, avg_bits=3.0)
    assert not bool(cache.samples[0].text_mask.any())
    with pytest.warns(UserWarning, match="no text tokens"):
        out = _generate(model, p, cache, new=4)
    assert out.shape == (1, 4)
    plan = cache.plan(0)
    assert bool((plan.scores == 1).all()) and plan.effective_avg_bits() <= 3.0 + 1e-6


def test_num_return_sequences_gives_identical_greedy_rows(model) -> None:
    p = video_prompt(model, [2], question=44)  # 48 residual tokens: decode flushes a 56-token block soon
    single = _generate(model, p, _wq(model, p, avg_bits=3.0, residual=0), new=12)
    cache = _wq(model, p, avg_bits=3.0, residual=0)
    # transformers refuses greedy with num_return_sequences > 1: top-k 1 sampling is greedy, per returned row
    out = model.generate(**p.inputs, cache=cache, max_new_tokens=12, do_sample=True, top_k=1,
                         num_return_sequences=2)
    rows = out[:, p.inputs["input_ids"].shape[1]:]
    assert rows.shape == (2, 12) and torch.equal(rows[0], single[0]) and torch.equal(rows[1], single[0])
    assert cache.layers[0].store.stats["flushes"] > 0  # decode tokens were quantized into the flush bucket


def test_beam_search_all_dense_matches_dynamic_cache(model) -> None:
    p = video_prompt(model, [2])
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)
    want = model.generate(**p.inputs, cache=DynamicCache(config=model.config), **kw)
    got = model.generate(**p.inputs, cache=_wq(model, p, avg_bits=16.0), **kw)
    assert torch.equal(got, want)


def test_beam_search_scores_match_the_caches_own_greedy_path(model) -> None:
    """Each returned beam's score equals the log-probability the cache gives that sequence when it is decoded on
    its own (teacher-forced greedy through a fresh cache): reordered buckets, dense piece and lens per beam."""
    p = video_prompt(model, [2], question=44)
    n_in, new = p.inputs["input_ids"].shape[1], 12
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, length_penalty=0.0,
              return_dict_in_generate=True, output_scores=True)
    cache = _wq(model, p, avg_bits=3.0, residual=0)
    out = model.generate(**p.inputs, cache=cache, num_beams=3, num_return_sequences=3, **kw)
    assert cache.layers[0].store.stats["flushes"] > 0 and cache.layers[0].store.dense.lens.shape[0] == 3
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3
    for seq, score in zip(out.sequences, out.sequences_scores):
        gen = seq[n_in:].tolist()
        forced = model.generate(**p.inputs, cache=_wq(model, p, avg_bits=3.0, residual=0), max_new_tokens=new,
                                do_sample=False, output_logits=True, return_dict_in_generate=True,
                                prefix_allowed_tokens_fn=lambda b, ids, g=gen: [g[ids.shape[0] - n_in]])
        assert forced.sequences[0, n_in:].tolist() == gen
        logp = sum(float(torch.log_softmax(lg[0].double(), -1)[tok]) for lg, tok in zip(forced.logits, gen))
        assert abs(logp - float(score)) < 1e-3 * max(1.0, abs(logp))


def _fill_per_window(layer, b, k, v, windows, valid) -> None:
    """The pre-vectorization fill_sample: one Python step per window in bucket order (the oracle for the layout)."""
    from wq_compile.core.windows import unquantizable_windows

    bad = unquantizable_windows(k, v, windows.starts, windows.lengths)
    bits = torch.where(bad, torch.full_like(windows.bits, 16), windows.bits)
    order = windows.with_bits(bits).bucket_order().tolist()
    in_window = torch.zeros(k.shape[1], dtype=torch.bool)
    per_bits, tails = {w: [] for w in layer.buckets}, []
    for w in order:
        s, n, width = int(windows.starts[w]), int(windows.lengths[w]), int(bits[w])
        idx = torch.arange(s, s + n)
        in_window[idx] = True
        whole = 0 if width == 16 else n // layer.k_group * layer.k_group
        if whole:
            per_bits[width].append(idx[:whole])
        tails.append(idx[whole:])
    for width, parts in per_bits.items():
        if parts:
            idx = torch.cat(parts)
            layer.buckets[width].append(b, k[:, idx], v[:, idx], layer.quantizer)
    idx = torch.cat(tails)
    if idx.numel():
        layer.dense.append(b, k[:, idx], v[:, idx], pinned=True)
    idx = torch.nonzero(~in_window & valid).flatten()
    layer.dense.append(b, k[:, idx], v[:, idx])
    layer.flush()


@pytest.mark.parametrize("shuffled", [False, True])
def test_vectorized_fill_is_bit_identical_to_the_per_window_fill(shuffled: bool) -> None:
    """Unsorted windows, every width, group tails, a NaN window and an out-of-fp16-range one, padding."""
    from wq_compile.core.layout import LayerCache
    from wq_compile.core.windows import Windows

    gen = torch.Generator().manual_seed(3)
    t = 900
    k, v = torch.randn(2, t, 64, generator=gen), torch.randn(2, t, 64, generator=gen)
    lengths = [84, 57, 196, 30, 61, 112, 5, 140]
    starts, s = [], 7
    for n in lengths:
        starts.append(s)
        s += n + 3
    bits = [8, 16, 2, 4, 8, 2, 4, 2]
    k[1, starts[3] + 2, 9] = float("nan")
    v[0, starts[5] + 100, 1] = 1e6
    perm = torch.randperm(len(lengths), generator=gen) if shuffled else torch.arange(len(lengths))
    w = Windows(torch.tensor(starts)[perm], torch.tensor(lengths)[perm], torch.tensor(bits)[perm])
    valid = torch.ones(t, dtype=torch.bool)
    valid[:4] = False
    want = LayerCache.empty(1, 2, 64, torch.float32, residual=64)
    got = LayerCache.empty(1, 2, 64, torch.float32, residual=64)
    _fill_per_window(want, 0, k, v, w, valid)
    got.fill_sample(0, k, v, w, valid=valid)
    for width in want.buckets:
        for a, b in zip(want.buckets[width].tensors(), got.buckets[width].tensors()):
            assert torch.equal(a, b)
    for name in ("k", "v", "lens", "pinned"):
        assert torch.equal(getattr(want.dense, name).nan_to_num(7.0), getattr(got.dense, name).nan_to_num(7.0))
    assert got.stats["dense_windows"] == 2


def test_prompt_plan_is_built_once_and_shared_by_every_layer(monkeypatch) -> None:
    """Windows' token indices, text index and masks are derived once per prompt, not once per layer."""
    from wq_compile.core.windows import Windows

    built: list[tuple] = []
    real = Windows._cached

    def counting(self, key, make):
        def counted():
            built.append(key)
            return make()
        return real(self, key, counted)

    monkeypatch.setattr(Windows, "_cached", counting)
    torch.set_grad_enabled(False)
    layers = 5
    m = tiny_model(ATTN_IMPLEMENTATION, layers=layers)
    p = video_prompt(m, [3, 2])
    cache = _wq(m, p, avg_bits=3.0)
    _generate(m, p, cache, new=2)
    assert cache.stats.prefill_layers == layers
    assert cache.stats.prompt_plans == 2  # one per sample, not per layer
    assert built
    kinds = [k[0] for k in built]
    for kind in set(kinds):  # each derivation at most once per sample, whatever the number of layers
        assert kinds.count(kind) <= 2, (kind, kinds.count(kind))
    assert set(cache.stats.stage_seconds) == {"screen", "score", "search", "fill"}
    assert all(s >= 0 for s in cache.stats.stage_seconds.values())
    assert sum(cache.stats.stage_seconds.values()) <= cache.stats.store_seconds
    cache.prepare(**p.inputs)  # a new conversation derives its prompt again
    _generate(m, p, cache, new=2)
    assert cache.stats.prompt_plans == 4
