"""The console scripts run end to end on small inputs and write what they promise."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from wq_compile.tools.cli import main_bench, main_eval


def test_wq_eval_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rows.json"
    rc = main_eval(["--model", "tiny", "--frames", "2", "--new-tokens", "4", "--repeats", "1", "--avg-bits", "4",
                    "--backend", "reference", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dense (DynamicCache)" in text and "WindowQuant avg 4 bits" in text and "HF QuantizedCache fp8" in text
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    wq = rows["WindowQuant avg 4 bits"]
    assert 0 < wq["bytes_vs_dense"] < 1 and wq["decode_ms"] > 0 and 0 <= wq["agreement"] <= 1
    # quantized K/V change the next-token distributions: KL strictly positive (no clamp hides a negative one)
    assert 0 < wq["mean_kl"] < 1


def test_wq_eval_refuses_unknown_model(capsys: pytest.CaptureFixture) -> None:
    assert main_eval(["--model", "no/such/folder"]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_wq_bench_writes_csv_and_png(tmp_path: Path) -> None:
    rc = main_bench(["--model", "tiny", "--tokens", "392", "--mixes", "mixed", "--repeats", "3", "--threads", "1",
                     "--logs-dir", str(tmp_path / "nologs"), "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "decode.csv")))
    by = {r["method"]: r for r in rows}
    assert {"SDPA fp32, query group folded", "SDPA bf16, enable_gqa", "ggml flash-attn q4_0",
            "ONNX Runtime GQA int8 cache", "torch dequantize-all + SDPA"} <= set(by)
    fused = by["WindowQuant fused (default schedule)"]
    assert float(fused["max_err"]) < 1e-4 and float(fused["median_ms"]) > 0
    assert (tmp_path / "decode.png").stat().st_size > 10_000


@pytest.mark.filterwarnings("ignore::wq_compile.compiler.build.UntunedKernelWarning")
def test_wq_bench_multi_times_the_kernel_against_sdpa(tmp_path: Path) -> None:
    rc = main_bench(["--multi", "--model", "tiny", "--tokens", "392", "--steps", "3", "--repeats", "2", "--threads",
                     "1", "--logs-dir", str(tmp_path / "nologs"), "--out", str(tmp_path)])
    assert rc == 0
    by = {r["method"]: r for r in csv.DictReader(open(tmp_path / "multi.csv"))}
    assert {f"SDPA {t}, {form}" for t in ("fp32", "bf16") for form in ("enable_gqa", "K/V repeat_interleave'd",
                                                                          "query group folded")} <= set(by)
    for name in ("WindowQuant multi-token (default knobs)", "before: fused one-token kernel x S",
                 "SDPA fp32, query group folded"):
        assert float(by[name]["max_err"]) < 1e-4 and float(by[name]["median_ms"]) > 0, by[name]
    assert int(by["SDPA fp32, enable_gqa"]["steps"]) == 3 and "S=3" in (tmp_path / "multi.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--multi", "--steps", "0"], "--steps"), (["--tokens", "0"], "--tokens"), (["--tokens", "-5"], "--tokens"), (["--tokens", "x"], "--tokens"),
    (["--repeats", "0"], "--repeats"), (["--mixes", ""], "--mixes"), (["--model", "nope"], "--model"),
    (["--threads", "0"], "--threads"),
])
def test_wq_bench_refuses_nonsense(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main_bench(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
