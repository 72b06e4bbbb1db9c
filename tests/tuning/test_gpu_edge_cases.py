"""The GPU visit's edge cases (issue 21, item 5), dry run on CPU: the split-KV PrimFunc the CUDA schedule transforms,
built for llvm, against the torch reference on padding samples, odd lengths, short residuals, empty buckets and
P in {1, 3, 66, 200}. Outputs are poisoned with NaN first, so an unwritten block fails."""

from __future__ import annotations

import pytest

from wq_compile.core.spec import KernelSpec
from wq_compile.kernels.split_decode import merge_spec, split_spec
from wq_compile.tuning import gpu_edge_cases as ec
from wq_testing import compiled_default

#: The 0.5B CUDA kernel's spec (f16, chunk 32): tests/kernels/test_split_decode.py builds the same one.
SPEC = split_spec(KernelSpec("fused", (8, 4, 2, 16), chunk=32, dtype="f16", head_dim=64, num_q_heads=14,
                             num_kv_heads=2))


def test_edge_cases_cover_what_the_issue_names():
    cases = {c.name: c for c in ec.edge_cases((8, 4, 2))}
    assert 0 in cases["batch3_padding"].tokens and len(cases["batch3_padding"].tokens) == 3
    residuals = [t - sum(n for _, n, _ in cases["residual_1_17_31"].windows) for t in cases["residual_1_17_31"].tokens]
    assert residuals == [1, 17, 31]
    assert any(n % 28 and n % 32 for c in cases.values() for _, n, _ in c.windows)
    assert len({b for _, _, b in cases["empty_buckets"].windows}) == 1  # two of three buckets stay empty
    assert {1, 3, 66} <= set(ec.PARTS) and max(ec.PARTS) > 1000 // 32  # more splits than any piece's chunks


def test_split_and_merge_pass_every_edge_case_on_llvm():
    rows = ec.run_edge_cases(SPEC, compiled_default(SPEC), compiled_default(merge_spec(SPEC)), "cpu")
    cases = ec.edge_cases((8, 4, 2))
    assert len(rows) >= len(cases) * len(ec.PARTS)
    # every case also runs at the split count the decoder launches on 132 SMs (P from all pieces' chunks together)
    assert {r["case"] for r in rows if r["decoder_parts"]} == {c.name for c in cases}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad[:3]
    assert max(r["max_abs_err"] for r in rows) > 0  # compared for real


def test_a_wrong_merge_is_caught():
    def merge_drops_last_split(o_parts, lse_parts, out):
        compiled_default(merge_spec(SPEC))(o_parts[:-1].contiguous(), lse_parts[:-1].contiguous(), out)

    rows = ec.run_edge_cases(SPEC, compiled_default(SPEC), merge_drops_last_split, "cpu", small=True, parts=(3,))
    assert not all(r["ok"] for r in rows)
    with pytest.raises(ValueError, match="not a split-KV kernel"):
        ec.run_edge_cases(KernelSpec("fused", (4, 16), chunk=32, dtype="f16", head_dim=64, num_q_heads=14,
                                     num_kv_heads=2), print, print, "cpu")


def test_export_pairs_and_sanitizer_skip(tmp_path, monkeypatch):
    """The visit finds each split kernel's merge in a manifest, and without compute-sanitizer says so."""
    fields = lambda s: {k: (list(x) if isinstance(x, tuple) else x) for k, x in vars(s).items()}  # noqa: E731
    manifest = {"kernels": [{"uri": s.uri, "spec": fields(s)} for s in (SPEC, merge_spec(SPEC))]}
    ((split, merge),) = ec.export_split_pairs(manifest)
    assert split["uri"] == SPEC.uri and merge["uri"] == merge_spec(SPEC).uri
    assert ec.export_split_pairs({"kernels": manifest["kernels"][:1]}) == []  # no merge exported: no edge step
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert ec.sanitizer_tool() is None
    assert "compute-sanitizer not found" in ec.run_sanitizer([tmp_path])["skipped"]


def test_edge_case_layers_hold_an_int1_bucket_when_the_kernel_reads_one():
    spec = split_spec(KernelSpec("fused", (8, 4, 2, 1, 16), chunk=32, dtype="f16", head_dim=64, num_q_heads=14,
                                 num_kv_heads=2))
    case = ec.edge_cases((8, 4, 2, 1))[0]
    layer, q = ec.build_layer(case, spec, "cpu")
    assert sorted(layer.buckets) == [1, 2, 4, 8] and int(layer.buckets[1].lens.sum()) > 0
    assert q.shape == (3, 14, 64)
