"""The shipped knob records cover the decode kernels the runtime builds by default. In every shipped CPU device
folder (one per ISA class) every preset's fused and multi-token kernels of the default CPU decoder (``kernel_specs``
with the default kinds and scale/zero bits) have a measured record: a shape left out runs untuned on that class (as
every shape but 0.5B did on AVX2, and the Qwen shapes' follow-up questions on AVX-512, before this test). The quantize
kernels of the default fit are deliberately not shipped (README, "The quantize kernels of the default fit are not
shipped tuned"): their MetaSchedule logs are 3.4-3.6 MB each for a 1.00-1.21x gain."""

from __future__ import annotations

from pathlib import Path

import pytest

from wq_compile.compiler import tuning_log
from wq_compile.core.models import PRESETS
from wq_compile.kernels.catalog import DEFAULT_KERNEL_KINDS, kernel_specs
from wq_compile.kernels.knobs import record_uri

SHIPPED = Path(__file__).resolve().parents[2] / "tuning_logs"
FOLDERS = sorted(p for p in SHIPPED.iterdir() if p.is_dir() and p.name.startswith("cpu-"))
#: Kernel kinds tuned by knob sweeps: their records (meta.json and samples, a few KB) are shipped for every shape.
KNOB_KINDS = ("fused", "multi")


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_shipped_knob_records_cover_the_decode_kernels_of_every_preset(folder: Path) -> None:
    specs = {name: [s for s in kernel_specs(name, kinds=DEFAULT_KERNEL_KINDS) if s.kind in KNOB_KINDS]
             for name in PRESETS}
    assert all(len({s.kind for s in ss}) == len(KNOB_KINDS) for ss in specs.values()), specs
    # a record is a folder with measured samples, not an interrupted sweep's prepared meta.json alone
    missing = {name: [record_uri(s) for s in ss if not (folder / record_uri(s) / tuning_log.KNOB_FILE).is_file()]
               for name, ss in specs.items()}
    assert not any(missing.values()), f"{folder.name}: knob records missing: {({k: v for k, v in missing.items() if v})}"
