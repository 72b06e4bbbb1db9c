"""Edge cases of the split-KV decode (split kernel + merge) and of the split-KV multi-token kernel (+ the same
merge) against the torch reference, for the GPU visit.

The review of issue 21 found the kernel sound at the preset shapes with every piece full; what only a run can show
is masking, padding and empty pieces: batch 3 with a padding sample (no tokens), lengths that are not multiples of
the key group (28) or the chunk (32), a residual of 1-31 tokens, an empty bucket, and split counts P of 1, 3, 66
and more than a short piece has chunks. Every output is poisoned (NaN) before the call, so a block that writes
nothing shows up; every merged output must be finite and match the reference. Only torch, the pure-torch core
and the argument descriptions are imported (the visit runs with the TVM runtime only).

``python -m wq_compile.tuning.gpu_edge_cases --export DIR [--small]`` runs them on the export's split kernel and
merge (its first candidate each): the visit runs it under ``compute-sanitizer`` (memcheck / racecheck /
synccheck) with ``--small``.

The multi-token kernel runs the same layers with ``S`` in :data:`STEPS` new tokens appended to every sample (the
padding sample then holds the step alone), against ``decode_attention(..., causal_tail=S)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.layout import LayerCache
from ..core.reference import decode_attention
from ..core.spec import KernelSpec, bucket_widths
from ..core.windows import Windows
from ..kernels.signatures import SPLIT_CHUNK, choose_splits, is_split, piece_fields, signature

#: Split counts every case runs with: one split, a few, the 7B's at 8K tokens on 132 SMs, more than any piece's chunks;
#: and the decoder's own choice for the case on 132 SMs (:func:`decoder_parts`).
PARTS = (1, 3, 66, 200)
#: SMs the decoder's split count is chosen for (H100 / H200).
GPU_SMS = 132
SMALL_PARTS = (1, 3)
#: New tokens per step of the multi-token cases: two, an odd count across row tiles, a full launch.
STEPS = (2, 7, 64)
SMALL_STEPS = (2, 7)
#: Largest |error| accepted against the reference, per query dtype (codes are identical; only arithmetic differs).
ATOL = {"f32": 1e-3, "f16": 2e-2, "bf16": 6e-2}

SplitFn = Callable[..., Any]


@dataclass(frozen=True)
class EdgeCase:
    """One layer to decode: prompt tokens per sample (0: a padding sample) and the windows of a non-empty sample as
    (start, length, bits) fractions of its prompt's window budget."""

    name: str
    tokens: tuple[int, ...]
    windows: tuple[tuple[int, int, int], ...]


def edge_cases(widths: Sequence[int], small: bool = False) -> list[EdgeCase]:
    """The cases for a kernel over the quantized ``widths`` (windows only of those widths; the rest stay empty)."""
    w = sorted(widths, reverse=True)
    hi, lo = w[0], w[-1]
    cases = [
        # a padding sample between two others; window lengths 45 / 60 / 90: not multiples of 28 or 32
        EdgeCase("batch3_padding", (300, 0, 181), ((0, 90, hi), (90, 60, lo), (150, 45, hi))),
        # residual 1, 17, 31 tokens after 112 windowed tokens (4 key groups)
        EdgeCase("residual_1_17_31", (113, 129, 143), ((0, 56, hi), (56, 56, lo))),
        # one width only: every other bucket empty (capacity, no tokens)
        EdgeCase("empty_buckets", (77, 200), ((0, 45, lo),)),
        # a short piece (1 chunk) next to a long one: P above the short piece's chunks
        EdgeCase("short_piece", (1000,), ((0, 28, lo), (28, 900, hi))),
        # one token, no window at all: the dense piece alone
        EdgeCase("one_token", (1,), ()),
    ]
    return cases[:3] if small else cases


def build_layer(case: EdgeCase, spec: KernelSpec, device: str, seed: int = 0) -> tuple[LayerCache, torch.Tensor]:
    """The layer of ``case`` (torch quantizer, the reference format) and a query ``[B, Hq, D]``."""
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
    k_group, v_group = spec.k_group, min(spec.v_group, spec.head_dim)
    gen = torch.Generator().manual_seed(seed)
    layer = LayerCache.empty(len(case.tokens), spec.num_kv_heads, spec.head_dim, dtype, device, k_group=k_group,
                             v_group=v_group, residual=10_000, chunk=2 * SPLIT_CHUNK,
                             widths=bucket_widths(spec.bits))
    for b, t in enumerate(case.tokens):
        if t == 0:
            continue
        k = torch.randn(spec.num_kv_heads, t, spec.head_dim, generator=gen).to(dtype)
        v = torch.randn(spec.num_kv_heads, t, spec.head_dim, generator=gen).to(dtype)
        wins = [(s, min(n, t - s), bits) for s, n, bits in case.windows if s < t]
        windows = Windows(torch.tensor([s for s, _, _ in wins], dtype=torch.long),
                          torch.tensor([n for _, n, _ in wins], dtype=torch.long),
                          torch.tensor([bits for _, _, bits in wins], dtype=torch.long))
        layer.fill_sample(b, k.to(device), v.to(device), windows)
    q = torch.randn(len(case.tokens), spec.num_q_heads, spec.head_dim, generator=gen).to(dtype).to(device)
    return layer, q


def split_args(spec: KernelSpec, layer: LayerCache, q: torch.Tensor, sm_scale: float) -> list[Any]:
    """The split kernel's inputs in signature order, read from the layer's pieces by name (as the decoder does)."""
    pieces: dict[str, Any] = {f"q{b}": layer.buckets[b] for b in spec.bits if b != 16}
    pieces["dense"] = layer.dense
    args: list[Any] = [q.contiguous()]
    for a in signature(spec).inputs[1:]:
        if a.is_scalar:
            args.append(sm_scale)
        else:
            tag, field = piece_fields(a.name)
            args.append(getattr(pieces[tag], field))
    return args


def decoder_parts(spec: KernelSpec, layer: LayerCache) -> int:
    """The split count the CUDA decoder launches for ``layer`` on a 132-SM GPU: from the chunks of all pieces
    together (their capacities), as :class:`~wq_compile.runtime.decoder.FusedDecoder` calls ``choose_splits``."""
    caps = [layer.buckets[b].capacity for b in spec.bits if b != 16] + [layer.dense.capacity]
    return choose_splits(GPU_SMS, sum(caps), layer.dense.lens.shape[0], spec.num_kv_heads, SPLIT_CHUNK)


def run_edge_cases(spec: KernelSpec, split_fn: SplitFn, merge_fn: SplitFn, device: str, *, small: bool = False,
                   parts: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every case at every split count: max |error| against the reference over the non-padding samples, whether
    every merged output is finite, and ``ok``. ``split_fn(*inputs, o_parts, lse_parts)``, ``merge_fn(o_parts,
    lse_parts, out)``: the loaded modules' functions. A multi-token kernel: :func:`run_multi_edge_cases`."""
    if not is_split(spec):
        raise ValueError(f"{spec.uri}: not a split-KV kernel")
    if spec.kind == "multi":
        return run_multi_edge_cases(spec, split_fn, merge_fn, device, small=small, parts=parts)
    quantized = [b for b in spec.bits if b != 16]
    rows = []
    for case in edge_cases(quantized, small):
        layer, q = build_layer(case, spec, device)
        scale = spec.head_dim ** -0.5
        ref = decode_attention(q, layer, scale).float()
        real = torch.tensor([t > 0 for t in case.tokens], device=device)
        plist = list(parts or (SMALL_PARTS if small else PARTS))
        if parts is None and not small and decoder_parts(spec, layer) not in plist:
            plist.append(decoder_parts(spec, layer))
        for p in plist:
            bsz, hq, d = q.shape
            o_parts = torch.full((p, bsz, hq, d), float("nan"), dtype=torch.float32, device=device)
            lse_parts = torch.full((p, bsz, hq), float("nan"), dtype=torch.float32, device=device)
            out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
            row: dict[str, Any] = {"kernel": spec.uri, "case": case.name, "tokens": list(case.tokens), "parts": p,
                                   "decoder_parts": p == decoder_parts(spec, layer)}
            try:
                split_fn(*split_args(spec, layer, q, scale), o_parts, lse_parts)
                merge_fn(o_parts, lse_parts, out)
                if device == "cuda":
                    torch.cuda.synchronize()
                got = out.float()
                row["finite"] = bool(torch.isfinite(got).all())
                row["lse_nan"] = bool(torch.isnan(lse_parts).any())  # -inf is an empty split; NaN is unwritten
                row["max_abs_err"] = float((got[real] - ref[real]).abs().max()) if bool(real.any()) else 0.0
                row["padding_zero"] = bool((got[~real] == 0).all())
                row["ok"] = (row["finite"] and not row["lse_nan"] and row["padding_zero"]
                             and row["max_abs_err"] <= ATOL[spec.dtype])
            except Exception as exc:  # noqa: BLE001 - a failing case is a row of the report, not the end of the visit
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
    return rows


def run_multi_edge_cases(spec: KernelSpec, split_fn: SplitFn, merge_fn: SplitFn, device: str, *,
                         small: bool = False, parts: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The split-KV multi-token kernel on every case with ``S`` in :data:`STEPS` new tokens appended, at every split
    count: rows as :func:`run_edge_cases` (every sample compared: a padding sample holds the step)."""
    rows = []
    for case in edge_cases([b for b in spec.bits if b != 16], small):
        for steps in SMALL_STEPS if small else STEPS:
            layer, _ = build_layer(case, spec, device)
            gen = torch.Generator().manual_seed(steps)
            bsz, hkv, d, hq = len(case.tokens), spec.num_kv_heads, spec.head_dim, spec.num_q_heads
            new = [torch.randn(bsz, hkv, steps, d, generator=gen).to(layer.dense.k.dtype).to(device) for _ in "kv"]
            layer.append(*new)
            q = torch.randn(bsz, hq, steps, d, generator=gen).to(layer.dense.k.dtype).to(device)
            scale = d ** -0.5
            ref = decode_attention(q, layer, scale, causal_tail=steps).transpose(1, 2).float()
            args = split_args(spec, layer, q.transpose(1, 2), scale)
            tiles = -(-steps * (hq // hkv) // int(dict(spec.extra).get("rows", hq // hkv)))  # row tiles per sample
            auto = choose_splits(GPU_SMS, layer.dense.capacity + sum(b.capacity for b in layer.buckets.values()),
                                 bsz * tiles, hkv, SPLIT_CHUNK)  # as StepDecoder chooses it
            for p in list(parts or (SMALL_PARTS if small else (*PARTS, auto))):
                o_parts = torch.full((p, bsz, steps, hq, d), float("nan"), dtype=torch.float32, device=device)
                lse_parts = torch.full((p, bsz, steps, hq), float("nan"), dtype=torch.float32, device=device)
                out = torch.full((bsz, steps, hq, d), float("nan"), dtype=q.dtype, device=device)
                row: dict[str, Any] = {"kernel": spec.uri, "case": f"{case.name}_S{steps}", "tokens": list(case.tokens),
                                       "steps": steps, "parts": p, "decoder_parts": p == auto}
                try:
                    split_fn(*args, o_parts, lse_parts)
                    merge_fn(o_parts.view(p, bsz * steps, hq, d), lse_parts.view(p, bsz * steps, hq),
                             out.view(bsz * steps, hq, d))
                    if device == "cuda":
                        torch.cuda.synchronize()
                    got = out.float()
                    row["finite"] = bool(torch.isfinite(got).all())
                    row["lse_nan"] = bool(torch.isnan(lse_parts).any())
                    row["max_abs_err"] = float((got - ref).abs().max())
                    row["ok"] = row["finite"] and not row["lse_nan"] and row["max_abs_err"] <= ATOL[spec.dtype]
                except Exception as exc:  # noqa: BLE001 - a failing case is a row of the report
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
    return rows


def export_split_pairs(manifest: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(split kernel, its merge) entries of an export manifest (the split-KV decode and multi-token kernels)."""
    from .offline_format import spec_from_fields

    kernels = {k["uri"]: k for k in manifest["kernels"]}
    pairs = []
    for k in manifest["kernels"]:
        spec = spec_from_fields(k["spec"])
        if spec.kind in ("fused", "decode", "multi") and is_split(spec):
            from ..kernels.signatures import merge_spec

            merge = kernels.get(merge_spec(spec).uri)
            if merge is not None:
                pairs.append((k, merge))
    return pairs


def load_function(export: Path, kernel: dict[str, Any]) -> SplitFn:
    """The first candidate of an exported kernel, loaded with the TVM runtime (and its nvcc binary on CUDA)."""
    import tvm

    from ..compiler.cuda_binary import prebuilt_cuda_binary

    cand = kernel["candidates"][0]
    binary = (export / cand["binary"]).read_bytes() if cand.get("binary") else None
    with prebuilt_cuda_binary(binary):
        module = tvm.runtime.load_module(str(export / cand["file"]))
    return module.get_function("main")


def check_export_edge_cases(export: Path, manifest: dict[str, Any], device: str, *,
                            small: bool = False) -> list[dict[str, Any]]:
    """:func:`run_edge_cases` for every split kernel (and merge) of an export."""
    from .offline_format import spec_from_fields

    rows = []
    for split, merge in export_split_pairs(manifest):
        rows += run_edge_cases(spec_from_fields(split["spec"]), load_function(export, split),
                               load_function(export, merge), device, small=small)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wq_compile.tuning.gpu_edge_cases", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, metavar="DIR")
    p.add_argument("--small", action="store_true", help="the first cases at P 1 and 3 (for compute-sanitizer)")
    a = p.parse_args(argv)
    export = Path(a.export)
    manifest = json.loads((export / "manifest.json").read_text())
    device = "cuda" if manifest["device"]["kind"] == "cuda" else "cpu"
    rows = check_export_edge_cases(export, manifest, device, small=a.small)
    for r in rows:
        print(json.dumps(r))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())


SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


def sanitizer_tool() -> str | None:
    """Path of ``compute-sanitizer`` (PATH, else the CUDA toolkit's bin), or None."""
    import os
    import shutil

    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "compute-sanitizer"
    return str(path) if path.is_file() else None


def run_sanitizer(exports: Sequence[Path], timeout_s: float = 240) -> dict[str, Any]:
    """``compute-sanitizer --tool T`` over the small edge cases of every export, per tool: exit code and the tail
    of its report; ``{"skipped": why}`` where the tool is not installed."""
    import os
    import subprocess

    tool = sanitizer_tool()
    if tool is None:
        return {"skipped": "compute-sanitizer not found (PATH, $CUDA_HOME/bin): memcheck/racecheck/synccheck not run"}
    out: dict[str, Any] = {"tool": tool}
    for export in exports:
        for check in SANITIZER_TOOLS:
            cmd = [tool, "--tool", check, "--error-exitcode", "3", sys.executable, "-m",
                   "wq_compile.tuning.gpu_edge_cases", "--export", str(export), "--small"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
                out[f"{export.name}:{check}"] = {"rc": proc.returncode, "clean": proc.returncode == 0,
                                                 "tail": (proc.stdout + proc.stderr)[-1500:]}
            except subprocess.TimeoutExpired:
                out[f"{export.name}:{check}"] = {"rc": None, "clean": False, "tail": f"timed out after {timeout_s} s"}
    return out
