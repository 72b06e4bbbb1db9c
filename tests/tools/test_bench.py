"""wq-bench: every peer computes the same attention as the reference, ratios are against the fastest dense call,
and a missing peer is a row that says how to install it."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from wq_compile.tools.bench import decode as bench
from wq_compile.tools.bench import peers as bench_peers
from wq_compile.tools.bench.peers import INSTALL_HINT, copy_bandwidth, ggml_peers, ort_peers, sdpa_peers

#: max abs error vs exact fp32 attention, per peer: exact calls at fp32 rounding, the rest at their cache format's.
PEER_TOL = {
    "SDPA fp32, query group folded": 1e-6,
    "SDPA fp32, enable_gqa": 1e-6,
    "SDPA bf16, query group folded": 3e-2,
    "SDPA bf16, enable_gqa": 3e-2,
    "ggml flash-attn q8_0": 2e-2,
    "ggml flash-attn q4_0": 1.5e-1,
    "ggml flash-attn f16": 1e-2,
    "ONNX Runtime GQA fp32 cache": 1e-5,
    "ONNX Runtime GQA int8 cache": 3e-2,
}


def _case(n: int = 300, hq: int = 8, hkv: int = 2, d: int = 64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, d, generator=gen)
    k = torch.randn(1, hkv, n, d, generator=gen)
    v = torch.randn(1, hkv, n, d, generator=gen)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True, scale=d**-0.5)[:, :, 0]
    return q, k, v, d**-0.5, want


def test_every_installed_peer_matches_exact_attention() -> None:
    q, k, v, scale, want = _case()
    peers = sdpa_peers(q, k, v, scale) + ggml_peers(q, k, v, scale, 2) + ort_peers(q, k, v, scale, 2)
    assert {p.name for p in peers} == set(PEER_TOL)
    for p in peers:
        if p.fn is None:  # only a peer that is not installed may be absent, and it says how to get it
            assert INSTALL_HINT in p.note, p
            continue
        err = float((p.fn().float() - want).abs().max())
        assert err <= PEER_TOL[p.name], f"{p.name}: max error {err:.2e} > {PEER_TOL[p.name]:.0e}"
        assert p.bytes_read > 0
        assert p.fn().shape == want.shape  # a second call gives the same shape (state is not consumed)


def test_peer_bytes_follow_the_cache_format() -> None:
    q, k, v, scale, _ = _case(n=512)
    dense = 2 * k.numel() * 4
    by = {p.name: p for p in sdpa_peers(q, k, v, scale) + ggml_peers(q, k, v, scale, 1) + ort_peers(q, k, v, scale, 1)}
    assert by["SDPA fp32, query group folded"].bytes_read == dense
    assert by["SDPA bf16, enable_gqa"].bytes_read == dense // 2
    if by["ggml flash-attn q4_0"].fn is not None:
        # q4_0: 32 codes of 4 bits + one fp16 scale = 18 bytes per 32 elements
        assert by["ggml flash-attn q4_0"].bytes_read == 2 * k.numel() // 32 * 18
        assert by["ggml flash-attn q8_0"].bytes_read == 2 * k.numel() // 32 * 34
    if by["ONNX Runtime GQA int8 cache"].fn is not None:
        assert by["ONNX Runtime GQA int8 cache"].bytes_read == 2 * k.numel()


def test_missing_peers_are_rows_that_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ggml", None)  # import ggml -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    q, k, v, scale, _ = _case(n=64)
    rows = ggml_peers(q, k, v, scale, 1) + ort_peers(q, k, v, scale, 1)
    assert len(rows) == 5 and all(r.fn is None and INSTALL_HINT in r.note for r in rows)


def test_interleaved_timing_reports_every_function() -> None:
    seq: list[str] = []

    def a() -> None:
        seq.append("a")

    def b() -> None:
        seq.append("b")

    stats = bench.time_interleaved([a, b], repeats=5, warmup=2, rounds=2)
    assert seq.count("a") == 5 + 2 * 2 and seq.count("b") == 5 + 2 * 2  # every round has its own warm-up
    # blocks: round 1 a (2 warm-up + 3) then b, round 2 rotated: b (2 + 2) then a
    assert "".join(seq) == "a" * 5 + "b" * 5 + "b" * 4 + "a" * 4
    assert all(p20 <= med <= p80 for med, p20, p80 in stats)


def test_copy_bandwidth_is_plausible() -> None:
    gbps = copy_bandwidth(8 << 20, repeats=2)
    assert 0.5 < gbps < 2000


def test_arithmetic_peaks_are_physical() -> None:
    """The probe kernels' peaks for this host and for the AVX2 class (which this x86 host runs): at most two steps
    per cycle at 6 GHz, and a dot-product step is worth more than an FMA (a step hoisted out of the probe's loop,
    or a chain folded away, would report far more; a probe that never ran, nothing)."""
    from wq_compile.compiler.device import host_device, resolve_device
    from wq_compile.compiler.isa_variants import cpu_isa
    from wq_compile.kernels.probes import probe_macs_per_step

    targets = ["llvm"]
    if host_device().isa.startswith("x86_64-avx"):
        targets.append('{"kind": "llvm", "mcpu": "haswell", "num-cores": 2}')
    for target in targets:
        cpu = cpu_isa(resolve_device(target))
        peaks = bench_peers.mac_peaks(target, iters=1 << 16, repeats=3)
        assert "fma" in peaks and ("dot8" in peaks) == (cpu.dot is not None)
        for kind, macs in peaks.items():
            per_step = probe_macs_per_step(cpu, kind)
            assert 0.05e9 * per_step < macs < 2 * 6e9 * per_step, (target, kind, macs / 1e9)
        if "dot8" in peaks:
            assert peaks["dot8"] > peaks["fma"], (target, peaks)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_run_ratios_are_against_the_fastest_dense_call(tmp_path) -> None:
    rows = bench.run("tiny", [392], ["mixed"], repeats=3, logs_dir=str(tmp_path / "nologs"), out_dir=tmp_path,
                     progress=False, threads=1, peers=False)
    by = {r.method: r for r in rows}
    dense = [r for r in rows if r.method.startswith("SDPA")]
    assert len(dense) == 4
    best = min(r.median_ms for r in dense)
    for r in rows:
        if r.median_ms == r.median_ms:
            assert r.vs_best_dense == pytest.approx(best / r.median_ms)
            assert r.gbps > 0 and r.copy_frac > 0
    assert max(r.vs_best_dense for r in dense) == pytest.approx(1.0)
    fused = by["WindowQuant fused (default schedule)"]
    assert fused.max_err < 1e-4 and fused.median_ms > 0
    assert by["WindowQuant fused (tuned)"].note  # absent tuned module: a row that says why
    assert (tmp_path / "decode.csv").exists() and (tmp_path / "decode.png").stat().st_size > 10_000
    assert "vs best dense" in bench.format_table(rows)
    # the README's table: one row per method, the fp32 ratio against the fastest fp32 SDPA call of the case
    md = (tmp_path / "decode.md").read_text()
    assert md.startswith(bench.format_markdown(rows)) and "arithmetic peak of one core" in md
    # the share of the arithmetic peak: fp32 FMA rows (WindowQuant exact, fp32 SDPA) get one, bf16 rows none
    assert 0 < fused.peak_frac < 1.5 and all(0 < r.peak_frac < 1.5 for r in dense if "fp32" in r.method)
    assert all(r.peak_frac != r.peak_frac for r in dense if "bf16" in r.method)
    line = next(x for x in md.splitlines() if x.startswith("| WindowQuant fused (default schedule)"))
    best32 = min(r.median_ms for r in dense if r.method.startswith("SDPA fp32"))
    assert f"| {best32 / fused.median_ms:.2f}x |" in line and f"| {fused.median_ms:.3f} |" in line


def test_e2e_cold_then_warm_in_fresh_processes(tmp_path) -> None:
    from wq_compile.tools.bench import e2e

    rows = e2e.run(["tiny"], frames=1, new_tokens=3, repeats=1, layers=1, cache_dir=str(tmp_path), progress=False)
    assert [r.module_cache for r in rows] == ["cold", "warm"]
    for r in rows:
        assert r.prompt_tokens > 196 and r.layers == 1
        assert r.backend.startswith("tvm")  # the compiled kernels ran, not the torch fallback
        assert min(r.dense_ttft_ms, r.wq_first_ttft_ms, r.wq_next_ttft_ms, r.dense_decode_ms, r.wq_decode_ms) > 0
        assert 0 < r.store_ms < r.wq_next_ttft_ms and r.dense_first_ttft_ms > 0
        stages = (r.screen_ms, r.score_ms, r.search_ms, r.fill_ms)
        assert min(stages) >= 0 and r.fill_ms > 0 and sum(stages) <= r.store_ms + 1e-6
    assert any((tmp_path / "tiny").rglob("*.so"))  # the cold run built modules where the warm run found them
    with pytest.raises(RuntimeError, match="cold run needs an empty folder"):
        e2e.run(["tiny"], frames=1, new_tokens=3, repeats=1, layers=1, cache_dir=str(tmp_path), progress=False)
    assert "ms/tok WQ" in e2e.format_table(rows) and "screen/score/search/fill" in e2e.format_table(rows)


def test_isa_note_names_both_isas_and_warns_when_they_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """``wq-bench --target`` for another ISA class: the note says which ISA the kernels and torch's peers ran with,
    and warns (naming the ATEN_CPU_CAPABILITY to set) when they differ."""
    pytest.importorskip("tvm")
    from wq_compile.tools.cli.wq_bench import isa_note

    haswell = '{"kind": "llvm", "mcpu": "haswell", "mtriple": "x86_64-linux-gnu", "num-cores": 2}'
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    note = isa_note(haswell)
    assert "(x86_64-avx2)" in note and "AVX512" in note and "ATEN_CPU_CAPABILITY=avx2" in note
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "ATEN_CPU_CAPABILITY" not in isa_note(haswell)
