"""Kernel variants built from one ISA's intrinsics, refused on other targets before LLVM sees them.

The CPU fused kernel is plain TIR that LLVM vectorizes for any llvm target (x86-64 AVX2/AVX-512, aarch64 NEON/SVE:
``tests/compiler/test_aarch64.py`` checks the assembly), except two opt-in variants that call x86 intrinsics
directly: the ``lut`` knob (4-bit unpack by ``vpermps`` on 512-bit vectors) and the int8 dot-product mode
``dot8`` (``vpdpbusd``, ``vpermb``). For another target LLVM does not fail at build time but *aborts the process*
when it emits code ("Do not know how to split the result of this operator"), so they are checked here, with the
device's recorded features (no TVM needed).
"""

from __future__ import annotations

from ..core.spec import KernelSpec
from .device import Device

#: ``spec.extra`` key -> the LLVM features that variant is built from (all needed; a value of 0 needs nothing).
X86_VARIANTS: dict[str, tuple[str, ...]] = {
    "lut": ("avx512f",),
    "dot8": ("avx512vnni", "avx512vbmi", "avx512bw"),
}


def isa_variant_unsupported(spec: KernelSpec, device: Device) -> str | None:
    """Why ``device`` cannot build ``spec``'s ISA-specific variants, or None."""
    extra = dict(spec.extra)
    for key, features in X86_VARIANTS.items():
        if int(extra.get(key, 0) or 0) and (device.kind != "llvm" or not device.has_features(*features)):
            return (f"{spec.uri}: {key}={extra[key]} is built from x86 intrinsics needing {'/'.join(features)}, "
                    f"which target {device.tag} ({device.isa}) lacks; build it without {key!r}")
    return None


def check_isa_variants(spec: KernelSpec, device: Device) -> None:
    """Raise ``ValueError`` (never reach LLVM) when ``spec`` asks for a variant ``device`` cannot build."""
    why = isa_variant_unsupported(spec, device)
    if why is not None:
        raise ValueError(why)
