"""The CPU multi-token kernel (kind "multi") through the runtime's StepDecoder, against the torch reference
``decode_attention(..., causal_tail=S)`` over the same bucketed cache.

One module per (shape, dtype, knobs) is built once for the module (default knobs: no tuning log is given) and
serves every S and every cache below: S is a run-time size.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("tvm")

from tolerances import ATOL, ATOL_BF16, ATOL_F16, RTOL  # noqa: E402
from wq_testing import check_close, poison_past_lens as _poison, step_layer  # noqa: E402
from wq_compile.compiler.build import UntunedKernelWarning  # noqa: E402
from wq_compile.core.layout import LayerCache  # noqa: E402
from wq_compile.core.reference import decode_attention  # noqa: E402
from wq_compile.core.spec import KernelSpec, bucket_widths  # noqa: E402
from wq_compile.kernels import knobs as knob_lib  # noqa: E402
from wq_compile.runtime.library import KernelLibrary  # noqa: E402
from wq_compile.runtime.steps import StepDecoder  # noqa: E402

SHAPES = {"0.5b": (14, 2, 64), "7b": (28, 4, 128)}
SM_SCALE = 0.125
#: (shape, dtype, knobs) of the modules built (three, to keep the suite short): both shapes, every query dtype,
#: the merge of splits (the default 2, and 3) and the direct write of one split, row tiles of 4, 8 and 16 rows
#: (7 heads per KV head: tiles cut across tokens).
BUILDS = [("0.5b", "f32", {}), ("7b", "f16", {"splits": 1, "rows": 16}), ("0.5b", "bf16", {"splits": 3, "rows": 4})]
#: Window widths of the cached sample per build: the f32 module (tightest tolerance) fills an int1 bucket too.
WIDTHS = {"f32": (8, 4, 2, 1), "f16": (8, 4, 2, 4), "bf16": (8, 4, 2, 4)}
#: The buckets of each build's layer (8/4/2 always, 1 when the build fills it): the widths of the kernel it runs.
LAYER_WIDTHS = {k: bucket_widths(w) for k, w in WIDTHS.items()}
TOL = {"f32": (max(ATOL[b] for b in (8, 4, 2, 1, 16)), max(RTOL[b] for b in (8, 4, 2, 1, 16))),
       "f16": (ATOL_F16, ATOL_F16), "bf16": (ATOL_BF16, ATOL_BF16)}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    with KernelLibrary("llvm", logs_dir=root / "no-logs", cache_dir=root / "cache") as lib:
        yield lib


@pytest.fixture(scope="module")
def decoders(library):
    made = {}

    def get(shape: str, dtype: str, knobs: dict) -> StepDecoder:
        key = (shape, dtype, tuple(sorted(knobs.items())))
        if key not in made:
            hq, hkv, d = SHAPES[shape]
            dec = StepDecoder(library, hq, hkv, d, DTYPES[dtype], knobs=knobs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UntunedKernelWarning)  # no knob record in an empty logs folder
                dec.kernel(LAYER_WIDTHS[dtype])
            made[key] = dec
        return made[key]

    return get


def _check(dec: StepDecoder, layer: LayerCache, q: torch.Tensor, dtype: str, what: str) -> torch.Tensor:
    want = decode_attention(q, layer, SM_SCALE, causal_tail=q.shape[2]).transpose(1, 2)
    _poison(layer)
    lens = layer.dense.lens.clone()
    got = dec(q, layer, SM_SCALE)
    assert torch.equal(layer.dense.lens, lens)  # chunked steps never touch the cache's own counts
    assert got.shape == want.shape and got.dtype == DTYPES[dtype]
    check_close(what, got, want, *TOL[dtype])
    return got


@pytest.mark.parametrize("shape,dtype,knobs", BUILDS, ids=[f"{s}-{d}-{k or 'default'}" for s, d, k in BUILDS])
@pytest.mark.parametrize("steps", [2, 7, 64, 90])  # 90: two launches (64 + 26), each causal at its offset
def test_multi_token_kernel_matches_causal_reference(decoders, shape: str, dtype: str, knobs: dict,
                                                     steps: int) -> None:
    dec = decoders(shape, dtype, knobs)
    gen = torch.Generator().manual_seed(steps)
    layer, q = step_layer(SHAPES[shape], DTYPES[dtype], [400, 300], steps, gen, WIDTHS[dtype])
    assert int(layer.buckets[2].lens[0]) > 0 and int(layer.buckets[2].lens[1]) == 0
    assert tuple(sorted(layer.buckets, reverse=True)) == LAYER_WIDTHS[dtype]
    assert (1 in layer.buckets and int(layer.buckets[1].lens[0]) > 0) == (1 in WIDTHS[dtype])
    _check(dec, layer, q, dtype, f"multi {shape} {dtype} {knobs} S={steps}")


def test_multi_token_kernel_with_nothing_cached_but_the_step(decoders) -> None:
    """Empty buckets and a dense piece that holds only the step itself: plain causal attention among the S tokens
    (the first token sees only itself)."""
    dec = decoders("0.5b", "f32", {})
    gen = torch.Generator().manual_seed(1)
    layer = LayerCache.empty(1, 2, 64, torch.float32)
    layer.append(torch.randn(1, 2, 5, 64, generator=gen), torch.randn(1, 2, 5, 64, generator=gen))
    q = torch.randn(1, 14, 5, 64, generator=gen)
    out = _check(dec, layer, q, "f32", "multi, step only")
    v0 = layer.dense.v[0, :, 0].repeat_interleave(7, 0)  # token 0 attends to itself alone: its own value
    check_close("first token", out[0, 0], v0, *TOL["f32"])


def test_multi_token_refuses_bad_steps(library) -> None:
    dec = StepDecoder(library, 14, 2, 64, torch.float32)
    layer = LayerCache.empty(1, 2, 64, torch.float32)
    layer.append(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64))
    with pytest.raises(ValueError, match="fewer than the 4 new tokens"):
        dec(torch.randn(1, 14, 4, 64), layer, SM_SCALE)
    with pytest.raises(ValueError, match="expected 14 heads of 64"):
        dec(torch.randn(1, 7, 3, 64), layer, SM_SCALE)
    with pytest.raises(ValueError, match=r"\[B, Hq, S, D\]"):
        dec(torch.randn(14, 3, 64), layer, SM_SCALE)


def test_multi_token_knobs_are_checked() -> None:
    from wq_compile.kernels.multi_token_cpu import MultiKnobs

    multi = KernelSpec("multi", (4, 16), 64, 14, 2)
    assert knob_lib.effective(knob_lib.with_knobs(multi, {"rows": 16})).rows == 16
    with pytest.raises(ValueError, match="rows is a knob of multi kernels"):
        knob_lib.with_knobs(KernelSpec("fused", (4, 16), 64, 14, 2), {"rows": 8})
    with pytest.raises(ValueError, match="1..32 query rows"):
        MultiKnobs.of(knob_lib.with_knobs(multi, {"rows": 33}))
    with pytest.raises(ValueError, match="needs the dense piece"):
        from wq_compile.kernels import signature

        signature(KernelSpec("multi", (4,), 64, 14, 2))
