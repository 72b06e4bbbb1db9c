"""How each quantization group's fp16 scale and zero are chosen: min/max, or least squares (``lsq``).

The stored format and the dequantization are the same for every fit (``x ~ code * scale + zero`` in fp32 from fp16
scale and zero, ``code = clamp(round((x - zero) / scale), 0, qmax)``), so the compiled decode kernels read any fit.

- ``minmax``: ``zero = min``, ``scale = (max - min) / qmax`` rounded up in fp16 so no code clips (KIVI's choice,
  and the compiled quantize kernel's);
- ``lsq``: alternating least squares, started from min/max. With the codes fixed, the scale and zero minimising the
  squared reconstruction error are a linear regression of the group's values on its codes; with scale and zero
  fixed, rounding is the best code. Each half-step can only lower the error, so a few iterations converge (Lloyd's
  algorithm for an affine grid). Scale and zero are rounded to fp16 after each fit and every group keeps the best
  of all iterates, min/max included, measured with the fp16 values the cache stores: a group's error is never
  above min/max's. It may clip outliers where that lowers the total error (HQQ's half-quadratic solver also
  trades clipping for a smaller error, on an lp norm with p < 1; this minimises the squared error, which is what
  attention's dot products see).
"""

from __future__ import annotations

import torch

from .spec import SCALE_DTYPE

#: Ways of choosing a group's scale and zero (see the module docstring). ``lsq-keys``: keys by least squares,
#: values by min/max. Measured (docs/formats.md): least squares lowers the squared error of both, but on values
#: its clipping is a bias shared by every token, which attention's weighted sum over tokens does not average
#: away (the tiny model's attention-output error at int2 went 0.045 -> 0.113 with it on values, and stayed 0.045
#: with it on keys only), while min/max rounding errors are unbiased and do average out.
FITS = ("minmax", "lsq", "lsq-keys")
#: Alternating least-squares iterations of the ``lsq`` fit: the error drop after 4 is below 1% on Gaussian groups.
LSQ_ITERS = 4


def check_fit(fit: object) -> str:
    """Return ``fit`` if it names a fit in :data:`FITS`, else raise ``ValueError`` naming the choices."""
    if fit not in FITS:
        raise ValueError(f"fit: must be one of {FITS}, got {fit!r}")
    return str(fit)


def fit_of(fit: str, kind: str) -> str:
    """The fit ``fit`` applies to keys (``kind="k"``) or values (``"v"``): ``minmax`` or ``lsq``."""
    check_fit(fit)
    if kind not in ("k", "v"):
        raise ValueError(f"kind: must be 'k' or 'v', got {kind!r}")
    return "lsq" if fit == "lsq" or (fit == "lsq-keys" and kind == "k") else "minmax"


def minmax_params(mn: torch.Tensor, mx: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) with ``zero + qmax * scale >= max`` so codes never clip; constant groups get scale 0."""
    zero = mn.to(SCALE_DTYPE)
    if not torch.isfinite(zero).all() or not torch.isfinite(mx.to(SCALE_DTYPE)).all():
        raise ValueError("x: values are not finite or exceed the fp16 range of scale/zero")
    span = mx.float() - zero.float()
    scale = (span / qmax).to(SCALE_DTYPE)
    short = scale.float() * qmax < span  # fp16 rounding made the range too small: bump one ulp
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(span > 0, scale, torch.zeros_like(scale))
    return scale, zero


def codes_of(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round((x - zero) / scale), 0, qmax)`` as float (0 where ``scale == 0``): the one coding rule."""
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x.float() - zero.float()) / safe)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return q.clamp_(0, qmax)


def _sq_err(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (codes_of(g, s, z, qmax) * s.float() + z.float() - g).square().sum(-1)


def fit_params(g: torch.Tensor, qmax: int, fit: str = "minmax", iters: int = LSQ_ITERS
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero)`` of every group of ``g [..., n]`` (a group is the last axis), under ``fit``
    (``minmax`` or ``lsq``; :func:`fit_of` maps a config's fit to each of keys and values)."""
    if fit not in ("minmax", "lsq"):
        raise ValueError(f"fit: must be 'minmax' or 'lsq' for one tensor (see fit_of), got {fit!r}")
    g = g.float()
    scale, zero = minmax_params(g.amin(-1), g.amax(-1), qmax)
    if fit == "minmax" or g.shape[-1] == 0:
        return scale, zero
    best = _sq_err(g, scale, zero, qmax)
    s, z = scale, zero
    n = g.shape[-1]
    xm = g.mean(-1)
    for _ in range(iters):
        c = codes_of(g, s.unsqueeze(-1), z.unsqueeze(-1), qmax)
        cm = c.mean(-1)
        var = (c.square().mean(-1) - cm.square()) * n
        cov = ((c * g).mean(-1) - cm * xm) * n
        ok = (var > 0.5) & (cov > 0)  # at least two distinct codes, increasing map
        s_new = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s.float())
        z_new = torch.where(ok, xm - s_new * cm, z.float())
        s16 = s_new.clamp(max=65504.0).to(SCALE_DTYPE)
        z16 = z_new.clamp(-65504.0, 65504.0).to(SCALE_DTYPE)
        s16 = torch.where(s.float() > 0, s16, s)  # constant groups keep scale 0
        err = _sq_err(g, s16, z16, qmax)
        better = err < best
        scale, zero = torch.where(better, s16, scale), torch.where(better, z16, zero)
        best = torch.where(better, err, best)
        s, z = s16, z16
    return scale, zero
