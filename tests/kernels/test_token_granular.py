"""Token-granularity baseline kernel: correct against its torch reference on irregular sizes, and its reference
agrees with the bucket format's reference where both describe the same cache."""

from __future__ import annotations

import pytest
import torch

from wq_compile.kernels.token_granular import TokenGranularSpec, pack_token_granular, reference_token_granular
from wq_compile.compiler.baselines import compile_token_granular
from wq_testing import check_matches_bucket_layout


@pytest.fixture(scope="module", params=["vectorized", "parallel"])
def kernel(request):
    return compile_token_granular(TokenGranularSpec(64, 4, 2), schedule=request.param)


@pytest.mark.parametrize("groups,dense", [([2, 4, 8, 2, 8, 4, 2], 13), ([8], 1), ([2] * 11, 70), ([4, 1, 2], 0)])
def test_kernel_matches_reference(kernel, groups: list[int], dense: int) -> None:
    gen = torch.Generator().manual_seed(len(groups) * 100 + dense)
    n = 28 * len(groups)
    k, v = torch.randn(2, n, 64, generator=gen) * 2, torch.randn(2, n, 64, generator=gen)
    k[:, :28, 3] = 0.7  # a constant key group in one channel
    dk, dv = torch.randn(2, dense, 64, generator=gen), torch.randn(2, dense, 64, generator=gen)
    cache = pack_token_granular(k, v, torch.tensor(groups), dk, dv)
    q = torch.randn(1, 4, 64, generator=gen)
    out = torch.full((1, 4, 64), float("nan"))
    kernel(q, *cache.args(), 0.125, out)
    assert torch.allclose(out, reference_token_granular(q, cache, 0.125), atol=2e-6, rtol=1e-5)


def test_reference_agrees_with_the_bucket_reference_at_one_width() -> None:
    """All groups at one width, tokens in order: the same numbers as one bucket of the layout (independent code)."""
    check_matches_bucket_layout(pack_token_granular, reference_token_granular)


def test_widths_really_differ_per_group() -> None:
    """Guard against a packer that ignores the widths: 2-bit groups are coarser than 8-bit ones."""
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 56, 64, generator=gen), torch.randn(2, 56, 64, generator=gen)
    cache = pack_token_granular(k, v, torch.tensor([2, 8]), k[:, :0], v[:, :0])
    assert cache.bits[0, :56].tolist() == [2] * 28 + [8] * 28
    assert cache.offset[0, 28].item() == 28 * 4 and cache.offset[0, 29].item() == 28 * 4 + 16
    assert cache.k_words.shape[-1] == 28 * 4 + 28 * 16


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_wq_bench_token_granular_writes_tables(tmp_path, capsys) -> None:
    import csv

    from wq_compile.tools.cli import main_bench

    rc = main_bench(["--token-granular", "--model", "tiny", "--tokens", "392", "--repeats", "3", "--frames", "2",
                     "--logs-dir", str(tmp_path / "nologs"), "--out", str(tmp_path)])
    assert rc == 0
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "granularity.csv"))}
    tok, reo = rows["token-granular in place"], rows["reordered buckets (fused kernel)"]
    assert float(tok["max_err"]) < 1e-5 and float(reo["max_err"]) < 1e-4
    assert float(rows["token-granular in place, parallel only"]["max_err"]) < 1e-5
    assert float(rows["token-granular in place, per-group dispatch"]["max_err"]) < 1e-4
    assert abs(float(tok["eff_bits"]) - float(reo["eff_bits"])) < 0.3  # equal memory, up to rounding of the mix
    search = list(csv.DictReader(open(tmp_path / "granularity_search.csv")))
    assert {(r["granularity"], r["policy"]) for r in search} == {
        (g, p) for g in ("window (frame)", "token group (28)") for p in ("similarity", "sensitivity")}
    assert (tmp_path / "granularity.png").stat().st_size > 5_000
    assert "reordered/this" in capsys.readouterr().out
