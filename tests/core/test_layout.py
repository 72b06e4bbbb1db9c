"""Bucket reordering changes no result: attention over the bucketed cache equals attention over the same quantized
tokens in prompt order, and at all-16-bit equals torch SDPA over the original cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wq_compile.core.layout import LayerCache
from wq_compile.core.windows import WindowAssignment
from wq_compile.core.quant import fake_quant
from wq_compile.core.reference import attend_piece, decode_attention, merge_states
from wq_compile.core.spec import QuantSpec
from tolerances import ATOL, RTOL

HQ, HKV, D, KG, VG = 4, 2, 32, 28, 32


def _prompt(gen: torch.Generator, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(HKV, t, D, generator=gen) * 2, torch.randn(HKV, t, D, generator=gen)


def _windows(starts: list[int], lengths: list[int], bits: list[int]) -> WindowAssignment:
    return WindowAssignment(torch.tensor(starts), torch.tensor(lengths), torch.tensor(bits))


def _in_order(k: torch.Tensor, v: torch.Tensor, w: WindowAssignment) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantized tokens, left in prompt order: each window's whole key groups fake-quantized in place."""
    k, v = k.clone().float(), v.clone().float()
    for s, n, b in zip(w.starts.tolist(), w.lengths.tolist(), w.bits.tolist()):
        whole = n // KG * KG
        if b != 16 and whole:
            spec = QuantSpec(b, KG, VG)
            k[:, s : s + whole] = fake_quant(k[:, s : s + whole], spec, "k")
            v[:, s : s + whole] = fake_quant(v[:, s : s + whole], spec, "v")
    return k, v


def _as_cached(k: torch.Tensor, v: torch.Tensor, w: WindowAssignment, steps: list[tuple[torch.Tensor, torch.Tensor]],
               residual: int, flush_tokens: int, flush_bits: int, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The tokens a LayerCache holds after ``fill_sample`` and one ``append`` per step, computed independently: the
    windows as :func:`_in_order` leaves them, then the residual (text tokens in prompt order, padding dropped, then
    the appended ones) with every flushed block fake-quantized at ``flush_bits``. Blocks of ``flush_tokens`` are
    flushed from the oldest residual token while more than ``residual + flush_tokens - 1`` are left, after the prompt
    and before each append (a step's tokens are its queries: never quantized before they attend). Returns
    ``(k, v, number of flushed blocks)``."""
    kq, vq = _in_order(k, v, w)
    in_window = torch.zeros(k.shape[1], dtype=torch.bool)
    for s, n in zip(w.starts.tolist(), w.lengths.tolist()):
        in_window[s : s + n] = True
    rest = ~in_window if valid is None else ~in_window & valid
    res_k, res_v = k[:, rest].float(), v[:, rest].float()
    flushed = 0

    def flush() -> int:
        n = flushed
        while res_k.shape[1] - n > residual + flush_tokens - 1:
            n += flush_tokens
        return n

    flushed = flush()
    for kn, vn in steps:
        flushed = flush()
        res_k, res_v = torch.cat([res_k, kn.float()], 1), torch.cat([res_v, vn.float()], 1)
    spec = QuantSpec(flush_bits, KG, VG)
    for s in range(0, flushed, flush_tokens):
        res_k[:, s : s + flush_tokens] = fake_quant(res_k[:, s : s + flush_tokens], spec, "k")
        res_v[:, s : s + flush_tokens] = fake_quant(res_v[:, s : s + flush_tokens], spec, "v")
    return torch.cat([kq[:, in_window], res_k], 1), torch.cat([vq[:, in_window], res_v], 1), flushed // flush_tokens


def _tol(widths: list[int]) -> dict[str, float]:
    """The shared tolerance table's bound for attention over pieces of these widths (the loosest of them)."""
    return {"atol": max(ATOL[b] for b in widths), "rtol": max(RTOL[b] for b in widths)}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch SDPA of one sample: ``q [Hq, D]`` over ``k, v [Hkv, T, D]`` (GQA by repeating KV heads)."""
    rep = HQ // HKV
    out = F.scaled_dot_product_attention(
        q[None, :, None, :].float(), k.repeat_interleave(rep, 0)[None].float(), v.repeat_interleave(rep, 0)[None].float()
    )
    return out[0, :, 0]


CASES = [
    # windows (starts, lengths, bits) over a prompt of T tokens; text outside windows
    (420, [10, 206, 2, 402], [196, 196, 7, 13], [2, 8, 4, 16]),
    (700, [5, 305], [300, 300], [4, 2]),
    (300, [0, 100, 200], [100, 100, 100], [8, 8, 8]),
]


@pytest.mark.parametrize("t, starts, lengths, bits", CASES)
def test_reordering_is_invariant(t: int, starts: list[int], lengths: list[int], bits: list[int],
                                 gen: torch.Generator) -> None:
    k, v = _prompt(gen, t)
    w = _windows(starts, lengths, bits)
    cache = LayerCache.empty(1, HKV, D, torch.float32, k_group=KG, v_group=VG, residual=10_000)
    cache.fill_sample(0, k, v, w)
    assert int(cache.num_tokens()[0]) == t
    q = torch.randn(1, HQ, D, generator=gen)
    got = decode_attention(q, cache, sm_scale=D**-0.5)
    kq, vq = _in_order(k, v, w)
    want = _sdpa(q[0], kq, vq)
    torch.testing.assert_close(got[0], want, atol=2e-6, rtol=1e-5)


def test_all_16_bit_equals_sdpa_on_original(gen: torch.Generator) -> None:
    k, v = _prompt(gen, 500)
    w = _windows([3, 199, 395], [196, 196, 100], [16, 16, 16])
    cache = LayerCache.empty(1, HKV, D, torch.float32, k_group=KG, v_group=VG)
    cache.fill_sample(0, k, v, w)
    q = torch.randn(1, HQ, D, generator=gen)
    torch.testing.assert_close(decode_attention(q, cache, D**-0.5)[0], _sdpa(q[0], k, v), atol=2e-6, rtol=1e-5)


def test_batch_with_padding_and_decode_steps(gen: torch.Generator) -> None:
    """Two samples with different windows; padding tokens are dropped; appended decode tokens are attended; the
    flushed residual blocks are quantized at ``flush_bits`` exactly as the expected side quantizes them."""
    residual, flush_tokens, flush_bits = 16, 2 * KG, 8
    cache = LayerCache.empty(2, HKV, D, torch.float32, k_group=KG, v_group=VG, residual=residual,
                             flush_tokens=flush_tokens, flush_bits=flush_bits)
    k0, v0 = _prompt(gen, 450)
    k1, v1 = _prompt(gen, 450)
    w0 = _windows([10, 206], [196, 196], [4, 2])
    w1 = _windows([60], [196], [8])
    valid1 = torch.zeros(450, dtype=torch.bool)
    valid1[50:] = True  # left padding
    cache.fill_sample(0, k0, v0, w0)
    cache.fill_sample(1, k1, v1, w1, valid=valid1)
    assert cache.num_tokens().tolist() == [450, 400]
    steps = [(torch.randn(2, HKV, 1, D, generator=gen), torch.randn(2, HKV, 1, D, generator=gen)) for _ in range(40)]
    for kn, vn in steps:
        cache.append(kn, vn)
    q = torch.randn(2, HQ, D, generator=gen)
    got = decode_attention(q, cache, D**-0.5)
    flushes = 0
    for i, (k, v, w, valid) in enumerate(((k0, v0, w0, None), (k1, v1, w1, valid1))):
        kq, vq, n = _as_cached(k, v, w, [(kn[i], vn[i]) for kn, vn in steps], residual, flush_tokens, flush_bits,
                               valid)
        assert kq.shape[1] == int(cache.num_tokens()[i])
        torch.testing.assert_close(got[i], _sdpa(q[i], kq, vq), **_tol(w.bits.tolist() + [flush_bits]))
        flushes += n
    # sample 0 flushes during decode (58 text tokens, then 40 steps), sample 1 after its prompt (204) and once more
    assert flushes == 5 and cache.stats["flushes"] == flushes


def test_residual_flush_keeps_recent_tokens_dense(gen: torch.Generator) -> None:
    cache = LayerCache.empty(1, HKV, D, torch.float16, k_group=KG, v_group=VG, residual=32, flush_bits=4)
    k, v = _prompt(gen, 40)
    cache.fill_sample(0, k, v, _windows([], [], []))
    for _ in range(100):
        cache.append(torch.randn(1, HKV, 1, D, generator=gen), torch.randn(1, HKV, 1, D, generator=gen))
    assert 32 <= cache.dense.residual_len(0) <= 32 + 2 * KG  # the last step's token is flushed next step
    assert int(cache.buckets[4].lens[0]) % KG == 0 and int(cache.num_tokens()[0]) == 140
    assert cache.dense.capacity % 64 == 0 and cache.buckets[4].capacity % 64 == 0


def test_byte_accounting_is_exact(gen: torch.Generator) -> None:
    cache = LayerCache.empty(1, HKV, D, torch.float16, k_group=KG, v_group=VG)
    k, v = _prompt(gen, 400)
    cache.fill_sample(0, k, v, _windows([0, 196], [196, 200], [4, 2]))
    used = cache.used_bytes()
    # 4-bit, 2 heads: K codes 7 groups x 32 ch x 32 slots x 4 bit (token-packed, 28 of 32 slots used) = 7 x 32 x 16 B,
    #   V codes 196 tokens x 32 dims x 4 bit = 16 B, + 7 key groups x 32 ch x fp16 x 2 + 196 tokens x 1 value group x fp16 x 2
    assert used["int4"] == 2 * (7 * 32 * 16 + 196 * 16 + 7 * 32 * 2 * 2 + 196 * 1 * 2 * 2)
    assert used["int2"] == 2 * (7 * 32 * 8 + 196 * 8 + 7 * 32 * 2 * 2 + 196 * 1 * 2 * 2)
    assert used["int8"] == 0
    assert used["dense"] == (4 + 4) * 2 * 32 * 2 * 2  # the 4-token tail of window 2 and 4 text tokens, fp16


def test_overlapping_windows_are_rejected(gen: torch.Generator) -> None:
    k, v = _prompt(gen, 100)
    cache = LayerCache.empty(1, HKV, D, torch.float32, k_group=KG, v_group=VG)
    with pytest.raises(ValueError, match="windows"):
        cache.fill_sample(0, k, v, _windows([0, 20], [30, 30], [4, 4]))
    with pytest.raises(ValueError, match="windows"):
        cache.fill_sample(0, k, v, _windows([90], [30], [4]))


def test_merge_handles_empty_pieces(gen: torch.Generator) -> None:
    q = torch.randn(1, HQ, D, generator=gen)
    k, v = torch.randn(1, HKV, 10, D, generator=gen), torch.randn(1, HKV, 10, D, generator=gen)
    o1, l1 = attend_piece(q, k, v, torch.tensor([10]), 0.2)
    o0, l0 = attend_piece(q, k, v, torch.tensor([0]), 0.2)
    assert torch.isinf(l0).all() and (o0 == 0).all()
    o, lse = merge_states([o0, o1, o0], [l0, l1, l0])
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(lse, l1)
    o, lse = merge_states([o0], [l0])
    assert not torch.isnan(o).any() and torch.isinf(lse).all()


def test_causal_tail_for_several_query_tokens(gen: torch.Generator) -> None:
    k, v = torch.randn(1, HKV, 12, D, generator=gen), torch.randn(1, HKV, 12, D, generator=gen)
    q = torch.randn(1, HQ, 3, D, generator=gen)
    o, _ = attend_piece(q, k, v, torch.tensor([12]), D**-0.5, causal_tail=3)
    rep = HQ // HKV
    mask = torch.ones(3, 12, dtype=torch.bool).tril(diagonal=9)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    torch.testing.assert_close(o, want, atol=2e-6, rtol=1e-5)


def test_several_new_tokens_are_never_quantized_before_they_attend(gen: torch.Generator) -> None:
    """A long chunk appended at once (chunked prefill) stays dense for its own step: a bucket has no causal mask."""
    cache = LayerCache.empty(1, HKV, D, torch.float32, k_group=KG, v_group=VG, residual=16)
    k0, v0 = _prompt(gen, 20)
    cache.fill_sample(0, k0, v0, _windows([], [], []))
    kn, vn = torch.randn(1, HKV, 300, D, generator=gen), torch.randn(1, HKV, 300, D, generator=gen)
    cache.append(kn, vn)
    assert sum(int(b.lens[0]) for b in cache.buckets.values()) == 0  # flushed only at the next append
    q = torch.randn(1, HQ, 300, D, generator=gen)
    got = decode_attention(q, cache, D**-0.5, causal_tail=300)
    k, v = torch.cat([k0[None], kn], 2), torch.cat([v0[None], vn], 2)
    mask = torch.ones(300, 320, dtype=torch.bool).tril(diagonal=20)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    cache.append(kn[:, :, :1], vn[:, :, :1])
    assert int(cache.buckets[8].lens[0]) > 0


def test_select_samples_reorders_buckets_dense_and_lens() -> None:
    """Beam search / num_return_sequences: sample i becomes old sample idx[i] in every piece (different windows,
    widths and flushed blocks per sample), so attention per sample follows its source exactly."""
    from wq_compile.core.reference import decode_attention

    gen = torch.Generator().manual_seed(5)
    layer = LayerCache.empty(3, 2, 64, torch.float32, k_group=28, residual=30)
    for b, bits in enumerate(([8, 4], [2, 16], [4, 4])):
        k, v = torch.randn(2, 150 + 28 * b, 64, generator=gen), torch.randn(2, 150 + 28 * b, 64, generator=gen)
        layer.fill_sample(b, k, v, WindowAssignment(torch.tensor([0, 56]), torch.tensor([56, 56 + 28 * b]),
                                                    torch.tensor(bits)))
    for _ in range(40):  # decode steps: flushes differ per sample
        layer.append(torch.randn(3, 2, 1, 64, generator=gen), torch.randn(3, 2, 1, 64, generator=gen))
    q = torch.randn(3, 4, 64, generator=gen)
    before = decode_attention(q, layer, 0.125)
    idx = torch.tensor([2, 0, 0, 1])
    layer.select_samples(idx)
    after = decode_attention(q[idx], layer, 0.125)
    assert torch.allclose(after, before[idx], atol=1e-6)
    assert layer.num_tokens().tolist() == [int(n) for n in layer.num_tokens()] and layer.dense.lens.shape == (4,)
