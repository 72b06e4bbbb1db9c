"""The vector unit a CPU kernel factory writes for: lane width, register count and the int8 dot-product flavour.

A factory never reads the host: the compiler derives this from the target's features
(:func:`wq_compile.compiler.isa_variants.cpu_isa`) and hands it in. The lane width sets the vector loops and tile
shapes, the register count sizes the register tiles (the accumulators of a pass must stay in registers: AVX2 has
16 ymm registers, AVX-512 32 zmm, so the 16-lane structure on 8-lane registers needs twice the registers and
spills), and ``dot`` picks the instructions of the int8 dot-product mode. Plain data, no TVM import.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Int8 dot-product flavours: ``vnni512`` (AVX-512 VNNI ``vpdpbusd`` on zmm + VBMI byte shuffles), ``avxvnni``
#: (AVX-VNNI ``vpdpbusd`` on ymm, e.g. alderlake), ``maddubs`` (AVX2 ``vpmaddubsw`` + ``vpmaddwd``, haswell).
DOT_FLAVOURS: tuple[str, ...] = ("vnni512", "avxvnni", "maddubs")


@dataclass(frozen=True)
class CpuIsa:
    """``lanes``: fp32 lanes per vector register (16 AVX-512, 8 AVX2); ``vector_regs``: architectural vector
    registers; ``dot``: the int8 dot-product flavour of :data:`DOT_FLAVOURS`, or None (the mode is refused);
    ``scalef``: AVX-512F's ``vscalefps`` (``x * 2^floor(y)`` in one instruction) exists, so the softmax's exp
    needs no exponent bit tricks or clamps (x86 AVX-512 only; 16 lanes on another ISA is LLVM's split vectors)."""

    lanes: int = 16
    vector_regs: int = 32
    dot: str | None = "vnni512"
    scalef: bool = True

    def __post_init__(self) -> None:
        if self.lanes not in (8, 16):
            raise ValueError(f"lanes: the CPU kernel is written for 8 or 16 fp32 lanes, got {self.lanes}")
        if self.vector_regs < 8:
            raise ValueError(f"vector_regs: expected at least 8 vector registers, got {self.vector_regs}")
        if self.dot is not None and self.dot not in DOT_FLAVOURS:
            raise ValueError(f"dot: expected one of {DOT_FLAVOURS} or None, got {self.dot!r}")
        if self.dot == "vnni512" and self.lanes != 16:
            raise ValueError("dot: vnni512 works on 16 int32 lanes (zmm)")
        if self.dot in ("avxvnni", "maddubs") and self.lanes != 8:
            raise ValueError(f"dot: {self.dot} works on 8 int32 lanes (ymm)")
        if self.scalef and self.lanes != 16:
            raise ValueError("scalef: vscalefps is an AVX-512 instruction (16 fp32 lanes)")

    @property
    def broadcast_operand(self) -> bool:
        """Whether an FMA can read a broadcast scalar from memory (AVX-512 EVEX ``{1toN}``): without it the
        broadcast takes a register of its own, one less for a register tile."""
        return self.lanes == 16

    def heads_per_pass(self, heads: int, regs_per_head: int, fixed_regs: int) -> int:
        """Query heads per pass of a register tile: as many as fit (``regs_per_head`` accumulators each, beside
        ``fixed_regs`` live operands and a broadcast register where the ISA needs one), balanced over passes."""
        spare = self.vector_regs - fixed_regs - (0 if self.broadcast_operand else 1)
        fit = max(1, spare // max(1, regs_per_head))
        passes = -(-heads // fit)
        return -(-heads // passes)


#: The AVX-512 kernel (VNNI + VBMI int8 dots): what the factory builds when no target is named.
AVX512 = CpuIsa(16, 32, "vnni512")
#: AVX2 + FMA (haswell and later, Zen 1-3): ymm registers, int8 dots by ``vpmaddubsw`` + ``vpmaddwd``.
AVX2 = CpuIsa(8, 16, "maddubs", scalef=False)
