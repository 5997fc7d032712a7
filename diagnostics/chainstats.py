"""Convergence statistics of MCMC draws in NumPy, without importing ArviZ.

Rank-normalized split R-hat, bulk and tail effective sample size and the
Monte Carlo standard error of the mean (Vehtari et al. 2021,
arXiv:1903.08008), written to give ArviZ 0.23's ``az.rhat(method="rank")``,
``az.ess(method="bulk" | "tail")`` and ``az.mcse(method="mean")`` on a
``(chain, draw)`` array to rounding error (the tests compare them on random
inputs with ArviZ as the oracle, to 1e-10).

Why not call ArviZ: every NUTS reference checks R-hat and ESS of every element
before it is trusted, and importing ArviZ (with xarray, pandas, matplotlib
and scipy.stats) takes seconds, more than sampling a small model
(benchmarks/README.md, "import time"). The inverse normal CDF comes from
``torch.special.ndtri`` (Cephes' ``ndtri``, the algorithm SciPy uses; torch is
already imported wherever draws are made), not from ``scipy.stats``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ess", "mcse_mean", "rhat"]

_MIN_DRAWS = 4


def _invalid(x: np.ndarray, min_chains: int) -> bool:
    """ArviZ's ``not_valid``: any NaN, too few chains or too few draws."""
    return bool(np.isnan(x).any()) or x.shape[0] < min_chains or x.shape[1] < _MIN_DRAWS


def _split(x: np.ndarray) -> np.ndarray:
    """Each chain's first and last halves as separate chains (middle draw dropped if odd)."""
    half = x.shape[1] // 2
    return np.vstack((x[:, :half], x[:, -half:]))


def _rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened ``x``, ties given their average rank (``rankdata``)."""
    flat = x.ravel()
    order = np.argsort(flat, kind="mergesort")
    ordered = flat[order]
    new = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(new)
    bounds = np.concatenate((np.nonzero(new)[0], [flat.size]))
    ranks = np.empty(flat.size)
    ranks[order] = 0.5 * (bounds[group] + bounds[group - 1] + 1)
    return ranks


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Normal scores of the ranks of ``x`` (Blom's offset 3/8), same shape."""
    ranks = _rank_average(x)
    p = (ranks - 3 / 8) / (ranks.size - 2 * (3 / 8) + 1)
    return torch.special.ndtri(torch.from_numpy(p)).numpy().reshape(x.shape)


def _rhat_plain(x: np.ndarray) -> float:
    """Gelman-Rubin R-hat of ``x`` shape (chain, draw), chains as given."""
    n = x.shape[1]
    between = n * np.var(np.mean(x, axis=1), ddof=1)
    within = np.mean(np.var(x, axis=1, ddof=1))
    return float(np.sqrt((between / within + n - 1) / n))


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= ``n`` (an FFT length; any length >= n gives the same result)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _autocov(x: np.ndarray) -> np.ndarray:
    """Autocovariance of each row at every lag (FFT, divided by the row length)."""
    n = x.shape[1]
    m = _fast_len(2 * n)
    x = x - x.mean(axis=1, keepdims=True)
    f = np.fft.rfft(x, n=m, axis=1)
    f *= np.conjugate(f)
    return np.fft.irfft(f, n=m, axis=1)[:, :n] / n


def _ess_plain(x: np.ndarray) -> float:
    """Multi-chain ESS of ``x`` shape (chain, draw) with Geyer's initial monotone sequence."""
    x = np.asarray(x, dtype=float)
    if np.isnan(x).any():
        return float("nan")
    if np.max(x) - np.min(x) < np.finfo(float).resolution:
        return float(x.size)
    n_chain, n_draw = x.shape
    acov = _autocov(x)
    mean_var = np.mean(acov[:, 0]) * n_draw / (n_draw - 1.0)
    var_plus = mean_var * (n_draw - 1.0) / n_draw
    if n_chain > 1:
        var_plus += np.var(x.mean(axis=1), ddof=1)
    rho = np.zeros(n_draw)
    even = 1.0
    rho[0] = even
    odd = 1.0 - (mean_var - np.mean(acov[:, 1])) / var_plus
    rho[1] = odd
    t = 1
    while t < n_draw - 3 and even + odd > 0.0:
        even = 1.0 - (mean_var - np.mean(acov[:, t + 1])) / var_plus
        odd = 1.0 - (mean_var - np.mean(acov[:, t + 2])) / var_plus
        if even + odd >= 0:
            rho[t + 1] = even
            rho[t + 2] = odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = (rho[t - 1] + rho[t]) / 2.0
            rho[t + 2] = rho[t + 1]
        t += 2
    size = n_chain * n_draw
    tau = -1.0 + 2.0 * np.sum(rho[: max_t + 1]) + np.sum(rho[max_t + 1 : max_t + 2])
    tau = max(tau, 1 / np.log10(size))
    if np.isnan(rho).any():
        return float("nan")
    return float(size / tau)


def _quantile7(x: np.ndarray, prob: float) -> float:
    """R's type-7 quantile of the flattened ``x``, computed as ``mquantiles(alphap=betap=1)``."""
    s = np.sort(x.ravel())
    n = s.size
    aleph = n * prob + (1.0 - prob)
    k = int(np.floor(np.clip(aleph, 1, n - 1)))
    gamma = float(np.clip(aleph - k, 0, 1))
    return float((1.0 - gamma) * s[k - 1] + gamma * s[k])


def _as_2d(draws: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(draws, dtype=float))
    if x.ndim != 2:
        raise ValueError(f"draws must have shape (chain, draw), got {x.shape}")
    return x


def rhat(draws: np.ndarray) -> float:
    """Rank-normalized split R-hat: the larger of the bulk and the folded (tail) R-hat.

    Parameters
    ----------
    draws : ndarray, shape (chain, draw)
        One scalar quantity.

    Returns
    -------
    float
        NaN for fewer than two chains, fewer than four draws or any NaN.
    """
    x = _as_2d(draws)
    if _invalid(x, min_chains=2):
        return float("nan")
    split = _split(x)
    bulk = _rhat_plain(_z_scale(split))
    tail = _rhat_plain(_z_scale(np.abs(split - np.median(split))))
    return max(bulk, tail)


def ess(draws: np.ndarray, method: str = "bulk") -> float:
    """Effective sample size of ``draws`` shape (chain, draw).

    Parameters
    ----------
    draws : ndarray, shape (chain, draw)
        One scalar quantity.
    method : {"bulk", "tail", "mean"}
        ``bulk``: of the rank-normalized split chains; ``tail``: the smaller of
        the ESS of the 5% and 95% quantile indicators; ``mean``: of the split
        chains as they are (the one MCSE of the mean uses).

    Returns
    -------
    float
        NaN for fewer than four draws or any NaN.
    """
    if method not in ("bulk", "tail", "mean"):
        raise ValueError(f"unknown ESS method {method!r}: use 'bulk', 'tail' or 'mean'")
    x = _as_2d(draws)
    if _invalid(x, min_chains=1):
        return float("nan")
    if method == "bulk":
        return _ess_plain(_z_scale(_split(x)))
    if method == "mean":
        return _ess_plain(_split(x))
    return min(_ess_plain(_split(x <= _quantile7(x, p))) for p in (0.05, 0.95))


def mcse_mean(draws: np.ndarray) -> float:
    """Monte Carlo standard error of the mean of ``draws`` shape (chain, draw): sd / sqrt(ESS)."""
    x = _as_2d(draws)
    if _invalid(x, min_chains=1):
        return float("nan")
    return float(np.std(x, ddof=1) / np.sqrt(ess(x, "mean")))
