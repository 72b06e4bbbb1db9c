"""Decode benchmarks of the GPU visit (:mod:`wq_compile.tuning.gpu_visit`): the peers on one decode step (torch SDPA on the
dense cache, dequantize-all + SDPA, FlashInfer) and the WindowQuant modules an export carries for benchmarking.

Only torch, the TVM runtime and the pure-torch modules of this package are imported (it runs where TVM's compiler
is absent).
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import offline_measure
from ..core.models import get_preset


def _sdpa_backend(dev: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if dev == "cuda" else sdpa_kernel(SDPBackend.MATH)


def _timer(dev: str, repeat: int) -> Callable[[Callable[[], Any]], float]:
    kind = "cuda" if dev == "cuda" else "llvm"
    return lambda fn: statistics.median(offline_measure.time_calls(fn, kind, warmup=3, repeat=repeat,
                                                                   min_sample_s=0.01))


def bench_baselines(model: str, tokens: int, dev: str, repeat: int) -> list[dict[str, Any]]:
    """Every peer at its fastest on one decode step (batch 1), rows with seconds, GB/s and error vs fp32."""
    import torch.nn.functional as F

    from ..core.quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values
    from ..core.spec import QuantSpec

    p = get_preset(model)
    hq, hkv, d = p.num_q_heads, p.num_kv_heads, p.head_dim
    g = hq // hkv
    dtype = torch.float16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    q = torch.randn(1, hq, 1, d, generator=gen).to(dev, dtype)
    k = torch.randn(1, hkv, tokens, d, generator=gen).to(dev, dtype)
    v = torch.randn(1, hkv, tokens, d, generator=gen).to(dev, dtype)
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                         v.double().repeat_interleave(g, 1))
    dense_bytes = 2 * k.numel() * k.element_size()
    timer = _timer(dev, repeat)
    rows = []

    def row(method: str, fn: Callable[[], torch.Tensor], nbytes: int, note: str = "") -> None:
        try:
            out = fn().reshape(ref.shape)
            err = float((out.double() - ref).norm() / ref.norm())
            secs = timer(fn)
            rows.append({"model": model, "tokens": tokens, "method": method, "seconds": secs,
                         "gbps": nbytes / secs / 1e9, "rel_err": err, "bytes": nbytes, "note": note, "error": None})
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            rows.append({"model": model, "tokens": tokens, "method": method, "seconds": None, "gbps": None,
                         "rel_err": None, "bytes": nbytes, "note": note, "error": f"{type(exc).__name__}: {exc}"})

    backend = "flash" if dev == "cuda" else "math (cpu)"
    with _sdpa_backend(dev):
        row("sdpa_dense_gqa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), dense_bytes,
            backend)
        qf = q.reshape(1, hkv, g, d)
        row("sdpa_dense_folded", lambda: F.scaled_dot_product_attention(qf, k, v), dense_bytes, backend)
    qs = QuantSpec(4, k_group=28, v_group=min(64, d))
    kq = quantize_keys(k.float().reshape(hkv, tokens, d), qs)
    vq = quantize_values(v.float().reshape(hkv, tokens, d), qs)
    q_bytes = sum(t.numel() * t.element_size() for t in (kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero))

    def dequant_sdpa() -> torch.Tensor:
        kd = dequantize_keys(kq, tokens).to(dtype).unsqueeze(0)
        vd = dequantize_values(vq).to(dtype).unsqueeze(0)
        with _sdpa_backend(dev):
            return F.scaled_dot_product_attention(q.reshape(1, hkv, g, d), kd, vd)

    row("dequant_all_int4_sdpa", dequant_sdpa, q_bytes, "torch dequantize of every token, then SDPA")
    if dev == "cuda" and importlib.util.find_spec("flashinfer") is not None:
        import flashinfer

        kn, vn = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
        row("flashinfer_decode_fp16", lambda: flashinfer.single_decode_with_kv_cache(q[0, :, 0], kn, vn),
            dense_bytes, "single_decode_with_kv_cache, NHD")
    return rows


def _module_args(spec_args: list[dict[str, Any]], dev: str, seed: int) -> list[Any]:
    """Arguments for a WindowQuant module from the manifest's description (random floats, random code words)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[Any] = []
    for a in spec_args:
        if a["scalar"] is not None:
            out.append(a["scalar"])
            continue
        dt = getattr(torch, a["dtype"])
        if a["values"] is not None:
            t = torch.tensor(a["values"], dtype=dt)
        elif dt.is_floating_point:
            t = torch.rand(a["shape"], generator=gen).to(dt) * (0.1 if a["name"].endswith("scale") else 1.0)
        else:
            t = torch.randint(-2**31, 2**31 - 1, a["shape"], generator=gen, dtype=torch.int64).to(dt)
        out.append(t.to(dev))
    return out


def bench_modules(export: Path, manifest: dict[str, Any], lengths: Sequence[int], dev: str,
                  repeat: int) -> list[dict[str, Any]]:
    """Time each exported WindowQuant module at the benchmark lengths it was exported for."""
    import tvm

    rows = []
    for kernel in manifest["kernels"]:
        bench = kernel.get("bench")
        if not bench:
            continue
        binary = (export / bench["binary"]).read_bytes() if bench.get("binary") else None
        with offline_measure.prebuilt_cuda_binary(binary):
            func = tvm.runtime.load_module(str(export / bench["file"])).get_function(kernel["uri"])
        for total in lengths:
            at = bench["lengths"].get(str(total))
            if at is None:
                continue
            args = _module_args(at["args"], dev, seed=total)
            try:
                func(*args)
                if dev == "cuda":
                    torch.cuda.synchronize()
                outs = [t for t, a in zip(args, at["args"]) if a["output"]]
                if not all(torch.isfinite(t).all() for t in outs if t.dtype.is_floating_point):
                    raise AssertionError("non-finite output")
                secs = _timer(dev, repeat)(lambda: func(*args))
                rows.append({"model": kernel["spec"]["num_q_heads"], "tokens": at["tokens"],
                             "method": f"windowquant:{kernel['uri']}", "seconds": secs,
                             "gbps": at["bytes_read"] / secs / 1e9, "rel_err": None, "bytes": at["bytes_read"],
                             "note": bench["schedule"], "error": None})
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": kernel["spec"]["num_q_heads"], "tokens": at["tokens"],
                             "method": f"windowquant:{kernel['uri']}", "seconds": None, "gbps": None,
                             "rel_err": None, "bytes": at["bytes_read"], "note": bench["schedule"],
                             "error": f"{type(exc).__name__}: {exc}"})
    return rows
