"""Importance-resampled draws: a fit whose guide is a proposal, not the answer.

Pathfinder (Zhang et al. 2022, Algorithm 2) and the importance-corrected
Laplace approximation (``auto_laplace_is``) return draws resampled from a pool
of proposal draws with Pareto-smoothed importance weights
``log p(x, z) - log q(z)`` (Vehtari et al. 2024): the proposal is the fit's
guide (the mixture of the paths' Gaussians, or Laplace's Gaussian), and the
resampled draws follow the posterior as closely as the weights allow (Pareto
``k`` < 0.7: reliable; above: the proposal misses mass and the draws lean
toward it). The fit flags a k of 0.7 or more in ``settings["resample"]``
(``reliable`` False) and in its message, as the project reports every other
doubt about a fit (no Python warning: the message travels with the result
into reports and comparisons).

A fit that resamples carries ``settings["resample"]`` (:func:`resample_settings`);
:meth:`~vimodels.svi.result.FitResult.sample` and ArviZ conversion then call
:func:`resampled_draws`. Its guide stays a proper density, so the ELBO, IWAE
bounds, k-hat and evidence estimates are those of the proposal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from vimodels.mode.psis import psis
from vimodels.svi.draws import ModelInfo
from vimodels.svi.pool import pool_draws

#: Proposal draws per resampled draw (Stan's multi-path Pathfinder pools
#: ``num_paths`` x ``num_draws`` and keeps ``num_draws``: 4 for its 4 paths).
POOL_FACTOR = 4

#: Pareto k at and above which the resampled draws are flagged unreliable.
KHAT_BAD = 0.7

#: Fewest draws from which a fit estimates its Pareto k (the tail fit needs about 10 of them).
MIN_DRAWS = 50


def resample_settings(log_w: np.ndarray, pool_factor: int = POOL_FACTOR) -> dict[str, Any]:
    """``settings["resample"]`` of a fit from its proposal's log weights (the ELBO draws).

    ``k_hat`` is None (and ``reliable`` None) when there are too few draws to fit
    the tail (fewer than :data:`MIN_DRAWS`).
    """
    k_hat = khat_of(log_w) if len(log_w) >= MIN_DRAWS else None
    zero = int(np.isneginf(np.asarray(log_w, dtype=float)).sum())
    out = {"method": "psis", "pool_factor": int(pool_factor), "k_hat": k_hat, "zero_weight": zero}
    out["reliable"] = None if k_hat is None else bool(k_hat < KHAT_BAD)
    return out


def khat_note(k_hat: float | None, n: int, zero: int = 0) -> str:
    """One line on a Pareto k of ``n`` weights, ``zero`` of them 0 (``log p = -inf``)."""
    if k_hat is None:
        return f"importance weights' Pareto k not estimated ({n} draws; {MIN_DRAWS} needed)"
    draws = f"{n} draws" + (f", {zero} of weight 0 where log p = -inf" if zero else "")
    if k_hat < KHAT_BAD:
        return f"importance weights' Pareto k {k_hat:.2f} ({draws}): resampling reliable"
    return (
        f"importance weights' Pareto k {k_hat:.2f} >= {KHAT_BAD} ({draws}): the proposal "
        "misses posterior mass, so the resampled draws are not reliable (they lean toward "
        "the proposal); use NUTS, or a richer guide"
    )


def khat_of(log_w: np.ndarray) -> float:
    """Pareto k of log weights.

    A log weight of ``-inf`` (a draw where ``log p = -inf``: outside the model's
    support, or where its density failed) is a weight of 0, as in ArviZ's
    ``psislw``: it cannot lengthen the tail that ``k`` measures. ``inf`` when a
    weight is NaN or ``+inf``, or fewer than two are positive.
    """
    return psis(log_w)[1] if khat_defined(log_w) else float("inf")


def khat_defined(log_w: np.ndarray) -> bool:
    """Whether log weights have a Pareto k: no NaN or ``+inf``, at least two finite."""
    lw = np.asarray(log_w, dtype=float)
    return not (np.isnan(lw).any() or np.isposinf(lw).any()) and int(np.isfinite(lw).sum()) > 1


def psis_probabilities(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Resampling probabilities from Pareto-smoothed weights (non-finite weights get 0), and k.

    ``k`` as :func:`khat_of` (draws of weight 0 do not count against it; a NaN or
    ``+inf`` weight makes it ``inf``).
    """
    lw = np.asarray(log_w, dtype=float)
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError("no proposal draw has a finite importance weight")
    fill = np.where(finite, lw, np.min(lw[finite]) - 1e3)
    # the fill lies far below the tail's cutoff: the same k as psis of the -inf weights
    smoothed, k_hat = psis(fill)
    probs = np.where(finite, np.exp(smoothed - smoothed.max()), 0.0)
    return probs / probs.sum(), (k_hat if khat_defined(lw) else float("inf"))


def resampled_draws(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    num_samples: int,
    pool_factor: int = POOL_FACTOR,
    *,
    sites: tuple[str, ...] | None = None,
    check: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """``num_samples`` draws resampled (with replacement) from ``pool_factor`` x as many.

    The pool is drawn from ``guide`` under Pyro's current random state (set the
    seed before calling); the resampling indices come from the same stream. Its
    log weights come from the frozen potential of a Laplace or Pathfinder guide
    where that gives the traces' numbers (:func:`vimodels.svi.pool.pool_draws`).

    Returns
    -------
    draws : dict of str to ndarray
        ``(num_samples, *site_shape)`` per site (``sites``, default all latent ones).
    log_weights : ndarray, shape (num_samples,)
        Log weights of the pool's first ``num_samples`` proposal draws (independent
        draws of the guide: what ELBO, IWAE and k-hat of the proposal need).
    k_hat : float
        Pareto k of the whole pool's weights.
    """
    pool = num_samples * pool_factor
    latent, log_w = pool_draws(model, guide, args, kwargs, info, pool, sites=sites, check=check)
    probs, k_hat = psis_probabilities(log_w)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    idx = np.random.default_rng(seed).choice(pool, size=num_samples, replace=True, p=probs)
    return {k: v[idx] for k, v in latent.items()}, log_w[:num_samples], k_hat
