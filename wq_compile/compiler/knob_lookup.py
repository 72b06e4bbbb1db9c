"""The knobs the runtime builds a plain-TIR kernel with: the knob record of this device tag, else of the same ISA
class with the nearest core count (token splits rescaled), else the factory defaults; and where they came from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..core.spec import KernelSpec
from ..kernels.knobs import effective, has_knobs, knobs_of, record_uri, scale_splits, with_knobs
from .device import Device
from .tuning_log import UNTUNED, Provenance, find_knob_record


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
    if not has_knobs(spec, device.kind) or knobs_of(spec):
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
