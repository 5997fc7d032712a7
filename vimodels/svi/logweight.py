"""The one sum ``log p(x, z) - log q(z)`` over a model trace and a guide trace.

Every importance log weight of the project comes from :func:`log_weight_terms`:
the ELBO and draws of a fit (:mod:`vimodels.svi.draws`, :mod:`vimodels.svi.weights`,
:mod:`vimodels.svi.minibatch_eval`), the checks of :mod:`vimodels.svi.particles`,
the IWAE bound (:mod:`vimodels.svi.iwae`) and the VAE's test log-likelihood
(:mod:`vimodels.vae.evaluate`).

Conventions
-----------
- ``n`` draws sit on a particle plate at dim ``-ndim`` (``ndim =
  max_plate_nesting + 1``); a site whose log density has no such axis is the
  same for every draw. ``ndim=None`` means one draw without a particle plate:
  each site's log density is summed whole.
- Counted sites: every ``sample`` site of the model (latent, observed,
  ``pyro.factor``, deterministic sites have log density 0) and the guide's
  unobserved ``sample`` sites; subsample sites are skipped.
- Each site's log density is scaled and masked as Pyro does (``poutine.scale``,
  a subsampled plate's ``N / b``, ``poutine.mask``, ``obs_mask``).
- With ``plate`` the sites inside that plate are kept per element of the plate
  (``local``, shape ``(n, B)``) with the plate's subsample scale divided out
  (the IWAE bound takes a log-mean-exp per data point; the VAE evaluates each
  data point); the others are summed per draw (``draws``, shape ``(n,)``).

Enumerated discrete sites are not summed out here: a trace holds one value per
site. :func:`vimodels.svi.draws.sample_guide` contracts them (Pyro's tensor
contraction) where a model has any.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample


class NotVectorizable(ValueError):
    """A model or guide gives different numbers under a particle plate."""


@dataclass(frozen=True)
class WeightTerms:
    """``log p(x, z) - log q(z)`` of ``n`` draws, split by a plate.

    Attributes
    ----------
    draws : Tensor, shape (n,)
        Sum over the sites outside ``plate`` (every site without a plate).
    local : Tensor, shape (n, B), or None
        Sites inside ``plate`` per element of it (``B`` its size in the trace),
        the plate's subsample scale divided out; None without ``plate`` or when
        no site is inside it.
    plate_scale : float
        The subsample scale ``N / B`` of ``plate`` (1.0 when not subsampled or
        without ``plate``): ``draws + plate_scale * local.sum(-1)`` is the full
        log weight.
    local_sites, other_sites : tuple of str
        Names of the counted sites inside and outside ``plate``.
    """

    draws: torch.Tensor
    local: torch.Tensor | None
    plate_scale: float
    local_sites: tuple[str, ...]
    other_sites: tuple[str, ...]

    def total(self) -> torch.Tensor:
        """The full log weight per draw, shape ``(n,)``."""
        if self.local is None:
            return self.draws
        return self.draws + self.plate_scale * self.local.sum(-1)


def counted_sites(tr: poutine.Trace, guide: bool) -> list[dict]:
    """Sites of a trace that enter the log weight, in trace order (see module notes)."""
    return [
        s
        for s in tr.nodes.values()
        if s["type"] == "sample" and not site_is_subsample(s) and not (guide and s["is_observed"])
    ]


def _log_density(site: dict, fn, scale) -> torch.Tensor:
    lp = fn.log_prob(site["value"])
    lp = scale_and_mask(lp, scale, site["mask"])
    return lp if isinstance(lp, torch.Tensor) else torch.as_tensor(lp)


def _lead(lp: torch.Tensor, site: dict, n: int, ndim: int) -> torch.Tensor:
    if lp.dim() < ndim:
        lp = lp.reshape((1,) * (ndim - lp.dim()) + tuple(lp.shape))
    if lp.shape[0] not in (1, n):
        raise NotVectorizable(
            f"site {site['name']!r} has a log density of shape {tuple(lp.shape)} "
            f"under {n} particles"
        )
    return lp


def site_log_prob(site: dict, n: int, ndim: int | None, fn=None) -> torch.Tensor:
    """Scaled, masked log density of a site summed per draw, shape ``(n,)``.

    ``ndim`` is the position of the particle plate counted from the right
    (``max_plate_nesting + 1``), None for one draw without it; a density
    without that axis is the same for every draw. ``fn`` replaces the site's
    distribution (e.g. one with detached parameters).
    """
    lp = _log_density(site, site["fn"] if fn is None else fn, site["scale"])
    if ndim is None:
        return lp.sum().reshape(1).expand(n)
    lp = _lead(lp, site, n, ndim)
    total = lp.reshape(lp.shape[0], -1).sum(-1)
    return total.expand(n) if total.shape[0] == 1 else total


def plate_frame(site: dict, plate: str):
    """The ``CondIndepStackFrame`` of ``plate`` in a site's plate stack, or None."""
    for f in site["cond_indep_stack"]:
        if f.name == plate and f.vectorized:
            return f
    return None


def plate_scale(site: dict, plate: str) -> float:
    """Subsample scale ``N / b`` of ``plate`` for ``site`` (1.0 when not subsampled)."""
    f = plate_frame(site, plate)
    full = getattr(f, "full_size", None) if f is not None else None
    if full is not None and f.size:
        return float(full) / float(f.size)
    scale = site["scale"]
    return float(scale) if not isinstance(scale, torch.Tensor) else float(scale.max())


def _per_element(site: dict, fn, n: int, ndim: int, frame, scale: float) -> torch.Tensor:
    """Log density of a site inside the plate of ``frame``, shape ``(1 or n, 1 or B)``."""
    inner = site["scale"] / scale
    lp = _lead(_log_density(site, fn, inner), site, n, ndim)
    if lp.dim() > ndim:
        raise NotVectorizable(
            f"site {site['name']!r} has a log density of shape {tuple(lp.shape)}: more batch "
            f"dimensions than the {ndim - 1} plates and the particle plate"
        )
    keep = {0, ndim + frame.dim}
    dims = [d for d in range(ndim) if d not in keep]
    return lp.sum(dims) if dims else lp


def log_weight_terms(
    model_tr: poutine.Trace,
    guide_tr: poutine.Trace | None,
    n: int,
    ndim: int | None,
    *,
    plate: str | None = None,
    guide_fn: Callable | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> WeightTerms:
    """Sum ``log p(x, z) - log q(z)`` over the sites of a model and a guide trace.

    Parameters
    ----------
    model_tr : Trace
        The model, replayed on the guide's draws (or conditioned on latent values).
    guide_tr : Trace or None
        The guide; None sums ``log p(x, z)`` only.
    n : int
        Number of draws on the particle plate.
    ndim : int or None
        Position of the particle plate from the right (``max_plate_nesting + 1``);
        None for one draw without a particle plate (``n`` must be 1).
    plate : str, optional
        Keep the sites inside this plate per element of it (see :class:`WeightTerms`).
        Needs ``ndim``.
    guide_fn : callable, optional
        Applied to each guide site's distribution before its log density is taken
        (the IWAE's doubly reparameterized estimator detaches its parameters).
    dtype : torch.dtype or None
        Each site's sum is cast to it before the sites are added (float64 for
        evaluation); None keeps the sites' dtype (a differentiable loss).

    Returns
    -------
    WeightTerms
        ``draws`` of shape ``(n,)`` and, with ``plate``, ``local`` of shape ``(n, B)``.

    Raises
    ------
    NotVectorizable
        A site's log density has more leading entries than ``n`` draws allow.
    """
    if plate is not None and ndim is None:
        raise ValueError("a plate split needs the particle plate's position ndim")
    draws = torch.zeros(n, dtype=dtype or torch.get_default_dtype())
    local = None
    scale = None
    names: tuple[list[str], list[str]] = ([], [])
    sources = [(1.0, model_tr, False)]
    if guide_tr is not None:
        sources.append((-1.0, guide_tr, True))
    for sign, tr, is_guide in sources:
        for site in counted_sites(tr, is_guide):
            fn = guide_fn(site["fn"]) if is_guide and guide_fn is not None else site["fn"]
            frame = plate_frame(site, plate) if plate is not None else None
            if frame is None:
                lp = site_log_prob(site, n, ndim, fn)
                draws = draws + sign * (lp if dtype is None else lp.to(dtype))
                names[1].append(site["name"])
                continue
            if scale is None:
                scale = plate_scale(site, plate)
            lp = _per_element(site, fn, n, ndim, frame, scale)
            lp = lp if dtype is None else lp.to(dtype)
            local = sign * lp if local is None else local + sign * lp
            names[0].append(site["name"])
    if local is not None:
        size = local.shape[1] if local.shape[1] != 1 else _plate_size(model_tr, guide_tr, plate)
        local = local.expand(n, size)
    return WeightTerms(
        draws=draws,
        local=local,
        plate_scale=1.0 if scale is None else scale,
        local_sites=tuple(dict.fromkeys(names[0])),
        other_sites=tuple(dict.fromkeys(names[1])),
    )


def _plate_size(model_tr: poutine.Trace, guide_tr: poutine.Trace | None, plate: str) -> int:
    for tr in (model_tr, guide_tr):
        for site in counted_sites(tr, False) if tr is not None else ():
            f = plate_frame(site, plate)
            if f is not None:
                return int(f.size)
    return 1


def trace_log_weights(
    model_tr: poutine.Trace, guide_tr: poutine.Trace, n: int, ndim: int | None
) -> torch.Tensor:
    """``log p(x, z) - log q(z)`` per draw, float64 shape ``(n,)`` (:func:`log_weight_terms`)."""
    return log_weight_terms(model_tr, guide_tr, n, ndim).draws
