"""Tuning never makes a kernel slower (wq_compile.compiler.record_rule, wq_compile.tuning.versus_default): a record
slower than the default schedule in its own measurement is not used (MetaSchedule logs and knob records, planted
here), a sweep whose candidates are all slower than the factory's knobs keeps no record, and every shipped log the
rule refuses is listed and skipped."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from wq_compile.compiler import knob_lookup, record_rule, tuning_log  # noqa: E402
from wq_compile.compiler.build import UntunedKernelWarning, choose_schedule, kernel_def  # noqa: E402
from wq_compile.compiler.device import resolve_device  # noqa: E402
from wq_compile.compiler.tuning_log import KnobRecordWarning  # noqa: E402
from wq_compile.core.spec import KernelSpec  # noqa: E402
from wq_compile.tuning import knob_tune  # noqa: E402
from wq_compile.tuning.versus_default import judge  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "tuning_logs"
#: A shipped quantize log with a MetaSchedule record (planted slow or fast by rewriting its recorded times).
SLOW_URI = "quantize_k2v2_kg28_vg64_d64_h14kv2_f32_c64"
#: The shipped folder the slow record is planted in (the AVX-512 one; its AVX2 twin is a sweep the default won).
SHIPPED_TAG = "cpu-x86_64-intel-xeon-2c"
SPEC = KernelSpec("fused", (4, 16), head_dim=64, num_q_heads=4, num_kv_heads=2)
GRID = ({"splits": 1, "pvc": 16, "qkh": 8}, {"splits": 2, "pvc": 8, "qkh": 8})


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


def test_rule_and_judge():
    assert record_rule.slower_than_default({"untuned_ms": 1.0, "tuned_ms": 0.9}) is None
    assert "not faster" in record_rule.slower_than_default({"untuned_ms": 1.0, "tuned_ms": 1.2})
    assert "not faster" in record_rule.slower_than_default({"untuned_ms": 1.0, "tuned_ms": 1.0})  # a tie buys nothing
    assert "no record kept" in record_rule.slower_than_default({"default_wins": True})
    assert record_rule.slower_than_default({"tuned_ms": 1.0}) is None  # unmeasured: nothing to judge by
    b = judge([1.0, 1.1, 0.9], [[0.5, 0.6, 0.55], [2.0, 2.0, 2.0]])
    assert (b.default_s, b.best_s, b.worst_s, b.kept, b.candidates) == (1.0, 0.55, 2.0, True, 2)
    assert b.spread == pytest.approx(0.2) and "kept: 1.82x" in b.line("k")
    assert not judge([1.0], [[1.5], [1.0]]).kept


def _planted(tmp_path: Path, host, untuned_ms: float, tuned_ms: float) -> Path:
    """The shipped slow quantize log, re-labelled as this host's, with the given recorded times."""
    src = SHIPPED / "cpu-x86_64-intel-xeon-2c" / SLOW_URI
    dst = tuning_log.log_dir(tmp_path, host.tag, SLOW_URI)
    shutil.copytree(src, dst)
    meta = json.loads((dst / tuning_log.META_FILE).read_text())
    meta.update(device_tag=host.tag, target=host.target_json, isa=host.isa, num_cores=host.num_cores,
                versions=tuning_log.new_meta(host, SLOW_URI, {}, {}, {}, 0)["versions"],
                untuned_ms=untuned_ms, tuned_ms=tuned_ms)
    tuning_log.write_meta(dst, meta)
    return tmp_path


def test_a_planted_slow_metaschedule_record_is_not_used(tmp_path, host):
    kdef = kernel_def(KernelSpec("quantize", (2,), head_dim=64, num_q_heads=14, num_kv_heads=2))
    logs = _planted(tmp_path / "slow", host, untuned_ms=0.53, tuned_ms=2.91)
    with pytest.warns(UntunedKernelWarning, match="not faster than the default schedule"):
        sch, prov, _ = choose_schedule(kdef, host, logs)
    assert sch is None and not prov.tuned
    logs = _planted(tmp_path / "fast", host, untuned_ms=2.91, tuned_ms=0.53)  # the same record, faster: used
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelWarning)
        sch, prov, _ = choose_schedule(kdef, host, logs)
    assert sch is not None and str(prov) == "tuned here"


def _knob_record(logs: Path, host, untuned_ms: float, tuned_ms: float) -> None:
    folder = tuning_log.log_dir(logs, host.tag, SPEC.uri)
    meta = tuning_log.new_meta(host, SPEC.uri, tuning_log.spec_fields(SPEC), {"B": 1}, {}, 0)
    meta.update(kind=tuning_log.KNOB_KIND, untuned_ms=untuned_ms, tuned_ms=tuned_ms,
                best={"knobs": {"splits": 1, "pvc": 8, "qkh": 8}, "median_ms": tuned_ms})
    tuning_log.write_meta(folder, meta)


def test_a_planted_slow_knob_record_is_not_used(tmp_path, host):
    _knob_record(tmp_path / "slow", host, untuned_ms=0.2, tuned_ms=0.3)
    with pytest.warns(KnobRecordWarning, match="not faster than the default"):
        choice = knob_lookup.choose_knobs(SPEC, host, tmp_path / "slow")
    assert choice.knobs == {} and str(choice.provenance) == "untuned"
    _knob_record(tmp_path / "fast", host, untuned_ms=0.3, tuned_ms=0.2)
    choice = knob_lookup.choose_knobs(SPEC, host, tmp_path / "fast")
    assert choice.knobs == {"splits": 1, "pvc": 8, "qkh": 8} and str(choice.provenance) == "tuned here"


@pytest.mark.parametrize("default_wins", [True, False])
def test_a_sweep_keeps_a_record_only_if_it_beats_the_factory_knobs(tmp_path, host, monkeypatch, default_wins):
    """The factory's knobs are a candidate of every sweep (added to a grid without them); planted times make
    every other candidate slower (no record is used) or one faster (its record is used)."""
    default = knob_tune.knob_key(knob_tune.DEFAULT_KNOBS)
    fast = knob_tune.knob_key(GRID[0])

    def planted(key, fn, settings):
        fn()
        return 1e-4 if key == default else (5e-5 if key == fast and not default_wins else 2e-4)

    monkeypatch.setattr(knob_tune, "time_candidate", planted)
    settings = knob_tune.KnobSweepSettings(logs_dir=tmp_path, n_tokens=128, rounds=2, min_sample_s=0.002, grid=GRID)
    res = knob_tune.sweep_knobs(SPEC, host, settings)
    meta = tuning_log.read_meta(res.log_dir, host)
    assert default in {knob_tune.knob_key(c.knobs) for c in res.candidates} and len(res.candidates) == 3
    assert res.bought is not None and res.bought.kept is not default_wins and meta["default_wins"] is default_wins
    assert res.bought.default_s == pytest.approx(1e-4) and res.bought.worst_s == pytest.approx(2e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KnobRecordWarning)
        choice = knob_lookup.choose_knobs(SPEC, host, tmp_path)
    if default_wins:
        assert choice.knobs == {} and str(choice.provenance) == "untuned"
    else:
        assert choice.knobs == GRID[0] and str(choice.provenance) == "tuned here"


def test_shipped_records_slower_than_their_default_are_listed_and_skipped(tmp_path, capsys):
    """Every shipped log the rule refuses (its record not faster than its default) is listed
    (python -m wq_compile.compiler.record_rule) and refused by the same rule the lookups apply; a copy of the shipped
    tree with one record planted slow (its 2.91 ms against a 0.53 ms default, as a log shipped before the rule was)
    lists exactly that one more."""
    def check(root: Path) -> list[dict]:
        slow = record_rule.slow_records(root)
        metas = sorted(root.glob(f"*/*/{tuning_log.META_FILE}"))
        assert metas
        for path in metas:
            meta = json.loads(path.read_text())
            listed = any(r["uri"] == path.parent.name and r["tag"] == path.parent.parent.name for r in slow)
            measured = "untuned_ms" in meta and "tuned_ms" in meta
            assert listed == (meta.get("default_wins") is True or (measured and meta["tuned_ms"] >= meta["untuned_ms"]))
        return slow

    shipped = check(SHIPPED)
    planted = tmp_path / "tuning_logs"
    shutil.copytree(SHIPPED, planted)
    meta_path = planted / SHIPPED_TAG / SLOW_URI / tuning_log.META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(untuned_ms=0.53, tuned_ms=2.91, default_wins=False)
    tuning_log.write_meta(meta_path.parent, meta)
    slow = check(planted)
    assert {(r["tag"], r["uri"]) for r in slow} == {(r["tag"], r["uri"]) for r in shipped} | {(SHIPPED_TAG, SLOW_URI)}
    assert len(slow) == len(shipped) + 1
    record_rule.main([str(planted)])
    out = capsys.readouterr().out
    assert f"{len(slow)} record(s)" in out and SLOW_URI in out
