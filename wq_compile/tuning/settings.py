"""How to tune, shared by the MetaSchedule driver, the knob sweeps and the offline export (one object instead of a
long parameter list), and the error every tuner raises when no candidate was measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..compiler.build import DEFAULT_N_TOKENS
from ..compiler.cache_files import cache_root
from ..compiler.device import Device
from ..compiler.measure import RPCSettings
from ..core.spec import KernelSpec


DEFAULT_TRIALS: dict[str, int] = {"fused": 40, "decode": 24, "merge": 8, "quantize": 8, "multi": 40}

class NoValidTrialsError(RuntimeError):
    """Tuning measured no candidate successfully (builds timed out, runs failed)."""

@dataclass(frozen=True)
class TuneSettings:
    """How to tune (one object instead of a long parameter list); ``wq-tune``'s flags map onto it."""

    trials: int | Mapping[str, int] | None = None  # valid records per kernel (or per kind); None: DEFAULT_TRIALS
    logs_dir: Path = Path("tuning_logs")
    seed: int = 0
    n_tokens: int = DEFAULT_N_TOKENS  # token capacity per piece the workload is fixed at
    rpc: RPCSettings | None = None
    builder_timeout: float = 180.0  # the default build worker imports tensor_intrin for 35-47 s (docs/TVM_NOTES.md)
    runner_timeout: float = 60.0
    num_trials_per_iter: int = 16
    population_size: int = 128
    genetic_iters: int = 3
    measure: bool = True  # time the default and the tuned schedule after tuning
    work_dir: Path | None = None  # MetaSchedule's scratch folder (default: next to the module cache)
    knob_tokens: int = 8192  # plain-TIR kernels (llvm fused): tokens per piece their knob grid is timed at
    knob_rounds: int = 7  # ... and interleaved rounds per candidate (median)

    def trials_for(self, spec: KernelSpec) -> int:
        if self.trials is None:
            return DEFAULT_TRIALS[spec.kind]
        if isinstance(self.trials, Mapping):
            return int(self.trials.get(spec.kind, DEFAULT_TRIALS[spec.kind]))
        return int(self.trials)

    def work_dir_for(self, device: Device, spec: KernelSpec) -> Path:
        """Task logs and RPC uploads: never inside the logs folder that goes into git."""
        return self.work_dir or cache_root().parent / "tune-work" / device.tag / spec.uri
