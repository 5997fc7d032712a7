"""Importance log weights ``log p(x, z) - log q(z)`` for draws of a guide.

The ELBO is their mean and the IWAE bound their log-mean-exp; PSIS k-hat is
computed from them. Draws are vectorized with a particle plate and chunked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vimodels.svi.draws import model_info, sample_guide


def log_weights(
    model: Callable,
    guide: Callable,
    kwargs: dict,
    num: int,
    max_plate_nesting: int,
    chunk: int = 500,
    report: dict | None = None,
    *,
    check: bool = True,
) -> np.ndarray:
    """Return ``num`` draws of ``log p(x, z) - log q(z)`` with ``z ~ q`` (nats).

    The draws of :func:`vimodels.svi.draws.sample_guide` (the one guide-drawing
    path), without their values: the first vectorized pass is checked against a
    few of its draws evaluated one at a time
    (:func:`vimodels.svi.particles.check_particles`); when they disagree, or the
    model cannot run under a particle plate, every draw is evaluated on its own.
    Enumerated discrete sites are summed out.

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
    report : dict, optional
        Filled with ``vectorized`` (bool) and ``reason`` (why not, or None).
    check : bool
        Check the first vectorized pass (off where an earlier pass of the same
        model and guide was checked).

    Returns
    -------
    ndarray, shape (num,)
        NaN where the model has no density at a draw.
    """
    info = model_info(model, (), kwargs, max_plate_nesting)
    return sample_guide(
        model, guide, (), kwargs, info, num, chunk, report, sites=(), check=check, nan_as=np.nan
    )[1]


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
