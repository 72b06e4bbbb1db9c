"""Knob sweep of the plain-TIR CPU fused kernel and the runtime's use of its record (wq_compile.tuning.knob_tune,
wq_compile.kernels.knobs, the knob-record kind of wq_compile.compiler.tuning_log)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

pytest.importorskip("tvm")

from wq_compile.tuning import knob_tune
from wq_compile.compiler import knob_lookup
from wq_compile.kernels import knobs
from wq_compile.compiler import module_cache, tuning_log  # noqa: E402
from wq_compile.compiler.check import ReferenceMismatch  # noqa: E402
from wq_compile.compiler.build import kernel_def  # noqa: E402
from wq_compile.compiler.device import resolve_device  # noqa: E402
from wq_compile.kernels import example_sizes  # noqa: E402
from wq_compile.compiler.measure import example_args  # noqa: E402
from wq_compile.runtime.library import KernelLibrary  # noqa: E402
from wq_compile.core.spec import KernelSpec  # noqa: E402
from wq_compile.compiler.tuning_log import KnobRecordWarning  # noqa: E402

SPEC = KernelSpec("fused", (4, 16), head_dim=64, num_q_heads=4, num_kv_heads=2)
GRID = ({"splits": 1, "pvc": 16, "qkh": 8}, {"splits": 2, "pvc": 8, "qkh": 8})


def _settings(logs, **kw):
    # a fixed grid without the factory knobs: these tests check the sweep machinery (test_record_rule the rule)
    kw.setdefault("include_default", False)
    return knob_tune.KnobSweepSettings(logs_dir=logs, n_tokens=128, rounds=2, min_sample_s=0.002, grid=GRID, **kw)


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, host):
    logs = tmp_path_factory.mktemp("logs")
    res = knob_tune.sweep_knobs(SPEC, host, _settings(logs))
    return logs, res


def _copy_as(logs, host, tag, cores, isa):
    """The host's record copied under another device tag (its meta says that device, cores and ISA class)."""
    src = tuning_log.log_dir(logs, host.tag, SPEC.uri)
    dst = tuning_log.log_dir(logs, tag, SPEC.uri)
    shutil.copytree(src, dst)
    meta = json.loads((dst / tuning_log.META_FILE).read_text())
    target = {"kind": "llvm", "mcpu": "other", "num-cores": cores}
    meta.update(device_tag=tag, num_cores=cores, isa=isa, target=json.dumps(target))
    meta["best"]["knobs"]["splits"] = 4 * cores
    tuning_log.write_meta(dst, meta)
    return dst


def test_sweep_records_every_candidate_and_the_runtime_builds_the_winner(swept, host, tmp_path):
    logs, res = swept
    folder = tuning_log.log_dir(logs, host.tag, SPEC.uri)
    meta = tuning_log.read_meta(folder, host)
    assert meta["kind"] == "knobs" and meta["num_cores"] == host.num_cores and meta["isa"] == host.isa
    assert {knob_tune.knob_key(c["knobs"]) for c in meta["candidates"]} == {knob_tune.knob_key(g) for g in GRID}
    assert all(c["rounds"] == 2 and c["median_ms"] > 0 for c in meta["candidates"])
    assert meta["best"]["knobs"] == dict(res.best.knobs) == min(meta["candidates"], key=lambda c: c["median_ms"])[
        "knobs"]
    assert len(tuning_log.read_knob_samples(folder)) == 2 * len(GRID) == res.new_samples
    from wq_compile.compiler.build import UntunedKernelWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelWarning)  # a tuned kernel compiles without this warning
        kernel = KernelLibrary(host, logs_dir=logs, cache_dir=tmp_path).load(SPEC)
    assert str(kernel.provenance) == "tuned here"
    assert knobs.knobs_of(kernel.spec) == dict(res.best.knobs) and kernel.spec.uri == res.best_spec.uri
    assert kernel.spec.uri.startswith(SPEC.uri + "_splits")


def test_interrupted_sweep_resumes_without_measuring_finished_candidates(swept, host, tmp_path, monkeypatch):
    logs, _ = swept
    mine = tmp_path / "logs"
    shutil.copytree(logs, mine)
    folder = tuning_log.log_dir(mine, host.tag, SPEC.uri)
    samples = (folder / tuning_log.KNOB_FILE).read_text().splitlines()
    last = json.loads(samples[-1])
    (folder / tuning_log.KNOB_FILE).write_text("\n".join(samples[:-1]) + '\n{"knobs": {"spl')  # torn append
    timed = []
    real = knob_tune.time_function
    monkeypatch.setattr(knob_tune, "time_function", lambda fn, **kw: timed.append(fn) or real(fn, **kw))
    with pytest.warns(tuning_log.TornLogWarning):
        res = knob_tune.sweep_knobs(SPEC, host, _settings(mine))
    assert len(timed) == 1 == res.new_samples  # only the lost sample is measured again
    assert json.loads((folder / tuning_log.KNOB_FILE).read_text().splitlines()[-1])["knobs"] == last["knobs"]
    assert knob_tune.sweep_knobs(SPEC, host, _settings(mine)).new_samples == 0 and len(timed) == 1


def test_record_of_same_isa_class_is_used_with_scaled_splits_other_class_is_not(swept, host, tmp_path):
    logs, res = swept
    arch = host.tag.split("-")[1]
    other_isa = "x86_64-avx2" if host.isa != "x86_64-avx2" else "x86_64-avx512"
    mine = tmp_path / "logs"
    shutil.copytree(logs, mine)
    far = f"cpu-{arch}-farclass-{host.num_cores}c"
    _copy_as(mine, host, far, host.num_cores, other_isa)
    near_cores = 4 * host.num_cores
    near = f"cpu-{arch}-sameclass-{near_cores}c"
    _copy_as(mine, host, near, near_cores, host.isa)
    shutil.rmtree(tuning_log.log_dir(mine, host.tag, SPEC.uri))
    choice = knob_lookup.choose_knobs(SPEC, host, mine)
    assert str(choice.provenance) == f"tuned on {near}"
    # that record's best had splits 4 x its cores: the same work items per core here
    assert choice.knobs["splits"] == 4 * host.num_cores and "scaled" in choice.note
    kernel = KernelLibrary(host, logs_dir=mine, cache_dir=tmp_path / "cache").load(SPEC)
    assert str(kernel.provenance) == f"tuned on {near}" and knobs.knobs_of(kernel.spec)["splits"] == 4 * host.num_cores
    shutil.rmtree(tuning_log.log_dir(mine, near, SPEC.uri))
    choice = knob_lookup.choose_knobs(SPEC, host, mine)
    assert str(choice.provenance) == "untuned" and choice.knobs == {}
    assert knob_lookup.resolve(SPEC, host, mine) == SPEC


def test_avx2_record_is_found_on_any_avx2_only_host(host, tmp_path):
    """A sweep for the haswell target (``wq-tune --target '{"kind": "llvm", "mcpu": "haswell", ...}'``, run here)
    records knobs for the ``x86_64-avx2`` class; AVX2-only hosts simulated from this host's facts (another CPU
    model and mcpu, so never this host's tag or the record's) find them by the class lookup; an AVX-512 host does
    not."""
    if not host.has_features("avx2"):
        pytest.skip(f"running AVX2 code needs an x86-64 host with AVX2 ({host.isa})")
    from wq_compile.compiler.device import Device

    haswell = resolve_device({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    res = knob_tune.sweep_knobs(SPEC, haswell, knob_tune.KnobSweepSettings(
        logs_dir=tmp_path, n_tokens=128, rounds=1, min_sample_s=0.002, grid=GRID[:1], include_default=False))
    assert tuning_log.read_meta(res.log_dir, haswell)["isa"] == "x86_64-avx2"
    facts = host.facts()
    for mcpu, model in (("znver3", "amd-ryzen-7-5800x"), ("skylake", "intel-core-i7-6700")):
        target = {**json.loads(facts["target_json"]), "mcpu": mcpu, "num-cores": 2}
        sim = Device.from_facts({**facts, "tag": f"cpu-x86_64-{model}-2c", "target_json": json.dumps(target),
                                 "isa": "x86_64-avx2", "features": ["avx2"]})
        assert sim.tag not in (host.tag, haswell.tag)
        choice = knob_lookup.choose_knobs(SPEC, sim, tmp_path)
        assert str(choice.provenance) == f"tuned on {haswell.tag}" and choice.knobs == GRID[0], choice
    if host.isa != "x86_64-avx2":
        assert str(knob_lookup.choose_knobs(SPEC, host, tmp_path).provenance) == "untuned"


def test_changed_record_changes_the_module_key(swept, host, tmp_path):
    logs, _ = swept
    mine = tmp_path / "logs"
    shutil.copytree(logs, mine)
    spec = knob_lookup.resolve(SPEC, host, mine)
    before = module_cache.expected_key(spec, host, mine)
    folder = tuning_log.log_dir(mine, host.tag, SPEC.uri)
    meta = json.loads((folder / tuning_log.META_FILE).read_text())
    meta["best"]["median_ms"] *= 2
    tuning_log.write_meta(folder, meta)
    assert knob_lookup.resolve(SPEC, host, mine) == spec
    assert module_cache.expected_key(spec, host, mine)["logs"] != before["logs"]


def test_corrupt_knob_record_is_skipped_with_a_warning(swept, host, tmp_path):
    logs, _ = swept
    mine = tmp_path / "logs"
    shutil.copytree(logs, mine)
    meta_path = tuning_log.log_dir(mine, host.tag, SPEC.uri) / tuning_log.META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["best"]["median_ms"]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(KnobRecordWarning, match="not a complete knob record"):
        assert str(knob_lookup.choose_knobs(SPEC, host, mine).provenance) == "untuned"
    meta_path.write_text('{"versions": ')
    with pytest.warns(KnobRecordWarning, match="not valid JSON"):
        assert knob_lookup.resolve(SPEC, host, mine) == SPEC
    with pytest.warns(KnobRecordWarning):
        kernel = KernelLibrary(host, logs_dir=mine, cache_dir=tmp_path / "cache").load(SPEC)
    assert str(kernel.provenance) == "untuned" and kernel.spec == SPEC


def test_candidate_failing_the_reference_check_is_never_recorded(host, tmp_path, monkeypatch):
    real = knob_tune.check_against_reference

    def check(kdef, module, device, *a):
        if knobs.knobs_of(kdef.spec)["splits"] == 1:
            raise ReferenceMismatch(f"{kdef.spec.uri} output: broken on purpose")
        real(kdef, module, device, *a)

    monkeypatch.setattr(knob_tune, "check_against_reference", check)
    res = knob_tune.sweep_knobs(SPEC, host, _settings(tmp_path))
    folder = tuning_log.log_dir(tmp_path, host.tag, SPEC.uri)
    assert [c.knobs["splits"] for c in res.candidates] == [2] and list(res.failed) == ["pvc=16,qkh=8,splits=1"]
    assert {s["knobs"]["splits"] for s in tuning_log.read_knob_samples(folder)} == {2}
    meta = tuning_log.read_meta(folder, host)
    assert [c["knobs"]["splits"] for c in meta["candidates"]] == [2] and meta["best"]["knobs"]["splits"] == 2
    monkeypatch.setattr(knob_tune, "check_against_reference",
                        lambda kdef, *a: (_ for _ in ()).throw(ReferenceMismatch("broken")))
    with pytest.raises(knob_tune.NoValidKnobsError, match="nothing recorded"):
        knob_tune.sweep_knobs(SPEC, host, _settings(tmp_path / "none"))
    assert tuning_log.read_knob_samples(tuning_log.log_dir(tmp_path / "none", host.tag, SPEC.uri)) == []


def test_grid_and_settings_are_checked():
    grid = knob_tune.knob_grid(KernelSpec("fused", (8, 4, 2, 16), 64, 14, 2), num_cores=2)
    assert sorted({g["splits"] for g in grid}) == [1, 2, 4] and sorted({g["qkh"] for g in grid}) == [4, 8]
    assert sorted({g["splits"] for g in knob_tune.knob_grid(SPEC, 8)}) == [1, 2, 4, 8, 16]
    assert {g["qkh"] for g in knob_tune.knob_grid(SPEC, 2)} == {8}  # a group of 2 heads: one pass only
    # the AVX-512 table unpack of 4-bit codes: only where the target has it and a bucket is 4-bit
    wide = knob_tune.knob_grid(KernelSpec("fused", (8, 4, 2, 16), 64, 14, 2), 2, "x86_64-avx512")
    assert {g.get("lut", 0) for g in wide} == {0, 1} and len(wide) == 2 * len(grid)
    avx2 = knob_tune.knob_grid(KernelSpec("fused", (8, 4, 2, 16), 64, 14, 2), 2, "x86_64-avx2")
    assert all("lut" not in g for g in avx2)
    # AVX2: the factory caps a QK pass at what 16 ymm registers hold (2 heads here), so 8 and 4 would be one candidate
    assert sorted({g["qkh"] for g in avx2}) == [1, 8] and len(avx2) == len(grid)
    assert all("lut" not in g for g in knob_tune.knob_grid(KernelSpec("fused", (8, 2, 16), 64, 14, 2), 2,
                                                             "x86_64-avx512"))
    with pytest.raises(ValueError, match="lut must be 0 or 1"):
        knobs.with_knobs(SPEC, {"lut": 2})
    with pytest.raises(ValueError, match="rounds"):
        knob_tune.KnobSweepSettings(rounds=0)
    with pytest.raises(ValueError, match="knobs: unknown keys"):
        knobs.with_knobs(SPEC, {"tile": 2})
    with pytest.raises(ValueError, match="has no structure knobs"):
        knob_tune.sweep_knobs(KernelSpec("quantize", (4,), 64, 4, 2), "llvm")


def test_example_lens_are_each_pieces_capacity():
    kdef = kernel_def(SPEC, "llvm")
    sizes = example_sizes(SPEC, 256)
    named = dict(zip(kdef.signature.names, example_args(kdef.signature, sizes)))
    assert int(named["q4_lens"][0]) == sizes["N4"] and int(named["dense_lens"][0]) == sizes["N16"] < sizes["N4"]


def test_cli_knob_flags_are_checked(capsys):
    from wq_compile.tools.cli import main_tune

    for flag in ("--knob-rounds", "--knob-tokens"):
        with pytest.raises(SystemExit) as exc:
            main_tune(["--model", "tiny", flag, "0"])
        assert exc.value.code == 2 and f"{flag}: expected a positive count" in capsys.readouterr().err


def test_multi_token_kernel_is_swept_and_the_runtime_builds_the_winner(host, tmp_path):
    """The multi-token kernel goes through the same sweep (its candidates checked against the causal reference of
    :mod:`wq_compile.compiler.check`), with ``rows`` among its knobs; the runtime builds the recorded winner."""
    spec = KernelSpec("multi", (4, 16), head_dim=64, num_q_heads=4, num_kv_heads=2)
    # not the factory's knobs (splits 2, pvc 16, rows 8): a default that wins keeps no record (record_rule)
    grid = ({"splits": 1, "pvc": 16, "qkh": 8, "rows": 4}, {"splits": 1, "pvc": 8, "qkh": 8, "rows": 16})
    res = knob_tune.sweep_knobs(spec, host, knob_tune.KnobSweepSettings(
        logs_dir=tmp_path / "logs", n_tokens=128, rounds=1, min_sample_s=0.002, grid=grid, include_default=False))
    assert not res.failed and {knob_tune.knob_key(c.knobs) for c in res.candidates} == {
        knob_tune.knob_key(g) for g in grid}
    kernel = KernelLibrary(host, logs_dir=tmp_path / "logs", cache_dir=tmp_path / "cache").load(spec)
    assert str(kernel.provenance) == "tuned here" and knobs.knobs_of(kernel.spec) == dict(res.best.knobs)
    assert knob_tune.default_knobs(spec)["rows"] == 8 and "rows" not in knob_tune.default_knobs(SPEC)
    assert {g["rows"] for g in knob_tune.knob_grid(spec, 2)} == set(knob_tune.ROWS_CANDIDATES)
