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
    is_croppable = True  # crop() undoes the newest residual tokens (assisted and prompt-lookup decoding)

    def __init__(self) -> None:
        super().__init__()
        self.store: LayerCache | None = None
        self.seen = 0
        self.frozen = 0  # logical tokens up to the end of the last stored window: never cropped

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
        self.store, self.seen, self.frozen, self.is_initialized = None, 0, 0, False

    def crop_error(self, n: int) -> str | None:
        """Why the newest ``n`` tokens cannot be removed (None: they can): they must all still be in every sample's
        dense residual, after the last visual window stored in the buckets."""
        if n > self.seen - self.frozen:
            return (f"crop: removing {n} tokens would reach into the stored prompt's visual windows (quantized "
                    f"into buckets or pinned); only the {self.seen - self.frozen} tokens after the last window "
                    f"can be removed")
        if self.store is not None:
            resid = int((self.store.dense.lens - self.store.dense.pinned).min())
            if n > resid:
                return (f"crop: removing {n} tokens would reach into a bucket: only the newest {resid} tokens are "
                        f"still dense (older residual blocks were flushed into the int{self.store.flush_bits} "
                        f"bucket); raise WindowQuantConfig.residual to speculate further")
        return None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens (transformers' convention: a non-positive count) from
        the dense residual. Raises ``ValueError`` naming what a deeper crop would reach."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        why = self.crop_error(n)
        if why is not None:
            raise ValueError(why)
        if self.store is not None:
            self.store.dense.lens -= n
        self.seen -= n

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
