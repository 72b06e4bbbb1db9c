"""KernelSignature: binding torch tensors to symbols with the size rules, errors naming the argument."""

from __future__ import annotations

import pytest
import torch

from wq_compile.kernels.signature import ArgDesc, KernelArgumentError, KernelSignature

SIG = KernelSignature(
    "toy",
    (
        ArgDesc.tensor("k", ("B", 2, "N", 8), "float32"),
        ArgDesc.tensor("k_scale", ("B", 2, "G", 8), "float16"),
        ArgDesc.scalar("sm_scale", "float32"),
        ArgDesc.tensor("out", ("B", 2, 8), "float32", output=True),
    ),
    multiple_of=(("N", 64),),
    at_least=(("G", "N", 28),),
)


def _args(b=1, n=64, g=3):
    return [torch.zeros(b, 2, n, 8), torch.zeros(b, 2, g, 8, dtype=torch.float16), 0.5, torch.zeros(b, 2, 8)]


def test_bind_returns_symbols_and_default_sizes_satisfy_rules():
    assert SIG.bind(*_args(2, 128, 5)) == {"B": 2, "N": 128, "G": 5}
    sizes = SIG.default_sizes(100)
    assert sizes == {"B": 1, "N": 128, "G": 5}
    assert SIG.bind(*_args(sizes["B"], sizes["N"], sizes["G"])) == sizes
    assert SIG.symbols == ("B", "N", "G") and [a.name for a in SIG.outputs] == ["out"]
    assert SIG.nbytes({"B": 1, "N": 64, "G": 3}) == 2 * 64 * 8 * 4 + 2 * 3 * 8 * 2


@pytest.mark.parametrize("index,value,match", [
    (0, torch.zeros(1, 2, 100, 8), r"'k': size N=100 must be a positive multiple of 64"),
    (1, torch.zeros(1, 2, 2, 8, dtype=torch.float16), r"'k_scale': G=2 groups of 28 tokens do not cover N=64"),
    (1, torch.zeros(1, 2, 3, 8), r"'k_scale': expected dtype torch.float16"),
    (2, torch.tensor(0.5), r"'sm_scale': expected a Python number"),
    (3, torch.zeros(2, 2, 8), r"'out': dim 0 is 'B' = 1 from an earlier argument, got 2"),
    (0, torch.zeros(1, 8, 64, 2).transpose(1, 3), r"'k': expected a contiguous tensor"),
])
def test_bind_errors_name_the_argument(index, value, match):
    args = _args()
    args[index] = value
    with pytest.raises(KernelArgumentError, match=match):
        SIG.bind(*args)
    with pytest.raises(KernelArgumentError, match="expected 4 arguments"):
        SIG.bind(*_args()[:3])


def test_check_prim_func_rejects_a_description_that_differs():
    from wq_compile.kernels import make_kernel, signature
    from wq_compile.core.spec import KernelSpec

    spec = KernelSpec("quantize", (4,), head_dim=64, num_q_heads=4, num_kv_heads=2)
    func = make_kernel(spec)
    sig = signature(spec)
    assert sig.check_prim_func(func) is sig
    swapped = KernelSignature(sig.name, (sig.args[1], sig.args[0], *sig.args[2:]))
    with pytest.raises(ValueError, match="parameter 'v' is described as"):
        swapped.check_prim_func(func)


def test_8_bit_scale_zero_pieces_have_their_own_arguments_and_split_specs_refuse_them() -> None:
    from wq_compile.core.spec import KernelSpec
    from wq_compile.kernels.signatures import attention_signature, split_spec

    spec = KernelSpec("fused", (8, 4, 2, 16), 64, 4, 2, extra=(("meta8", 2),))
    args = {a.name: a for a in attention_signature(spec).args}
    assert args["q2_k_scale"].dtype == "uint8" and args["q4_k_scale"].dtype == "float16"
    assert args["q2_k_base"].shape == ("B", 2, "R2", 3, 64) and args["q2_run_of"].shape == ("B", "G2")
    assert "q4_run_of" not in args and spec.uri.endswith("_meta82")
    with pytest.raises(ValueError, match="meta8"):
        attention_signature(split_spec(spec))
