"""Structure knobs of plain-TIR kernels (the CPU fused decode kernel and the multi-token kernel): which specs have
them, the spec with and without them, and how a record's token splits scale to another core count. Which knobs the
runtime builds with (a knob record of this or a compatible machine, else defaults) is the compiler's lookup:
:mod:`wq_compile.compiler.knob_lookup`.

Knobs are factory parameters stored in ``spec.extra`` (so they are part of the URI); the record of a sweep lives
under the URI *without* knobs (``tuning_logs/<tag>/<base uri>/``, see :mod:`wq_compile.compiler.tuning_log`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

from ..core.spec import KernelSpec

if TYPE_CHECKING:  # the factory imports TVM: resolving knobs on a warm load must not (wq_compile.compiler.light_load)
    from .attention_cpu import CpuKnobs
    from .multi_token_cpu import MultiKnobs

#: ``spec.extra`` keys of :class:`CpuKnobs` (token splits, P @ V channel tile, query heads per QK pass, AVX-512
#: table unpack of 4-bit codes), and ``rows`` (query rows per work item) of the multi-token kernel's
#: :class:`~wq_compile.kernels.multi_token_cpu.MultiKnobs`.
KNOB_KEYS: tuple[str, ...] = ("splits", "pvc", "qkh", "lut", "rows")
#: Knobs only some kinds take.
_KIND_KNOBS: dict[str, str] = {"rows": "multi"}
#: Most token splits per KV head the sweep and the core scaling use (each split adds a merge and a workspace row).
MAX_SPLITS = 64


def has_knobs(spec: KernelSpec, target_kind: str) -> bool:
    """True for kernels built from plain TIR with knobs in ``spec.extra`` (the llvm fused and multi kernels; not
    their split-KV forms, block-style TIR scheduled like the CUDA ones)."""
    return target_kind == "llvm" and spec.kind in ("fused", "multi") and dict(spec.extra).get("split", 0) != 1


def knobs_of(spec: KernelSpec) -> dict[str, int]:
    """The knob entries of ``spec.extra`` (empty: the factory's defaults)."""
    return {k: int(v) for k, v in spec.extra if k in KNOB_KEYS}


#: ``spec.extra`` keys of precision and storage modes: part of the kernel's URI, not of its knob record's (the
#: structure that wins for the exact-query kernel is the one the int8-query kernel is built with, and the one the
#: kernel reading 8-bit scale/zero is: it adds a few loads per key group, not a loop).
MODE_KEYS: tuple[str, ...] = ("dot8", "meta8")


def record_uri(spec: KernelSpec) -> str:
    """The URI naming ``spec``'s knob record folder: without knobs and precision modes."""
    return replace(spec, extra=tuple((k, v) for k, v in spec.extra if k not in KNOB_KEYS + MODE_KEYS)).uri


def base_spec(spec: KernelSpec) -> KernelSpec:
    """``spec`` without knobs: its URI names the knob record's folder."""
    return replace(spec, extra=tuple((k, v) for k, v in spec.extra if k not in KNOB_KEYS))


def with_knobs(spec: KernelSpec, knobs: Mapping[str, int]) -> KernelSpec:
    """``spec`` with exactly ``knobs`` (keys checked; canonical order so equal knobs give one URI)."""
    bad = sorted(set(knobs) - set(KNOB_KEYS))
    if bad:
        raise ValueError(f"knobs: unknown keys {bad}; expected some of {list(KNOB_KEYS)}")
    for k, v in knobs.items():
        if k in _KIND_KNOBS and spec.kind != _KIND_KNOBS[k]:
            raise ValueError(f"knobs: {k} is a knob of {_KIND_KNOBS[k]} kernels, not of {spec.kind}")
        lo = 0 if k == "lut" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (k == "lut" and v > 1):
            raise ValueError(f"knobs: {k} must be {'0 or 1' if k == 'lut' else 'a positive int'}, got {v!r}")
    base = base_spec(spec)
    return replace(base, extra=base.extra + tuple((k, int(knobs[k])) for k in KNOB_KEYS if k in knobs))


def effective(spec: KernelSpec) -> CpuKnobs | MultiKnobs:
    """The knobs the factory builds ``spec`` with (defaults filled in)."""
    if spec.kind == "multi":
        from .multi_token_cpu import MultiKnobs

        return MultiKnobs.of(spec)
    from .attention_cpu import CpuKnobs

    return CpuKnobs.of(spec)


def scale_splits(splits: int, from_cores: int, to_cores: int) -> int:
    """Token splits for ``to_cores`` from a record tuned on ``from_cores``: the same work items per core."""
    if from_cores < 1 or to_cores < 1:
        raise ValueError(f"cores: expected positive core counts, got {from_cores} -> {to_cores}")
    return max(1, min(MAX_SPLITS, round(splits * to_cores / from_cores)))


