"""A processed video kept for later: a :class:`WindowQuantCache` saved to a folder and loaded in another process.

The folder holds ``tensors.safetensors`` (each layer's buckets and dense piece cut to the tokens they hold, each
sample's windows, masks and per-layer widths) and ``cache.json`` (format number, versions, the data-relevant
config, the model's shapes, each layer's logical length). The file is about the size of the quantized cache: codes,
scale/zero and dense tokens, nothing of the allocated but unused capacity. Loading checks the format, the config, the
model and every tensor's shape, and refuses a mismatch with a ``ValueError`` that names it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.config import WindowQuantConfig
from ..core.buckets import QuantBucket
from ..core.layout import LayerCache
from ..core.meta8 import RunMeta
from ..core.quant import QuantizedKeys, QuantizedValues
from ..core.windows import Windows
from .llava import SampleLayout

#: A :class:`~wq_compile.integrations.transformers.WindowQuantCache` (not imported: that module imports this one).
WindowQuantCache = Any

#: Bump when the folder's layout changes; a loader refuses any other number.
FORMAT = 1
TENSORS, META = "tensors.safetensors", "cache.json"
#: Config fields that change what is stored (``backend``, ``target`` and ``int8_dots`` only change how it is read).
DATA_FIELDS = ("avg_bits", "widths", "window", "k_group", "v_group", "residual", "flush_bits", "scorer", "chunk",
               "meta_bits")
#: What a file written before a field existed holds for it.
_SAVED_DEFAULTS = {"meta_bits": 16}
_BUCKET = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
_RUNS = ("k_base", "v_base", "run_of", "runs")  # 8-bit scale/zero buckets only (:mod:`wq_compile.core.meta8`)


def _model_meta(cache: WindowQuantCache) -> dict[str, Any]:
    v = cache.visual
    return {"num_layers": cache.num_layers, "num_q_heads": cache.num_q_heads, "num_kv_heads": cache.num_kv_heads,
            "head_dim": cache.head_dim, "tokens_per_frame": v.tokens_per_frame, "video_token_id": v.video_token_id,
            "image_token_id": v.image_token_id}


def _data_config(wq: WindowQuantConfig) -> dict[str, Any]:
    d = asdict(wq)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in DATA_FIELDS}


def _versions() -> dict[str, str]:
    """What wrote the file (the package's installed version: read from its metadata, not by importing the root
    package, which would close an import cycle through the lazy public names)."""
    from importlib import metadata

    import transformers

    return {"wq_compile": metadata.version("wq-compile"), "transformers": transformers.__version__,
            "torch": torch.__version__}


def save(cache: WindowQuantCache, path: str | Path) -> Path:
    """Write ``cache`` (after a prefill) to the folder ``path`` (created); returns it."""
    from safetensors.torch import save_file

    if cache.samples is None or any(layer.store is None for layer in cache.layers) or len(cache.plans) < len(
            cache.layers):
        raise ValueError("cache: nothing to save yet; save after generate() has stored the prompt in every layer")
    if cache.turn is not None:
        raise ValueError("cache: extend() was called and its turn not generated yet; save after generate()")
    out: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        store = layer.store
        assert store is not None
        for bits, bk in store.buckets.items():
            n = int(bk.lens.max())
            groups = -(-n // bk.spec.k_group)
            for name in _BUCKET:
                t = getattr(bk, name)
                out[f"layer.{i}.int{bits}.{name}"] = t[:, :, : groups if name.startswith("k_") else n]
            if bk.meta_bits == 8:
                assert bk.runs is not None and bk.run_of is not None and bk.k_base is not None
                assert bk.v_base is not None
                r = int(bk.runs.max())
                out[f"layer.{i}.int{bits}.k_base"], out[f"layer.{i}.int{bits}.v_base"] = (bk.k_base[:, :, :r],
                                                                                       bk.v_base[:, :, :r])
                out[f"layer.{i}.int{bits}.run_of"], out[f"layer.{i}.int{bits}.runs"] = bk.run_of[:, :groups], bk.runs
            out[f"layer.{i}.int{bits}.lens"] = bk.lens
        n = int(store.dense.lens.max())
        out[f"layer.{i}.dense.k"], out[f"layer.{i}.dense.v"] = store.dense.k[:, :, :n], store.dense.v[:, :, :n]
        out[f"layer.{i}.dense.lens"], out[f"layer.{i}.dense.pinned"] = store.dense.lens, store.dense.pinned
        layers.append({"seen": layer.seen, "frozen": layer.frozen, "stats": dict(store.stats)})
    for b, s in enumerate(cache.samples):
        out[f"sample.{b}.starts"], out[f"sample.{b}.lengths"] = s.windows.starts, s.windows.lengths
        out[f"sample.{b}.text_mask"], out[f"sample.{b}.valid"] = s.text_mask, s.valid
        out[f"sample.{b}.bits"] = torch.stack([cache.plans[i][b] for i in range(cache.num_layers)]).reshape(
            cache.num_layers, len(s.windows))
        out[f"sample.{b}.scores"] = torch.stack([cache.scores[i][b].float().cpu() for i in range(
            cache.num_layers)]).reshape(cache.num_layers, len(s.windows))
    dtype = cache.layers[0].store.dense.k.dtype  # type: ignore[union-attr]
    meta = {"format": FORMAT, "versions": _versions(), "config": _data_config(cache.wq), "model": _model_meta(cache),
            "batch": len(cache.samples), "dtype": str(dtype).removeprefix("torch."), "layers": layers}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in out.items()}, str(folder / TENSORS))
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return folder


def _check(name: str, saved: Any, now: Any, fix: str) -> None:
    if saved != now:
        raise ValueError(f"{name}: the saved cache has {saved!r}, this one {now!r}; {fix}")


def _run_meta(x: dict[str, torch.Tensor], get: Any, p: str, b: int, n: int, g: int, batch: int, hkv: int,
              bk: QuantBucket) -> RunMeta:
    """Sample ``b``'s 8-bit scale/zero codes and run bases as the file holds them, checked before use."""
    assert bk.k_base is not None and bk.v_base is not None
    if any(x[name].dtype != torch.uint8 for name in ("k_scale", "k_zero", "v_scale", "v_zero")):
        raise ValueError(f"{p}k_scale: 8-bit scale/zero must be uint8 codes (a damaged or foreign file)")
    runs, run_of = get(p + "runs", batch), get(p + "run_of", batch, None)
    kb = get(p + "k_base", batch, hkv, None, *bk.k_base.shape[3:])
    vb = get(p + "v_base", batch, hkv, None, *bk.v_base.shape[3:])
    r = int(runs[b])
    if r > kb.shape[2] or g > run_of.shape[1] or (g and not 0 <= int(run_of[b, :g].min()) <= int(
            run_of[b, :g].max()) < r):
        raise ValueError(f"{p}run_of: sample {b}'s run index does not fit its {r} runs in the file")
    return RunMeta(x["k_scale"][b, :, :g], x["k_zero"][b, :, :g], x["v_scale"][b, :, :n], x["v_zero"][b, :, :n],
                   kb[b, :, :r], vb[b, :, :r], run_of[b, :g])


def load_into(cache: WindowQuantCache, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Fill the empty ``cache`` from the folder ``path`` after checking format, config, model and shapes."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        raise ValueError(f"path: {folder} is not a saved WindowQuantCache (needs {META} and {TENSORS})")
    meta = json.loads((folder / META).read_text())
    _check("format", meta.get("format"), FORMAT, "it was written by another wq_compile format; save it again")
    for key, now in _data_config(cache.wq).items():
        _check(f"config.{key}", meta["config"].get(key, _SAVED_DEFAULTS.get(key)), now,
               "load with the WindowQuantConfig it was saved with")
    for key, now in _model_meta(cache).items():
        _check(f"model.{key}", meta["model"].get(key), now, "load with the config of the model that made it")
    dtype = getattr(torch, meta["dtype"])
    t = load_file(str(folder / TENSORS), device=str(device))
    batch, hkv, d = int(meta["batch"]), cache.num_kv_heads, cache.head_dim

    def get(name: str, *shape: int | None) -> torch.Tensor:
        if name not in t:
            raise ValueError(f"{TENSORS}: tensor {name!r} is missing (a damaged or foreign file)")
        x = t[name]
        if x.dim() != len(shape) or any(s is not None and s != x.shape[i] for i, s in enumerate(shape)):
            raise ValueError(f"{name}: shape {tuple(x.shape)} does not fit {shape} (batch {batch}, {hkv} KV heads, "
                             f"head_dim {d}); the file does not match this model")
        return x

    backend = cache.backend(dtype, torch.device(device))
    wq = cache.wq
    for i, layer in enumerate(cache.layers):
        store = LayerCache.empty(batch, hkv, d, dtype, device, wq.k_group, wq.v_group, wq.residual,
                                 flush_bits=wq.flush_bits, chunk=wq.chunk, quantizer=backend.quantize,
                                 widths=wq.bucket_widths, meta_bits=wq.meta_bits)
        for bits, bk in store.buckets.items():
            p = f"layer.{i}.int{bits}."
            lens = get(p + "lens", batch)
            x = {name: get(p + name, batch, hkv, None, *getattr(bk, name).shape[3:]) for name in _BUCKET}
            for b in range(batch):
                n = int(lens[b])
                g = -(-n // bk.spec.k_group)
                if n % bk.spec.k_group or n > x["v_codes"].shape[2]:
                    raise ValueError(f"{p}lens: sample {b} holds {n} tokens, not whole key groups within the file")
                if not n:
                    continue
                if bk.meta_bits == 8:  # the stored codes and run bases, as they are
                    rm = _run_meta(x, get, p, b, n, g, batch, hkv, bk)
                    bk.append_codes(b, x["k_codes"][b, :, :g], x["v_codes"][b, :, :n], rm)
                    continue
                qk = QuantizedKeys(x["k_codes"][b, :, :g], x["k_scale"][b, :, :g], x["k_zero"][b, :, :g], bk.spec)
                qv = QuantizedValues(x["v_codes"][b, :, :n], x["v_scale"][b, :, :n], x["v_zero"][b, :, :n], bk.spec)
                bk.append_quantized(b, qk, qv)
        p = f"layer.{i}.dense."
        k, v = get(p + "k", batch, hkv, None, d), get(p + "v", batch, hkv, None, d)
        lens, pinned = get(p + "lens", batch), get(p + "pinned", batch)
        for b in range(batch):
            n, m = int(lens[b]), int(pinned[b])
            if not 0 <= m <= n <= k.shape[2]:
                raise ValueError(f"{p}lens: sample {b}: {m} pinned of {n} tokens does not fit the file")
            store.dense.append(b, k[b, :, :m], v[b, :, :m], pinned=True)
            store.dense.append(b, k[b, :, m:n], v[b, :, m:n])
        info = meta["layers"][i]
        store.stats.update(info["stats"])
        layer.store, layer.seen, layer.frozen = store, int(info["seen"]), int(info["frozen"])
        layer.device, layer.dtype, layer.is_initialized = torch.device(device), dtype, True
    samples, plans, scores = [], {i: [] for i in range(cache.num_layers)}, {i: [] for i in range(cache.num_layers)}
    for b in range(batch):
        p = f"sample.{b}."
        starts = get(p + "starts", None).cpu()
        w = Windows(starts, get(p + "lengths", starts.numel()).cpu())
        valid = get(p + "valid", None).cpu()
        samples.append(SampleLayout(w, get(p + "text_mask", valid.numel()).cpu(), valid))
        bits, sc = get(p + "bits", cache.num_layers, len(w)).cpu(), get(p + "scores", cache.num_layers, len(w)).cpu()
        for i in range(cache.num_layers):
            plans[i].append(bits[i])
            scores[i].append(sc[i])
    cache.samples, cache.plans, cache.scores = samples, plans, scores
