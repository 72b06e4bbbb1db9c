"""8-bit scale and zero on a per-run grid: the low-bit buckets' metadata at half the bytes (issue 22).

At 2 bits the fp16 scale and zero of a 28-token key group cost 32 / 28 = 1.14 bits per key, a third of what a key
costs in all. Here each group's scale and zero are 8-bit codes on a grid that one *run* of up to
:data:`RUN_GROUPS` consecutive key groups of one append shares (its tokens' values too):

- scale ``s = fp16(base_s * code / 255)`` (fp32 arithmetic), ``base_s`` the run's largest scale rounded up to fp16;
- zero ``z = fp16(z_lo + code * z_step)``, ``z_lo`` the run's smallest zero rounded down to fp16 and ``z_step`` its
  zeros' span / 255 rounded up: the grid covers every zero of the run, so nothing is out of range, and a channel
  whose zero drifts over the run costs resolution, not clipping.

Three fp16 numbers per run and channel (keys) or value group (values) are the base. Codes are computed against
the decoded scale and zero, so a stored bucket is exactly today's format with fp16 metadata constrained to the grid:
every decode kernel reads it after :func:`decode` (fp16 scale/zero per group again), and the reference dequantizes
it the same way. Which buckets use it: widths up to :data:`META8_MAX_WIDTH` when a config sets ``meta_bits=8``;
at 4 and 8 bits metadata is a smaller share and a drifting zero would cost more steps, so they keep fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quant_fit import codes_of
from .quant import QuantizedKeys, QuantizedValues, pack, pack_keys
from .spec import QuantSpec

#: Bits of one group's scale/zero: 16 (fp16) or 8 (codes on the run grid).
META_BITS: tuple[int, ...] = (16, 8)
#: What a config stores unless told otherwise: at 2 bits the same error at 0.90x the bytes (docs/formats.md).
DEFAULT_META_BITS = 8
#: The widest bucket that takes 8-bit metadata when asked.
META8_MAX_WIDTH = 2
#: Key groups per run (448 tokens at k_group 28): the base costs 48 bits per channel per run. Runs of 4 to 64
#: groups changed the int2 reconstruction error by at most 0.01% (needle, MiniLM; docs/formats.md); 16 costs
#: 0.05 effective bits less than 8 and keeps a run within a few frames.
RUN_GROUPS = 16
#: fp16 numbers per base entry: scale base, zero low end, zero step.
BASE_FIELDS = 3
_CODE_MAX = 255


def check_meta_bits(meta_bits: object) -> int:
    """Return ``meta_bits`` if allowed, else raise naming the argument."""
    if isinstance(meta_bits, bool) or meta_bits not in META_BITS:
        raise ValueError(f"meta_bits: must be one of {META_BITS} (bits of each group's scale and zero), "
                         f"got {meta_bits!r}")
    return int(meta_bits)  # type: ignore[arg-type]


def bucket_meta_bits(bits: int, meta_bits: int) -> int:
    """Metadata bits of the ``bits``-wide bucket under a config's ``meta_bits``."""
    return meta_bits if bits <= META8_MAX_WIDTH else 16


def widest_meta8(widths: "tuple[int, ...] | list[int]", meta_bits: int) -> int:
    """The widest of ``widths`` whose bucket stores 8-bit scale/zero under ``meta_bits`` (0: none): with the widths,
    what names the decode kernel that reads them."""
    return max((w for w in widths if w != 16 and bucket_meta_bits(w, meta_bits) == 8), default=0)


def meta_cost_bits(meta_bits: int, k_group: int, v_group: int) -> tuple[float, float]:
    """Metadata bits per key and per value element (scale and zero, and at 8 bits the run base amortized over a
    full run): the figures :func:`~wq_compile.core.allocation.effective_bits` adds to the codes."""
    if meta_bits == 16:
        return 32 / k_group, 32 / v_group
    base = BASE_FIELDS * 16 / (RUN_GROUPS * k_group)
    return 16 / k_group + base, 16 / v_group + base / v_group


@dataclass(frozen=True)
class RunMeta:
    """The 8-bit metadata of one append of ``G`` key groups (``n = G * k_group`` tokens, ``R`` runs).

    ``k_scale/k_zero [Hkv, G, D]`` and ``v_scale/v_zero [Hkv, n, D / v_group]`` uint8 codes, ``k_base
    [Hkv, R, 3, D]`` and ``v_base [Hkv, R, 3, D / v_group]`` fp16, ``run_of [G]`` int32: the run of each group."""

    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_base: torch.Tensor
    v_base: torch.Tensor
    run_of: torch.Tensor


def runs_of(groups: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[groups]`` int32: runs of :data:`RUN_GROUPS` consecutive groups (the last may be shorter)."""
    return (torch.arange(groups, device=device) // RUN_GROUPS).to(torch.int32)


def token_runs(run_of: torch.Tensor, k_group: int, n: int | None = None) -> torch.Tensor:
    """The run of each token (its key group's) from the run of each group ``run_of [..., G]``: ``[..., n]``
    (``n`` defaults to ``G * k_group``); values take their run's base."""
    runs = run_of.repeat_interleave(k_group, dim=-1)
    return runs if n is None else runs[..., :n]


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _run_reduce(x: torch.Tensor, run_of: torch.Tensor, runs: int, how: str) -> torch.Tensor:
    """Reduce ``x [H, G, X]`` over the groups of each run -> ``[H, R, X]``."""
    out = x.new_zeros(x.shape[0], runs, x.shape[2])
    idx = run_of.long().view(1, -1, 1).expand_as(x)
    return out.scatter_reduce(1, idx, x, reduce=how, include_self=False)


def encode(scale: torch.Tensor, zero: torch.Tensor, run_of: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and zero ``[H, G, X]`` (any float) of groups in runs ``run_of [G]`` -> uint8 codes ``[H, G, X]`` each
    and the fp16 base ``[H, R, 3, X]`` (field-major: a kernel reads one field of a run as a contiguous vector).
    Round to nearest, so encoding the decoded values gives the same codes back (the zero step may move by an fp16
    ulp: stored metadata is moved and saved as it is, never encoded again)."""
    s, z = scale.float(), zero.float()
    runs = int(run_of.max()) + 1 if run_of.numel() else 0
    s_max = _fp16_up(_run_reduce(s, run_of, runs, "amax"))
    z_lo = _fp16_down(_run_reduce(z, run_of, runs, "amin"))
    z_step = _fp16_up((_run_reduce(z, run_of, runs, "amax") - z_lo.float()) / _CODE_MAX)
    r = run_of.long()
    bs, zl, zs = s_max.float()[:, r], z_lo.float()[:, r], z_step.float()[:, r]
    sc = torch.where(bs > 0, s / torch.where(bs > 0, bs, 1.0) * _CODE_MAX, 0.0).round().clamp(0, _CODE_MAX)
    zc = torch.where(zs > 0, (z - zl) / torch.where(zs > 0, zs, 1.0), 0.0).round().clamp(0, _CODE_MAX)
    base = torch.stack([s_max, z_lo, z_step], -2)
    return sc.to(torch.uint8), zc.to(torch.uint8), base


def decode(sc: torch.Tensor, zc: torch.Tensor, base: torch.Tensor, run_of: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes ``[..., G, X]`` and base ``[..., R, 3, X]`` (runs ``run_of``: ``[G]``, or ``[..., G]`` per sample)
    -> fp16 scale and zero ``[..., G, X]``: ``fp16(base_s * code / 255)``, ``fp16(z_lo + code * z_step)`` in fp32."""
    r = run_of.long()
    if r.dim() == 1:
        b = base[..., r, :, :]
    else:  # per sample: base [B, H, R, 3, X], run_of [B, G]
        idx = r[:, None, :, None, None].expand(-1, base.shape[1], -1, BASE_FIELDS, base.shape[4])
        b = base.gather(2, idx)
    b = b.float()
    s = (b[..., 0, :] * sc.float() / _CODE_MAX).half()
    z = (b[..., 1, :] + zc.float() * b[..., 2, :]).half()
    return s, z


#: Codes ``(k_codes, v_codes)`` of ``(spec, k, v, k_scale, k_zero, v_scale, v_zero)`` against given fp16 scale/zero:
#: the compiled quantize kernel without its fit (``CompiledQuantizer.recode``); None: the torch reference.
Recode = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def constrain(k: torch.Tensor, v: torch.Tensor, qk: QuantizedKeys, qv: QuantizedValues, recode: Recode | None = None
              ) -> tuple[QuantizedKeys, QuantizedValues, RunMeta]:
    """Put fitted ``qk, qv`` (of ``k, v [Hkv, n, D]``, whole key groups) on the 8-bit grid of their runs: the
    codes are recomputed against the decoded scale and zero (by ``recode`` when given, the compiled per-element
    pass; the grid itself is a few small tensors). Returns the fp16 view (what kernels read after
    :func:`decode`) and the :class:`RunMeta` the bucket stores."""
    spec: QuantSpec = qk.spec
    h, n, d = k.shape
    g = n // spec.k_group
    if n % spec.k_group or qk.scale.shape[-2] != g or qv.scale.shape[-2] != n:
        raise ValueError(f"k: {n} tokens is not the {qk.scale.shape[-2]} whole key groups of {spec.k_group} "
                         f"that qk holds")
    run_of = runs_of(g, k.device)
    ksc, kzc, kbase = encode(qk.scale, qk.zero, run_of)
    ks, kz = decode(ksc, kzc, kbase, run_of)
    tok_run = token_runs(run_of, spec.k_group)
    vsc, vzc, vbase = encode(qv.scale, qv.zero, tok_run)
    vs, vz = decode(vsc, vzc, vbase, tok_run)
    rm = RunMeta(ksc, kzc, vsc, vzc, kbase, vbase, run_of)
    if recode is not None:
        kc, vc = recode(spec, k, v, ks, kz, vs, vz)
        return QuantizedKeys(kc, ks, kz, spec), QuantizedValues(vc, vs, vz, spec), rm
    kg = k.float().reshape(h, g, spec.k_group, d)
    kcodes = codes_of(kg, ks.float()[:, :, None, :], kz.float()[:, :, None, :], spec.qmax).to(torch.int64)
    vg = v.float().reshape(h, n, d // spec.v_group, spec.v_group)
    vcodes = codes_of(vg, vs.float()[..., None], vz.float()[..., None], spec.qmax).to(torch.int64)
    qk8 = QuantizedKeys(pack_keys(kcodes.reshape(h, n, d), spec.bits, spec.k_group), ks, kz, spec)
    qv8 = QuantizedValues(pack(vcodes.reshape(h, n, d), spec.bits), vs, vz, spec)
    return qk8, qv8, rm
