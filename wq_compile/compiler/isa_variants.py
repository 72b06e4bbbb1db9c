"""The vector unit a CPU kernel is written for, and kernel variants built from one ISA's intrinsics, refused on other
targets before LLVM sees them.

The CPU fused kernel is plain TIR that LLVM vectorizes for any llvm target (x86-64 AVX2/AVX-512, aarch64 NEON/SVE:
``tests/compiler/test_aarch64.py`` checks the assembly), written for the lane width and register count of the
target's ISA class (:func:`cpu_isa`: 8 fp32 lanes and 16 registers on AVX2, 16 and 32 elsewhere), except two opt-in
variants that call x86 intrinsics directly: the ``lut`` knob (4-bit unpack by ``vpermps`` on 512-bit vectors) and
the int8 dot-product mode ``dot8`` (``vpdpbusd`` + ``vpermb`` on AVX-512 VNNI/VBMI, ``vpdpbusd`` on ymm with
AVX-VNNI, ``vpmaddubsw`` + ``vpmaddwd`` on AVX2). For another target LLVM does not fail at build time but *aborts
the process* when it emits code ("Do not know how to split the result of this operator"), so they are checked here,
with the device's recorded features (no TVM needed).
"""

from __future__ import annotations

from ..core.spec import KernelSpec
from ..kernels.cpu_isa import CpuIsa
from .device import Device

#: ``spec.extra`` key -> the LLVM features that variant is built from (all needed; a value of 0 needs nothing).
#: ``dot8`` is decided by :func:`cpu_isa` (one of several instruction sets will do).
X86_VARIANTS: dict[str, tuple[str, ...]] = {
    "lut": ("avx512f",),
}
#: LLVM features of the AVX-512 int8 dot-product flavour: ``vpdpbusd`` (VNNI) and ``vpermb``/``vpermt2b`` (VBMI).
VNNI512_FEATURES: tuple[str, ...] = ("avx512vnni", "avx512vbmi", "avx512bw")


def cpu_isa(device: Device) -> CpuIsa | None:
    """The vector unit the CPU fused kernel is written for on ``device`` (None for non-llvm targets), read from its
    ISA class and features: AVX-512 16 lanes / 32 registers (int8 dots with VNNI + VBMI), AVX2 8 lanes / 16
    registers (int8 dots with AVX-VNNI where the target has it, else ``vpmaddubsw``), any other llvm target the
    16-lane structure without int8 dots (LLVM splits the vectors: aarch64 is built, not measured)."""
    if device.kind != "llvm":
        return None
    if device.isa == "x86_64-avx512":
        return CpuIsa(16, 32, "vnni512" if device.has_features(*VNNI512_FEATURES) else None)
    if device.isa == "x86_64-avx2":
        return CpuIsa(8, 16, "avxvnni" if device.has_features("avxvnni") else "maddubs", scalef=False)
    return CpuIsa(16, 32, None, scalef=False)


def int8_dot_flavour(device: Device) -> str | None:
    """The int8 dot-product instructions the CPU kernel uses on ``device`` (None: the mode does not exist there)."""
    isa = cpu_isa(device)
    return None if isa is None else isa.dot


def isa_variant_unsupported(spec: KernelSpec, device: Device) -> str | None:
    """Why ``device`` cannot build ``spec``'s ISA-specific variants, or None."""
    extra = dict(spec.extra)
    for key, features in X86_VARIANTS.items():
        if int(extra.get(key, 0) or 0) and (device.kind != "llvm" or not device.has_features(*features)):
            return (f"{spec.uri}: {key}={extra[key]} is built from x86 intrinsics needing {'/'.join(features)}, "
                    f"which target {device.tag} ({device.isa}) lacks; build it without {key!r}")
    if int(extra.get("dot8", 0) or 0) and int8_dot_flavour(device) is None:
        return (f"{spec.uri}: dot8={extra['dot8']} is built from x86 intrinsics needing AVX2 "
                f"({'/'.join(VNNI512_FEATURES)} on AVX-512 targets), which target {device.tag} ({device.isa}) "
                "lacks; build it without 'dot8'")
    return None


def check_isa_variants(spec: KernelSpec, device: Device) -> None:
    """Raise ``ValueError`` (never reach LLVM) when ``spec`` asks for a variant ``device`` cannot build."""
    why = isa_variant_unsupported(spec, device)
    if why is not None:
        raise ValueError(why)
