"""What one prefill leaves behind, per layer (a :class:`Workload`), and the synthetic workloads with ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...core.policy import attend
from ...core.scores import embedding_scores
from ...core.windows import Windows, make_windows


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
    meta_bits: int = 16  # the storage format's scale/zero bits every cost and error of the analysis uses
    answer: torch.Tensor | None = None  # [W] bool: windows that hold the answer (ground truth), if known
    prompt_focused: bool = True
    base: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.base = self.readout({})

    def kl(self, replaced: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean KL(dense || replaced) of the readout distributions."""
        logp = self.readout(replaced)
        return max(float(torch.sum(self.base.exp() * (self.base - logp), dim=-1).mean()), 0.0)

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

