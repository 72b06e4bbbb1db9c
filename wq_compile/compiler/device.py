"""Targets, device tags and ISA classes: the one place that decides what "this machine" compiles for.

A :class:`Device` bundles the TVM target with the tag that names its tuning logs and module cache folder:
``cpu-<arch>-<cpu model>-<n>c`` for llvm, ``cuda-<gpu name>-<sm arch>`` for CUDA. In apache-tvm 0.27 target
strings with flags are rejected, so llvm targets are built from a dict. :func:`host_device` is the host target of
the runtime *and* of the tests (``mcpu`` from LLVM's host detection, physical cores), so both compile the same code.
A device is plain data (tag, target JSON, ISA class) plus the TVM target built on demand, so the warm load path can
read this host's device from a file instead of asking LLVM (:mod:`wq_compile.compiler.light_load`, keyed by
:func:`host_fingerprint`) and never import TVM.

:func:`isa_class` reads a target's features (not its name): logs tuned on another CPU of the same class (e.g. an AMD
znver5 log on an Intel AVX-512 Xeon) replay there as fast as local ones (docs/TVM_NOTES.md), which is what lets
:mod:`wq_compile.compiler.tuning_log` use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import metadata
from typing import Any

#: Packages whose versions make a tuning log or a compiled module valid (must match exactly).
PINNED_PACKAGES: tuple[str, ...] = ("apache-tvm", "apache-tvm-ffi")


def slug(text: str) -> str:
    """Lower-case, dash-separated, filesystem-safe form of ``text``."""
    s = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$|\bprocessor\b", " ", text.lower())
    s = re.sub(r"[^a-z0-9_.]+", "-", s).strip("-")
    return re.sub(r"-+", "-", s) or "unknown"


def versions() -> dict[str, str]:
    """Versions that tuning logs and modules are keyed on (tvm, tvm-ffi) plus torch (recorded only)."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """Read once per process: package metadata parsing costs milliseconds per call."""
    out = {}
    for pkg in (*PINNED_PACKAGES, "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


@dataclass(frozen=True)
class Device:
    """A compilation target and the tag naming its logs and modules.

    Everything a warm module-cache load reads (tag, kind, target text, ISA class, cores) is plain data, so a device
    can be made without TVM from the host-facts file of the module cache (:mod:`wq_compile.compiler.light_load`); the TVM
    target itself is then built from ``target_json`` on first use of :attr:`target` (which imports TVM). Devices
    made from a TVM target use :meth:`of`.
    """

    tag: str
    name: str
    #: Canonical text of the target (``str(Target)``, JSON), as recorded in meta.json and module keys.
    target_json: str
    #: ISA class of the target (see :func:`isa_class`).
    isa: str
    built_target: Any = field(default=None, compare=False, repr=False)  # tvm.target.Target (importing tvm: seconds)
    #: Which of :data:`CHECKED_FEATURES` the target has (llvm targets; None: not known without TVM).
    features: tuple[str, ...] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, target: Any, tag: str, name: str) -> "Device":
        return cls(tag, name, str(target), isa_class(target), target, target_features(target))

    def has_features(self, *names: str) -> bool:
        """Whether the target has every LLVM feature in ``names`` (read from :attr:`features` when they were
        recorded and cover ``names``, else from the TVM target)."""
        if self.features is not None and set(names) <= set(CHECKED_FEATURES):
            return set(names) <= set(self.features)
        if self.kind != "llvm":
            return False
        from tvm.target import codegen

        return bool(codegen.target_has_features(list(names), self.target))

    @property
    def target(self) -> Any:
        """The ``tvm.target.Target`` (built from :attr:`target_json` when this device was read from facts)."""
        if self.built_target is None:
            from tvm.target import Target

            object.__setattr__(self, "built_target", Target(self._attrs))
        return self.built_target

    @cached_property
    def _attrs(self) -> dict[str, Any]:
        return json.loads(self.target_json)

    @property
    def kind(self) -> str:
        return str(self._attrs["kind"])

    @property
    def arch(self) -> str | None:
        return str(self._attrs["arch"]) if self.kind == "cuda" else None

    @property
    def num_cores(self) -> int | None:
        value = self._attrs.get("num-cores")
        return int(value) if value is not None else None

    def facts(self) -> dict[str, Any]:
        """What :meth:`from_facts` needs to make this device again without TVM."""
        out: dict[str, Any] = {"tag": self.tag, "name": self.name, "target_json": self.target_json, "isa": self.isa}
        if self.features is not None:
            out["features"] = list(self.features)
        return out

    @classmethod
    def from_facts(cls, facts: Any) -> "Device":
        """A device from :meth:`facts` (raises ``ValueError`` when they are incomplete or not an llvm target)."""
        try:
            feats = facts.get("features")
            dev = cls(*(facts[k] for k in ("tag", "name", "target_json", "isa")),
                      features=None if feats is None else tuple(str(f) for f in feats))
            ok = all(isinstance(facts[k], str) and facts[k] for k in ("tag", "name", "target_json", "isa")) \
                and dev.kind == "llvm"
        except (TypeError, KeyError, ValueError, AttributeError):  # JSONDecodeError is a ValueError
            ok = False
        if not ok:
            raise ValueError(f"device facts: incomplete or not an llvm target: {facts!r}")
        return dev


#: LLVM features a device records (kernel variants that need them are chosen or refused without TVM): the int8
#: dot-product mode of the CPU kernel needs VNNI, VBMI and BW on 512-bit vectors, AVX-VNNI or AVX2 on 256-bit ones
#: (:func:`wq_compile.compiler.isa_variants.cpu_isa`). Part of :func:`host_fingerprint`: facts recorded with
#: another list are not found (the host is resolved with TVM again), never read as "feature absent".
CHECKED_FEATURES: tuple[str, ...] = ("avx512f", "avx512bw", "avx512vnni", "avx512vbmi", "avx2", "avxvnni")


def target_features(target: Any) -> tuple[str, ...] | None:
    """Which of :data:`CHECKED_FEATURES` an llvm target has (None for other kinds)."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        return None
    return tuple(f for f in CHECKED_FEATURES if codegen.target_has_features([f], target))


def isa_class(target: Any) -> str:
    """The class of targets whose tuned schedules replay well on each other, read from the target's features:
    ``x86_64-avx512``, ``x86_64-avx2``, ``x86_64``, ``aarch64-sve``, ``aarch64-neon``, ``cuda-<arch>`` or the kind."""
    from tvm.target import Target, codegen

    if isinstance(target, str):
        target = Target(json.loads(target)) if target.startswith("{") else Target(target)
    kind = str(target.kind.name)
    if kind == "cuda":
        return f"cuda-{target.arch}"
    if kind != "llvm":
        return kind
    features = target.features
    if getattr(features, "is_aarch64", False):
        return "aarch64-sve" if getattr(features, "has_sve", False) else "aarch64-neon"
    triple = str(dict(target.attrs.items()).get("mtriple", "") or codegen.llvm_get_system_triple())
    if not triple.startswith(("x86_64", "i686", "i386")):
        return f"llvm-{triple.split('-')[0] or 'unknown'}"
    if codegen.target_has_features(["avx512f", "avx512bw", "avx512vl"], target):
        return "x86_64-avx512"
    if codegen.target_has_features(["avx2", "fma"], target):
        return "x86_64-avx2"
    return "x86_64"


def _cpuinfo_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_fingerprint(num_cores: int | None = None) -> str:
    """What decides :func:`host_device` besides the tvm version (LLVM's host CPU detection): the machine, the CPU
    model and feature flags of ``/proc/cpuinfo`` and the core count, digested. Keys the host-facts file of the
    module cache (:mod:`wq_compile.compiler.light_load`), so facts recorded on another CPU, or under another affinity mask,
    are never used."""
    wanted = ("model name", "flags", "features", "cpu part", "cpu implementer")  # x86 and arm spellings
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                name, sep, value = line.partition(":")
                name = name.strip().lower()
                if sep and name in wanted:
                    seen.setdefault(name, value.strip())
    except OSError:
        seen["processor"] = platform.processor()
    text = json.dumps([platform.machine(), sorted(seen.items()), int(num_cores or physical_cores()),
                       list(CHECKED_FEATURES)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def physical_cores() -> int:
    """Physical cores this process may run on: psutil's count (hyper-threads not counted), capped by the CPU
    affinity mask (a container or ``taskset`` limit)."""
    n = os.cpu_count() or 1
    try:
        import psutil

        n = int(psutil.cpu_count(logical=False) or n)
    except ImportError:
        pass
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    return max(1, n)


@lru_cache(maxsize=8)
def host_device(num_cores: int | None = None) -> Device:
    """The llvm target of this machine (``mcpu`` from LLVM's host detection, physical cores) and its tag: the
    target of the runtime and of the tests alike (plain ``"llvm"`` would be generic x86-64, far slower)."""
    from tvm.target import Target, codegen

    cores = int(num_cores or physical_cores())
    mcpu = str(codegen.llvm_get_system_cpu())
    target = Target({"kind": "llvm", "num-cores": cores, "mcpu": mcpu})
    model = _cpuinfo_model()
    tag = f"cpu-{slug(platform.machine())}-{slug(model)}-{cores}c"
    return Device.of(target, tag, f"{model} ({mcpu}, {cores} cores)")


@lru_cache(maxsize=1)
def local_gpus() -> tuple[tuple[str, str], ...]:
    """``(name, compute capability)`` of the NVIDIA GPUs visible here (empty without a driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2:
            gpus.append((parts[0], parts[1]))
    return tuple(gpus)


def has_local_gpu() -> bool:
    """True when a CUDA GPU and driver are usable here (nvidia-smi lists one and torch sees it)."""
    if not local_gpus():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _cuda_device(target: Any, name: str | None) -> Device:
    arch = str(target.arch)
    label = name or arch
    return Device.of(target, f"cuda-{slug(label)}-{slug(arch)}" if name else f"cuda-{slug(arch)}", label)


#: GPUs TVM 0.27 has no tag for, mapped to the tag of a GPU with the same SM (compute capability, registers, shared
#: memory, threads): the H200 is an H100 chip with more HBM. The device keeps its own name (logs, module cache).
CUDA_TAG_ALIASES: dict[str, str] = {"nvidia/nvidia-h200": "nvidia/nvidia-h100"}


def resolve_device(target: str | dict | Any = "llvm", num_cores: int | None = None) -> Device:
    """``llvm`` | ``cuda`` (the local GPU) | a TVM tag such as ``nvidia/nvidia-h100`` | a JSON dict | a Target.

    Raises ``ValueError`` with a hint when the target cannot be built (e.g. ``cuda`` without a local GPU).
    """
    spec = target
    if isinstance(spec, Device):
        return spec
    from tvm.target import Target

    if isinstance(spec, str):
        text = spec.strip()
        if text == "llvm":
            return host_device(num_cores)
        if text == "cuda":
            gpus = local_gpus()
            if not gpus:
                raise ValueError(
                    "target: 'cuda' means the local GPU, but nvidia-smi lists none here. Measuring (tuning) needs "
                    "a GPU on this machine, or a remote one through --rpc HOST:PORT --rpc-key KEY (TVM RPC "
                    "tracker); name the GPU with a tag such as 'nvidia/nvidia-h100' (or a JSON dict with 'arch'), "
                    "which also compiles here without measuring (--build-only)"
                )
            gpu_name, cap = gpus[0]
            arch = "sm_" + cap.replace(".", "")
            arch = arch + "a" if arch in ("sm_90", "sm_100") else arch
            return _cuda_device(Target({"kind": "cuda", "arch": arch}), gpu_name)
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"target: not valid JSON ({exc}): {text!r}") from exc
        else:
            if " -" in text:
                raise ValueError(
                    f"target: strings with flags are rejected by TVM 0.27 ({text!r}); "
                    'pass a JSON dict such as {"kind": "llvm", "num-cores": 2}'
                )
            try:
                target = Target(CUDA_TAG_ALIASES.get(text, text))
            except Exception as exc:  # TVM raises several error types for unknown tags
                raise ValueError(f"target: unknown tag or kind {text!r} ({exc})") from exc
            if target.kind.name == "cuda":
                return _cuda_device(target, text.split("/")[-1])
            return _device_from_target(target)
    if isinstance(spec, dict):
        if spec.get("kind") == "llvm":  # unspecified cores / CPU mean this host's (never generic x86-64)
            from tvm.target import codegen

            spec = {"num-cores": int(num_cores or physical_cores()), "mcpu": str(codegen.llvm_get_system_cpu()),
                    **spec}
        try:
            target = Target(spec)
        except Exception as exc:
            raise ValueError(f"target: TVM rejected {spec!r} ({exc})") from exc
        return _device_from_target(target)
    return _device_from_target(spec)


def _device_from_target(target: Any) -> Device:
    """A device for an explicit target. An llvm target for another CPU than this host's gets ``-<mcpu>`` in its tag,
    so its modules never share a cache file with the host's; one with an ``mtriple`` names that triple's arch."""
    from tvm.target import codegen

    kind = str(target.kind.name)
    if kind == "cuda":
        return _cuda_device(target, None)
    if kind == "llvm":
        attrs = dict(target.attrs.items())
        cores = int(attrs.get("num-cores", physical_cores()))
        model = _cpuinfo_model()
        mcpu = str(attrs.get("mcpu") or "generic")
        triple = str(attrs.get("mtriple") or "")  # a cross target's tag names its arch (the log lookup compares it)
        tag = f"cpu-{slug(triple.split('-')[0] if triple else platform.machine())}-{slug(model)}-{cores}c"
        if mcpu != str(codegen.llvm_get_system_cpu()) or attrs.get("mtriple"):
            tag += f"-{slug(mcpu)}"
        return Device.of(target, tag, f"{model} ({mcpu}, {cores} cores)")
    return Device.of(target, slug(kind), kind)
