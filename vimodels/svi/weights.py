"""Importance log weights ``log p(x, z) - log q(z)`` for draws of a guide.

The ELBO is their mean and the IWAE bound their log-mean-exp; PSIS k-hat is
computed from them. Draws are vectorized with a particle plate and chunked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample


def _site_sum(site: dict, num: int, ndim: int) -> torch.Tensor:
    lp = site["fn"].log_prob(site["value"])
    scale = site["scale"]
    if not (isinstance(scale, float) and scale == 1.0):
        lp = lp * scale
    if lp.dim() < ndim:
        lp = lp.reshape((1,) * (ndim - lp.dim()) + lp.shape)
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(num)


def log_weights(
    model: Callable,
    guide: Callable,
    kwargs: dict,
    num: int,
    max_plate_nesting: int,
    chunk: int = 500,
    discrete: bool = False,
) -> np.ndarray:
    """Return ``num`` draws of ``log p(x, z) - log q(z)`` with ``z ~ q`` (nats).

    Parameters
    ----------
    model, guide : callable
        Called as ``fn(**kwargs)``.
    kwargs : dict
        Data.
    num : int
        Number of draws.
    max_plate_nesting : int
        Plate depth of the model; the particle plate goes just outside it.
    chunk : int
        Draws per vectorized pass.
    discrete : bool
        Model has enumerated discrete sites: ``log p`` marginalizes them with
        ``TraceEnum_ELBO`` one draw at a time.

    Returns
    -------
    ndarray, shape (num,)
    """
    out = []
    with torch.no_grad():
        if discrete:
            elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
            for _ in range(num):
                out.append(-elbo.loss(model, guide, **kwargs))
            return np.asarray(out, dtype=float)
        ndim = max_plate_nesting + 1
        done = 0
        while done < num:
            n = min(chunk, num - done)
            try:
                with pyro.plate("_weights_particles", n, dim=-ndim):
                    guide_tr = poutine.trace(guide).get_trace(**kwargs)
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        **kwargs
                    )
                total = torch.zeros(n)
                for sign, tr in ((1.0, model_tr), (-1.0, guide_tr)):
                    for site in tr.nodes.values():
                        if (
                            site["type"] == "sample"
                            and not site_is_subsample(site)
                            and not (tr is guide_tr and site["is_observed"])
                        ):
                            total = total + sign * _site_sum(site, n, ndim)
                out.append(total.double().numpy())
            except (RuntimeError, ValueError, IndexError):
                # model not vectorizable: fall back to one draw at a time
                for _ in range(n):
                    guide_tr = poutine.trace(guide).get_trace(**kwargs)
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        **kwargs
                    )
                    w = model_tr.log_prob_sum() - guide_tr.log_prob_sum(
                        lambda name, site: not site["is_observed"]
                    )
                    out.append(np.array([float(w)]))
            done += n
    return np.concatenate(out)


def draw_sites(
    model: Callable,
    guide: Callable,
    kwargs: dict,
    num: int,
    max_plate_nesting: int,
    sites: tuple[str, ...],
    site_shapes: dict[str, tuple[int, ...]],
    chunk: int = 1000,
) -> dict[str, np.ndarray]:
    """Draw ``z ~ q`` and return the model's sites (latent and deterministic) per draw.

    The guide runs under a particle plate just outside the model's plates and the
    model is replayed on its draws, so deterministic sites are computed from them.

    Returns
    -------
    dict of str to ndarray
        ``(num, *site_shapes[name])`` for each requested site present in the model.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in sites}
    ndim = max_plate_nesting + 1
    with torch.no_grad():
        done = 0
        while done < num:
            n = min(chunk, num - done)
            try:
                with pyro.plate("_draw_particles", n, dim=-ndim):
                    guide_tr = poutine.trace(guide).get_trace(**kwargs)
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        **kwargs
                    )
                batch = [_site_value(model_tr, name, n, site_shapes) for name in sites]
            except (RuntimeError, ValueError, IndexError):
                batch = None
            if batch is None:  # not vectorizable: one draw at a time
                rows: dict[str, list[np.ndarray]] = {name: [] for name in sites}
                for _ in range(n):
                    guide_tr = poutine.trace(guide).get_trace(**kwargs)
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        **kwargs
                    )
                    for name in sites:
                        rows[name].append(_site_value(model_tr, name, 1, site_shapes))
                batch = [
                    np.concatenate(rows[name]) if rows[name][0] is not None else None
                    for name in sites
                ]
            for name, value in zip(sites, batch):
                if value is not None:
                    parts[name].append(value)
            done += n
    return {name: np.concatenate(v) for name, v in parts.items() if v}


def _site_value(tr, name: str, n: int, site_shapes: dict) -> np.ndarray | None:
    if name not in tr.nodes:
        return None
    value = tr.nodes[name]["value"]
    shape = tuple(site_shapes.get(name, value.shape[1:] if value.dim() else ()))
    size = int(np.prod(shape)) if shape else 1
    if value.numel() == size:  # did not depend on the particles
        value = value.reshape(shape).expand((n, *shape))
    if value.numel() != n * size:
        raise ValueError(f"site {name!r} has shape {tuple(value.shape)} under {n} particles")
    return value.detach().reshape((n, *shape)).double().numpy()


def elbo_estimate(log_w: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the ELBO from log weights (nats)."""
    log_w = np.asarray(log_w, dtype=float)
    if not np.isfinite(log_w).all():  # -inf weights: the ELBO is -inf, its error undefined
        return float(log_w.mean()), float("nan")
    return float(log_w.mean()), float(log_w.std(ddof=1) / np.sqrt(len(log_w)))


def iwae_estimate(log_w: np.ndarray, k: int) -> tuple[float, float]:
    """IWAE bound with ``k`` particles from ``len(log_w) // k`` independent groups.

    Returns the mean over groups of ``logmeanexp`` and its standard error.
    """
    log_w = np.asarray(log_w, dtype=float)
    groups = len(log_w) // k
    if groups < 1:
        raise ValueError(f"need at least k={k} log weights, got {len(log_w)}")
    w = log_w[: groups * k].reshape(groups, k)
    m = w.max(1, keepdims=True)
    lme = m[:, 0] + np.log(np.exp(w - m).mean(1))
    se = float(lme.std(ddof=1) / np.sqrt(groups)) if groups > 1 else float("nan")
    return float(lme.mean()), se
