"""Timing of compiled kernels: locally (CPU, or a GPU on this machine) or on a remote device through TVM RPC.

Never a fake time: a target that cannot be measured here raises :class:`MeasurementUnavailableError`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .device import Device, has_local_gpu
from ..kernels.signature import KernelSignature
from ..core.spec import KernelSpec


class MeasurementUnavailableError(RuntimeError):
    """Latency cannot be measured for this target here (e.g. CUDA without a GPU and without RPC)."""


@dataclass(frozen=True)
class RPCSettings:
    """A TVM RPC tracker and the device key that serves the target's device (``--rpc HOST:PORT --rpc-key KEY``)."""

    host: str
    port: int
    key: str
    session_timeout_sec: int = 60

    @classmethod
    def parse(cls, address: str, key: str) -> "RPCSettings":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"rpc: expected HOST:PORT, got {address!r}")
        if not key:
            raise ValueError("rpc-key: a device key is required with --rpc")
        return cls(host, int(port), key)

    def config(self) -> Any:
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.RPCConfig(
            tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
            session_timeout_sec=self.session_timeout_sec,
        )


def time_function(fn: Callable[[], Any], *, sync: Callable[[], None] | None = None, repeat: int = 7,
                  min_sample_s: float = 0.02) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` samples, each long enough to time (``min_sample_s``)."""
    sync = sync or (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def example_args(
    sig: KernelSignature,
    env: Mapping[str, int],
    device: torch.device | str = "cpu",
    scalars: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[Any]:
    """Arguments with plausible contents (random floats, random codes, lengths = their axis) for timing."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    args: list[Any] = []
    for a in sig.args:
        if a.is_scalar:
            args.append((scalars or {}).get(a.name, 0.125 if a.dtype.startswith("float") else 1))
            continue
        shape = a.shape_at(env)
        dt = a.torch_dtype
        if dt.is_floating_point:
            t = torch.rand(shape, generator=gen, dtype=torch.float32).to(dt)
            if a.name.endswith("scale"):
                t = t * 0.1
        elif a.name.endswith("lens"):
            # valid lengths: the token capacity of this piece (the chunk-aligned symbol of the arguments with the
            # same prefix: a fused kernel's dense piece is smaller than its buckets; more would read out of bounds)
            prefix = a.name[: -len("lens")]
            own = {s for b in sig.args if b is not a and b.name.startswith(prefix) for s in (b.shape or ())}
            caps = ([env[s] for s, _ in sig.multiple_of if s in env and s in own]
                    or [env[s] for s, _ in sig.multiple_of if s in env] or list(env.values()) or [1])
            fill = max(caps)
            t = torch.full(shape, int(fill), dtype=dt)
        else:
            t = torch.randint(0, 2**30, shape, generator=gen, dtype=torch.int64).to(dt)
        args.append(t.to(device))
    return args


def measure_local(module: Any, spec: KernelSpec, sig: KernelSignature, sizes: Mapping[str, int],
                  device: Device) -> float:
    dev = "cpu" if device.kind == "llvm" else "cuda"
    args = example_args(sig, sizes, device=dev)
    sig.bind(*args, device_type=dev)
    f = module.get_function(spec.uri)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    return time_function(lambda: f(*args), sync=sync)


def measure_rpc(module: Any, spec: KernelSpec, sig: KernelSignature, sizes: Mapping[str, int], device: Device,
                rpc: RPCSettings, workdir: Path) -> float:
    """Upload the module to the tracker's device and time it there (TVM's time_evaluator, median of runs)."""
    import numpy as np
    import tvm
    from tvm import rpc as tvm_rpc

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{spec.uri}.rpc.so"
    module.export_library(str(path))
    tracker = tvm_rpc.connect_tracker(rpc.host, rpc.port)
    sess = tracker.request(rpc.key, priority=1, session_timeout=rpc.session_timeout_sec)
    sess.upload(str(path))
    rmod = sess.load_module(path.name)
    dev = sess.device("cpu" if device.kind == "llvm" else device.kind, 0)  # a device name, not a target kind
    args = [tvm.runtime.tensor(v.numpy(), dev) if hasattr(v, "numpy") else v for v in example_args(sig, sizes)]
    evaluator = rmod.time_evaluator(spec.uri, dev, number=10, repeat=7, min_repeat_ms=20)
    return float(np.median(evaluator(*args).results))


def can_measure(device: Device, rpc: RPCSettings | None) -> bool:
    return rpc is not None or device.kind == "llvm" or (device.kind == "cuda" and has_local_gpu())


def require_measurable(device: Device, rpc: RPCSettings | None) -> None:
    if not can_measure(device, rpc):
        raise MeasurementUnavailableError(
            f"target {device.tag}: no {device.kind} device on this machine, so nothing can be measured here "
            "(MetaSchedule would record failed runs of 1e10 s). Tune on the GPU machine, pass "
            "--rpc HOST:PORT --rpc-key KEY to measure on a remote device through a TVM RPC tracker, "
            "or use --build-only to compile (from existing logs or the default schedule) without measuring."
        )
