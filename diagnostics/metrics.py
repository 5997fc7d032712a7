"""How close an approximation is to a reference: pure functions on arrays.

Nothing here runs inference. Draws are numpy arrays; reference draws keep
their chains ``(chain, draw, *shape)`` so that Monte Carlo errors account for
autocorrelation; approximate draws are ``(n, *shape)``.

Marginal metrics (one row per site element, :func:`marginal_table`):

- ``std_mean_error`` = (approx mean - reference mean) / reference sd, with
  ``std_mcse`` = reference MCSE of the mean / reference sd;
- ``sd_ratio`` = approx sd / reference sd (below 1: the approximation is
  too narrow);
- ``coverage90``: fraction of reference draws inside the approximation's
  central 90% interval (0.90 when the marginal is right);
- ``w1``: 1-Wasserstein distance between the marginals (units of the site),
  and ``std_w1`` = ``w1`` / reference sd (unitless: what a comparison's
  summary averages over elements of different sites and units).

Joint metrics (:func:`joint_metrics`) on the continuous latent sites in
unconstrained space, standardized by the reference sd of each coordinate:
exact 2-Wasserstein (POT, on a subsample), sliced 2-Wasserstein (POT),
energy distance, and the error of the correlation matrix.

Importance-weight metrics from ``log w = log p(x, z) - log q(z)``: PSIS
k-hat (ArviZ), the ELBO, the IWAE bound and the importance-sampling
estimate of ``log p(x)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import ot
import pandas as pd
from scipy import stats
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from diagnostics import _arviz
from diagnostics.labels import element_labels
from vimodels.svi.weights import iwae_estimate

KHAT_GOOD = 0.5
KHAT_BAD = 0.7


def flatten(
    draws: Mapping[str, np.ndarray], sites: Sequence[str], sample_ndim: int = 1
) -> tuple[np.ndarray, list[str]]:
    """Concatenate site elements into columns.

    Parameters
    ----------
    draws : dict of str to ndarray
        Arrays with ``sample_ndim`` leading sample axes.
    sites : sequence of str
        Sites to take, in order.
    sample_ndim : int
        1 for ``(n, *shape)``, 2 for ``(chain, draw, *shape)``.

    Returns
    -------
    matrix : ndarray, shape (n_total, D)
    labels : list of str, length D
    """
    cols, labels = [], []
    for site in sites:
        x = np.asarray(draws[site], dtype=float)
        lead = x.shape[:sample_ndim]
        shape = x.shape[sample_ndim:]
        cols.append(x.reshape(int(np.prod(lead)), -1))
        labels += element_labels(site, shape)
    if not cols:
        return np.empty((0, 0)), []
    return np.concatenate(cols, axis=1), labels


# ----------------------------------------------------------------------------- marginals


def central_interval(x: np.ndarray, prob: float = 0.9) -> tuple[float, float]:
    """Equal-tailed interval holding ``prob`` of the draws ``x`` (1-D)."""
    a = (1.0 - prob) / 2.0
    lo, hi = np.quantile(np.asarray(x, dtype=float), [a, 1.0 - a])
    return float(lo), float(hi)


def coverage(approx: np.ndarray, reference: np.ndarray, prob: float = 0.9) -> float:
    """Fraction of ``reference`` draws inside the approximation's central ``prob`` interval."""
    lo, hi = central_interval(approx, prob)
    ref = np.asarray(reference, dtype=float).ravel()
    return float(np.mean((ref >= lo) & (ref <= hi)))


def wasserstein1(x: np.ndarray, y: np.ndarray) -> float:
    """1-Wasserstein distance between two 1-D samples (scipy), in their units."""
    return float(stats.wasserstein_distance(np.ravel(x), np.ravel(y)))


def marginal_metrics(
    approx: np.ndarray, reference: np.ndarray, prob: float = 0.9
) -> dict[str, float]:
    """Compare one scalar quantity.

    Parameters
    ----------
    approx : ndarray, shape (n,)
        Draws of the approximation.
    reference : ndarray, shape (chain, draw)
        Reference draws (a 1-D array counts as one chain).
    prob : float
        Mass of the central interval used for coverage.

    Returns
    -------
    dict
        ``ref_mean``, ``ref_sd``, ``ref_mcse``, ``mean``, ``sd``, ``mean_error``,
        ``std_mean_error``, ``std_mcse``, ``sd_ratio``, ``coverage90``, ``w1``,
        ``std_w1`` (``w1`` in reference sds).
    """
    a = np.asarray(approx, dtype=float).ravel()
    r = np.asarray(reference, dtype=float)
    if r.ndim == 1:
        r = r[None, :]
    ref_flat = r.ravel()
    ref_mean, ref_sd = float(ref_flat.mean()), float(ref_flat.std(ddof=1))
    constant = ref_sd == 0.0
    mcse = float("nan") if constant or r.shape[1] < 4 else _arviz.mcse_mean(r)
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    err = mean - ref_mean
    return {
        "ref_mean": ref_mean,
        "ref_sd": ref_sd,
        "ref_mcse": mcse,
        "mean": mean,
        "sd": sd,
        "mean_error": err,
        "std_mean_error": err / ref_sd if not constant else float("nan"),
        "std_mcse": mcse / ref_sd if not constant else float("nan"),
        "sd_ratio": sd / ref_sd if not constant else float("nan"),
        "coverage90": coverage(a, ref_flat, prob),
        "w1": (w1 := wasserstein1(a, ref_flat)),
        "std_w1": w1 / ref_sd if not constant else float("nan"),
    }


def marginal_table(
    approx: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], sites: Sequence[str]
) -> pd.DataFrame:
    """One row per element of each site of interest.

    Parameters
    ----------
    approx : dict of str to ndarray
        ``(n, *shape)`` draws of the approximation.
    reference : dict of str to ndarray
        ``(chain, draw, *shape)`` reference draws.
    sites : sequence of str
        Sites to compare (present in both).

    Returns
    -------
    DataFrame
        Columns ``site``, ``element`` and those of :func:`marginal_metrics`.

    Raises
    ------
    ValueError
        When a site has no draws on one side, or another per-draw shape.
    """
    rows = []
    for site in sites:
        missing = [
            name
            for name, d in (("approximation", approx), ("reference", reference))
            if site not in d
        ]
        if missing:  # never a silently shorter table
            raise ValueError(f"site {site!r} has no draws in the {' and '.join(missing)}")
        a = np.asarray(approx[site], dtype=float)
        r = np.asarray(reference[site], dtype=float)
        if a.shape[1:] != r.shape[2:]:  # same element count, other layout: not comparable
            raise ValueError(
                f"site {site!r} has per-draw shape {a.shape[1:]} in the approximation and "
                f"{r.shape[2:]} in the reference"
            )
        a2 = a.reshape(a.shape[0], -1)
        r3 = r.reshape(r.shape[0], r.shape[1], -1)
        for j, label in enumerate(element_labels(site, r.shape[2:])):
            rows.append({"site": site, "element": label, **marginal_metrics(a2[:, j], r3[:, :, j])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- joint


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[rng.choice(len(x), size=n, replace=False)]


def wasserstein2(x: np.ndarray, y: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Exact 2-Wasserstein distance between two empirical distributions (POT ``emd2``).

    Parameters
    ----------
    x : ndarray, shape (n, D)
    y : ndarray, shape (m, D)
    max_points : int
        Each sample is subsampled to at most this many points (the cost is O(n m)).
    seed : int
        Seed of the subsampling.

    Notes
    -----
    Between finite samples the distance is biased upward (it does not vanish
    for two samples of one distribution); compare methods at equal sizes.
    """
    rng = np.random.default_rng(seed)
    x = _subsample(np.asarray(x, dtype=float).reshape(len(x), -1), max_points, rng)
    y = _subsample(np.asarray(y, dtype=float).reshape(len(y), -1), max_points, rng)
    cost = ot.dist(x, y, metric="sqeuclidean")
    cost2 = float(ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=1_000_000))
    return float(np.sqrt(max(cost2, 0.0)))


def sliced_wasserstein(
    x: np.ndarray, y: np.ndarray, num_projections: int = 200, max_points: int = 2000, seed: int = 0
) -> float:
    """Sliced 2-Wasserstein distance (POT): root mean squared W2 over random directions.

    For two Gaussians differing by a shift ``delta`` in ``D`` dimensions it
    equals ``|delta| / sqrt(D)``. Each sample is subsampled to at most
    ``max_points`` draws.
    """
    rng = np.random.default_rng(seed)
    x = _subsample(np.asarray(x, dtype=float).reshape(len(x), -1), max_points, rng)
    y = _subsample(np.asarray(y, dtype=float).reshape(len(y), -1), max_points, rng)
    return float(
        ot.sliced_wasserstein_distance(x, y, n_projections=num_projections, p=2, seed=seed)
    )


def energy_distance(x: np.ndarray, y: np.ndarray, max_points: int = 2000, seed: int = 0) -> float:
    """Energy distance ``sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|)`` (Szekely and Rizzo).

    Uses the V-statistic on at most ``max_points`` draws of each sample; zero
    only when the distributions agree. In 1-D it matches
    ``scipy.stats.energy_distance``.
    """
    rng = np.random.default_rng(seed)
    x = _subsample(np.asarray(x, dtype=float).reshape(len(x), -1), max_points, rng)
    y = _subsample(np.asarray(y, dtype=float).reshape(len(y), -1), max_points, rng)
    xy = cdist(x, y).mean()
    xx = cdist(x, x).mean()
    yy = cdist(y, y).mean()
    return float(np.sqrt(max(2.0 * xy - xx - yy, 0.0)))


def correlation_error(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Error of the approximation's correlation matrix ``corr(x)`` against ``corr(y)``.

    Returns
    -------
    dict
        ``corr_max_error``: largest absolute difference of an off-diagonal
        entry; ``corr_rms_error``: root mean square over off-diagonal entries;
        ``corr_pair``: ``(i, j)`` of the largest difference (or ``None``).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    d = x.shape[1]
    if d < 2:
        return {"corr_max_error": float("nan"), "corr_rms_error": float("nan"), "corr_pair": None}
    with np.errstate(invalid="ignore", divide="ignore"):
        cx, cy = np.corrcoef(x, rowvar=False), np.corrcoef(y, rowvar=False)
    diff = np.abs(np.nan_to_num(cx - cy))
    iu = np.triu_indices(d, 1)
    k = int(np.argmax(diff[iu]))
    return {
        "corr_max_error": float(diff[iu].max()),
        "corr_rms_error": float(np.sqrt(np.mean(diff[iu] ** 2))),
        "corr_pair": (int(iu[0][k]), int(iu[1][k])),
    }


def joint_metrics(
    approx: np.ndarray,
    reference: np.ndarray,
    *,
    seed: int = 0,
    standardize: bool = True,
    max_points: int = 1000,
) -> dict[str, float]:
    """Distances between joint distributions (rows are draws, columns coordinates).

    Parameters
    ----------
    approx : ndarray, shape (n, D)
    reference : ndarray, shape (m, D)
    seed : int
    standardize : bool
        Divide every coordinate by its reference sd (and subtract the
        reference mean) first, so that distances are in reference sd units.
    max_points : int
        Subsample size of the exact Wasserstein distance.

    Returns
    -------
    dict
        ``w2``, ``sliced_w2``, ``energy``, ``corr_max_error``, ``corr_rms_error``.
    """
    a = np.asarray(approx, dtype=float)
    r = np.asarray(reference, dtype=float)
    if standardize:
        mu, sd = r.mean(0), r.std(0, ddof=1)
        sd = np.where(sd > 0, sd, 1.0)
        a, r = (a - mu) / sd, (r - mu) / sd
    out = {
        "w2": wasserstein2(a, r, max_points=max_points, seed=seed),
        "sliced_w2": sliced_wasserstein(a, r, seed=seed),
        "energy": energy_distance(a, r, max_points=2 * max_points, seed=seed),
    }
    corr = correlation_error(a, r)
    out["corr_max_error"] = corr["corr_max_error"]
    out["corr_rms_error"] = corr["corr_rms_error"]
    return out


def joint_floor(
    reference: np.ndarray, *, seed: int = 0, max_points: int = 1000
) -> dict[str, float]:
    """:func:`joint_metrics` between two random halves of the reference draws.

    Distances between finite samples do not vanish even for one distribution
    (the exact W2 between two samples of ``n`` draws in ``D`` dimensions
    shrinks only like ``n ** (-1 / D)``); this is the floor a perfect
    approximation would reach with the same number of draws.
    """
    r = np.asarray(reference, dtype=float)
    perm = np.random.default_rng(seed).permutation(len(r))
    half = len(r) // 2
    a, b = r[perm[:half]], r[perm[half : 2 * half]]
    mu, sd = r.mean(0), r.std(0, ddof=1)
    sd = np.where(sd > 0, sd, 1.0)
    return joint_metrics(
        (a - mu) / sd, (b - mu) / sd, seed=seed, standardize=False, max_points=max_points
    )


# ----------------------------------------------------------------------------- weights


def psis_khat(log_weights: np.ndarray) -> float:
    """Pareto k-hat of importance log weights ``log p(x, z) - log q(z)``, ``z ~ q``.

    Below 0.5 importance sampling from ``q`` is reliable, 0.5 to 0.7 usable,
    above 0.7 ``q`` misses posterior mass and weighted estimates are not to
    be trusted (Vehtari et al., Pareto smoothed importance sampling).
    """
    lw = np.asarray(log_weights, dtype=float).ravel()
    if np.ptp(lw) == 0.0:  # q equals the posterior up to the constant: bounded weights
        return float("-inf")
    return _arviz.psis_khat(lw)


def khat_verdict(khat: float) -> str:
    """``good`` (< 0.5), ``ok`` (< 0.7), ``bad`` (>= 0.7) or ``n/a``."""
    if khat is None or np.isnan(khat):
        return "n/a"
    if khat < KHAT_GOOD:
        return "good"
    if khat < KHAT_BAD:
        return "ok"
    return "bad"


def elbo(log_weights: np.ndarray) -> tuple[float, float]:
    """ELBO (mean log weight, nats) and its standard error."""
    lw = np.asarray(log_weights, dtype=float).ravel()
    return float(lw.mean()), float(lw.std(ddof=1) / np.sqrt(len(lw)))


def iwae_bound(log_weights: np.ndarray, k: int) -> tuple[float, float]:
    """IWAE bound with ``k`` importance samples from independent groups, and its se (nats)."""
    return iwae_estimate(np.asarray(log_weights, dtype=float).ravel(), k)


def log_evidence_is(log_weights: np.ndarray) -> tuple[float, float]:
    """Importance-sampling estimate of ``log p(x)`` and its delta-method standard error.

    ``log mean exp(log w)`` over all draws; the standard error is the relative
    standard error of the mean weight, ``sd(w) / (sqrt(n) mean(w))``. It is
    only as good as the proposal: check :func:`psis_khat` first.
    """
    lw = np.asarray(log_weights, dtype=float).ravel()
    n = len(lw)
    est = float(logsumexp(lw) - np.log(n))
    w = np.exp(lw - lw.max())
    se = float(w.std(ddof=1) / (np.sqrt(n) * w.mean()))
    return est, se
