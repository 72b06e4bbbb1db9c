"""MetaSchedule driver: real short tunes into a tmp logs dir, resume, broken logs, zero-trial and no-GPU refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from wq_compile import cli
from wq_compile.build import TuningLogError, open_database, read_meta
from wq_compile.device import has_local_gpu, resolve_device, slug, versions
from wq_compile.models import PRESETS, ModelPreset, kernel_specs
from wq_compile.tune import (
    MeasurementUnavailableError,
    NoValidTrialsError,
    RPCSettings,
    TuneResult,
    tune_kernel,
)
from wq_testing import TINY_DECODE, TOY_PROVIDER, TOY_SPEC, measured_log

#: The driver tests tune the toy kernel (see wq_testing.TOY_PROVIDER: real kernels would take minutes per tune).
FAST = dict(n_tokens=128, population_size=32, genetic_iters=1, provider=TOY_PROVIDER)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


@pytest.fixture(scope="module")
def pools():
    """One builder and runner for the module: creating a LocalBuilder costs ~8 s of worker start-up here."""
    from tvm.s_tir import meta_schedule as ms

    from wq_compile.tune import build_candidate

    return dict(builder=ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=120),
                runner=ms.runner.LocalRunner(timeout_sec=60))


def _lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_tune_writes_records_meta_and_resumes(tmp_path, host, pools):
    res = tune_kernel(TOY_SPEC, host, trials=2, logs_dir=tmp_path, seed=3, **FAST, **pools)
    log = tmp_path / host.tag / TOY_SPEC.uri
    assert res.log_dir == log and res.valid_trials >= 2 and res.new_trials >= 2
    records = _lines(log / "database_tuning_record.json")
    assert len(records) == res.valid_trials
    assert len(_lines(log / "database_workload.json")) == 1
    meta = read_meta(log, host)
    assert meta["valid_trials"] == res.valid_trials and meta["trials_requested"] == 2 and meta["seed"] == 3
    assert meta["versions"] == versions() and meta["device_tag"] == host.tag
    assert meta["tuning_sizes"] == {"n": 128}
    assert res.untuned_s > 0 and res.tuned_s > 0 and meta["tuned_ms"] == pytest.approx(res.tuned_s * 1e3)
    assert res.gbps > 0 and res.bytes_read > 0

    # Re-run with more trials: existing records count, new ones are appended (the old lines stay as they were).
    res2 = tune_kernel(TOY_SPEC, host, trials=res.valid_trials + 1, logs_dir=tmp_path, seed=3, **FAST, **pools)
    records2 = _lines(log / "database_tuning_record.json")
    assert records2[: len(records)] == records
    assert res2.valid_trials == len(records2) >= len(records) + 1
    assert len(_lines(log / "database_workload.json")) == 1

    # Enough records already: nothing is tuned.
    res3 = tune_kernel(TOY_SPEC, host, trials=1, logs_dir=tmp_path, measure=False, **FAST)
    assert res3.new_trials == 0 and res3.valid_trials == res2.valid_trials


def test_zero_valid_trials_is_an_error(tmp_path, host):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class FailingBuilder(PyBuilder):
        def build(self, build_inputs):
            return [BuilderResult(None, "simulated build timeout") for _ in build_inputs]

    with pytest.raises(NoValidTrialsError, match="0 valid.*builder timeout"):
        tune_kernel(TOY_SPEC, host, trials=2, logs_dir=tmp_path, builder=FailingBuilder(), **FAST)


def test_corrupt_and_stale_logs_are_refused(tmp_path, host):
    log = measured_log(TOY_SPEC, host, tmp_path, TOY_PROVIDER)
    meta_path = log / "meta.json"
    good = json.loads(meta_path.read_text())

    meta_path.write_text("{not json")
    with pytest.raises(TuningLogError, match=r"meta\.json: not valid JSON.*(re-tune|delete)"):
        tune_kernel(TOY_SPEC, host, trials=1, logs_dir=tmp_path, **FAST)

    stale = {**good, "versions": {**good["versions"], "apache-tvm": "0.19.0"}}
    meta_path.write_text(json.dumps(stale))
    with pytest.raises(TuningLogError, match="tuned with apache-tvm 0.19.0.*never used"):
        read_meta(log, host)

    meta_path.write_text(json.dumps(good))
    rec = log / "database_tuning_record.json"
    rec.write_text(rec.read_text() + '[0, [1.0e-5], "truncated\n')
    with pytest.raises(TuningLogError, match=r"database_tuning_record\.json:2: not valid JSON"):
        open_database(log, host)

    meta_path.unlink()
    with pytest.raises(TuningLogError, match="without meta.json"):
        tune_kernel(TOY_SPEC, host, trials=1, logs_dir=tmp_path, **FAST)


@pytest.mark.skipif(has_local_gpu(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_gpu_is_never_measured(tmp_path):
    with pytest.raises(MeasurementUnavailableError, match="--rpc HOST:PORT --rpc-key KEY"):
        tune_kernel(TINY_DECODE, "nvidia/nvidia-h100", trials=2, logs_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    assert cli.main_tune(["--target", "nvidia/nvidia-h100", "--model", "tiny", "--logs-dir", str(tmp_path)]) == 2


@pytest.mark.skipif(has_local_gpu(), reason="checks the refusal on a machine without a GPU")
def test_cli_cuda_without_gpu_or_rpc_refuses_to_measure(tmp_path, capsys):
    argv = ["--target", "cuda", "--model", "tiny", "--kernels", "fused",
            "--logs-dir", str(tmp_path / "logs"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main_tune(argv) != 0
    err = capsys.readouterr().err
    assert "Measuring (tuning) needs a GPU" in err and "--rpc HOST:PORT" in err
    assert not any(tmp_path.iterdir())  # nothing tuned, built or cached


def test_targets_and_tags(host):
    assert host.tag.startswith("cpu-") and host.tag.endswith(f"{int(dict(host.target.attrs.items())['num-cores'])}c")
    cuda = resolve_device("nvidia/nvidia-h100")
    assert cuda.kind == "cuda" and cuda.arch == "sm_90a" and cuda.tag == "cuda-nvidia-h100-sm_90a"
    assert resolve_device('{"kind": "llvm", "num-cores": 1}').tag.endswith("-1c")
    with pytest.raises(ValueError, match="strings with flags"):
        resolve_device("llvm -num-cores 2")
    assert slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"
    assert RPCSettings.parse("10.0.0.1:9190", "h100") == RPCSettings("10.0.0.1", 9190, "h100")
    with pytest.raises(ValueError, match="HOST:PORT"):
        RPCSettings.parse("nohost", "k")


def test_model_presets_and_kernel_sets():
    p = PRESETS["llava-ov-7b"]
    assert (p.num_layers, p.num_q_heads, p.num_kv_heads, p.head_dim) == (28, 28, 4, 128)
    specs = kernel_specs("llava-ov-0.5b")
    kinds = [s.kind for s in specs]
    assert kinds.count("decode") == 4 and kinds.count("quantize") == 3
    fused = next(s for s in specs if s.kind == "fused")
    assert fused.bits == (8, 4, 2, 16) and fused.num_q_heads == 14 and fused.num_kv_heads == 2
    assert len({s.uri for s in specs}) == len(specs)
    cfg = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=24, num_attention_heads=14,
                                                      num_key_value_heads=2, hidden_size=896))
    assert ModelPreset.from_config(cfg, "x") == ModelPreset("x", 24, 14, 2, 64)
    with pytest.raises(ValueError, match="unknown preset"):
        kernel_specs("llama")


def test_cli_parsing_and_table():
    args = cli.tune_parser().parse_args(["--model", "tiny", "--bits", "4,8", "--kernels", "fused,decode"])
    assert args.bits == (4, 8) and args.kernels == ("fused", "decode") and args.target == "llvm"
    with pytest.raises(SystemExit):
        cli.tune_parser().parse_args(["--kernels", "bogus"])
    r = TuneResult(TOY_SPEC, None, 5, 5, 2e-3, 1e-3, 4_000_000, True)
    table = cli.format_table([r])
    assert TOY_SPEC.uri in table and "2.00x" in table and "4.00" in table  # 4e6 B / 1e-3 s = 4 GB/s
