"""Model presets (attention shapes) and the kernel set a model needs.

A preset fixes what a kernel is specialised on: query heads, KV heads and head_dim. Layers only matter for
memory accounting and benchmarks; one compiled kernel serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any



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
    # Text configs of the released Qwen2-VL / Qwen2.5-VL checkpoints (hidden / heads = 128 in every one; GQA groups
    # 6, 7 and 8). The pinned transformers ships only the 72B-sized defaults (80 layers, 64 / 8 heads, head_dim
    # 128): these shapes are the checkpoints' config.json values, see the README's support table.
    "qwen2-vl-2b": ModelPreset("qwen2-vl-2b", num_layers=28, num_q_heads=12, num_kv_heads=2, head_dim=128),
    "qwen2-vl-7b": ModelPreset("qwen2-vl-7b", num_layers=28, num_q_heads=28, num_kv_heads=4, head_dim=128),
    "qwen2.5-vl-3b": ModelPreset("qwen2.5-vl-3b", num_layers=36, num_q_heads=16, num_kv_heads=2, head_dim=128),
    "qwen2.5-vl-7b": ModelPreset("qwen2.5-vl-7b", num_layers=28, num_q_heads=28, num_kv_heads=4, head_dim=128),
    # the tiny random-weight Qwen2-VL / Qwen2.5-VL of integrations.tiny_qwen (head_dim 128 like the released ones)
    "tiny-qwen": ModelPreset("tiny-qwen", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=128),
}


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
