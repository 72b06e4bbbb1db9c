"""Targets, tags and ISA classes; one host target for the runtime and the tests."""

from __future__ import annotations

import pytest

from wq_compile.compiler.device import host_device, isa_class, resolve_device, slug
from wq_compile.compiler.measure import RPCSettings


def test_targets_and_tags():
    host = resolve_device("llvm")
    assert (host.target_json, host.tag) == (host_device().target_json, host_device().tag)  # runtime = tests
    assert host.tag.startswith("cpu-") and host.tag.endswith(f"{host.num_cores}c")
    assert dict(host.target.attrs.items())["mcpu"] not in ("generic", "x86-64")
    cuda = resolve_device("nvidia/nvidia-h100")
    assert cuda.kind == "cuda" and cuda.arch == "sm_90a" and cuda.tag == "cuda-nvidia-h100-sm_90a"
    assert resolve_device('{"kind": "llvm", "num-cores": 1}').tag.endswith("-1c")
    # the form wq-tune's error message suggests is this host's target: same target, same tag, same cache files
    as_json = resolve_device(f'{{"kind": "llvm", "num-cores": {host.num_cores}}}')
    assert (as_json.tag, as_json.target_json) == (host.tag, host.target_json)
    other = resolve_device({"kind": "llvm", "mcpu": "haswell" if "haswell" not in host.tag else "znver5"})
    assert other.tag != host.tag and other.tag.startswith(host.tag)  # another CPU never shares a module file
    with pytest.raises(ValueError, match="strings with flags"):
        resolve_device("llvm -num-cores 2")
    assert slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"
    assert RPCSettings.parse("10.0.0.1:9190", "h100") == RPCSettings("10.0.0.1", 9190, "h100")
    with pytest.raises(ValueError, match="HOST:PORT"):
        RPCSettings.parse("nohost", "k")


def test_device_facts_make_the_same_device_without_tvm():
    """The host-facts file of the light load path stores these facts: the device made from them is equal (tag,
    target, ISA class), builds the same TVM target on demand, and incomplete facts are refused, never guessed."""
    from wq_compile.compiler.device import Device, host_fingerprint

    host = resolve_device("llvm")
    again = Device.from_facts(host.facts())
    assert again == host and again.built_target is None
    assert (again.kind, again.num_cores, again.isa) == (host.kind, host.num_cores, host.isa)
    assert str(again.target) == host.target_json
    for bad in ({**host.facts(), "target_json": "{"}, {"tag": host.tag}, None,
                Device.of(resolve_device("nvidia/nvidia-h100").target, "cuda-x", "x").facts()):
        with pytest.raises(ValueError, match="device facts"):
            Device.from_facts(bad)
    assert host_fingerprint(1) != host_fingerprint(2) and host_fingerprint(1) == host_fingerprint(1)


@pytest.mark.parametrize("mcpu,vnni", [("sapphirerapids", True), ("skylake-avx512", False), ("haswell", False)])
def test_recorded_features_answer_without_the_target(mcpu, vnni):
    """The features the int8 dot-product mode needs are recorded with the device (and in its facts), so the light
    path can refuse or allow the mode without TVM; they agree with the TVM target's."""
    from wq_compile.compiler.device import Device
    from wq_compile.runtime.decoder import INT8_DOT_FEATURES

    dev = resolve_device({"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"})
    again = Device.from_facts(dev.facts())
    assert again.features == dev.features and again.built_target is None
    assert again.has_features(*INT8_DOT_FEATURES) is vnni and again.built_target is None  # no TVM target built
    assert Device.from_facts({k: v for k, v in dev.facts().items() if k != "features"}).has_features(
        *INT8_DOT_FEATURES) is vnni  # older facts: asks the TVM target


@pytest.mark.parametrize("target,isa", [
    ({"kind": "llvm", "mcpu": "znver5"}, "x86_64-avx512"),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, "x86_64-avx512"),
    ({"kind": "llvm", "mcpu": "haswell"}, "x86_64-avx2"),
    ({"kind": "llvm", "mcpu": "x86-64"}, "x86_64"),
    ({"kind": "llvm", "mcpu": "neoverse-v1", "mtriple": "aarch64-linux-gnu"}, "aarch64-sve"),
    ({"kind": "llvm", "mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu"}, "aarch64-neon"),
])
def test_isa_class_is_read_from_target_features(target, isa):
    from tvm.target import Target

    assert isa_class(Target(target)) == isa
    assert isa_class(str(Target(target))) == isa  # as recorded in meta.json
    assert isa_class(Target("nvidia/nvidia-h100")) == "cuda-sm_90a"


def test_tvm_pool_uses_every_physical_core():
    """Without TVM_NUM_THREADS, TVM halves hardware_concurrency() on x86 (it assumes hyper-threads): on a VM whose
    vCPUs are real cores every kernel ran on half of them. The runtime sets the pool to the physical cores."""
    import os
    import subprocess
    import sys

    code = ("import os; from wq_compile.compiler.cpu_threads import share_cores_with_torch; from wq_compile.compiler.device import "
            "physical_cores; share_cores_with_torch(); import tvm_ffi, tvm; "
            "print(tvm_ffi.get_global_func('runtime.NumThreads')(), physical_cores())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    pool, cores = map(int, out.stdout.split()[-2:])
    assert pool == cores, f"TVM pool has {pool} threads on a machine with {cores} physical cores"
    env["TVM_NUM_THREADS"] = "1"  # a user's setting wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-2]) == 1
