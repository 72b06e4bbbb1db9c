"""Table of bad inputs a user can produce (issue 10): config, cache, the kernels' Python entry points and the three
CLIs. Each case asserts the error type and that the message names the argument (and the fix where there is one)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from wq_compile.runtime.backend import CompiledQuantizer
from wq_compile.tools.cli import main_bench, main_eval, main_tune
from wq_compile.core.config import WindowQuantConfig
from wq_compile.integrations.tiny import tiny_config
from wq_compile.integrations.transformers import WindowQuantCache
from wq_compile.kernels import signature
from wq_compile.core.layout import LayerCache
from wq_compile.compiler.measure import example_args
from wq_compile.core.quant import quantize_keys, quantize_values
from wq_compile.runtime.library import shared_library
from wq_compile.core.allocation import allocate_bits
from wq_compile.kernels.signature import KernelArgumentError
from wq_compile.core.spec import KernelSpec, QuantSpec

NAN, INF = math.nan, math.inf
FUSED = KernelSpec("fused", (8, 4, 2, 16), head_dim=64, num_q_heads=4, num_kv_heads=2)


def _cfg(**kw: Any) -> Callable[[], Any]:
    return lambda: WindowQuantConfig(**kw)


def _cache(text_shapes: dict | None = None, **kw: Any) -> Callable[[], Any]:
    return lambda: WindowQuantCache(tiny_config(text_shapes=text_shapes), WindowQuantConfig(backend="reference",
                                                                                             **kw))


def _quantizer(k: torch.Tensor, v: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        q = CompiledQuantizer(shared_library("llvm"), 4, 2, 64, torch.float32, 64)
        return q(QuantSpec(4, 28, 64), k, v)
    return run


def _fused_args(index: int, bad: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
    """The fused kernel's argument check (what ``CompiledKernel.run`` runs first) with argument ``index`` broken."""
    def run() -> Any:
        sig = signature(FUSED)
        args = list(example_args(sig, sig.default_sizes(64)))
        args[index] = bad(args[index])
        return sig.bind(*args)
    return run


def _poison(value: float, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = torch.randn(2, 28, 64), torch.randn(2, 28, 64)
    (k if where == "k" else v)[1, 3, 5] = value
    return k, v


def _alloc(scores: torch.Tensor, errors: torch.Tensor) -> Callable[[], Any]:
    return lambda: allocate_bits(scores, errors, torch.full((3,), 56), 4.0)


def _select(idx: list[int]) -> Callable[[], Any]:
    return lambda: LayerCache.empty(2, 2, 64, torch.float32).select_samples(torch.tensor(idx))


RAISES: list[tuple[str, Callable[[], Any], type[BaseException], tuple[str, ...]]] = [
    # config: every field, at construction
    ("avg_bits nan", _cfg(avg_bits=NAN), ValueError, ("avg_bits", "finite positive")),
    ("avg_bits inf", _cfg(avg_bits=INF), ValueError, ("avg_bits", "e.g. 3.0")),
    ("avg_bits 0", _cfg(avg_bits=0), ValueError, ("avg_bits",)),
    ("avg_bits -2", _cfg(avg_bits=-2.0), ValueError, ("avg_bits",)),
    ("avg_bits str", _cfg(avg_bits="3"), ValueError, ("avg_bits",)),
    ("avg_bits bool", _cfg(avg_bits=True), ValueError, ("avg_bits",)),
    ("widths empty", _cfg(widths=()), ValueError, ("widths", "non-empty")),
    ("widths 3", _cfg(widths=(3,)), ValueError, ("widths", "(16, 8, 4, 2, 1)")),
    ("widths 6", _cfg(widths=(16, 8, 4, 2, 1, 0)), ValueError, ("widths", "at most five")),
    ("k_group 0", _cfg(k_group=0), ValueError, ("k_group", "e.g. 28")),
    ("k_group -28", _cfg(k_group=-28), ValueError, ("k_group",)),
    ("k_group float", _cfg(k_group=28.0), ValueError, ("k_group",)),
    ("v_group 0", _cfg(v_group=0), ValueError, ("v_group", "None")),
    ("chunk 0", _cfg(chunk=0), ValueError, ("chunk", "e.g. 64")),
    ("chunk -64", _cfg(chunk=-64), ValueError, ("chunk",)),
    ("residual -1", _cfg(residual=-1), ValueError, ("residual", ">= 0")),
    ("residual -100", _cfg(residual=-100), ValueError, ("residual",)),
    ("residual float", _cfg(residual=1.5), ValueError, ("residual",)),
    ("flush_bits 16", _cfg(flush_bits=16), ValueError, ("flush_bits", "(8, 4, 2, 1)")),
    ("flush_bits 3", _cfg(flush_bits=3), ValueError, ("flush_bits",)),
    ("scorer", _cfg(scorer="cosine"), ValueError, ("scorer", "'attention' or 'embedding'")),
    ("backend", _cfg(backend="cuda"), ValueError, ("backend", "'auto', 'tvm' or 'reference'")),
    ("window name", _cfg(window="scene"), ValueError, ("window", "'frame' or a positive")),
    ("window 0", _cfg(window=0), ValueError, ("window",)),
    ("window not key groups", _cfg(window=30), ValueError, ("window", "k_group")),
    # the cache: the config against the model's shapes
    ("cache v_group 48 vs head_dim 64", _cache(v_group=48), ValueError, ("v_group", "head_dim 64", "divisor")),
    ("cache v_group 64 vs head_dim 32", _cache(dict(hidden_size=128), v_group=64), ValueError,
     ("v_group", "head_dim 32")),
    ("cache config type", lambda: WindowQuantCache(tiny_config(), {"avg_bits": 3}), TypeError, ("wq_config",)),
    ("model kv heads", lambda: WindowQuantConfig().for_model(4, 3, 64), ValueError, ("num_kv_heads",)),
    ("model head_dim 24", lambda: WindowQuantConfig().for_model(4, 2, 24), ValueError, ("head_dim", "24")),
    ("model head_dim 0", lambda: WindowQuantConfig().for_model(4, 2, 0), ValueError, ("head_dim",)),
    # quantizers (reference and compiled) refuse what no code represents
    ("ref k nan", lambda: quantize_keys(_poison(NAN, "k")[0], QuantSpec(4)), ValueError, ("k:", "NaN/inf", "dense")),
    ("ref v inf", lambda: quantize_values(_poison(INF, "v")[1], QuantSpec(4)), ValueError, ("v:", "NaN/inf")),
    ("ref v 7e4", lambda: quantize_values(_poison(7e4, "v")[1], QuantSpec(2)), ValueError, ("v:", "65504")),
    ("compiled k nan", _quantizer(*_poison(NAN, "k")), ValueError, ("k:", "NaN/inf")),
    ("compiled v 1e5", _quantizer(*_poison(1e5, "v")), ValueError, ("v:", "65504")),
    ("compiled k -inf", _quantizer(*_poison(-INF, "k")), ValueError, ("k:",)),
    # the search never sees NaN
    ("scores nan", _alloc(torch.tensor([1.0, NAN, 0.5]), torch.rand(3, 4)), ValueError, ("scores", "finite")),
    ("errors nan", _alloc(torch.rand(3), torch.tensor([[0.0, 1, 2, 3]] * 2 + [[0, NAN, 2, 3]])), ValueError,
     ("errors", "dense")),
    ("avg_bits infeasible", lambda: allocate_bits(torch.rand(3), torch.rand(3, 4), torch.full((3,), 56), 1.0),
     ValueError, ("avg_bits", "raise avg_bits")),
    # layout
    ("select out of range", _select([0, 2]), ValueError, ("indices", "2 cached samples")),
    ("select 2-d", lambda: LayerCache.empty(2, 2, 64, torch.float32).select_samples(torch.zeros(2, 1)), ValueError,
     ("indices",)),
    ("layer flush_bits", lambda: LayerCache.empty(1, 2, 64, torch.float32, flush_bits=3), ValueError,
     ("flush_bits",)),
    # the fused kernel's argument check (runtime entry point)
    ("fused q dtype", _fused_args(0, lambda a: a.double()), KernelArgumentError, ("argument 'q'", "dtype")),
    ("fused q dims", _fused_args(0, lambda a: a[0]), KernelArgumentError, ("argument 'q'", "dims")),
    ("fused q strides", _fused_args(0, lambda a: a.transpose(1, 2).contiguous().transpose(1, 2)),
     KernelArgumentError, ("argument 'q'", "contiguous")),
    ("fused sm_scale tensor", _fused_args(25, lambda a: torch.tensor(a)), KernelArgumentError,
     ("argument 'sm_scale'", "Python number")),
    ("fused codes dtype", _fused_args(1, lambda a: a.long()), KernelArgumentError, ("argument 'q8_k_codes'",)),
    ("fused lens shape", _fused_args(24, lambda a: a[:0]), KernelArgumentError, ("dense_lens",)),
    ("fused numpy", _fused_args(0, lambda a: a.numpy()), KernelArgumentError, ("argument 'q'", "torch.Tensor")),
]


@pytest.mark.parametrize("name, call, exc, needles", RAISES, ids=[c[0] for c in RAISES])
def test_bad_input_raises_naming_the_argument(name: str, call: Callable[[], Any], exc: type[BaseException],
                                              needles: tuple[str, ...]) -> None:
    with pytest.raises(exc) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), f"{name}: {needle!r} not in {info.value}"


CLI: list[tuple[str, Callable[[list[str]], int], list[str], tuple[str, ...]]] = [
    ("tune tokens 0", main_tune, ["--tokens", "0"], ("--tokens", "positive integer")),
    ("tune tokens -5", main_tune, ["--tokens", "-5"], ("--tokens", "positive integer")),
    ("tune trials 0", main_tune, ["--trials", "0"], ("--trials", "positive integer")),
    ("tune trials -1", main_tune, ["--trials", "-1"], ("--trials",)),
    ("tune trials x", main_tune, ["--trials", "x"], ("--trials",)),
    ("tune kernels empty", main_tune, ["--kernels", ""], ("--kernels", "at least one kernel kind")),
    ("tune kernels bogus", main_tune, ["--kernels", "prefill"], ("--kernels", "unknown kernel kinds")),
    ("tune bits x", main_tune, ["--bits", "a"], ("--bits",)),
    ("tune model", main_tune, ["--model", "gpt"], ("--model",)),
    ("bench tokens 0", main_bench, ["--tokens", "0"], ("--tokens",)),
    ("bench repeats 0", main_bench, ["--repeats", "0"], ("--repeats",)),
    ("eval avg-bits x", main_eval, ["--avg-bits", "x"], ("--avg-bits", "numbers")),
    ("eval backend", main_eval, ["--backend", "gpu"], ("--backend",)),
]


@pytest.mark.parametrize("name, main, argv, needles", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_nonsense_naming_the_flag(name: str, main: Callable[[list[str]], int], argv: list[str],
                                              needles: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    for needle in needles:
        assert needle in err, f"{name}: {needle!r} not in {err}"


def test_wq_eval_on_a_folder_without_weights_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(tiny_config().to_json_string())
    assert main_eval(["--model", str(tmp_path), "--frames", "1", "--new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wq-eval: --model") and "loadable" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
