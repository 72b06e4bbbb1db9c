"""Which kernels a model needs: the catalogue ``wq-tune``, the offline export and the tests build from a preset."""

from __future__ import annotations

from typing import Any

from ..core.models import ModelPreset, get_preset
from ..core.spec import QUANT_BITS, KernelSpec, check_bits
from ..core.quant_fit import DEFAULT_FIT
from ..core.meta8 import DEFAULT_META_BITS, bucket_meta_bits, widest_meta8
from .signatures import META8_KEY, SPLIT_CHUNK, merge_spec, quantize_spec, split_spec

#: Kernel kinds in the order ``kernel_specs`` lists them; ``dense`` is the decode kernel over an fp residual;
#: ``multi`` the fused kernel of several new query tokens (CPU), ``multi-split`` its split-KV form and merge (CUDA).
KERNEL_KINDS: tuple[str, ...] = ("decode", "dense", "merge", "fused", "split", "quantize", "multi", "multi-split")
#: What the runtime uses by default on CPUs (one fused launch per layer and decode step, one multi-token launch per
#: layer and several-token step, plus the quantizer of the residual).
DEFAULT_KERNEL_KINDS: tuple[str, ...] = ("fused", "multi", "quantize")
#: What the runtime uses on CUDA: the split-KV fused kernel and its merge (``FusedDecoder(split=None)``), the
#: split-KV multi-token kernel (``StepDecoder(split=None)``; the same merge), quantize.
CUDA_KERNEL_KINDS: tuple[str, ...] = ("split", "multi-split", "quantize")


def default_kernel_kinds(target_kind: str) -> tuple[str, ...]:
    """The kinds the decoder of a ``target_kind`` ("llvm", "cuda", ...) target runs, so that ``wq-tune`` without
    ``--kernels`` tunes exactly those (tuning "fused" for a GPU would leave its split kernel untuned)."""
    return CUDA_KERNEL_KINDS if target_kind == "cuda" else DEFAULT_KERNEL_KINDS


def kernel_specs(
    preset: str | ModelPreset | Any,
    bits: tuple[int, ...] = (2, 4, 8),
    dtype: str = "f32",
    k_group: int = 28,
    v_group: int = 64,
    chunk: int = 64,
    kinds: tuple[str, ...] = KERNEL_KINDS,
    fit: str = DEFAULT_FIT,
    meta_bits: int = DEFAULT_META_BITS,
) -> list[KernelSpec]:
    """The kernels one model needs, for the quantized widths ``bits``.

    decode: one per-bucket kernel per width; dense: decode over the fp residual (bits ``(16,)``);
    merge: merges the partial states of every bucket and the residual; fused: every width plus the residual in
    one launch; split: the split-KV form of fused and its merge (the CUDA decode path); quantize: one per width;
    multi: the fused kernel of several new query tokens (the CPU path of several-token steps); multi-split: its
    split-KV form and merge (the CUDA path). A kernel two kinds share (the merge) is listed once. ``fit``: the
    scale/zero fit the quantize kernels compute (a config's ``fit``; one with no compiled form is refused).
    ``meta_bits``: a config's scale/zero bits (:mod:`wq_compile.core.meta8`); at 8 the CPU fused and multi-token
    kernels are their 8-bit forms and each width with 8-bit scale/zero adds its recode kernel (quantize against
    given scale/zero); the split-KV (CUDA) kernels read the fp16 expansion and do not change.
    """
    p = get_preset(preset)
    widths = tuple(sorted({check_bits(b, QUANT_BITS) for b in bits}, reverse=True))
    if not widths:
        raise ValueError("bits: expected at least one quantized width")
    unknown = [k for k in kinds if k not in KERNEL_KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown kernel kinds {unknown}; expected a subset of {KERNEL_KINDS}")
    common = dict(
        head_dim=p.head_dim,
        num_q_heads=p.num_q_heads,
        num_kv_heads=p.num_kv_heads,
        k_group=k_group,
        v_group=v_group,
        dtype=dtype,
        chunk=chunk,
    )
    meta8 = widest_meta8(widths, meta_bits)
    m8 = ((META8_KEY, meta8),) if meta8 else ()
    specs: list[KernelSpec] = []
    for kind in kinds:
        if kind == "decode":
            specs += [KernelSpec("decode", (b,), **common) for b in widths]
        elif kind == "dense":
            specs.append(KernelSpec("decode", (16,), **common))
        elif kind == "merge":
            specs.append(KernelSpec("merge", widths + (16,), **common))
        elif kind == "fused":
            specs.append(KernelSpec("fused", widths + (16,), extra=m8, **common))
        elif kind == "split":  # what the CUDA decoder runs: split-KV fused kernel (its own chunk) + one merge
            fused = split_spec(KernelSpec("fused", widths + (16,), **{**common, "chunk": SPLIT_CHUNK}))
            specs += [fused, merge_spec(fused)]
        elif kind == "quantize":
            specs += [quantize_spec(b, fit, **common) for b in widths]
            specs += [quantize_spec(b, given=True, **common) for b in widths if bucket_meta_bits(b, meta_bits) == 8]
        elif kind == "multi":
            specs.append(KernelSpec("multi", widths + (16,), extra=m8, **common))
        elif kind == "multi-split":  # what the CUDA step decoder runs: the split-KV multi-token kernel + its merge
            multi = split_spec(KernelSpec("multi", widths + (16,), **{**common, "chunk": SPLIT_CHUNK}))
            specs += [multi, merge_spec(multi)]
    return list(dict.fromkeys(specs))
