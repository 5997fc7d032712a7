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

from vimodels.svi.particles import (
    NotVectorizable,
    check_particles,
    sequential_log_weight,
    trace_log_weights,
)


def log_weights(
    model: Callable,
    guide: Callable,
    kwargs: dict,
    num: int,
    max_plate_nesting: int,
    chunk: int = 500,
    discrete: bool = False,
    report: dict | None = None,
) -> np.ndarray:
    """Return ``num`` draws of ``log p(x, z) - log q(z)`` with ``z ~ q`` (nats).

    The first vectorized pass is checked against a few of its draws evaluated
    one at a time (:func:`vimodels.svi.particles.check_particles`); when they
    disagree, or the model cannot run under a particle plate, every draw is
    evaluated on its own.

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
    report : dict, optional
        Filled with ``vectorized`` (bool) and ``reason`` (why not, or None).

    Returns
    -------
    ndarray, shape (num,)
    """
    out = []
    report = {} if report is None else report
    report.update(vectorized=False, reason=None)
    with torch.no_grad():
        if discrete:
            report["reason"] = "enumerated discrete sites are summed out one draw at a time"
            elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
            for _ in range(num):
                out.append(-elbo.loss(model, guide, **kwargs))
            return np.asarray(out, dtype=float)
        ndim = max_plate_nesting + 1
        done = 0
        try:
            while done < num:
                n = min(chunk, num - done)
                with pyro.plate("_weights_particles", n, dim=-ndim):
                    guide_tr = poutine.trace(guide).get_trace(**kwargs)
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        **kwargs
                    )
                total = trace_log_weights(model_tr, guide_tr, n, ndim)
                if done == 0:
                    check_particles(model, guide, (), kwargs, model_tr, guide_tr, total)
                out.append(total.numpy().copy())
                done += n
            report["vectorized"] = True
        except (NotVectorizable, RuntimeError, ValueError, IndexError, TypeError) as exc:
            # not vectorizable: one draw at a time, from the first
            report["reason"] = _reason(exc)
            out = [np.array([sequential_log_weight(model, guide, (), kwargs)]) for _ in range(num)]
    return np.concatenate(out)


def _reason(exc: Exception) -> str:
    if isinstance(exc, NotVectorizable):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"the model fails under a particle plate ({type(exc).__name__}: {text})"[:300]


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
