"""Simulation-based calibration statistics: pure functions on arrays.

Nothing here fits or simulates. The inputs are, for each scalar element of
the sites of interest, the *ranks* of the true parameter among ``L`` draws of
an approximation, one per simulated data set (SBC, Talts et al. 2018): with
``theta ~ p(theta)``, ``y ~ p(y | theta)`` and draws from the exact
posterior ``p(theta | y)``, the rank is uniform on ``{0, ..., L}``.

- :func:`ranks`: the rank of each truth among its draws (ties broken at random);
- :func:`uniformity_test`: the ECDF test with simultaneous bands of
  Sailynoja, Burkner & Vehtari (2022), its null distribution simulated
  (seeded, so deterministic); :func:`ecdf_band` gives the band to plot
  ECDF-differences against;
- :func:`histogram_band`: the pointwise binomial band of a rank histogram;
- :func:`vsbc_test`: VSBC (Yao et al. 2018): the distribution of the
  quantile ``u = P_q(theta < theta_true)`` is symmetric about 1/2 whenever the
  approximation is unbiased; a sign-flip test of a Kolmogorov-type symmetry
  statistic (exact under symmetry up to its Monte Carlo error);
- :func:`holm`: Holm's step-down correction for the number of elements;
- :func:`shape_z`, :func:`tail_excess` and :func:`verdict`: which way a
  failing histogram leans (``biased up``/``biased down``: the approximation's
  draws lie above/below the truth too often, ranks pile up at one end;
  ``under-dispersed``: too narrow, ranks pile up at both ends;
  ``over-dispersed``: too wide, ranks pile up in the middle);
- :func:`calibration_table` and :func:`site_table`: one row per element and
  per site with p-values (raw and Holm-corrected) and verdicts.

Ranks here count draws *below* the truth, so an approximation that sits too
high gives small ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats

CALIBRATED = "calibrated"
OVER = "over-dispersed"
UNDER = "under-dispersed"
BIASED_UP = "biased up"
BIASED_DOWN = "biased down"
VERDICTS = (CALIBRATED, OVER, UNDER, BIASED_UP, BIASED_DOWN)
NUM_NULL = 2000  # simulated null statistics per test (Monte Carlo se of p=0.05: 0.005)


def ranks(
    draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Rank of ``truth`` among ``draws``: the number of draws below it, in ``0..L``.

    Parameters
    ----------
    draws : ndarray, shape (L, *shape)
    truth : ndarray, shape (*shape)
    rng : Generator, optional
        Breaks ties (draws equal to the truth) uniformly at random; without
        it ties count half (rounded down).

    Returns
    -------
    ndarray of int, shape (*shape)
    """
    draws = np.asarray(draws, dtype=float)
    truth = np.asarray(truth, dtype=float)
    if draws.shape[1:] != truth.shape:
        raise ValueError(f"draws {draws.shape} do not match the truth {truth.shape}")
    below = (draws < truth).sum(axis=0)
    ties = (draws == truth).sum(axis=0)
    if rng is None:
        extra = ties // 2
    else:
        extra = np.floor(rng.random(truth.shape) * (ties + 1)).astype(int)
    return (below + extra).astype(int)


def fractional(rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """Ranks in ``0..num_ranks-1`` as mid-bin fractions ``(r + 1/2) / num_ranks`` in (0, 1)."""
    return (np.asarray(rank, dtype=float) + 0.5) / num_ranks


def _points(num_ranks: int, n: int, num_points: int | None) -> np.ndarray:
    """Evaluation indices ``k`` of the ECDF (``P(r < k) = k / num_ranks``)."""
    inner = num_ranks - 1
    k = num_points or min(inner, max(n, 20))
    k = max(1, min(k, inner))
    return np.unique(np.round(np.arange(1, k + 1) * num_ranks / (k + 1)).astype(int).clip(1, inner))


def _tail(counts: np.ndarray, n: int, z: np.ndarray) -> np.ndarray:
    """Two-sided binomial tail probability of each count (clipped at 1)."""
    lo = stats.binom.cdf(counts, n, z)
    hi = stats.binom.sf(counts - 1, n, z)
    return np.minimum(1.0, 2.0 * np.minimum(lo, hi))


def _statistic(counts: np.ndarray, n: int, z: np.ndarray) -> np.ndarray:
    """Smallest two-sided tail probability along the ECDF (last axis)."""
    return _tail(counts, n, z).min(axis=-1)


@lru_cache(maxsize=64)
def _null(n: int, num_ranks: int, num_points: int | None, num_null: int, seed: int) -> np.ndarray:
    """Simulated null distribution of the ECDF statistic, sorted."""
    rng = np.random.default_rng(seed)
    k = _points(num_ranks, n, num_points)
    hist = rng.multinomial(n, np.full(num_ranks, 1.0 / num_ranks), size=num_null)
    counts = np.cumsum(hist, axis=1)[:, k - 1]  # #{r < k} = #{r <= k - 1}
    return np.sort(_statistic(counts, n, k / num_ranks))


def uniformity_test(
    rank: np.ndarray,
    num_ranks: int,
    *,
    num_points: int | None = None,
    num_null: int = NUM_NULL,
    seed: int = 0,
) -> float:
    """p-value of the ECDF test that ``rank`` is uniform on ``0..num_ranks-1``.

    The statistic is the smallest two-sided binomial tail probability of the
    ECDF over the evaluation points (Sailynoja et al. 2022); its null
    distribution is simulated with ``seed`` (so the p-value is deterministic),
    and the p-value is ``(1 + #{null <= observed}) / (1 + num_null)``.

    Parameters
    ----------
    rank : ndarray of int, shape (n,)
    num_ranks : int
        ``L + 1`` for ``L`` draws per simulation.
    num_points : int, optional
        ECDF evaluation points; default ``min(L, max(n, 20))``.
    """
    rank = np.asarray(rank, dtype=int).reshape(-1)
    n = len(rank)
    if n == 0:
        return float("nan")
    k = _points(num_ranks, n, num_points)
    counts = np.searchsorted(np.sort(rank), k, side="left")  # #{r < k}
    observed = float(_statistic(counts, n, k / num_ranks))
    null = _null(n, num_ranks, num_points, num_null, seed)
    below = np.searchsorted(null, observed * (1 + 1e-12), side="right")
    return float((1 + below) / (1 + num_null))


def ecdf_band(
    n: int,
    num_ranks: int,
    alpha: float = 0.05,
    *,
    num_points: int | None = None,
    num_null: int = NUM_NULL,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simultaneous ``1 - alpha`` band of the ECDF of ``n`` uniform ranks.

    Returns
    -------
    z, lower, upper : ndarray
        Evaluation points (fractions of the rank range) and the band of the
        ECDF there; plot ``ECDF(z) - z`` against ``lower - z`` and ``upper - z``.
    """
    k = _points(num_ranks, n, num_points)
    z = k / num_ranks
    null = _null(n, num_ranks, num_points, num_null, seed)
    gamma = float(np.quantile(null, alpha))
    lower = stats.binom.ppf(gamma / 2, n, z) / n
    upper = stats.binom.ppf(1 - gamma / 2, n, z) / n
    return z, lower, upper


def ecdf(rank: np.ndarray, num_ranks: int, z: np.ndarray) -> np.ndarray:
    """ECDF of the ranks at fractions ``z``: ``#{r < z * num_ranks} / n``."""
    rank = np.sort(np.asarray(rank, dtype=int).reshape(-1))
    k = np.round(np.asarray(z) * num_ranks).astype(int)
    return np.searchsorted(rank, k, side="left") / max(len(rank), 1)


def histogram(rank: np.ndarray, num_ranks: int, bins: int) -> np.ndarray:
    """Counts of ``rank`` in ``bins`` bins of (nearly) equal width over ``0..num_ranks-1``."""
    edges = np.floor(np.arange(bins + 1) * num_ranks / bins).astype(int)
    return np.histogram(np.asarray(rank).reshape(-1), bins=edges - 0.5)[0]


def histogram_band(
    n: int, num_ranks: int, bins: int, level: float = 0.99
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise binomial band of each bin's count under uniform ranks (Talts et al. 2018).

    Returns
    -------
    lower, upper : ndarray, shape (bins,)
    """
    edges = np.floor(np.arange(bins + 1) * num_ranks / bins).astype(int)
    p = np.diff(edges) / num_ranks
    tail = (1 - level) / 2
    return stats.binom.ppf(tail, n, p), stats.binom.ppf(1 - tail, n, p)


def vsbc_test(
    rank: np.ndarray, num_ranks: int, *, num_null: int = NUM_NULL, seed: int = 0
) -> tuple[float, float]:
    """VSBC symmetry test of the quantiles ``u = (r + 1/2) / num_ranks`` about 1/2.

    Statistic: ``D = max_t |#{u <= 1/2 - t} - #{u >= 1/2 + t}| / n``, the
    Kolmogorov distance between the distributions of ``u`` and ``1 - u``.
    Under symmetry the signs of ``u - 1/2`` are independent fair coins given
    ``|u - 1/2|``, so flipping them at random (``num_null`` times, ``seed``)
    gives its null distribution.

    Returns
    -------
    statistic, p_value : float
    """
    # u - 1/2 = (2 r + 1 - num_ranks) / (2 num_ranks): grouped and signed on the integer
    # numerator, since in floating point mirror ranks r and num_ranks - 1 - r can differ
    # in the last bit of |u - 1/2| and split their tie group, inflating D
    k = 2 * np.asarray(rank, dtype=np.int64).reshape(-1) + 1 - num_ranks
    n = len(k)
    if n == 0:
        return float("nan"), float("nan")
    order = np.argsort(-np.abs(k), kind="stable")
    a = np.abs(k)[order]
    s = np.sign(k)[order]
    ends = np.r_[np.nonzero(np.diff(a))[0], n - 1]  # last index of each |x| group
    observed = float(np.abs(np.cumsum(s)[ends]).max()) / n
    rng = np.random.default_rng(seed)
    flips = rng.integers(0, 2, size=(num_null, n)) * 2 - 1
    null = np.abs(np.cumsum(flips * np.abs(s), axis=1)[:, ends]).max(axis=1) / n
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + num_null)
    return observed, float(p)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error over all given)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = len(q)
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj = np.maximum.accumulate((m - np.arange(m)) * q[order]).clip(max=1.0)
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def shape_z(rank: np.ndarray, num_ranks: int) -> tuple[float, float]:
    """Which way the ranks lean, as z-scores under uniform ranks.

    Returns
    -------
    z_bias : float
        Standardized mean of ``u - 1/2``: negative when the truth sits low
        among the draws (the approximation is biased up).
    z_spread : float
        Standardized mean of ``(u - 1/2)^2`` minus its uniform value:
        positive when ranks pile up at both ends (approximation
        under-dispersed), negative when in the middle (over-dispersed).
    """
    x = fractional(rank, num_ranks).reshape(-1) - 0.5
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    grid = fractional(np.arange(num_ranks), num_ranks) - 0.5  # exact discrete moments
    m2, m4 = float(np.mean(grid**2)), float(np.mean(grid**4))
    z_bias = float(x.mean() / np.sqrt(m2 / n))
    z_spread = float((np.mean(x**2) - m2) / np.sqrt((m4 - m2**2) / n))
    return z_bias, z_spread


def tail_excess(rank: np.ndarray, num_ranks: int) -> tuple[float, float]:
    """How much each half of the rank range weighs in the spread, relative to uniform ranks.

    With ``x = u - 1/2`` (``u``: :func:`fractional` ranks) and ``m2`` the
    uniform ranks' ``E[x^2]``, each half of the range contributes ``m2 / 2`` to
    ``E[x^2]`` under uniform ranks. An approximation that is too narrow or too
    wide but centred (a pure spread defect) keeps the ranks symmetric about
    1/2: both halves gain (narrow) or lose (wide) alike. A bias moves ranks
    from one half to the other: one half gains, the other loses.

    Returns
    -------
    low, high : float
        ``(mean(x^2 [x < 0]) - m2/2) / (m2/2)`` and the same for ``x > 0``:
        0 for uniform ranks, -1 for a half without ranks, positive where
        ranks pile up towards that end (up to ``(1/4 - m2/2) / (m2/2)``, about
        5, when every rank sits at that end).
    """
    x = fractional(rank, num_ranks).reshape(-1) - 0.5
    if len(x) == 0:
        return float("nan"), float("nan")
    grid = fractional(np.arange(num_ranks), num_ranks) - 0.5  # exact discrete moments
    half = float(np.mean(grid**2)) / 2
    low = float(np.mean(np.where(x < 0, x**2, 0.0))) / half - 1.0
    high = float(np.mean(np.where(x > 0, x**2, 0.0))) / half - 1.0
    return low, high


def verdict(p_adjusted: float, tail_low: float, tail_high: float, alpha: float = 0.05) -> str:
    """``calibrated`` when ``p_adjusted >= alpha``; else which way the ranks lean.

    The two halves' excesses (:func:`tail_excess`) split into a symmetric
    part ``tail_low + tail_high`` (what a spread defect changes) and an
    antisymmetric part ``tail_high - tail_low`` (what a bias changes); the
    larger one names the defect. Equivalently: ``under-dispersed`` when both
    halves gain weight, ``over-dispersed`` when both lose it, a bias when one
    gains and the other loses: ``biased down`` when the ranks lean high (the
    truth above the draws), ``biased up`` when they lean low.

    Comparing the z-scores of the mean and of the spread instead (as
    :func:`shape_z` gives them) calls a large bias ``under-dispersed``: when
    the ranks pile up at one end, ``(u - 1/2)^2`` grows faster in z-units
    than ``u - 1/2``.
    """
    if not np.isfinite(p_adjusted):
        return "no data"
    if p_adjusted >= alpha:
        return CALIBRATED
    asym, sym = tail_high - tail_low, tail_high + tail_low
    if abs(asym) >= abs(sym):
        return BIASED_DOWN if asym > 0 else BIASED_UP
    return UNDER if sym > 0 else OVER


def calibration_table(
    ranks_by_element: Mapping[str, np.ndarray],
    num_ranks: int,
    *,
    alpha: float = 0.05,
    sites: Mapping[str, str] | None = None,
    num_null: int = NUM_NULL,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per element: tests, Holm-corrected over the elements given, and verdicts.

    Parameters
    ----------
    ranks_by_element : dict of str to ndarray of int, shape (n,)
        Ranks of each element (``beta[0]`` ...) over the simulations.
    num_ranks : int
        ``L + 1``.
    alpha : float
        Family-wise level over the elements (Holm).
    sites : dict of str to str, optional
        Site of each element (default: the label before ``[``).

    Returns
    -------
    DataFrame
        ``site element n mean_u sd_u z_bias z_spread tail_low tail_high
        p_uniform p_uniform_holm vsbc_d p_vsbc p_vsbc_holm verdict``; ``sd_u``
        is to be read against the uniform's ``0.289``; ``tail_low`` and
        ``tail_high`` are :func:`tail_excess` (which decide the verdict).
    """
    rows = []
    for label, r in ranks_by_element.items():
        r = np.asarray(r, dtype=int).reshape(-1)
        u = fractional(r, num_ranks)
        zb, zs = shape_z(r, num_ranks)
        lo, hi = tail_excess(r, num_ranks)
        d, pv = vsbc_test(r, num_ranks, num_null=num_null, seed=seed)
        rows.append(
            {
                "site": (sites or {}).get(label, label.split("[")[0]),
                "element": label,
                "n": len(r),
                "mean_u": float(u.mean()) if len(r) else float("nan"),
                "sd_u": float(u.std()) if len(r) else float("nan"),
                "z_bias": zb,
                "z_spread": zs,
                "tail_low": lo,
                "tail_high": hi,
                "p_uniform": uniformity_test(r, num_ranks, num_null=num_null, seed=seed),
                "vsbc_d": d,
                "p_vsbc": pv,
            }
        )
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df.insert(df.columns.get_loc("p_uniform") + 1, "p_uniform_holm", holm(df["p_uniform"]))
    df["p_vsbc_holm"] = holm(df["p_vsbc"])
    df["verdict"] = [
        verdict(p, lo, hi, alpha)
        for p, lo, hi in zip(df["p_uniform_holm"], df["tail_low"], df["tail_high"])
    ]
    return df


def site_table(elements: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per site: its verdict and how many of its elements fail.

    A site is ``calibrated`` when none of its elements fails (Holm-corrected
    uniformity at ``alpha``); otherwise its verdict is that of its element
    with the smallest corrected p-value. ``vsbc`` says whether any element
    fails the VSBC symmetry test (``asymmetric``) or none does (``symmetric``).
    """
    rows = []
    if elements.empty:
        return pd.DataFrame()
    for site, g in elements.groupby("site", sort=False):
        worst = g.loc[g["p_uniform_holm"].idxmin()]
        failing = int((g["verdict"] != CALIBRATED).sum())
        rows.append(
            {
                "site": site,
                "elements": len(g),
                "failing": failing,
                "min_p_uniform_holm": float(g["p_uniform_holm"].min()),
                "min_p_vsbc_holm": float(g["p_vsbc_holm"].min()),
                "vsbc": "asymmetric" if (g["p_vsbc_holm"] < alpha).any() else "symmetric",
                "verdict": CALIBRATED if failing == 0 else str(worst["verdict"]),
            }
        )
    return pd.DataFrame(rows)
