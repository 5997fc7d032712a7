"""Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao and Gabry, JMLR 2024).

A small NumPy port of the standard algorithm (as in ArviZ's ``psislw`` with
``r_eff = 1``), kept here so that the core does not import ArviZ at run time.
"""

from __future__ import annotations

import numpy as np


def gpd_fit(x: np.ndarray, prior_bs: float = 3.0, prior_k: float = 10.0) -> tuple[float, float]:
    """Generalized Pareto shape ``k`` and scale ``sigma`` of sorted exceedances ``x`` > 0.

    Zhang and Stephens (2009) empirical Bayes estimate with a weakly informative
    prior on ``k`` (Vehtari et al.).
    """
    n = len(x)
    m = 30 + int(np.sqrt(n))
    b = 1.0 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b /= prior_bs * x[int(n / 4 + 0.5) - 1]
    b += 1.0 / x[-1]
    k = np.log1p(-b[:, None] * x).mean(axis=1)
    len_scale = n * (np.log(-(b / k)) - k - 1.0)
    with np.errstate(over="ignore"):
        weights = 1.0 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, b = weights[keep], b[keep]
    weights /= weights.sum()
    b_post = float((b * weights).sum())
    k_post = float(np.log1p(-b_post * x).mean())
    sigma = -k_post / b_post  # from the raw estimate; the prior then shrinks k
    k_post = (n * k_post + prior_k * 0.5) / (n + prior_k)
    return k_post, sigma


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    if abs(k) < 1e-12:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def psis(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, self-normalized log weights and the Pareto ``k``.

    Parameters
    ----------
    log_w : ndarray, shape (n,)
        Importance log weights (finite).

    Returns
    -------
    log_weights : ndarray, shape (n,)
        Smoothed log weights whose exponentials sum to one.
    k : float
        Estimated shape of the weights' tail: < 0.5 good, < 0.7 usable, above:
        the proposal misses mass (``inf`` when the tail is too short to fit).
    """
    lw = np.asarray(log_w, dtype=float).copy()
    n = lw.shape[0]
    lw -= lw.max()
    tail = int(np.ceil(min(0.2 * n, 3 * np.sqrt(n))))
    order = np.argsort(lw)
    cutoff = max(lw[order[-tail - 1]], np.log(np.finfo(float).tiny)) if n > tail else -np.inf
    exp_cut = np.exp(cutoff)
    idx = np.flatnonzero(lw > cutoff)
    k = np.inf
    if len(idx) > 4:
        x = lw[idx]
        xo = np.argsort(x)
        ex = np.exp(x) - exp_cut
        k, sigma = gpd_fit(ex[xo])
        if np.isfinite(k):
            q = _gpd_quantile(np.arange(0.5, len(idx)) / len(idx), k, sigma)
            smoothed = np.log(q + exp_cut)
            x[xo] = smoothed
            x[x > 0] = 0.0
            lw[idx] = x
    m = lw.max()
    lw -= m + np.log(np.exp(lw - m).sum())
    return lw, float(k)
