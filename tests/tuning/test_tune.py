"""MetaSchedule driver: real short tunes into a tmp logs dir, resume, broken logs, zero-trial and no-GPU refusals."""

from __future__ import annotations

import json

import pytest

from wq_compile.tools import cli
from wq_compile.compiler.device import has_local_gpu, resolve_device, versions
from wq_compile.compiler.measure import MeasurementUnavailableError
from wq_compile.tuning.tune import Measurers, TuneResult, tune_kernel
from wq_compile.tuning.settings import NoValidTrialsError, TuneSettings
from wq_compile.compiler.tuning_log import Provenance, TornLogWarning, TuningLogError, read_meta
from wq_testing import TINY_DECODE, TOY_SPEC, measured_log, toy_kernel

#: The driver tests tune the toy kernel (see wq_testing.toy_kernel: real kernels would take minutes per tune).
TOY = toy_kernel()


def _settings(logs, **kw):
    return TuneSettings(logs_dir=logs, population_size=32, genetic_iters=1, **kw)


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

    from wq_compile.tuning.metaschedule import build_candidate

    return Measurers(builder=ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=120),
                     runner=ms.runner.LocalRunner(timeout_sec=60))


def _lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


def _planted_measurement(monkeypatch, win: bool) -> None:
    """The default-vs-records measurement runs for real (its times must be positive), then its verdict is planted:
    the toy's records and its default schedule are within noise of each other, and these tests are about the
    driver's logs (tests/tuning/test_record_rule.py covers the rule with planted times end to end)."""
    from wq_compile.tuning import tune as tune_mod
    from wq_compile.tuning.versus_default import Bought

    real = tune_mod.measure_records

    def planted(*a, **kw):
        b = real(*a, **kw)
        assert b.default_s > 0 and b.best_s > 0 and b.candidates >= 1 and b.rounds >= 1
        factor = 0.5 if win else 2.0
        return Bought(b.default_s, b.default_s * factor, b.default_s * max(factor, 1.5), b.spread, b.candidates,
                      b.rounds)

    monkeypatch.setattr(tune_mod, "measure_records", planted)


def test_tune_writes_records_meta_and_resumes(tmp_path, host, pools, monkeypatch):
    _planted_measurement(monkeypatch, win=True)
    res = tune_kernel(TOY, host, _settings(tmp_path, trials=2, seed=3), measurers=pools)
    log = tmp_path / host.tag / TOY_SPEC.uri
    assert res.log_dir == log and res.valid_trials >= 2 and res.new_trials >= 2
    records = _lines(log / "database_tuning_record.json")
    assert len(records) == res.valid_trials
    assert len(_lines(log / "database_workload.json")) == 1
    meta = read_meta(log, host)
    assert meta["valid_trials"] == res.valid_trials and meta["trials_requested"] == 2 and meta["seed"] == 3
    assert meta["versions"] == versions() and meta["device_tag"] == host.tag
    assert meta["tuning_sizes"] == {"n": 128}
    assert str(res.provenance) == "tuned here"
    assert res.untuned_s > 0 and res.tuned_s > 0 and meta["tuned_ms"] == pytest.approx(res.tuned_s * 1e3)
    assert res.gbps > 0 and res.bytes_read > 0

    # Re-run with more trials: existing records count, new ones are appended (the old lines stay as they were).
    res2 = tune_kernel(TOY, host, _settings(tmp_path, trials=res.valid_trials + 1, seed=3), measurers=pools)
    records2 = _lines(log / "database_tuning_record.json")
    assert records2[: len(records)] == records
    assert res2.valid_trials == len(records2) >= len(records) + 1
    assert len(_lines(log / "database_workload.json")) == 1

    # Enough records already: nothing is tuned.
    res3 = tune_kernel(TOY, host, _settings(tmp_path, trials=1, measure=False))
    assert res3.new_trials == 0 and res3.valid_trials == res2.valid_trials

    # Every record measured slower than the default schedule: no record is kept, and the log says why.
    _planted_measurement(monkeypatch, win=False)
    res4 = tune_kernel(TOY, host, _settings(tmp_path, trials=1))
    meta = read_meta(log, host)
    assert res4.new_trials == 0 and not res4.bought.kept and str(res4.provenance) == "untuned"
    assert _lines(log / "database_tuning_record.json") == [] and meta["default_wins"] is True
    assert meta["bought"]["kept"] is False and meta["tuned_ms"] > meta["untuned_ms"]


def test_zero_valid_trials_is_an_error(tmp_path, host):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class FailingBuilder(PyBuilder):
        def build(self, build_inputs):
            return [BuilderResult(None, "simulated build timeout") for _ in build_inputs]

    with pytest.raises(NoValidTrialsError, match="0 valid.*builder timeout"):
        tune_kernel(TOY, host, _settings(tmp_path, trials=2), measurers=Measurers(builder=FailingBuilder()))


def test_corrupt_and_stale_logs_are_refused_torn_line_repaired(tmp_path, host):
    log = measured_log(TOY, host, tmp_path)
    meta_path = log / "meta.json"
    good = json.loads(meta_path.read_text())

    meta_path.write_text("{not json")
    with pytest.raises(TuningLogError, match=r"meta\.json: not valid JSON.*(re-tune|delete)"):
        tune_kernel(TOY, host, _settings(tmp_path, trials=1))

    stale = {**good, "versions": {**good["versions"], "apache-tvm": "0.19.0"}}
    meta_path.write_text(json.dumps(stale))
    with pytest.raises(TuningLogError, match="tuned with apache-tvm 0.19.0.*never used"):
        read_meta(log, host)

    meta_path.write_text(json.dumps(good))
    rec = log / "database_tuning_record.json"
    lines = rec.read_text()
    rec.write_text(lines + '[0, [1.0e-5], "truncated')  # an interrupted append
    with pytest.warns(TornLogWarning, match="removed a torn last line"):
        res = tune_kernel(TOY, host, _settings(tmp_path, trials=1, measure=False))
    assert rec.read_text() == lines and res.valid_trials == 1 and res.new_trials == 0

    meta_path.unlink()
    with pytest.raises(TuningLogError, match="without meta.json"):
        tune_kernel(TOY, host, _settings(tmp_path, trials=1))


@pytest.mark.skipif(has_local_gpu(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_gpu_is_never_measured(tmp_path):
    with pytest.raises(MeasurementUnavailableError, match="--rpc HOST:PORT --rpc-key KEY"):
        tune_kernel(TINY_DECODE, "nvidia/nvidia-h100", _settings(tmp_path, trials=2))
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


def test_cli_parsing_and_table():
    args = cli.tune_parser().parse_args(["--model", "tiny", "--bits", "4,8", "--kernels", "fused,decode"])
    assert args.bits == (4, 8) and args.kernels == ("fused", "decode") and args.target == "llvm"
    with pytest.raises(SystemExit):
        cli.tune_parser().parse_args(["--kernels", "bogus"])
    r = TuneResult(TOY_SPEC, None, 5, 5, 2e-3, 1e-3, 4_000_000, Provenance("foreign", "cpu-x86_64-amd-epyc-2c"))
    table = cli.format_table([r])
    assert TOY_SPEC.uri in table and "2.00x" in table and "4.00" in table  # 4e6 B / 1e-3 s = 4 GB/s
    assert "tuned on cpu-x86_64-amd-epyc-2c" in table
    assert TuneSettings(trials={"fused": 3}).trials_for(TOY_SPEC) == 24  # per kind, default for the others


def test_tensor_intrin_is_imported_with_a_shallow_stack_and_inspect_restored():
    """``TuneContext`` needs ``tvm.s_tir.tensor_intrin``; wq_compile imports it with a cheap ``inspect.stack``
    (about 8 s of CPU instead of 78 s with torch loaded, see wq_compile.tuning.ms_task): the intrinsics are registered as
    with the plain import and ``inspect.stack`` is the standard one again afterwards."""
    import inspect

    from tvm.s_tir import TensorIntrin

    from wq_compile.tuning.ms_task import import_tensor_intrin

    before = inspect.stack
    import_tensor_intrin()
    assert inspect.stack is before
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN

    assert TensorIntrin.get(VNNI_DOT_16x4_INTRIN) is not None
