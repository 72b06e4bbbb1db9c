"""Model presets (attention shapes) and the kernel set a model needs.

A preset fixes what a kernel is specialised on: query heads, KV heads and head_dim. Layers only matter for
memory accounting and benchmarks; one compiled kernel serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .spec import QUANT_BITS, KernelSpec, check_bits


@dataclass(frozen=True)
class ModelPreset:
    """Attention shapes of one decoder (the text model of a VLM)."""

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for field_name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field_name}: expected a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads: {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> "ModelPreset":
        """Read the shapes from a transformers config (a VLM config's ``text_config`` is used when present)."""
        text = getattr(config, "text_config", None) or config
        try:
            layers = int(text.num_hidden_layers)
            q_heads = int(text.num_attention_heads)
        except AttributeError as exc:
            raise ValueError(f"config: missing attention field ({exc}); expected a decoder config") from exc
        kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
        label = name or getattr(config, "name_or_path", None) or getattr(text, "model_type", "custom")
        return cls(str(label), layers, q_heads, kv_heads, int(head_dim))


#: Shapes of the text configs of the two LLaVA-OneVision checkpoints (see docs/DESIGN.md) and a tiny test model.
PRESETS: dict[str, ModelPreset] = {
    "llava-ov-0.5b": ModelPreset("llava-ov-0.5b", num_layers=24, num_q_heads=14, num_kv_heads=2, head_dim=64),
    "llava-ov-7b": ModelPreset("llava-ov-7b", num_layers=28, num_q_heads=28, num_kv_heads=4, head_dim=128),
    # head_dim 64: the default v_group (64 channels) must divide head_dim.
    "tiny": ModelPreset("tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64),
}

#: Kernel kinds in the order ``kernel_specs`` lists them; ``dense`` is the decode kernel over an fp residual.
KERNEL_KINDS: tuple[str, ...] = ("decode", "dense", "merge", "fused", "split", "quantize")
#: What the runtime uses by default (one fused launch per layer plus the quantizer of the residual).
DEFAULT_KERNEL_KINDS: tuple[str, ...] = ("fused", "quantize")


def get_preset(model: str | ModelPreset | Any) -> ModelPreset:
    """A preset by name, a preset itself, or one derived from a transformers config object."""
    if isinstance(model, ModelPreset):
        return model
    if isinstance(model, str):
        try:
            return PRESETS[model]
        except KeyError:
            raise ValueError(f"model: unknown preset {model!r}; expected one of {sorted(PRESETS)}") from None
    return ModelPreset.from_config(model)


def kernel_specs(
    preset: str | ModelPreset | Any,
    bits: tuple[int, ...] = (2, 4, 8),
    dtype: str = "f32",
    k_group: int = 28,
    v_group: int = 64,
    chunk: int = 64,
    kinds: tuple[str, ...] = KERNEL_KINDS,
) -> list[KernelSpec]:
    """The kernels one model needs, for the quantized widths ``bits``.

    decode: one per-bucket kernel per width; dense: decode over the fp residual (bits ``(16,)``);
    merge: merges the partial states of every bucket and the residual; fused: every width plus the residual in
    one launch; split: the split-KV form of fused and its merge (the CUDA decode path); quantize: one per width.
    """
    p = get_preset(preset)
    widths = tuple(sorted({check_bits(b, QUANT_BITS) for b in bits}, reverse=True))
    if not widths:
        raise ValueError("bits: expected at least one quantized width")
    unknown = [k for k in kinds if k not in KERNEL_KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown kernel kinds {unknown}; expected a subset of {KERNEL_KINDS}")
    common = dict(
        head_dim=p.head_dim,
        num_q_heads=p.num_q_heads,
        num_kv_heads=p.num_kv_heads,
        k_group=k_group,
        v_group=v_group,
        dtype=dtype,
        chunk=chunk,
    )
    specs: list[KernelSpec] = []
    for kind in kinds:
        if kind == "decode":
            specs += [KernelSpec("decode", (b,), **common) for b in widths]
        elif kind == "dense":
            specs.append(KernelSpec("decode", (16,), **common))
        elif kind == "merge":
            specs.append(KernelSpec("merge", widths + (16,), **common))
        elif kind == "fused":
            specs.append(KernelSpec("fused", widths + (16,), **common))
        elif kind == "split":  # what the CUDA decoder runs: split-KV fused kernel (its own chunk) + one merge
            from ..kernels.split_decode import SPLIT_CHUNK, merge_spec, split_spec

            fused = split_spec(KernelSpec("fused", widths + (16,), **{**common, "chunk": SPLIT_CHUNK}))
            specs += [fused, merge_spec(fused)]
        elif kind == "quantize":
            specs += [KernelSpec("quantize", (b,), **common) for b in widths]
    return specs
