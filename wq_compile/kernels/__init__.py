"""TensorIR kernel factories: :class:`~wq_compile.core.spec.KernelSpec` in, ``tvm.tirx.PrimFunc`` out (pure, no target).

The function's ``global_symbol`` is ``spec.uri``. Token counts are symbolic: one module serves every length; token
capacities ``N`` must be whole multiples of ``spec.chunk`` and tokens ``t >= lens[b]`` are masked.

Argument order (``*`` = symbolic; per = 32 // bits codes per int32 word; Dv = D / v_group):

- ``decode``, bits (b,), b in 2/4/8: ``q [B,Hq,D] dtype, k_codes [B,Hkv,G,D,W] i32 (token-packed per key group,
  ``W = quant.key_words(b, k_group)``), k_scale [B,Hkv,G,D] f16,
  k_zero [B,Hkv,G,D] f16, v_codes [B,Hkv,N,D/per] i32, v_scale [B,Hkv,N,Dv] f16, v_zero [B,Hkv,N,Dv] f16,
  lens [B] i32, sm_scale f32, o [B,Hq,D] f32, lse [B,Hq] f32`` (G * k_group >= N; token t uses key group t // k_group).
- ``decode``, bits (16,): ``q, k [B,Hkv,N,D] dtype, v [B,Hkv,N,D] dtype, lens, sm_scale, o, lse``.
  ``o`` is the normalized partial output, ``lse`` the natural-log log-sum-exp of the scaled scores;
  an empty sample gives ``o = 0`` and ``lse = -inf`` exactly.
- ``merge``: ``o_parts [P,B,Hq,D] f32, lse_parts [P,B,Hq] f32, out [B,Hq,D] dtype``.
- ``fused``, bits e.g. (8, 4, 2, 16): ``q``, then per quantized width in spec.bits order its 7 arguments
  ``k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lens`` (own N_b, G_b), then the dense ``k, v, lens``
  (own N_16), then ``sm_scale``, then ``out [B,Hq,D] dtype`` (final normalized attention).
- ``multi``, bits as ``fused`` (the dense piece last, required): ``q [B,S,Hq,D] dtype`` (``S`` new tokens, the last
  ``S`` of each sample's dense piece), the fused kernel's pieces and ``sm_scale``, then ``out [B,S,Hq,D] dtype``
  (token-major, as transformers lays them out); causal among the ``S`` tokens (:mod:`.multi_token_cpu`, llvm).
  Its split-KV form (``("split", 1)``, :mod:`.multi_token_split`, CUDA): outputs ``o_parts [P,B,S,Hq,D] f32,
  lse_parts [P,B,S,Hq] f32`` instead of ``out``, merged by the ``merge`` kernel read as ``B * S`` samples.
- ``quantize``, bits (b,): ``k [B,Hkv,n,D] dtype, v [B,Hkv,n,D] dtype`` -> ``k_codes [B,Hkv,n/k_group,D,W],
  k_scale [B,Hkv,n/k_group,D],
  k_zero, v_codes, v_scale [B,Hkv,n,Dv], v_zero`` (n a multiple of k_group).

:func:`signature` describes every argument (:class:`wq_compile.kernels.signature.KernelSignature`, the same class the build
path and the runtime use: outputs marked, size rules included); ``signature(spec).bind(*tensors)`` validates torch
tensors and returns the symbolic sizes, raising a ``KernelArgumentError`` that names the argument.

Part rules: a factory is handed its spec (and target kind); it never reads the host, a tuning log or the module
cache. May import: ``core`` only (``schedules``, one layer up, imports kernels, never the other way).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .cpu_isa import CpuIsa
from .signature import ArgDesc, KernelSignature
from ..core.spec import KernelSpec
from .signatures import MULTI_TUNING_STEPS, TUNING_SM_COUNT, choose_splits, is_split, piece_fields, pieces, signature

if TYPE_CHECKING:
    import tvm
    from tvm import tirx

#: Submodules that import TVM: loaded on first use (``kernels.attention``, ...), so that describing a kernel
#: (:func:`signature`) and the module-cache key (:func:`source_digest`) never import TVM (a warm load does neither).
_TVM_SUBMODULES = ("attention", "attention_cpu", "common", "granular_cpu", "merge", "multi_token_cpu", "multi_token_split",
                   "quantize", "split_decode", "token_granular")

__all__ = [
    "ArgDesc", "CpuIsa", "KernelSignature", "NEG_BIG", "default_scalars", "example_sizes", "make_kernel", "piece_fields",
    "signature", "source_digest", "specialize", "static_workload", "tuning_module",
]


def _factory(spec: KernelSpec) -> Any:
    """The TIR factory of ``spec`` (its argument description is :func:`signature`, shared with the runtime)."""
    from . import attention, merge, quantize, split_decode

    if spec.kind in ("decode", "fused"):
        return split_decode.build_split_attention if is_split(spec) else attention.build_attention
    factories = {"merge": merge.build_merge, "quantize": quantize.build_quantize}
    try:
        return factories[spec.kind]
    except KeyError:
        raise ValueError(f"kind: no kernel factory for {spec.kind!r}") from None


def __getattr__(name: str) -> Any:
    if name in _TVM_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "NEG_BIG":
        from .common import NEG_BIG

        return NEG_BIG
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_kernel(spec: KernelSpec, target_kind: str | None = None, cpu: CpuIsa | None = None) -> tirx.PrimFunc:
    """The TIR function of ``spec`` (unscheduled; schedule it with ``wq_compile.schedules.<target_kind>``).

    ``target_kind="llvm"`` gives the CPU fused kernel (:mod:`.attention_cpu`: plain TIR with its SIMD structure
    explicit, same signature) for ``kind="fused"``, written for the vector unit ``cpu`` (lanes, register tiles,
    int8 dot-product flavour; the compiler derives it from the target, None: AVX-512); every other case is the
    block-style kernel (CUDA, and the per-bucket decode kernels on llvm), or the split-KV kernel
    (:mod:`.split_decode`) for a split spec on any target. ``None`` keeps the block-style kernel.
    ``kind="multi"`` (several new query tokens): the CPU form (:mod:`.multi_token_cpu`, built for ``"llvm"`` and
    ``None``), or its split-KV form for any target (``split_spec`` of it, :mod:`.multi_token_split`: the CUDA one).
    Split kernels with two staging buffers mark their staging copies as ``cp.async`` groups for ``"cuda"`` only
    (the markers have no llvm lowering; without them the same double-buffered copies are plain loads).
    """
    async_copy = target_kind == "cuda"
    if spec.kind == "multi" and is_split(spec):  # the split-KV form: CUDA, and the same PrimFunc on llvm
        from . import multi_token_split

        return multi_token_split.build_multi_split(spec, async_copy)
    if spec.kind == "multi":
        if target_kind not in (None, "llvm"):
            raise ValueError(f"target_kind: this multi-token kernel is the CPU (llvm) form only, got {target_kind!r}; "
                             "other targets run its split-KV form (split_spec)")
        from . import multi_token_cpu

        return multi_token_cpu.build_multi_cpu(spec, cpu)
    if target_kind == "llvm" and spec.kind == "fused" and not is_split(spec):
        from . import attention_cpu

        return attention_cpu.build_fused_cpu(spec, cpu) if cpu is not None else attention_cpu.build_fused_cpu(spec)
    if spec.kind in ("decode", "fused") and is_split(spec):
        from . import split_decode

        return split_decode.build_split_attention(spec, async_copy)
    return _factory(spec)(spec)


def default_scalars(spec: KernelSpec) -> dict[str, float]:
    """Scalar parameters a kernel is tuned and timed with (folded into the static workload)."""
    return {"sm_scale": spec.head_dim**-0.5} if spec.kind in ("decode", "fused", "multi") else {}


def specialize(func: tirx.PrimFunc, sig: KernelSignature, sizes: Mapping[str, int],
               scalars: Mapping[str, float]) -> tirx.PrimFunc:
    """``func`` with every symbolic buffer fixed at ``sizes`` and every scalar parameter folded to ``scalars``.

    Buffers that are already static are left alone, so the workload (and its structural hash, which is how a tuning
    log finds its records) is the same as when the committed logs were tuned.
    """
    from tvm import tirx

    missing = sorted(set(sig.symbols) - set(sizes))
    if missing:
        raise ValueError(f"sizes: no value for symbols {missing} of {sig.name}")
    mapping = {}
    for param, arg in zip(func.params, sig.args):
        if arg.is_scalar:
            if arg.name not in scalars:
                raise ValueError(f"scalars: no value for scalar parameter {arg.name!r} of {sig.name}")
            mapping[param] = tirx.const(scalars[arg.name], arg.dtype)
        elif any(not isinstance(d, int) for d in arg.shape or ()):
            mapping[param] = tirx.decl_buffer(arg.shape_at(sizes), arg.dtype, name=arg.name)
    return func.specialize(mapping) if mapping else func


def static_workload(spec: KernelSpec, sizes: Mapping[str, int],
                    scalars: Mapping[str, float] | None = None, target_kind: str | None = None) -> tirx.PrimFunc:
    """``make_kernel(spec)`` with every symbolic size (and scalar parameter) fixed: the tuning workload.

    MetaSchedule measures only static shapes (``ArgInfo`` rejects symbolic ones). The design spaces never touch the
    dynamic chunk loop, so a trace tuned on this function replays on the symbolic ``make_kernel(spec)``.
    ``sizes`` maps the symbols of :func:`signature` (``B``, ``N``, ``G``, ``N4``, ...) to ints; scalars default to
    :func:`default_scalars` (``sm_scale = head_dim ** -0.5``).
    """
    return specialize(make_kernel(spec, target_kind), signature(spec), sizes,
                      {**default_scalars(spec), **(scalars or {})})


def tuning_module(func: tirx.PrimFunc, sig: KernelSignature, sizes: Mapping[str, int],
                  scalars: Mapping[str, float]) -> tvm.IRModule:
    """The IRModule MetaSchedule tunes and a tuning log is keyed on: the specialized function named ``main``."""
    import tvm

    return tvm.IRModule({"main": specialize(func, sig, sizes, scalars).with_attr("global_symbol", "main")})


def source_digest() -> str:
    """Digest of the kernel factories' source (this package, the spec and the signature module): part of every
    module-cache key, so an edited factory never reuses a module built from the old one."""
    root = Path(__file__).resolve().parent
    files = sorted(root.glob("*.py")) + [root.parent / "core" / "spec.py"]  # signature.py is in this package
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def example_sizes(spec: KernelSpec, n_tokens: int, batch: int = 1) -> dict[str, int]:
    """Symbol values of a representative workload with ``n_tokens`` per piece (tuning / benchmarks).

    Token capacities are rounded up to whole chunks (attention) or key groups (quantize); every key group count
    covers its capacity; merge uses one part per width in ``spec.bits`` (at least 2) unless fixed by ``spec.extra``.
    """
    sizes = {"B": batch}
    if spec.kind == "multi":  # MULTI_TUNING_STEPS new tokens, the last of a dense piece of one chunk
        sizes["S"] = min(MULTI_TUNING_STEPS, spec.chunk)
    if spec.kind in ("decode", "fused", "multi"):
        n = max(spec.chunk, -(-n_tokens // spec.chunk) * spec.chunk)
        for p in pieces(spec):
            sizes[p.n_sym] = n if p.quantized else spec.chunk  # the dense piece is the small residual
            if p.quantized:
                sizes[p.g_sym] = -(-n // spec.k_group)
        if spec.kind == "decode" and spec.bits == (16,):
            sizes["N"] = n
        if is_split(spec):  # the split count a GPU of TUNING_SM_COUNT SMs gets at these lengths (all pieces)
            total = sum(sizes[p.n_sym] for p in pieces(spec))
            sizes["P"] = choose_splits(TUNING_SM_COUNT, total, batch, spec.num_kv_heads, spec.chunk)
    elif spec.kind == "merge":
        if "p" not in dict(spec.extra):
            sizes["P"] = max(2, len(spec.bits))
    elif spec.kind == "quantize":
        n = max(spec.k_group, -(-n_tokens // spec.k_group) * spec.k_group)
        sizes.update(n=n, G=n // spec.k_group)
    return sizes
