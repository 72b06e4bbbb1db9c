"""Structure knobs of plain-TIR kernels (the CPU fused decode kernel): which specs have them, the spec with and
without them, and the knobs the runtime builds with (a knob record of this or a compatible machine, else defaults).

Knobs are factory parameters stored in ``spec.extra`` (so they are part of the URI); the record of a sweep lives
under the URI *without* knobs (``tuning_logs/<tag>/<base uri>/``, see :mod:`wq_compile.compiler.tuning_log`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping

from ..compiler.device import Device
from ..core.spec import KernelSpec
from ..compiler.tuning_log import UNTUNED, Provenance, find_knob_record

if TYPE_CHECKING:  # the factory imports TVM: resolving knobs on a warm load must not (wq_compile.compiler.light_load)
    from .attention_cpu import CpuKnobs

#: ``spec.extra`` keys of :class:`CpuKnobs` (token splits, P @ V channel tile, query heads per QK pass, AVX-512
#: table unpack of 4-bit codes).
KNOB_KEYS: tuple[str, ...] = ("splits", "pvc", "qkh", "lut")
#: Most token splits per KV head the sweep and the core scaling use (each split adds a merge and a workspace row).
MAX_SPLITS = 64


def has_knobs(spec: KernelSpec, device: Device) -> bool:
    """True for kernels built from plain TIR with knobs in ``spec.extra`` (today: the llvm fused kernel)."""
    return device.kind == "llvm" and spec.kind == "fused"


def knobs_of(spec: KernelSpec) -> dict[str, int]:
    """The knob entries of ``spec.extra`` (empty: the factory's defaults)."""
    return {k: int(v) for k, v in spec.extra if k in KNOB_KEYS}


#: ``spec.extra`` keys of precision modes: part of the kernel's URI, not of its knob record's (the structure that
#: wins for the exact-query kernel is the one the int8-query kernel is built with).
MODE_KEYS: tuple[str, ...] = ("dot8",)


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
        lo = 0 if k == "lut" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (k == "lut" and v > 1):
            raise ValueError(f"knobs: {k} must be {'0 or 1' if k == 'lut' else 'a positive int'}, got {v!r}")
    base = base_spec(spec)
    return replace(base, extra=base.extra + tuple((k, int(knobs[k])) for k in KNOB_KEYS if k in knobs))


def effective(spec: KernelSpec) -> CpuKnobs:
    """The knobs the factory builds ``spec`` with (defaults filled in)."""
    from .attention_cpu import CpuKnobs

    return CpuKnobs.of(spec)


def scale_splits(splits: int, from_cores: int, to_cores: int) -> int:
    """Token splits for ``to_cores`` from a record tuned on ``from_cores``: the same work items per core."""
    if from_cores < 1 or to_cores < 1:
        raise ValueError(f"cores: expected positive core counts, got {from_cores} -> {to_cores}")
    return max(1, min(MAX_SPLITS, round(splits * to_cores / from_cores)))


@dataclass(frozen=True)
class KnobChoice:
    """The knobs the runtime builds a kernel with, where they came from, and what was adapted (for reports)."""

    knobs: Mapping[str, int]
    provenance: Provenance
    note: str = ""


def choose_knobs(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None) -> KnobChoice:
    """Knobs for ``spec`` on ``device``: the knob record of this device tag, else of the same ISA class with the
    nearest core count (``splits`` rescaled to the local cores when they differ, and the note says so), else the
    factory defaults (``untuned``)."""
    rec = find_knob_record(logs_dir, device, record_uri(spec))
    if rec is None:
        return KnobChoice({}, UNTUNED, "no knob record: default knobs")
    knobs = dict(rec.knobs)
    note = f"knobs {knobs} from {rec.source.tag}"
    here = device.num_cores or os.cpu_count() or 1
    if not rec.source.exact and "splits" in knobs and rec.num_cores != here:
        scaled = scale_splits(knobs["splits"], rec.num_cores, here)
        note += f"; splits {knobs['splits']} (tuned on {rec.num_cores} cores) scaled to {scaled} for {here} cores"
        knobs["splits"] = scaled
    return KnobChoice(knobs, rec.provenance(), note)


def resolve(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None) -> KernelSpec:
    """The spec the runtime builds: knobs from :func:`choose_knobs` when ``spec`` names none; a spec with explicit
    knobs (or without knobs to choose) is returned as it is."""
    if not has_knobs(spec, device) or knobs_of(spec):
        return spec
    knobs = choose_knobs(spec, device, logs_dir).knobs
    return with_knobs(spec, knobs) if knobs else spec


def provenance(spec: KernelSpec, device: Device, logs_dir: str | os.PathLike | None) -> tuple[Provenance, str]:
    """Where ``spec``'s knobs came from: the record's provenance when they are the knobs the record gives here
    (after core scaling), else ``untuned`` (defaults or hand-given knobs)."""
    choice = choose_knobs(spec, device, logs_dir)
    if choice.knobs and effective(with_knobs(spec, choice.knobs)) == effective(spec):
        return choice.provenance, choice.note
    return UNTUNED, choice.note if not choice.knobs else f"hand-given knobs {knobs_of(spec)} ({choice.note})"
