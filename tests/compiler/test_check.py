"""The one-time reference check of a compiled kernel (used before a foreign record's module is cached)."""

from __future__ import annotations

import pytest

from wq_compile.compiler.check import ReferenceMismatch, check_against_reference
from wq_compile.compiler.build import build_module, default_schedule, kernel_def
from wq_compile.compiler.device import resolve_device
from wq_compile.core.spec import KernelSpec
from wq_testing import TINY_DECODE

TINY_QUANT = KernelSpec("quantize", (4,), head_dim=64, num_q_heads=4, num_kv_heads=2)


class _Broken:
    """A module whose kernel runs, then corrupts one output (a wrong schedule, as the check must catch it)."""

    def __init__(self, module, index, delta):
        self.module, self.index, self.delta = module, index, delta

    def get_function(self, name):
        f = self.module.get_function(name)

        def run(*args):
            f(*args)
            args[self.index].view(-1)[0] += self.delta

        return run


@pytest.fixture(scope="module")
def host():
    return resolve_device("llvm")


@pytest.mark.parametrize("spec", [TINY_DECODE, TINY_QUANT], ids=lambda s: s.kind)
def test_default_modules_pass_and_corrupted_outputs_fail(spec, host):
    kdef = kernel_def(spec, host.kind)
    module = build_module(default_schedule(kdef), host)
    check_against_reference(kdef, module, host)
    names = kdef.signature.names
    for out in [a.name for a in kdef.signature.outputs]:
        delta = 3 if kdef.signature.args[names.index(out)].dtype == "int32" else 0.5
        with pytest.raises(ReferenceMismatch, match=spec.uri):
            check_against_reference(kdef, _Broken(module, names.index(out), delta), host)
