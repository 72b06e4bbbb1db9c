"""How each quantization group's fp16 scale and zero are chosen: min/max, least squares (``lsq``), a zero search
(``zs``) or HQQ (``hqq``).

The stored format and the dequantization are the same for every fit (``x ~ code * scale + zero`` in fp32 from fp16
scale and zero, ``code = clamp(round((x - zero) / scale), 0, qmax)``), so the compiled decode kernels read any fit.

- ``minmax``: ``zero = min``, ``scale = (max - min) / qmax`` rounded up in fp16 so no code clips (KIVI's choice,
  and the compiled quantize kernel's);
- ``lsq``: alternating least squares, started from min/max. With the codes fixed, the scale and zero minimising the
  squared reconstruction error are a linear regression of the group's values on its codes; with scale and zero
  fixed, rounding is the best code. Each half-step can only lower the error, so a few iterations converge (Lloyd's
  algorithm for an affine grid). Scale and zero are rounded to fp16 after each fit and every group keeps the best
  of all iterates, min/max included, measured with the fp16 values the cache stores: a group's error is never
  above min/max's. It may clip outliers where that lowers the total error;
- ``hqq``: HQQ's half-quadratic zero search (a re-implementation of ``hqq.core.optimize``'s legacy proximal
  solver with its defaults; the ``hqq`` package is not imported): min/max's scale, the zero that minimises an lp
  norm (p = 0.7) of the error, which ignores a few large errors instead of spreading them.

- ``zs``: min/max's scale, and the zero among :data:`ZS_SHIFTS` (min/max's zero moved by a fraction of the scale,
  each rounded to fp16) of least squared error; min/max's zero is the first candidate and a later one must be
  strictly better, so a group is never coded worse than by min/max. Nine candidates, no iterations: cheap in the
  compiled quantize kernel. At one bit (two levels) min/max's scale spans the whole range and no zero fixes that:
  ``zs`` is then least squares (Lloyd's 2-means), which the compiled kernel computes too.

A config's ``fit`` names the fit of keys and of values (:data:`FIT_KINDS`, :func:`fit_of`).
"""

from __future__ import annotations

import torch

from .spec import SCALE_DTYPE

#: Ways of choosing a group's scale and zero, as (keys, values) per config name (see the module docstring).
#: Measured (docs/formats.md, int2 attention-output error): least squares lowers the squared error of both, but
#: on values its clipping is a bias every token shares, which attention's weighted sum over tokens does not
#: average away (tiny model 0.045 -> 0.113 with it on values); HQQ's zero search (lp norm, p = 0.7, scale kept)
#: helps values there (0.045 -> 0.035). ``lsq-hqq`` (keys least squares, values HQQ) was the best or within 1%
#: of it on every workload measured.
FIT_KINDS = {"minmax": ("minmax", "minmax"), "lsq": ("lsq", "lsq"), "lsq-keys": ("lsq", "minmax"),
             "hqq": ("hqq", "hqq"), "lsq-hqq": ("lsq", "hqq"), "lsq-zs": ("lsq", "zs"), "zs": ("minmax", "zs")}
FITS = tuple(FIT_KINDS)
#: The default: keys by least squares, values by the zero search; both computed by the compiled quantize kernel, so
#: the store stays a small share of the prefill (docs/formats.md has the measurements behind the choice).
DEFAULT_FIT = "lsq-zs"
#: The zero search's candidates, in units of the group's scale: 0 (min/max) first, then -1/2 .. 1/2 in eighths.
#: Measured (uniform int2, keys least squares, attention-output error; docs/formats.md): values by this search
#: 0.023 on the tiny model (HQQ's zero 0.035, min/max 0.045), and within 2% of the best of HQQ / min/max on needle,
#: duplicates, diffuse and MiniLM; wider (+-1) or finer (17) candidates change it by < 3%.
ZS_SHIFTS: tuple[float, ...] = (0.0, -0.5, -0.375, -0.25, -0.125, 0.125, 0.25, 0.375, 0.5)
#: A later zero-search candidate must beat the best so far by this relative margin. Shifts of -1/2 and +1/2 scale
#: often tie exactly (the grid moved by half a step either way), and fp32 sums in another order would break such a
#: tie either way: with the margin the earlier candidate wins in the reference and in the kernel alike.
ZS_TIE = 1e-5
#: Alternating least-squares iterations of the ``lsq`` fit: the error drop after 4 is below 1% on Gaussian groups.
LSQ_ITERS = 4


def check_fit(fit: object) -> str:
    """Return ``fit`` if it names a fit in :data:`FITS`, else raise ``ValueError`` naming the choices."""
    if fit not in FITS:
        raise ValueError(f"fit: must be one of {FITS}, got {fit!r}")
    return str(fit)


def fit_named(key_fit: str, value_fit: str) -> str:
    """The config fit name of a (keys, values) pair of per-tensor fits (inverse of :func:`fit_of`)."""
    for name, pair in FIT_KINDS.items():
        if pair == (key_fit, value_fit):
            return name
    raise ValueError(f"fit: no fit has keys {key_fit!r} and values {value_fit!r}; expected one of {FIT_KINDS}")


def fit_of(fit: str, kind: str) -> str:
    """The fit ``fit`` applies to keys (``kind="k"``) or values (``"v"``): ``minmax``, ``lsq``, ``hqq`` or ``zs``."""
    check_fit(fit)
    if kind not in ("k", "v"):
        raise ValueError(f"kind: must be 'k' or 'v', got {kind!r}")
    return FIT_KINDS[fit][0 if kind == "k" else 1]


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


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def hqq_params(g: torch.Tensor, qmax: int, iters: int = 20, lp: float = 0.7, beta: float = 10.0,
               kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's half-quadratic zero search (``hqq.core.optimize.optimize_weights_proximal_legacy``, its defaults):
    the scale stays min/max's, the zero minimises an lp (p = 0.7) reconstruction error by proximal steps; each
    group keeps its best iterate by mean absolute error, and the iterations stop, as HQQ's do, at the first step
    that does not lower the tensor's mean error. fp16 scale and zero in this module's convention
    (``x ~ code * scale + zero``)."""
    scale, zero = minmax_params(g.amin(-1), g.amax(-1), qmax)
    s = scale.float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    zq = -zero.float().unsqueeze(-1) * inv  # HQQ's zero: code = round(x * inv + zq)
    best_err = torch.full_like(s, float("inf"))
    best_zq, prev = zq, float("inf")
    for _ in range(iters):
        q = torch.round(g * inv + zq).clamp(0, qmax)
        r = torch.where(inv > 0, (q - zq) / torch.where(inv > 0, inv, torch.ones_like(inv)), g)
        err = (g - r).abs().mean(-1, keepdim=True)  # the error of this iterate's zero
        mean = float(err.mean())
        if mean >= prev:  # HQQ's stop: the tensor's mean error did not improve
            break
        prev = mean
        better = err < best_err
        best_err, best_zq = torch.where(better, err, best_err), torch.where(better, zq, best_zq)
        e = _shrink_lp(g - r, beta, lp)
        zq = torch.mean(q - (g - e) * inv, dim=-1, keepdim=True)
        beta *= kappa
    z_new = torch.where(inv > 0, -best_zq * s, zero.float().unsqueeze(-1)).squeeze(-1)
    return scale, z_new.clamp(-65504.0, 65504.0).to(SCALE_DTYPE)


def zero_search_params(g: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``zs``: min/max's fp16 scale and the fp16 zero among :data:`ZS_SHIFTS` of least squared error (see the
    module docstring); constant groups keep scale 0 and their exact zero.

    The error is measured in units of the scale, as the compiled kernel does (no division per candidate):
    ``u = (x - zero) / scale`` once, then for candidate ``z_j`` the offset ``o = (z_j - zero) / scale`` and
    ``sum((clamp(round(u - o), 0, qmax) - (u - o))^2)``, which is the squared error divided by ``scale^2``."""
    scale, zero = minmax_params(g.amin(-1), g.amax(-1), qmax)
    s = scale.float()
    ok = s > 0
    safe = torch.where(ok, s, torch.ones_like(s))
    u = torch.where(ok.unsqueeze(-1), (g.float() - zero.float().unsqueeze(-1)) / safe.unsqueeze(-1), 0.0)
    best_err, best_zero = None, zero
    for shift in ZS_SHIFTS:
        z = (zero.float() + shift * s).clamp(-65504.0, 65504.0).to(SCALE_DTYPE)
        off = torch.where(ok, (z.float() - zero.float()) / safe, torch.zeros_like(s))
        r = u - off.unsqueeze(-1)
        err = (torch.round(r).clamp(0, qmax) - r).square().sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err * (1.0 - ZS_TIE)
        best_err, best_zero = torch.where(better, err, best_err), torch.where(better, z, best_zero)
    return scale, best_zero


def fit_params(g: torch.Tensor, qmax: int, fit: str = "minmax", iters: int = LSQ_ITERS
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero)`` of every group of ``g [..., n]`` (a group is the last axis), under ``fit``
    (``minmax`` or ``lsq``; :func:`fit_of` maps a config's fit to each of keys and values)."""
    if fit not in ("minmax", "lsq", "hqq", "zs"):
        raise ValueError(f"fit: must be 'minmax', 'lsq', 'hqq' or 'zs' for one tensor (see fit_of), got {fit!r}")
    g = g.float()
    if fit == "hqq":
        return hqq_params(g, qmax)
    if fit == "zs" and qmax > 1:
        return zero_search_params(g, qmax)
    if fit == "zs":  # one bit: two levels, a 2-means; min/max's scale (the whole range) leaves nothing to search
        fit = "lsq"
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
        better = err < best  # every group runs all iterations: the compiled kernel's groups are independent
        scale, zero = torch.where(better, s16, scale), torch.where(better, z16, zero)
        best = torch.where(better, err, best)
        s, z = s16, z16
    return scale, zero
