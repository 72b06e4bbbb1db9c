"""The kernels a WindowQuant cache runs: compiled modules when they can be had, the torch reference otherwise.

A :class:`Backend` is chosen once per cache (``make_backend``): ``decode`` is called once per layer per step (one
launch of the fused kernel over every bucket and the dense piece), ``decode_steps`` once per layer per step of
several new tokens (the multi-token kernel; on CUDA its split-KV form and the merge), ``quantize`` whenever windows or a residual block enter a
bucket. The reference path exists for machines where no module can be built, and says so.
Compiled backends are shared in the process per (config, attention shapes, dtype, device): a second cache or a
second ``generate`` costs nothing to set up.
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..compiler.cpu_threads import share_cores_with_torch
from ..core.buckets import Quantizer, torch_quantizer
from ..core.config import WindowQuantConfig
from ..core.layout import LayerCache
from ..core.meta8 import bucket_meta_bits, widest_meta8
from ..core.quant import QuantizedKeys, QuantizedValues, check_quantizable, quantize_keys, quantize_values
from ..core.quant_fit import DEFAULT_FIT, check_fit
from ..core.reference import decode_attention
from ..core.spec import KernelSpec, QuantSpec, dtype_tag
from ..kernels.signatures import compiled_fit, quantize_spec

if TYPE_CHECKING:
    from .library import KernelLibrary


class AttentionDecoder(Protocol):
    def __call__(self, q: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        """``q [B, Hq, D]`` -> attention output ``[B, Hq, D]`` over every token of ``layer``."""


class StepsDecoder(Protocol):
    def __call__(self, query: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        """``query [B, Hq, S, D]`` (the ``S`` newest tokens of ``layer``'s dense piece) -> ``[B, S, Hq, D]``."""


class ReferenceDecoder:
    """Dequantize-and-attend in torch: the oracle, and the fallback when no compiled module can be had."""

    def __call__(self, q: torch.Tensor, layer: LayerCache, sm_scale: float, stats: Any) -> torch.Tensor:
        stats.reference_calls += 1
        return decode_attention(q, layer, sm_scale).to(q.dtype)  # type: ignore[union-attr]


class CompiledQuantizer:
    """The compiled quantize+pack kernel of each width (one module per width, every token count)."""

    def __init__(self, library: "KernelLibrary", num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 chunk: int, fit: str = DEFAULT_FIT) -> None:
        if not compiled_fit(fit):
            raise ValueError(f"fit: {fit!r} has no compiled quantize kernel (use reference_quantizer)")
        self.library = library
        self.shape = dict(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          dtype=dtype_tag(dtype), chunk=chunk)
        self.dtype = dtype
        self.fit = fit
        self.calls = 0

    def spec(self, qs: QuantSpec) -> KernelSpec:
        return quantize_spec(qs.bits, self.fit, k_group=qs.k_group, v_group=qs.v_group, **self.shape)

    def __call__(self, qs: QuantSpec, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantizedKeys, QuantizedValues]:
        # The kernel would code NaN as its group's minimum and overflow fp16 scales: refuse, as the reference does.
        check_quantizable("k", k)
        check_quantizable("v", v)
        return self.screened(qs, k, v)

    def screened(self, qs: QuantSpec, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantizedKeys, QuantizedValues]:
        """The call for tokens already screened by the caller (``LayerCache.fill_sample`` checks every window once
        per layer before it reaches a bucket): the same kernel call without a second pass over ``k, v``."""
        kernel = self.library.load(self.spec(qs))
        kc, ks, kz, vc, vs, vz = kernel.run(k.to(self.dtype).contiguous()[None], v.to(self.dtype).contiguous()[None])
        self.calls += 1
        return QuantizedKeys(kc[0], ks[0], kz[0], qs), QuantizedValues(vc[0], vs[0], vz[0], qs)

    def recode_spec(self, qs: QuantSpec) -> KernelSpec:
        """The quantize kernel of ``qs``'s width that codes against given scale/zero (no fit)."""
        return quantize_spec(qs.bits, given=True, k_group=qs.k_group, v_group=qs.v_group, **self.shape)

    def recode(self, qs: QuantSpec, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
               v_scale: torch.Tensor, v_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed key and value codes of screened ``k, v [Hkv, n, D]`` against given fp16 scale/zero (the 8-bit
        grid's, :func:`wq_compile.core.meta8.constrain`): the compiled kernel without its fit."""
        kernel = self.library.load(self.recode_spec(qs))
        kc, vc = kernel.run(k.to(self.dtype).contiguous()[None], v.to(self.dtype).contiguous()[None],
                            *(t.contiguous()[None] for t in (k_scale, k_zero, v_scale, v_zero)))
        return kc[0], vc[0]


@dataclass
class Backend:
    """What the cache calls: ``decode`` per layer per step, ``quantize`` when tokens enter a bucket."""

    name: str
    decode: AttentionDecoder
    quantize: Quantizer
    #: ``kernel uri -> "tuned here" | "tuned on <tag>" | "untuned"`` (empty for the reference).
    kernels: dict[str, str] = field(default_factory=dict)
    #: Modules compiled (cold) vs loaded from the module cache (warm) to set this backend up.
    compiled: int = 0
    cached: int = 0
    reused: int = 0  # already loaded in this process by another backend of the same library
    #: What runs the CPU kernels' parallel loops ("torch OpenMP", or "TVM pool (why)"); empty on GPUs.
    threads: str = ""
    #: Several new tokens in one compiled launch per layer (None: no such kernel here; the caller falls back).
    decode_steps: StepsDecoder | None = None

    def tuning_summary(self) -> str:
        """One line for reports: which kernels are tuned, from where, and which are not."""
        if not self.kernels:
            return "torch reference (no compiled kernels)"
        kinds = "; ".join(f"{uri.split('_')[0]} {'/'.join(_widths(uri))}{_modes(uri)}: {how}"
                          for uri, how in self.kernels.items())
        threads = f"; CPU threads: {self.threads}" if self.threads else ""
        return (f"{kinds} (modules: {self.compiled} compiled, {self.cached} from the module cache, "
                f"{self.reused} already loaded in this process{threads})")


def _widths(uri: str) -> list[str]:
    return [p for p in uri.split("_") if p[:1] == "k" and p[1:2].isdigit()]


def _modes(uri: str) -> str:
    """What else a report says about a kernel: int8 dots, 8-bit scale/zero read, the quantize kernel's recode form."""
    parts = uri.split("_")
    modes = [name for key, name in (("dot81", "int8 dots"), ("given1", "recode"))
             if key in parts] + ["8-bit scale/zero" for p in parts if p.startswith("meta8")]
    return f" ({', '.join(modes)})" if modes else ""


_SHARED: dict[tuple[Any, ...], Backend] = {}
_SHARED_LOCK = threading.Lock()


def make_backend(wq: WindowQuantConfig, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, *, shared: bool = True) -> Backend:
    """Compiled modules for these shapes (``wq.backend`` "auto"/"tvm"); else the torch reference, with a warning
    ("auto") or an error ("tvm"). Modules load from the cache, else compile from a tuning log of this or a
    compatible device, else from the default schedule (``UntunedKernelWarning``). With ``shared`` (the default)
    one backend per config and shapes serves the whole process."""
    wq = wq.for_model(num_q_heads, num_kv_heads, head_dim)  # v_group=None -> min(64, head_dim); shape checks
    if wq.backend == "reference":
        return Backend("reference", ReferenceDecoder(), reference_quantizer(wq.fit))
    share_cores_with_torch()
    key = (wq, num_q_heads, num_kv_heads, head_dim, dtype, str(torch.device(device)))
    with _SHARED_LOCK:
        if shared and key in _SHARED:
            return _SHARED[key]
        backend = _compiled_backend(wq, num_q_heads, num_kv_heads, head_dim, dtype, device)
        if shared:  # a fallback too: every later cache would otherwise retry (and warn) again
            _SHARED[key] = backend
        return backend


class BuildProgress:
    """A progress bar over the kernels a backend sets up, shown from the first kernel that must be compiled (tens of
    seconds each, once: they are cached afterwards); a warm module cache shows nothing."""

    def __init__(self, total: int, stats: Any) -> None:
        self.total, self.stats, self.bar = total, stats, None
        self.start = self._done()

    def _done(self) -> int:
        return self.stats.compiled + self.stats.cache_hits  # kernels this library has set up so far

    def compiling(self, spec: KernelSpec) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="WindowQuant: compiling kernels (first use, then cached)",
                            unit="kernel", file=sys.stderr, leave=False)
        self.bar.n = min(self.total, self._done() - self.start)
        self.bar.set_postfix_str(spec.uri.split("_")[0], refresh=True)

    def __enter__(self) -> "BuildProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.n = self.total
            self.bar.refresh()
            self.bar.close()


def _compiled_backend(wq: WindowQuantConfig, num_q_heads: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device | str) -> Backend:
    try:
        from .decoder import FusedDecoder
        from .library import shared_library

        library = shared_library(wq.target or ("cuda" if torch.device(device).type == "cuda" else "llvm"))
        stats = library.stats
        compiled, cached, reused = stats.compiled, stats.cache_hits, stats.reused
        buckets = wq.bucket_widths  # 8, 4, 2 (and 1 when the config allows it)
        widths = buckets if compiled_fit(wq.fit) else ()
        # fused + multi on CPUs; split + merge + multi split (its merge is the split's) on CUDA
        n8 = sum(bucket_meta_bits(w, wq.meta_bits) == 8 for w in widths)  # fused + recode kernels at 8-bit s/z
        bar = BuildProgress(len(widths) + (3 if library.device.kind == "cuda" else 2) + n8, library.stats)
        # 8-bit scale/zero (meta_bits=8): the CPU kernels read it natively, the split-KV ones its expansion
        meta8 = widest_meta8(buckets, wq.meta_bits)
        with library.reporting(bar.compiling), bar:
            decoder = FusedDecoder.create(num_q_heads, num_kv_heads, head_dim, dtype, device, k_group=wq.k_group,
                                          v_group=wq.v_group, chunk=wq.chunk, library=library,
                                          int8_dots=wq.int8_dots, bits=buckets, meta8=meta8)
            fit = wq.fit if compiled_fit(wq.fit) else "minmax"
            compiled_q = CompiledQuantizer(library, num_q_heads, num_kv_heads, head_dim, dtype, wq.chunk, fit)
            meta8 = 0 if decoder.split else meta8
            uris = [spec.uri for spec in decoder.specs(buckets, meta8)]  # the merge too, on CUDA
            # several-token steps: the multi-token kernel (CPUs), its split-KV form and the merge (CUDA)
            from .steps import StepDecoder

            steps = StepDecoder(library, num_q_heads, num_kv_heads, head_dim, dtype, k_group=wq.k_group,
                                v_group=wq.v_group, chunk=wq.chunk)
            steps.kernel(buckets, meta8)
            uris += [spec.uri for spec in steps.specs(buckets, meta8)]
            # the compiled quantize kernel fits keys by min/max or least squares and values by min/max or the zero
            # search; any other fit quantizes with the torch reference
            quantizer = compiled_q if compiled_fit(wq.fit) else reference_quantizer(wq.fit)
            for bits in widths:  # fail here, not in the middle of generation
                spec = compiled_q.spec(QuantSpec(bits, wq.k_group, wq.v_group))
                specs = [spec] + ([compiled_q.recode_spec(QuantSpec(bits, wq.k_group, wq.v_group))]
                                  if bucket_meta_bits(bits, wq.meta_bits) == 8 else [])
                for spec in specs:
                    library.load(spec)
                    uris.append(spec.uri)
        kernels = {uri: how for uri, how in library.provenance().items() if uri in uris}
        return Backend(f"tvm:{library.device.tag}", decoder, quantizer, kernels, stats.compiled - compiled,
                       stats.cache_hits - cached, min(stats.reused - reused, len(kernels)),
                       decoder.kernel(buckets, meta8).threads, steps)
    except Exception as exc:  # noqa: BLE001 - any failure to get a module falls back, loudly
        from .decoder import Int8DotsUnsupportedError

        if wq.backend == "tvm" or isinstance(exc, Int8DotsUnsupportedError):  # a config error: no fallback
            raise
        warnings.warn(f"WindowQuant: no compiled modules ({type(exc).__name__}: {exc}); using the torch "
                      f"reference, which dequantizes every step and is slow", RuntimeWarning, stacklevel=3)
        return Backend("reference", ReferenceDecoder(), reference_quantizer(wq.fit))


def reference_quantizer(fit: str = "minmax") -> Quantizer:
    """The torch quantizer with ``fit`` (:mod:`wq_compile.core.quant_fit`) choosing every group's scale and zero."""
    check_fit(fit)
    if fit == "minmax":
        return torch_quantizer
    return functools.partial(_fit_quantizer, fit)


def _fit_quantizer(fit: str, spec: QuantSpec, k: torch.Tensor, v: torch.Tensor
                   ) -> tuple[QuantizedKeys, QuantizedValues]:
    return quantize_keys(k, spec, fit), quantize_values(v, spec, fit)
