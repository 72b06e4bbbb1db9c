"""Drop-in ``transformers`` cache: generation on a window-quantized, bucketed KV cache.

Prefill runs exact attention on the prompt; then, per layer, the window search picks a width per window, the windows
are quantized and reordered into buckets and the text goes to the dense residual. Each decode step appends the new
token and runs one fused compiled kernel per layer over all buckets (never a dense dequantization of the cache).

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
    cache = WindowQuantCache(model.config, WindowQuantConfig(avg_bits=3)).prepare(**inputs)
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..core.config import WindowQuantConfig
from ..runtime.backend import Backend, make_backend
from ..core.layout import LayerCache
from ..core.windows import Windows, windows_holding
from ..core.quant import quantizable_tokens
from ..core.search import Plan, search
from ..core.scores import attention_scores, embedding_scores
from ..core.allocation import min_avg_bits
from ..core.windows import make_windows
from . import extend, persist
from .cache_layer import CacheStats, WindowQuantLayer
from .families import locate_samples, visual_layout
from .inputs import check_prompt_inputs
from .llava import SampleLayout


@dataclass
class _PromptSample:
    """What every layer's store needs of one sample's prompt, derived once per prompt (never per layer)."""

    windows: Windows  # its token indices are cached on it, so every layer reuses them
    valid: torch.Tensor  # [T] bool on the model's device
    text_idx: torch.Tensor | None  # positions of the text tokens (scoring queries); None: video only
    floor: float  # the smallest budget the windows allow (fp16 group tails)


class WindowQuantCache(Cache):
    """A ``transformers`` cache whose visual windows live in uniform-precision buckets after prefill.

    Windows (prefill) and flushed residual blocks (decode) holding NaN/inf or K/V beyond the fp16 range of
    scale/zero are never quantized: they stay dense at the model's dtype like a 16-bit window, so attention over
    them equals dense attention (docs/DESIGN.md, "Inputs no code represents"). Beam search and
    ``num_return_sequences`` are supported (``reorder_cache`` and the batch hooks reorder every layer)."""

    def __init__(self, config: Any, wq_config: WindowQuantConfig | None = None, backend: Backend | None = None) -> None:
        """``backend`` (from :func:`wq_compile.runtime.backend.make_backend`) pins the kernels explicitly; by default the
        process-wide backend for these shapes is used (loaded once per process, on first use)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        wq_config = WindowQuantConfig() if wq_config is None else wq_config
        if not isinstance(wq_config, WindowQuantConfig):
            raise TypeError(f"wq_config: expected a WindowQuantConfig, got {type(wq_config).__name__}")
        self.visual = visual_layout(config)  # the family's locator; raises for an unknown VLM family
        self.num_layers = text.num_hidden_layers
        self.max_positions: int | None = getattr(text, "max_position_embeddings", None)
        self.num_q_heads = text.num_attention_heads
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # Every field checked against the model now (not at prefill); v_group=None -> min(64, head_dim).
        self.wq = wq_config.for_model(self.num_q_heads, self.num_kv_heads, self.head_dim)
        super().__init__(layers=[WindowQuantLayer() for _ in range(self.num_layers)])
        self.samples: list[SampleLayout] | None = None
        self._prompt: list[_PromptSample] | None = None
        self.plans: dict[int, list[torch.Tensor]] = {}  # layer -> per-sample bits [W]
        self.scores: dict[int, list[torch.Tensor]] = {}
        self.embed_scores: list[torch.Tensor] | None = None
        self.stats = CacheStats()
        self._backend: Backend | None = backend
        self._hook: Any = None
        self._warned_dense: set[int] = set()
        self._warned_video_only = False
        self.turn: extend.Turn | None = None  # a later turn with new visual content, between extend() and generate

    # ---- set-up -------------------------------------------------------------------------------------------------
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model: Any = None,
                **inputs: Any) -> "WindowQuantCache":
        """Record where the visual windows are (``input_ids`` never reach a cache). Call once before ``generate``;
        extra keyword arguments (``pixel_values`` ...) are ignored, except the grids a Qwen2-VL locator reads
        (``video_grid_thw``, ``image_grid_thw``), so ``prepare(**inputs)`` works. The embedding
        scorer needs ``model`` to capture the prompt's input embeddings at prefill. Preparing again starts a new
        conversation: the cache is emptied."""
        check_prompt_inputs(self.max_positions, input_ids, inputs)
        for layer in self.layers:
            layer.reset()
        self.plans, self.scores, self.embed_scores = {}, {}, None
        self._prompt = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.samples = locate_samples(input_ids, attention_mask, self.visual, self.wq.window, inputs)
        if self.wq.scorer == "embedding":
            if model is None:
                raise ValueError("model: the embedding scorer needs prepare(..., model=model)")
            lm = model.get_decoder() if hasattr(model, "get_decoder") else model
            self._hook = lm.register_forward_pre_hook(self._capture_embeddings, with_kwargs=True)
        return self

    def _capture_embeddings(self, module: Any, args: tuple, kwargs: dict) -> None:
        emb = kwargs.get("inputs_embeds")
        if emb is None or self.samples is None:
            return
        self.embed_scores = [embedding_scores(emb[b].detach(), s.windows, s.text_mask) for b, s in
                             enumerate(self.samples)]
        self._hook.remove()
        self._hook = None

    def backend(self, dtype: torch.dtype, device: torch.device) -> Backend:
        """The kernels this cache runs (compiled modules, else the reference), chosen once."""
        if self._backend is None:
            self._backend = make_backend(self.wq, self.num_q_heads, self.num_kv_heads, self.head_dim, dtype, device)
        return self._backend

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers passes the dict it will splat into the attention function: hand it this cache's layer.
        fwd = kwargs.get("kwargs")
        if isinstance(fwd, dict):
            fwd["wq_cache"] = self
        return self.layers[layer_idx].update(key_states, value_states)

    # ---- batch reordering: beam search, num_return_sequences, contrastive search -------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Called by ``generate`` after every beam-search step: reorder every layer and the per-sample layouts."""
        super().reorder_cache(beam_idx)
        self._select_samples(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_samples(torch.as_tensor(indices).long().tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.samples is not None:
            self._select_samples([i for i in range(len(self.samples)) for _ in range(repeats)])

    def _select_samples(self, idx: list[int]) -> None:
        if self.samples is not None:
            self.samples = [self.samples[i] for i in idx]
        if self._prompt is not None:
            self._prompt = [self._prompt[i] for i in idx]
        self.plans = {li: [bits[i] for i in idx] for li, bits in self.plans.items()}
        self.scores = {li: [sc[i] for i in idx] for li, sc in self.scores.items()}
        if self.embed_scores is not None:
            self.embed_scores = [self.embed_scores[i] for i in idx]

    # ---- new visual content in a later turn (integrations/extend.py) -----------------------------------------------
    def extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model: Any = None,
               **_: Any) -> "WindowQuantCache":
        """Before ``generate`` on a turn that adds a clip or images: ``input_ids`` are the whole conversation so
        far plus the new turn. Its windows are stored into the existing buckets under the cache-wide budget (stored
        windows keep their width). Raises ``ValueError`` when the ids do not extend the cached conversation."""
        self.turn = extend.begin(self, input_ids, attention_mask, model)
        return self

    def store_turn(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   sm_scale: float) -> None:
        """Called by the attention function after the new turn's step: store its windows in this layer."""
        extend.store_turn(self, _PromptSample, layer_idx, query, key, value, sm_scale)

    # ---- kept for later: save / load (integrations/persist.py) ---------------------------------------------------
    def save(self, path: str) -> None:
        """Write this cache (after generate) to the folder ``path``: safetensors plus a small JSON."""
        persist.save(self, path)

    @classmethod
    def load(cls, path: str, config: WindowQuantConfig, model_config: Any, backend: Backend | None = None,
             device: torch.device | str = "cpu") -> "WindowQuantCache":
        """A cache saved by :meth:`save`, ready to continue the conversation (append the next turn's ids);
        ``config`` must be the WindowQuantConfig it was saved with, ``model_config`` the model's config."""
        if not isinstance(config, WindowQuantConfig):
            raise TypeError(f"config: expected the WindowQuantConfig the cache was saved with, got "
                            f"{type(config).__name__} (the model's config goes second: load(path, config, "
                            f"model_config))")
        cache = cls(model_config, config, backend)
        persist.load_into(cache, path, device)
        return cache

    def _pad_for_drafts(self, t: int) -> None:
        """Assisted decoding runs the target's prefill on the prompt plus the first draft tokens: those are valid,
        not visual and not scored (the question stays the scoring query), and go to the residual (cropped if
        rejected)."""
        assert self.samples is not None
        extra = t - self.samples[0].valid.shape[0]
        if extra > 0 and self._prompt is None:
            pad = torch.ones(extra, dtype=torch.bool)
            self.samples = [SampleLayout(s.windows, torch.cat([s.text_mask, ~pad]), torch.cat([s.valid, pad]))
                            for s in self.samples]

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted / prompt-lookup decoding: drop the newest rejected tokens, checked on every layer first so a
        refused crop leaves the cache untouched (see :meth:`WindowQuantLayer.crop`)."""
        for layer in self.layers:
            why = layer.crop_error(-tokens_to_remove) if tokens_to_remove < 0 and layer.is_initialized else None
            if why is not None:
                raise ValueError(why)
        super().crop(tokens_to_remove)

    # ---- prefill: search, quantize, reorder ---------------------------------------------------------------------
    def _prompt_samples(self, device: torch.device) -> list[_PromptSample]:
        """The per-sample prompt derivations, built at the first layer and reused by every later one."""
        if self._prompt is None:
            assert self.samples is not None
            out = []
            for s in self.samples:
                w = s.windows
                text_idx = torch.nonzero(s.text_mask).flatten().to(device) if bool(s.text_mask.any()) else None
                floor = min_avg_bits(w, self.wq.widths, self.wq.k_group, self.wq.v_group, self.wq.meta_bits)
                out.append(_PromptSample(w, s.valid.to(device=device, dtype=torch.bool), text_idx, floor))
                self.stats.prompt_plans += 1
            self._prompt = out
        return self._prompt

    def store_prompt(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     sm_scale: float) -> None:
        """Window search for this layer, then fill its buckets (one sample at a time: windows differ per sample).

        Everything that depends on the prompt only (windows' token indices, text positions, masks, the budget
        floor) is derived once per prompt at the first layer; a layer costs its own K/V passes only."""
        t0 = time.perf_counter()
        bsz, _, t, _ = key.shape
        if self.samples is None:
            warnings.warn("WindowQuantCache.prepare(**inputs) was not called: no visual windows are known, the "
                          "prompt is kept dense (only the residual flush quantizes)", stacklevel=3)
            ones = torch.ones(t, dtype=torch.bool)
            self.samples = [SampleLayout(make_windows([], 1), ones, ones) for _ in range(bsz)]
        if bsz != len(self.samples) and bsz % len(self.samples) == 0 and self.samples[0].valid.shape[0] == t:
            # generate() expands the prompt for num_beams / num_return_sequences (repeat_interleave on the batch)
            self._select_samples([i for i in range(len(self.samples)) for _ in range(bsz // len(self.samples))])
        self._pad_for_drafts(t)
        if len(self.samples) != bsz or self.samples[0].valid.shape[0] != t:
            raise ValueError(f"input_ids: prepare() saw {len(self.samples)} x {self.samples[0].valid.shape[0]} "
                             f"tokens but prefill has {bsz} x {t}")
        prompt = self._prompt_samples(key.device)
        store = LayerCache.empty(bsz, key.shape[1], key.shape[3], key.dtype, key.device, self.wq.k_group,
                                 self.wq.v_group, self.wq.residual, flush_bits=self.wq.flush_bits,
                                 chunk=self.wq.chunk, quantizer=self.backend(key.dtype, key.device).quantize,
                                 widths=self.wq.bucket_widths, meta_bits=self.wq.meta_bits)
        stages = self.stats.stage_seconds
        bits_list, score_list = [], []
        for b, ps in enumerate(prompt):
            bits, scores, ok = self._plan_sample(layer_idx, b, ps, query[b], key[b], value[b], sm_scale)
            bits_list.append(bits)
            score_list.append(scores)
            t1 = time.perf_counter()
            store.fill_sample(b, key[b], value[b], ps.windows.with_bits(bits), valid=ps.valid, quantizable=ok)
            stages["fill"] += time.perf_counter() - t1
        self.plans[layer_idx] = bits_list
        self.scores[layer_idx] = score_list
        self.layers[layer_idx].store = store
        self.turn = None  # a new conversation: no later turn pending
        self.layers[layer_idx].frozen = max((int((w.starts + w.lengths).max()) for w in (p.windows for p in prompt)
                                             if len(w)), default=0)
        self.stats.prefill_layers += 1
        self.stats.store_seconds += time.perf_counter() - t0

    def _plan_sample(self, layer_idx: int, b: int, ps: _PromptSample, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, sm_scale: float, budget: float | None = None,
                     embed_scores: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Bits and scores ``[W]`` of one sample, and its per-token quantizable mask ``[T]`` (for the fill).
        Windows with NaN/inf or out-of-fp16-range K/V stay at 16 bits (dense, so attention equals dense
        attention) and the search runs over the others only; a prompt without text tokens (video only) or with
        non-finite scores gets uniform scores, with a warning."""
        stages = self.stats.stage_seconds
        w = ps.windows
        if len(w) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0), None
        t0 = time.perf_counter()
        finite_keys = quantizable_tokens(key).all(0)  # [T]: one pass over K, one over V, shared by every use
        ok = finite_keys & quantizable_tokens(value).all(0)
        bad = windows_holding(~ok, w).cpu()
        n_bad = int(bad.sum())
        stages["screen"] += time.perf_counter() - t0
        bits = torch.full((len(w),), 16, dtype=torch.long)
        scores = torch.zeros(len(w))
        if n_bad and layer_idx not in self._warned_dense:
            self._warned_dense.add(layer_idx)
            warnings.warn(f"layer {layer_idx}: {n_bad} window(s) hold NaN/inf or K/V beyond the fp16 range; "
                          f"they stay dense (16 bits) and the budget applies to the other windows", stacklevel=4)
        if n_bad == len(w):
            return bits, scores, ok
        good = ~bad
        sub = w if n_bad == 0 else Windows(w.starts[good], w.lengths[good])
        t0 = time.perf_counter()
        if self.wq.scorer == "embedding":
            if self.embed_scores is None:
                raise RuntimeError("the embedding scorer saw no input embeddings: prepare(**inputs, "
                                   "model=model) must be called on the model that runs generate")
            sub_scores = (self.embed_scores[b] if embed_scores is None else embed_scores).float().cpu()
            sub_scores = sub_scores if n_bad == 0 else sub_scores[good]
        elif ps.text_idx is None:
            sub_scores = torch.ones(len(sub))
            if not self._warned_video_only:
                self._warned_video_only = True
                warnings.warn("the prompt has no text tokens (video only): the attention scorer has no queries, "
                              "so every window gets the same score (uniform allocation under the budget)",
                              stacklevel=4)
        else:
            mask = ps.valid & finite_keys
            sub_scores = attention_scores(query[:, ps.text_idx], key, sub, sm_scale,
                                          key_mask=None if bool(mask.all()) else mask).float().cpu()
        if not bool(torch.isfinite(sub_scores).all()):
            warnings.warn(f"layer {layer_idx}: window scores are not finite (NaN/inf queries or embeddings); "
                          f"using uniform scores", stacklevel=4)
            sub_scores = torch.ones(len(sub))
        t1 = time.perf_counter()
        stages["score"] += t1 - t0
        budget = self.wq.avg_bits if budget is None else budget  # a later turn: what the stored windows left
        floor = ps.floor if n_bad == 0 else min_avg_bits(sub, self.wq.widths, self.wq.k_group, self.wq.v_group,
                                                         self.wq.meta_bits)
        if budget < floor:  # fp16 tails of partial key groups (e.g. the last window of an image)
            warnings.warn(f"avg_bits={budget} is below the {floor:.3f} effective bits this prompt's windows "
                          f"need at least (fp16 group tails); using {floor:.3f}", stacklevel=4)
            budget = floor
        plan = search(sub_scores.to(key.device), key[None], value[None], sub, budget, self.wq.widths,
                      self.wq.k_group, self.wq.v_group, meta_bits=self.wq.meta_bits)
        if n_bad == 0:
            bits, scores = plan.bits[0].cpu(), sub_scores
        else:
            bits[good] = plan.bits[0].cpu()
            scores[good] = sub_scores
        stages["search"] += time.perf_counter() - t1
        return bits, scores, ok

    def plan(self, sample: int = 0) -> Plan | None:
        """The chosen widths of one sample as a :class:`Plan` (``bits [layers, windows]``), once prefill ran."""
        if self.samples is None or len(self.plans) < self.num_layers:
            return None
        bits = torch.stack([self.plans[i][sample] for i in range(self.num_layers)])
        scores = torch.stack([self.scores[i][sample].float().cpu() for i in range(self.num_layers)])
        return Plan(self.samples[sample].windows, bits, scores, self.wq.k_group, self.wq.v_group, self.wq.meta_bits)

    # ---- accounting ---------------------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Exact bytes per storage kind, and the fp16 bytes the same tokens would take in a dense cache."""
        used: dict[str, int] = {}
        tokens = 0
        visual_tokens = 0
        for layer in self.layers:
            if layer.store is None:
                continue
            for name, n in layer.store.used_bytes().items():
                used[name] = used.get(name, 0) + n
            tokens += int(layer.store.num_tokens().sum())
        if self.samples is not None:
            visual_tokens = sum(int(s.windows.lengths.sum()) for s in self.samples) * sum(
                1 for layer in self.layers if layer.store is not None)
        per_token_fp16 = self.num_kv_heads * self.head_dim * 2 * 2
        quantized = sum(v for k, v in used.items() if k != "dense")
        backend = self._backend
        return {
            "kernels": backend.tuning_summary() if backend is not None else "not loaded (no prefill yet)",
            "bytes": used,
            "total_bytes": sum(used.values()),
            "fp16_bytes": tokens * per_token_fp16,
            "visual_fp16_bytes": visual_tokens * per_token_fp16,
            "quantized_bytes": quantized,
            "cached_tokens": tokens,
        }


