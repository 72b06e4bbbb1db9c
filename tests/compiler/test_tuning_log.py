"""Tuning logs: compatibility lookup (exact tag, then same ISA class, nearest cores), digests, torn lines, meta."""

from __future__ import annotations

import json
import warnings

import pytest

from wq_compile.compiler import tuning_log
from wq_compile.compiler.device import resolve_device, versions
from wq_compile.compiler.tuning_log import Provenance, TornLogWarning, TuningLogError

URI = "quantize_k4v4_kg28_vg64_d64_h4kv2_f32_c64"


@pytest.fixture(scope="module")
def host():
    return resolve_device({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})  # an AVX-512 machine


def _log(logs, tag, target, **meta):
    folder = logs / tag / URI
    tuning_log.write_meta(folder, {"uri": URI, "versions": versions(), "device_tag": tag,
                                   "target": json.dumps(target), **meta})
    (folder / tuning_log.WORKLOAD_FILE).write_text('["abc", "{}"]\n')
    (folder / tuning_log.RECORD_FILE).write_text('[0, [[], []], [1.0e-5], null, null]\n')
    return folder


def test_lookup_order_exact_then_same_isa_class_nearest_cores(tmp_path, host):
    logs = tmp_path
    _log(logs, "cpu-x86_64-amd-epyc-8c", {"kind": "llvm", "mcpu": "znver5", "num-cores": 8})
    _log(logs, "cpu-x86_64-amd-epyc-2c", {"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    _log(logs, "cpu-x86_64-intel-haswell-2c", {"kind": "llvm", "mcpu": "haswell", "num-cores": 2})  # AVX2 only
    _log(logs, "cpu-aarch64-neoverse-2c", {"kind": "llvm", "mcpu": "neoverse-v1", "mtriple": "aarch64-linux-gnu",
                                           "num-cores": 2})
    stale = _log(logs, "cpu-x86_64-other-2c", {"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    meta = json.loads((stale / "meta.json").read_text())
    meta["versions"]["apache-tvm"] = "0.19.0"
    (stale / "meta.json").write_text(json.dumps(meta))
    tags = [(s.tag, s.exact) for s in tuning_log.candidate_logs(logs, host, URI)]
    assert tags == [("cpu-x86_64-amd-epyc-2c", False), ("cpu-x86_64-amd-epyc-8c", False)]
    avx2 = resolve_device({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    assert avx2.isa == "x86_64-avx2"
    assert [s.tag for s in tuning_log.candidate_logs(logs, avx2, URI)] == ["cpu-x86_64-intel-haswell-2c"]

    _log(logs, host.tag, json.loads(host.target_json))
    tags = [(s.tag, s.exact) for s in tuning_log.candidate_logs(logs, host, URI)]
    assert tags[0] == (host.tag, True) and len(tags) == 3
    assert tuning_log.candidate_logs(tmp_path / "missing", host, URI) == []


def test_provenance_strings():
    assert str(Provenance("here", "cpu-a-2c")) == "tuned here"
    assert str(Provenance("foreign", "cpu-b-2c", 1e-3)) == "tuned on cpu-b-2c"
    assert str(tuning_log.UNTUNED) == "untuned" and not tuning_log.UNTUNED.tuned
    p = Provenance("foreign", "x", 2.0)
    assert Provenance.from_json(p.to_json()) == p


def test_digest_changes_with_any_stored_record(tmp_path, host):
    folder = _log(tmp_path, "cpu-x86_64-amd-epyc-2c", {"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    before = tuning_log.digest(tuning_log.candidate_logs(tmp_path, host, URI))
    rec = folder / tuning_log.RECORD_FILE
    rec.write_text(rec.read_text().replace("1.0e-5", "2.0e-5"))
    after = tuning_log.digest(tuning_log.candidate_logs(tmp_path, host, URI))
    assert before != after and tuning_log.digest([]) == "none"


def test_torn_last_line_is_skipped_and_repaired_other_bad_lines_raise(tmp_path, host):
    pytest.importorskip("tvm")
    folder = _log(tmp_path, host.tag, json.loads(host.target_json))
    rec = folder / tuning_log.RECORD_FILE
    rec.write_text("")
    (folder / tuning_log.WORKLOAD_FILE).write_text("")
    rec.write_text('[0, [1.0e-5], "trunc')  # an interrupted append
    with pytest.warns(TornLogWarning, match="torn last line"):
        tuning_log.open_database(folder, host)
    assert tuning_log.repair_log(folder) == [rec] and rec.read_text() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TornLogWarning)
        tuning_log.open_database(folder, host)
    rec.write_text('{bad\n[0, [1.0e-5], null]\n')
    with pytest.raises(TuningLogError, match=r"database_tuning_record\.json:1: not valid JSON"):
        tuning_log.open_database(folder, host)


def test_meta_is_checked(tmp_path, host):
    folder = _log(tmp_path, host.tag, json.loads(host.target_json))
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(TuningLogError, match=r"meta\.json: not valid JSON.*(re-tune|delete)"):
        tuning_log.read_meta(folder, host)
    (folder / "meta.json").unlink()
    with pytest.raises(TuningLogError, match="without meta.json"):
        tuning_log.read_meta(folder, host)
    other = _log(tmp_path, "cpu-x-2c", json.loads(host.target_json))
    with pytest.raises(TuningLogError, match="log of device 'cpu-x-2c'"):
        tuning_log.read_meta(other, host)


@pytest.mark.parametrize("mcpu,mattr,isa", [("neoverse-n1", None, "aarch64-neon"),
                                            ("cortex-a72", None, "aarch64-neon"),
                                            ("neoverse-v1", None, "aarch64-sve"),
                                            ("neoverse-n1", ["+sve"], "aarch64-sve")])
def test_aarch64_devices_find_logs_of_their_own_class_only(tmp_path, mcpu, mattr, isa):
    """An aarch64 device finds the logs of its ISA class (NEON or SVE, read from the target), nearest cores first,
    never an x86 log nor one of the other aarch64 class."""
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    _log(tmp_path, "cpu-x86_64-amd-epyc-2c", {"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    _log(tmp_path, "cpu-x86_64-intel-haswell-2c", {"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    _log(tmp_path, "cpu-aarch64-graviton2-16c", {**arm, "mcpu": "neoverse-n1", "num-cores": 16})
    _log(tmp_path, "cpu-aarch64-graviton2-4c", {**arm, "mcpu": "neoverse-n1", "num-cores": 4})
    _log(tmp_path, "cpu-aarch64-graviton3-4c", {**arm, "mcpu": "neoverse-v1", "num-cores": 4})
    device = resolve_device({**arm, "mcpu": mcpu, "num-cores": 2, **({"mattr": mattr} if mattr else {})})
    assert device.isa == isa
    found = [s.tag for s in tuning_log.candidate_logs(tmp_path, device, URI)]
    assert found == (["cpu-aarch64-graviton2-4c", "cpu-aarch64-graviton2-16c"] if isa == "aarch64-neon"
                     else ["cpu-aarch64-graviton3-4c"]), found
