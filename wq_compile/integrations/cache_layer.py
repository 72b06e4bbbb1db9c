"""One decoder layer of a :class:`~wq_compile.integrations.transformers.WindowQuantCache` as transformers sees it
(length, beam reordering, batch selection and repetition) and the counters the cache keeps of what ran."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from ..core.layout import LayerCache


class WindowQuantLayer(CacheLayerMixin):
    """One decoder layer: its :class:`LayerCache` once the prompt has been stored, plus the logical length."""

    is_compileable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.store: LayerCache | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: hand the prompt back for exact attention (stored after it). Decode: append to the residual."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store is not None:
            self.store.append(key_states, value_states)
        else:
            # Prefill: K/V come as a transposed view ([B, T, H, D] memory); DynamicCache hands SDPA a contiguous
            # copy (its concatenation), and SDPA with GQA runs measurably slower on the view (about 5-10% of the
            # prefill on the 24-layer tiny model). One copy here gives both SDPA and the store contiguous K/V.
            key_states, value_states = key_states.contiguous(), value_states.contiguous()
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self.seen, self.is_initialized = None, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sample ``i`` becomes old sample ``beam_idx[i]`` (buckets, dense piece, lens)."""
        if self.store is not None:
            self.store.select_samples(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            n = self.store.dense.lens.shape[0]
            self.store.select_samples(torch.arange(n).repeat_interleave(repeats))

@dataclass
class CacheStats:
    """What the cache did: counted so tests and users can see the compiled path ran."""

    kernel_calls: int = 0
    reference_calls: int = 0
    prefill_layers: int = 0
    store_seconds: float = 0.0  # prefill: window search, quantization and reordering, all layers
    #: ``store_seconds`` by stage: "screen" (NaN/inf/fp16-range check of K/V), "score" (attention scores),
    #: "search" (errors + allocation), "fill" (quantize kernel, reorder into buckets, residual)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("screen", "score", "search", "fill"), 0.0))
    prompt_plans: int = 0  # per-sample prompt derivations (text index, masks, windows' token indices): once a prompt
