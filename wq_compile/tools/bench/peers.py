"""Library and handwritten baselines of decode attention, each called the fastest way it can be on a CPU.

A peer answers the same question as the WindowQuant kernel (one decode query over ``n`` cached tokens of one
layer) from its own copy of the cache, built once outside the timing. Peers that are not installed are returned
with ``fn=None`` and a note that says how to install them (``pip install -e ".[peers]"``), so every table keeps its
rows. ``bytes_read`` is what the peer must read per call (its cache format, every KV head once unless the peer is
known to read it once per query head, which the note then says).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

INSTALL_HINT = 'pip install -e ".[peers]"'


@dataclass(frozen=True)
class Peer:
    """One way of computing decode attention: ``fn()`` returns ``[B, Hq, D]`` fp32; None when unavailable."""

    name: str
    fn: Callable[[], torch.Tensor] | None
    bytes_read: int
    note: str
    #: the arithmetic its inner products run as, for the share of the arithmetic peak (:func:`mac_peaks`): ``fma``
    #: (fp32 FMAs), ``dot8`` (int8 dot products), or None (unknown: bf16 kernels, libraries, references)
    form: str | None = None


def sdpa_peers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> list[Peer]:
    """torch SDPA on the dense cache ``k, v [B, Hkv, N, D]``: both GQA calls, in fp32 and bf16.

    ``enable_gqa=True`` broadcasts each KV head to its query heads; folding the query group into the query axis
    (``q.view(B, Hkv, group, D)``: one decode token needs no mask) reads each KV head once, and is 3-4x faster on
    CPUs. Speedups must be reported against the faster one.
    """
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out: list[Peer] = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        qd, kd, vd = q.to(dtype), k.to(dtype).contiguous(), v.to(dtype).contiguous()
        nbytes = (kd.numel() + vd.numel()) * kd.element_size()

        def gqa(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            return F.scaled_dot_product_attention(qd[:, :, None], kd, vd, scale=sm_scale, enable_gqa=True)[:, :, 0]

        def folded(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            o = F.scaled_dot_product_attention(qd.view(bsz, hkv, group, d), kd, vd, scale=sm_scale)
            return o.reshape(bsz, hq, d)

        form = "fma" if dtype == torch.float32 else None
        out.append(Peer(f"SDPA {tag}, query group folded", folded, nbytes,
                        f"sdpa(q.view(B, Hkv, {group}, D), K, V), dense {tag} cache", form))
        out.append(Peer(f"SDPA {tag}, enable_gqa", gqa, nbytes,
                        f"sdpa(q[:, :, None], K, V, enable_gqa=True), dense {tag} cache", form))
    return out


# ---------------------------------------------------------------------------------------------------------------
# ggml flash attention over a q4_0 / q8_0 / f16 cache (what llama.cpp runs with --cache-type-k/-v)
# ---------------------------------------------------------------------------------------------------------------

class GgmlAttention:
    """``ggml_flash_attn_ext`` on the CPU with a persistent thread pool, through the ``ggml-python`` bindings.

    The graph is built once per cache; a call only runs ``ggml_graph_compute``. ggml quantizes the query to q8_0
    for quantized keys (an int8 dot product) and reads each KV head once per query head (no GQA sharing).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, cache_type: str,
                 threads: int) -> None:
        from ggml import ggml as g

        self.g = g
        bsz, hq, d = q.shape
        if bsz != 1:
            raise ValueError(f"q: the ggml peer runs batch 1, got batch {bsz}")
        hkv, n = k.shape[1], k.shape[2]
        gtype = {"q4_0": g.GGML_TYPE_Q4_0, "q8_0": g.GGML_TYPE_Q8_0, "f16": g.GGML_TYPE_F16}[cache_type]
        row = g.ggml_row_size(gtype, d)
        kv_bytes = 2 * row * n * hkv
        self.bytes_read = kv_bytes
        params = g.ggml_init_params(mem_size=kv_bytes + 4 * hq * d * 4 + 64 * 1024 * 1024, mem_buffer=None,
                                    no_alloc=False)
        self.ctx = g.ggml_init(params)
        qt = g.ggml_new_tensor_4d(self.ctx, g.GGML_TYPE_F32, d, 1, hq, 1)
        kt = g.ggml_new_tensor_4d(self.ctx, gtype, d, n, hkv, 1)
        vt = g.ggml_new_tensor_4d(self.ctx, gtype, d, n, hkv, 1)
        self._fill_f32(qt, q[0].float().contiguous().numpy())  # [Hq, D] = ne (D, 1, Hq)
        for t, x in ((kt, k[0]), (vt, v[0])):  # [Hkv, N, D] = ne (D, N, Hkv)
            src = np.ascontiguousarray(x.float().numpy())
            if cache_type == "f16":
                half = src.astype(np.float16)
                ctypes.memmove(g.ggml_get_data(t), half.ctypes.data, half.nbytes)
            else:
                arr = src.reshape(-1).ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                g.ggml_quantize_chunk(gtype, arr, g.ggml_get_data(t), 0, n * hkv, d, None)
        self.out = g.ggml_flash_attn_ext(self.ctx, qt, kt, vt, None, sm_scale, 0.0, 0.0)
        g.ggml_flash_attn_ext_set_prec(self.out, g.GGML_PREC_F32)
        self.graph = g.ggml_new_graph(self.ctx)
        g.ggml_build_forward_expand(self.graph, self.out)
        tp_params = g.ggml_threadpool_params_default(threads)
        tp_params.poll = 0  # no busy-wait after a graph (it would run against the next method's threads)
        self.pool = g.ggml_threadpool_new(ctypes.byref(tp_params))
        self.plan = g.ggml_graph_plan(self.graph, threads, self.pool)
        self.work = (ctypes.c_uint8 * max(1, self.plan.work_size))()
        self.plan.work_data = ctypes.cast(self.work, ctypes.POINTER(ctypes.c_uint8))
        self.shape = (1, hq, d)

    @staticmethod
    def _fill_f32(t: Any, x: np.ndarray) -> None:
        from ggml import ggml as g

        ctypes.memmove(g.ggml_get_data(t), x.ctypes.data, x.nbytes)

    def __call__(self) -> torch.Tensor:
        status = self.g.ggml_graph_compute(self.graph, ctypes.byref(self.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        nbytes = int(np.prod(self.shape)) * 4
        buf = (ctypes.c_float * (nbytes // 4)).from_address(self.g.ggml_get_data(self.out))
        # output ne (D, Hq, 1, 1): contiguous [Hq, D]
        return torch.from_numpy(np.ctypeslib.as_array(buf).copy()).view(self.shape)

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.g.ggml_threadpool_free(self.pool)
            self.pool = None
        if getattr(self, "ctx", None) is not None:
            self.g.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()


def ggml_peers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, threads: int) -> list[Peer]:
    """ggml flash attention over q8_0, q4_0 and f16 K/V, or rows that say how to install it."""
    types = ("q8_0", "q4_0", "f16")
    try:
        import ggml  # noqa: F401
    except ImportError:
        return [Peer(f"ggml flash-attn {t}", None, 0, f"not installed: {INSTALL_HINT} (ggml-python)") for t in types]
    group = q.shape[1] // k.shape[1]
    out = []
    for t in types:
        att = GgmlAttention(q, k, v, sm_scale, t, threads)
        out.append(Peer(f"ggml flash-attn {t}", att, att.bytes_read,
                        f"ggml_flash_attn_ext, {t} K/V, PREC_F32, {threads} threads; reads each KV head {group}x"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime GroupQueryAttention (contrib op) with a shared past/present buffer
# ---------------------------------------------------------------------------------------------------------------

class OrtGqa:
    """ONNX Runtime's ``com.microsoft.GroupQueryAttention`` decoding one token over a cache of ``n`` tokens.

    The cache is a BNSH buffer shared between past and present (``cache_sequence_length`` = ``n``): the call appends
    the newest token in place, so it reads ``n`` cached tokens and copies nothing. ``int8`` uses the op's
    per-channel int8 K/V cache with float scales.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, cache: str,
                 threads: int) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        bsz, hq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        int8 = cache == "int8"
        cache_t = TensorProto.INT8 if int8 else TensorProto.FLOAT
        inputs = [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, [bsz, 1, hq * d]),
            helper.make_tensor_value_info("key", TensorProto.FLOAT, [bsz, 1, hkv * d]),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, [bsz, 1, hkv * d]),
            helper.make_tensor_value_info("past_key", cache_t, [bsz, hkv, n, d]),
            helper.make_tensor_value_info("past_value", cache_t, [bsz, hkv, n, d]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [bsz]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        names = [i.name for i in inputs] + ["", ""]  # cos_cache, sin_cache
        attrs: dict[str, Any] = dict(num_heads=hq, kv_num_heads=hkv, scale=sm_scale)
        if int8:
            names += ["", "", "", "k_scale", "v_scale"]  # position_ids, attention_bias, head_sink
            inputs += [helper.make_tensor_value_info("k_scale", TensorProto.FLOAT, [1, hkv, 1, d]),
                       helper.make_tensor_value_info("v_scale", TensorProto.FLOAT, [1, hkv, 1, d])]
            attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                                domain="com.microsoft", **attrs)
        outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [bsz, 1, hq * d]),
                   helper.make_tensor_value_info("present_key", cache_t, [bsz, hkv, n, d]),
                   helper.make_tensor_value_info("present_value", cache_t, [bsz, hkv, n, d])]
        graph = helper.make_graph([node], "gqa_decode", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait after a call
        self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        kk, vv = k.float().numpy(), v.float().numpy()
        feeds: dict[str, np.ndarray] = {}
        if int8:
            ks = np.maximum(np.abs(kk).max(axis=(0, 2), keepdims=True), 1e-8) / 127.0  # [1, Hkv, 1, D]
            vs = np.maximum(np.abs(vv).max(axis=(0, 2), keepdims=True), 1e-8) / 127.0
            past_k = np.clip(np.round(kk / ks), -127, 127).astype(np.int8)
            past_v = np.clip(np.round(vv / vs), -127, 127).astype(np.int8)
            feeds.update(k_scale=ks.astype(np.float32), v_scale=vs.astype(np.float32))
            self.bytes_read = past_k.nbytes * 2
        else:
            past_k, past_v = kk.copy(), vv.copy()
            self.bytes_read = past_k.nbytes * 2
        # the newest token is passed as key/value and written at position n-1 of the shared buffer
        self.past_k, self.past_v = np.ascontiguousarray(past_k), np.ascontiguousarray(past_v)
        new_k = kk[:, :, n - 1].reshape(bsz, 1, hkv * d).astype(np.float32)
        new_v = vv[:, :, n - 1].reshape(bsz, 1, hkv * d).astype(np.float32)
        feeds.update(query=q.float().numpy().reshape(bsz, 1, hq * d), key=new_k, value=new_v,
                     seqlens_k=np.full((bsz,), n - 1, np.int32), total_sequence_length=np.array(n, np.int32))
        self.binding = self.sess.io_binding()
        for name, arr in feeds.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        self.binding.bind_cpu_input("past_key", self.past_k)
        self.binding.bind_cpu_input("past_value", self.past_v)
        self.out = np.empty((bsz, 1, hq * d), np.float32)
        self.binding.bind_output("output", "cpu", 0, np.float32, list(self.out.shape), self.out.ctypes.data)
        cache_np = np.int8 if int8 else np.float32
        self.binding.bind_output("present_key", "cpu", 0, cache_np, list(self.past_k.shape), self.past_k.ctypes.data)
        self.binding.bind_output("present_value", "cpu", 0, cache_np, list(self.past_v.shape),
                                 self.past_v.ctypes.data)
        self.shape = (bsz, hq, d)
        del onnx

    def __call__(self) -> torch.Tensor:
        self.sess.run_with_iobinding(self.binding)
        return torch.from_numpy(self.out.copy()).view(self.shape)


def ort_peers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, threads: int) -> list[Peer]:
    """ONNX Runtime GroupQueryAttention with an fp32 and an int8 cache, or rows that say how to install it."""
    kinds = ("fp32", "int8")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return [Peer(f"ONNX Runtime GQA {c} cache", None, 0, f"not installed: {INSTALL_HINT} (onnxruntime)")
                for c in kinds]
    out = []
    for c in kinds:
        try:
            att = OrtGqa(q, k, v, sm_scale, c, threads)
        except Exception as e:  # an op variant this onnxruntime build lacks is a row, not a crash
            out.append(Peer(f"ONNX Runtime GQA {c} cache", None, 0, f"unsupported here: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}"))
            continue
        out.append(Peer(f"ONNX Runtime GQA {c} cache", att, att.bytes_read,
                        f"com.microsoft.GroupQueryAttention, {c} BNSH cache shared past/present, {threads} threads"))
    return out


def copy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Copy bandwidth of this machine in GB/s (bytes read + written / s), torch ``copy_`` of ``nbytes``."""
    import time

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def mac_peaks(target: str = "llvm", iters: int = 1 << 20, repeats: int = 5) -> dict[str, float]:
    """Multiply-adds per second of ONE core in the CPU kernel's instruction forms on ``target`` (an llvm target):
    ``{"fma": fp32 FMA lanes/s, "dot8": int8 dot-product multiply-adds/s}`` (no ``dot8`` where the target has no
    int8 dots), the best of ``repeats`` runs of :func:`wq_compile.kernels.probes.peak_probe` on this thread."""
    import time

    from ...compiler.build import build_func
    from ...compiler.device import resolve_device
    from ...compiler.isa_variants import cpu_isa
    from ...kernels.probes import PROBE_KINDS, peak_probe, probe_macs_per_step

    device = resolve_device(target)
    cpu = cpu_isa(device)
    if cpu is None:
        raise ValueError(f"mac_peaks: {target!r} is not a CPU (llvm) target")
    ops = torch.ones((2, 4 * cpu.lanes), dtype=torch.uint8)
    out: dict[str, float] = {}
    for kind in PROBE_KINDS:
        if kind == "dot8" and cpu.dot is None:
            continue
        chains = 12
        fn = build_func(peak_probe(cpu, kind, chains), device)["main"]
        res = torch.zeros(cpu.lanes, dtype=torch.int32 if kind == "dot8" else torch.float32)
        fn(ops, iters // 16, res)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(ops, iters, res)
            best = min(best, time.perf_counter() - t0)
        out[kind] = iters * chains * probe_macs_per_step(cpu, kind) / best
    return out
