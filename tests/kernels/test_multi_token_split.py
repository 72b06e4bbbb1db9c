"""The split-KV multi-token kernel (the CUDA form, :mod:`wq_compile.kernels.multi_token_split`) built for llvm from
the same PrimFunc and run through :class:`~wq_compile.runtime.steps.StepDecoder` (``split=True``: split kernel,
then the merge) against ``decode_attention(..., causal_tail=S)``: both model shapes, f16 and bf16, S in {2, 7, 64}
(and 90: two launches), a batch of 3 with irregular lengths, a sample whose buckets are empty and a padding sample
(nothing cached but the step), NaN past every valid length, several split counts. Row tiles: the group (one token
per block, 0.5B) and 8 rows cutting across tokens (7B, 7 heads per KV head). Two modules, built once.

f32 is not built here: the same PrimFunc (the 0.5B f32 split kernel is checked in test_split_decode); on CUDA the 7B
f32 tiles pass 48 KB of static shared memory and the decoder refuses it (tests/runtime/test_gpu_limits.py).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("tvm")

from tolerances import ATOL_BF16, ATOL_F16  # noqa: E402
from wq_testing import check_close, poison_past_lens, step_layer  # noqa: E402
from wq_compile.compiler.build import UntunedKernelWarning  # noqa: E402
from wq_compile.core.reference import decode_attention  # noqa: E402
from wq_compile.core.spec import KernelSpec, bucket_widths  # noqa: E402
from wq_compile.kernels import make_kernel  # noqa: E402
from wq_compile.runtime.library import KernelLibrary  # noqa: E402
from wq_compile.runtime.steps import StepDecoder  # noqa: E402

SHAPES = {"0.5b": (14, 2, 64), "7b": (28, 4, 128)}
SM_SCALE = 0.125
#: (shape, dtype, knobs) of the two modules built.
BUILDS = [("0.5b", "f16", {}), ("7b", "bf16", {"rows": 8})]
#: Window widths of the cached sample per build: the 7B module fills an int1 bucket too.
WIDTHS = {"0.5b": (8, 4, 2, 4), "7b": (8, 4, 2, 1)}
#: The buckets of each build's layer (8/4/2 always, 1 when the build fills it): the widths of the kernel it runs.
LAYER_WIDTHS = {k: bucket_widths(w) for k, w in WIDTHS.items()}
TOL = {"f16": (ATOL_F16, ATOL_F16), "bf16": (ATOL_BF16, ATOL_BF16)}
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-split")
    made: dict = {}
    with KernelLibrary("llvm", logs_dir=root / "no-logs", cache_dir=root / "cache") as lib:
        def get(shape: str, dtype: str, knobs: dict) -> StepDecoder:
            key = (shape, dtype, tuple(sorted(knobs.items())))
            if key not in made:
                hq, hkv, d = SHAPES[shape]
                dec = StepDecoder(lib, hq, hkv, d, DTYPES[dtype], knobs=knobs, split=True, sm_count=132)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UntunedKernelWarning)
                    dec.kernel(LAYER_WIDTHS[shape])
                made[key] = dec
            return made[key]

        yield get


@pytest.mark.parametrize("shape,dtype,knobs", BUILDS, ids=[f"{s}-{d}-{k or 'default'}" for s, d, k in BUILDS])
@pytest.mark.parametrize("steps", [2, 7, 64, 90])
def test_split_multi_token_matches_causal_reference(decoders, shape: str, dtype: str, knobs: dict,
                                                    steps: int) -> None:
    dec = decoders(shape, dtype, knobs)
    assert dec.split and dec.spec(LAYER_WIDTHS[shape]).uri.endswith("_split1")
    layer, q = step_layer(SHAPES[shape], DTYPES[dtype], [400, 300, 0], steps, torch.Generator().manual_seed(steps),
                          WIDTHS[shape])
    assert int(layer.buckets[2].lens[1]) == 0 and int(layer.dense.lens[2]) == steps  # empty buckets, padding
    assert tuple(sorted(layer.buckets, reverse=True)) == LAYER_WIDTHS[shape]
    assert (1 in layer.buckets and int(layer.buckets[1].lens[0]) > 0) == (1 in WIDTHS[shape])
    want = decode_attention(q, layer, SM_SCALE, causal_tail=steps).transpose(1, 2)
    poison_past_lens(layer)
    for sm in (1, 5, 132):  # P = 1, a few, and as many as the chunks allow (more than a short piece's chunks)
        dec.sm_count = sm
        got = dec(q, layer, SM_SCALE)
        assert got.shape == want.shape and got.dtype == DTYPES[dtype]
        check_close(f"split multi {shape} {dtype} {knobs} S={steps} sm={sm}", got, want, *TOL[dtype])


def test_split_multi_token_spec_is_checked() -> None:
    from wq_compile.kernels.multi_token_split import build_multi_split

    spec = KernelSpec("multi", (4, 16), head_dim=64, num_q_heads=14, num_kv_heads=2, chunk=32)
    with pytest.raises(ValueError, match="split-KV multi-token spec"):
        build_multi_split(spec)
    with pytest.raises(ValueError, match="CPU \\(llvm\\) form only"):
        make_kernel(spec, "cuda")


def test_gpu_visit_edge_cases_cover_the_multi_token_kernel(decoders) -> None:
    """The GPU visit's edge cases for the split-KV multi-token kernel (dry run on llvm, the 0.5B module above):
    batch 3 with a padding sample, odd lengths, residuals of 1-31 tokens, empty buckets, a short piece next to a
    long one; S in {2, 7} at P in {1, 3} (the small set the sanitizer runs), outputs poisoned with NaN."""
    from wq_compile.tuning import gpu_edge_cases as ec

    dec = decoders("0.5b", "f16", {})
    spec = dec.spec(LAYER_WIDTHS["0.5b"])
    rows = ec.run_edge_cases(spec, dec.kernel(LAYER_WIDTHS["0.5b"]), dec._merge, "cpu", small=True)
    assert len(rows) == 3 * len(ec.SMALL_STEPS) * len(ec.SMALL_PARTS)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad[:3]
    assert max(r["max_abs_err"] for r in rows) > 0
    fields = lambda s: {k: (list(x) if isinstance(x, tuple) else x) for k, x in vars(s).items()}  # noqa: E731
    manifest = {"kernels": [{"uri": s.uri, "spec": fields(s)} for s in dec.specs(LAYER_WIDTHS["0.5b"])]}
    ((split, merge),) = ec.export_split_pairs(manifest)  # the visit pairs it with its merge
    assert split["uri"] == spec.uri and merge["uri"].startswith("merge")


def test_reference_partials_of_a_split_kernel(decoders) -> None:
    """``compiler.check``'s reference for a split kernel's outputs (what the offline export and the check of a
    foreign tuning record compare ``o_parts`` / ``lse_parts`` with) equals the kernel's own partials: split ``s``
    covers chunks ``[s * cps, (s + 1) * cps)`` of all pieces, empty splits ``o = 0, lse = -inf``; irregular lens,
    an empty bucket per sample, the dense piece causal."""
    from wq_compile.compiler.check import TOLERANCE, check_against_reference, reference_outputs
    from wq_compile.compiler.measure import example_args

    kernel = decoders("0.5b", "f16", {}).kernel(LAYER_WIDTHS["0.5b"])
    spec, sig = kernel.spec, kernel.signature
    sizes = {"B": 2, "S": 5, "N8": 64, "G8": 3, "N4": 128, "G4": 5, "N2": 64, "G2": 3, "N16": 64, "P": 7}
    args = example_args(sig, sizes, scalars={"sm_scale": SM_SCALE}, seed=3)
    named = dict(zip(sig.names, args))
    for name, lens in (("q8_lens", [40, 0]), ("q4_lens", [100, 3]), ("q2_lens", [0, 64]), ("dense_lens", [5, 30])):
        named[name].copy_(torch.tensor(lens, dtype=torch.int32))
    kernel(*args)
    want = reference_outputs(spec, named)
    assert bool(torch.isneginf(want["lse_parts"][5:]).all())  # 10 chunks in splits of 2: the last two are empty
    fin = torch.isfinite(want["lse_parts"])
    assert torch.equal(fin, torch.isfinite(named["lse_parts"])) and bool((named["lse_parts"][~fin] < 0).all())
    check_close("lse_parts", named["lse_parts"][fin], want["lse_parts"][fin], *TOLERANCE["f16"])
    check_close("o_parts", named["o_parts"], want["o_parts"], *TOLERANCE["f16"])
    assert float((want["o_parts"] - named["o_parts"]).abs().max()) > 0  # compared for real
    check_against_reference(SimpleNamespace(spec=spec, signature=sig), kernel.module, kernel.device)  # llvm: runs


def test_split_form_reads_8_bit_scale_zero_as_its_fp16_expansion(decoders) -> None:
    """``meta_bits=8`` on CUDA: the split kernel has no 8-bit reader, so the step decoder passes it the bucket's fp16
    expansion (per call) and the result is the reference's over the same codes (same module as the 0.5B build)."""
    dec = decoders("0.5b", "f16", {})
    layer, q = step_layer(SHAPES["0.5b"], torch.float16, [400, 300, 0], 7, torch.Generator().manual_seed(8),
                          WIDTHS["0.5b"], meta_bits=8)
    assert layer.meta8_width == 2 and layer.buckets[2].k_scale.dtype == torch.uint8
    want = decode_attention(q, layer, SM_SCALE, causal_tail=7).transpose(1, 2)
    check_close("split multi 0.5b f16 meta_bits=8", dec(q, layer, SM_SCALE), want, *TOL["f16"])
