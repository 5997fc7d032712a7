"""The log evidence ``log p(x)``: how it is obtained and how far to trust it.

A comparison measures each approximation's gap ``log p(x) - ELBO`` against
one number, so that number must be right to within its stated error. In
order of preference it is

1. given by the caller, or the catalog's closed form (``exact``) evaluated on
   the data the fits were made with;
2. **bridge sampling** on the reference draws (Meng & Wong 1996; the
   iterative scheme of Gronau et al. 2017): the draws are mapped to the
   unconstrained space where Pyro's NUTS runs (the potential
   ``-log p(x, z) - log|J|`` of :func:`pyro.infer.mcmc.util.initialize_model`),
   a multivariate t proposal (5 degrees of freedom) is fitted to the first
   half of each chain, and the second half and as many proposal draws enter
   the bridge. Its standard error is the square root of the relative mean
   squared error of Fruhwirth-Schnatter (2004), with the autocorrelation
   of the posterior half taken into account. The bridge's terms are bounded,
   so this error is honest even where the proposal fits poorly (it is then
   large, not small);
3. **importance sampling** with the same heavy-tailed proposal, its PSIS
   k-hat checked: used when the bridge cannot be run, refused (value NaN)
   when k-hat >= 0.7, and otherwise a cross-check of the bridge;
4. importance sampling with the best fitted guide as proposal (the last
   resort when the reference cannot be evaluated; refused when its k-hat is
   >= 0.7).

:func:`check_bounds` then compares every method's IWAE bound, a *lower*
bound on ``log p(x)``, with the estimate: a bound more than 3 standard
errors above it means one of the two numbers is wrong, and the flag says
which.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer.mcmc.util import initialize_model
from scipy.special import gammaln, logsumexp

from diagnostics import _arviz, metrics
from diagnostics.nuts.kernel import BatchedPotential, FlatPotential
from vimodels.data import RowArray
from vimodels.errors import derive_seed
from vimodels.svi.draws import model_info, sample_guide
from vimodels.svi.reparam import decentered_sites_of, source_model
from vimodels.svi.scope import param_scope
from vimodels.svi.subsample import full_data

if TYPE_CHECKING:
    from diagnostics.nuts.reference import Reference
    from vimodels.svi.fit import FitResult

EXACT = "exact"
ESTIMATED = "estimated"
GIVEN = "given"
UNKNOWN = "unknown"
# log p(x) is estimated from the best method's log weights drawn with seed + this
EVIDENCE_SEED_OFFSET = 7
# degrees of freedom of the multivariate t proposal fitted to the reference draws
PROPOSAL_DF = 5.0
# a bound above the estimate by more than this many standard errors is flagged
BOUND_SE = 3.0
_BATCH = 256
_MIN_DRAWS = 20


@dataclass(frozen=True)
class LogEvidence:
    """``log p(x)`` in nats and where it comes from.

    Attributes
    ----------
    value, se : float
        Estimate and standard error (``se`` 0 when exact; NaN when unknown).
    kind : str
        ``exact`` (closed form), ``estimated``, ``given`` (passed by the caller)
        or ``unknown``.
    source : str
        One line: how it was obtained, with its diagnostics.
    method : str
        ``closed form``, ``given``, ``bridge sampling``, ``importance sampling``
        (heavy-tailed proposal fitted to the reference draws), ``guide importance
        sampling`` or ``none``.
    diagnostics : dict
        Numbers behind the estimate (draws, k-hat, iterations, the cross-check).
    """

    value: float
    se: float
    kind: str
    source: str
    method: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "value": self.value,
            "se": self.se,
            "kind": self.kind,
            "source": self.source,
            "method": self.method,
            "diagnostics": dict(self.diagnostics),
        }


# ----------------------------------------------------------------------------- estimators


def _logmeanexp(x: np.ndarray) -> float:
    return float(logsumexp(x) - np.log(len(x)))


def bridge_sampling(
    lq_post: np.ndarray,
    lg_post: np.ndarray,
    lq_prop: np.ndarray,
    lg_prop: np.ndarray,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Iterative bridge-sampling estimate of ``log p(x)`` and its standard error.

    Parameters
    ----------
    lq_post, lg_post : ndarray, shape (chain, draw)
        Unnormalized log posterior ``log p(x, z)`` (with the log-Jacobian of the
        unconstrained space) and log proposal density at posterior draws not used
        to fit the proposal.
    lq_prop, lg_prop : ndarray, shape (n,)
        The same at independent draws of the proposal.
    tol, max_iter
        Stop when ``log p(x)`` moves less than ``tol``.

    Returns
    -------
    dict
        ``value``, ``se`` (square root of the relative mean squared error,
        Fruhwirth-Schnatter 2004, the posterior term inflated by its
        autocorrelation), ``re2``, ``iterations``, ``n_post``, ``n_eff`` (of the
        posterior terms) and ``n_prop``.
    """
    l1 = np.asarray(lq_post, float) - np.asarray(lg_post, float)  # (chain, draw)
    l2 = np.asarray(lq_prop, float) - np.asarray(lg_prop, float)
    l1 = np.where(np.isnan(l1), -np.inf, l1)
    l2 = np.where(np.isnan(l2), -np.inf, l2)
    n1, n2 = l1.size, l2.size
    flat1 = l1.ravel()
    # effective size of the posterior half for the bridge's weights (Gronau et al.)
    neff = float(n1)
    if l1.ndim == 2 and l1.shape[1] >= 4 and np.all(np.isfinite(l1)) and np.ptp(l1) > 0:
        neff = float(np.clip(_arviz.ess(l1, "bulk"), 1.0, n1))
    ls1 = math.log(neff / (neff + n2))
    ls2 = math.log(n2 / (neff + n2))
    finite2 = l2[np.isfinite(l2)]
    log_z = _logmeanexp(finite2) if len(finite2) else float(np.median(flat1))
    if not np.isfinite(log_z):
        log_z = float(np.median(flat1[np.isfinite(flat1)]))
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        num = l2 - np.logaddexp(ls1 + l2, ls2 + log_z)
        den = -np.logaddexp(ls1 + flat1, ls2 + log_z)
        new = _logmeanexp(num) - _logmeanexp(den)
        if not np.isfinite(new):
            log_z = float("nan")
            break
        done = abs(new - log_z) < tol
        log_z = new
        if done:
            break
    nan = float("nan")
    failed = {"value": nan, "se": nan, "re2": nan, "iterations": iterations}
    if not np.isfinite(log_z):
        return {**failed, "n_post": n1, "n_eff": neff, "n_prop": n2}
    s1, s2 = math.exp(ls1), math.exp(ls2)
    # normalized posterior p = q / Z; f1 on proposal draws, f2 on posterior draws (bounded)
    lp2, lp1 = l2 - log_z, l1 - log_z  # log p - log g
    with np.errstate(over="ignore"):
        f1 = 1.0 / (s1 + s2 * np.exp(-lp2))
        f2 = 1.0 / (s1 * np.exp(lp1) + s2)
    if not (np.mean(f1) > 0 and np.mean(f2) > 0):
        # the proposal and the posterior do not overlap in floating point: no error estimate
        return {**failed, "n_post": n1, "n_eff": 0.0, "n_prop": n2}
    term1 = float(np.var(f1, ddof=1) / np.mean(f1) ** 2 / n2)
    if f2.ndim == 2 and f2.shape[0] >= 1 and f2.shape[1] >= 4 and np.ptp(f2) > 0:
        mcse = _arviz.mcse_mean(f2)
        term2 = float((mcse / np.mean(f2)) ** 2)
        f2_eff = float(np.var(f2, ddof=1) / mcse**2) if mcse > 0 else float(n1)
    else:
        term2 = float(np.var(f2, ddof=1) / np.mean(f2) ** 2 / n1)
        f2_eff = float(n1)
    re2 = term1 + term2
    return {
        "value": float(log_z),
        "se": float(math.sqrt(re2)),
        "re2": re2,
        "iterations": iterations,
        "n_post": n1,
        "n_eff": min(neff, f2_eff),
        "n_prop": n2,
    }


@dataclass(frozen=True)
class StudentT:
    """A multivariate t density on ``R^D`` (location, scale matrix, degrees of freedom)."""

    loc: np.ndarray
    scale: np.ndarray
    df: float

    @classmethod
    def fit(cls, x: np.ndarray, df: float = PROPOSAL_DF) -> StudentT:
        """Location and scale matrix = sample mean and covariance of ``x`` (n, D)."""
        loc = x.mean(axis=0)
        cov = np.atleast_2d(np.cov(x, rowvar=False))
        jitter = 1e-10 * max(float(np.trace(cov)) / len(cov), 1e-300)
        return cls(loc, cov + jitter * np.eye(len(cov)), float(df))

    def _chol(self) -> np.ndarray:
        return np.linalg.cholesky(self.scale)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws, shape (n, D)."""
        d = len(self.loc)
        z = rng.standard_normal((n, d)) @ self._chol().T
        w = rng.chisquare(self.df, size=(n, 1)) / self.df
        return self.loc + z / np.sqrt(w)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Log density at ``x`` (n, D)."""
        d = len(self.loc)
        chol = self._chol()
        sol = np.linalg.solve(chol, (x - self.loc).T)
        maha = np.sum(sol**2, axis=0)
        logdet = 2.0 * np.sum(np.log(np.diag(chol)))
        nu = self.df
        return (
            gammaln((nu + d) / 2)
            - gammaln(nu / 2)
            - 0.5 * d * math.log(nu * math.pi)
            - 0.5 * logdet
            - 0.5 * (nu + d) * np.log1p(maha / nu)
        )


# ----------------------------------------------------------------------------- the model


class UnconstrainedDensity:
    """``log p(x, z) + log|J|`` of a Pyro model on its unconstrained space, vectorized.

    The potential Pyro's NUTS samples (discrete sites summed out), from
    :func:`~pyro.infer.mcmc.util.initialize_model`, evaluated many points at a time
    with the batched potential of :mod:`diagnostics.nuts.kernel` (rows one by one
    where it cannot be batched).

    Parameters
    ----------
    model : callable
    args : tuple
        Positional arguments of the model.
    kwargs : dict
        Keyword arguments of the model.
    max_plate_nesting : int, optional
    """

    def __init__(
        self,
        model: Callable,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        max_plate_nesting: int | None = None,
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, potential_fn, transforms, _ = initialize_model(
                model,
                model_args=tuple(args),
                model_kwargs=dict(kwargs or {}),
                max_plate_nesting=max_plate_nesting,
            )
        self.names = tuple(params)
        self.shapes = {k: tuple(params[k].shape) for k in self.names}
        self.transforms = transforms
        self.dtype = params[self.names[0]].dtype if self.names else torch.get_default_dtype()
        z0 = (
            np.concatenate([params[k].detach().reshape(-1).double().numpy() for k in self.names])
            if self.names
            else np.zeros(0)
        )
        self._flat = FlatPotential(potential_fn, self.shapes, self.dtype, True, z0)
        self._batched: Any = None

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the unconstrained space."""
        return self._flat.dim

    def unconstrain(self, draws: Mapping[str, np.ndarray], sample_ndim: int) -> np.ndarray:
        """Constrained draws (``sample_ndim`` leading axes) -> unconstrained ``(n, D)``."""
        cols = []
        for name in self.names:
            x = np.asarray(draws[name], dtype=float)
            lead = x.shape[:sample_ndim]
            x = x.reshape((int(np.prod(lead)),) + x.shape[sample_ndim:])
            t = self.transforms.get(name)
            with torch.no_grad():
                v = torch.as_tensor(x, dtype=torch.float64)
                u = (t(v) if t is not None else v).numpy()
            cols.append(u.reshape(len(u), -1))
        return np.concatenate(cols, axis=1)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """``log p(x, z) + log|J|`` at unconstrained points ``u`` (n, D); -inf where undefined."""
        u = np.asarray(u, dtype=float)
        n = len(u)
        out = np.empty(n)
        if self._batched is None:
            k = min(_BATCH, n)
            self._batched = BatchedPotential(self._flat, u[:k] if k else u)
        k = self._batched.size
        for start in range(0, n, k):
            chunk = u[start : start + k]
            m = len(chunk)
            if m < k:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], k - m, axis=0)])
            pot, _ = self._batched(chunk)
            out[start : start + m] = -pot[:m]
        out[~np.isfinite(out)] = -np.inf
        return out


#: Largest PSIS k-hat at which an importance-sampling estimate of ``log p(x)`` is printed
#: with its standard error. The delta-method se needs weights of finite variance, which
#: a Pareto tail with k >= 0.5 does not have: measured on a Gaussian target with a
#: too-narrow Gaussian proposal (true k 0.55-0.65, 4000 draws, 200 seeds), 3-16 % of
#: the estimates fell more than 3 printed se below the truth (0.3 % for a calibrated se).
#: k < 0.7 (:data:`diagnostics.metrics.KHAT_BAD`) is enough for a bound or a
#: resampling, not for a number printed as ``value +- se``.
IS_KHAT_MAX = metrics.KHAT_GOOD

_INFINITE_VARIANCE = (
    f" (k-hat >= {IS_KHAT_MAX}: the weights' variance is infinite, so the "
    "importance-sampling standard error would be understated)"
)


def reference_log_evidence(
    model: Callable,
    args: tuple,
    reference: Reference,
    *,
    max_plate_nesting: int | None = None,
    num_proposal: int | None = None,
    seed: int = 0,
) -> LogEvidence:
    """``log p(x)`` by bridge sampling on the reference draws (importance sampling as check).

    Parameters
    ----------
    model : callable
        The model, called as ``model(*args)``.
    args : tuple
    reference : Reference
        Draws ``(chain, draw, *shape)`` of every continuous latent site.
    max_plate_nesting : int, optional
    num_proposal : int, optional
        Draws of the proposal; default as many as the posterior draws in the bridge
        (at least 4000).
    seed : int
        Seed of the proposal draws.

    Returns
    -------
    LogEvidence
        ``method`` ``bridge sampling`` (or ``importance sampling`` when the bridge
        fails and the proposal's k-hat allows), with the cross-check in
        ``diagnostics``; ``unknown`` when neither can be trusted.

    Raises
    ------
    ValueError
        When the reference lacks a site, has too few draws, or the model cannot
        be evaluated (the caller falls back).
    """
    dens = UnconstrainedDensity(model, args, {}, max_plate_nesting)
    missing = [k for k in dens.names if k not in reference.draws]
    if missing:
        raise ValueError(f"the reference has no draws of {', '.join(missing)}")
    if not dens.names:
        raise ValueError("the model has no continuous latent site")
    chains, draws = reference.num_chains, reference.num_draws
    if draws < _MIN_DRAWS:
        raise ValueError(f"{draws} reference draws per chain are too few")
    u = dens.unconstrain(reference.draws, 2).reshape(chains, draws, -1)
    if not np.all(np.isfinite(u)):
        raise ValueError("reference draws map to non-finite unconstrained values")
    half = draws // 2
    fit_part = u[:, :half].reshape(-1, u.shape[-1])
    post_part = u[:, half:]
    proposal = StudentT.fit(fit_part)
    n_post = post_part.shape[0] * post_part.shape[1]
    n_prop = int(num_proposal or max(n_post, 4000))
    rng = np.random.default_rng(seed)
    prop = proposal.sample(n_prop, rng)
    flat_post = post_part.reshape(-1, u.shape[-1])
    lq_post = dens(flat_post).reshape(post_part.shape[:2])
    lg_post = proposal.log_prob(flat_post).reshape(post_part.shape[:2])
    lq_prop = dens(prop)
    lg_prop = proposal.log_prob(prop)
    bridge = bridge_sampling(lq_post, lg_post, lq_prop, lg_prop)
    lw = lq_prop - lg_prop
    finite = np.isfinite(lw)
    if finite.sum() > 1 and np.ptp(lw[finite]) > 0:
        is_value, is_se = metrics.log_evidence_is(lw[finite])
        # a proposal draw where the model is undefined has weight 0: keep it in the mean
        is_value += math.log(finite.mean())
        khat = metrics.psis_khat(lw[finite])
    else:
        is_value, is_se, khat = float("nan"), float("nan"), float("nan")
    diag: dict[str, Any] = {
        "proposal": f"multivariate t ({PROPOSAL_DF:g} df) fitted to the first half of each "
        "chain in unconstrained space",
        "dim": int(u.shape[-1]),
        "bridge": {k: _finite_or_none(v) for k, v in bridge.items()},
        "importance": {
            "value": _finite_or_none(is_value),
            "se": _finite_or_none(is_se),
            "khat": _finite_or_none(khat),
            "n": n_prop,
        },
        "reference": f"{reference.kind}, {'trusted' if reference.trusted else 'UNTRUSTED'}",
    }
    caveat = "" if reference.trusted else "; the reference is UNTRUSTED, so may be this"
    is_text = (
        f"importance sampling with the same proposal {is_value:.5g} +- {is_se:.2g} "
        f"(k-hat {khat:.2f}, {metrics.khat_verdict(khat)})"
    )
    if np.isfinite(bridge["value"]) and np.isfinite(bridge["se"]):
        agree = ""
        if np.isfinite(is_value) and khat < IS_KHAT_MAX:
            z = abs(is_value - bridge["value"]) / math.hypot(bridge["se"], is_se)
            diag["importance"]["z"] = float(z)
            agree = "agrees" if z <= BOUND_SE else f"DISAGREES ({z:.1f} se)"
            is_text = f"{is_text} {agree}"
        return LogEvidence(
            bridge["value"],
            bridge["se"],
            ESTIMATED,
            f"bridge sampling on the {reference.kind} reference draws ({bridge['n_post']} "
            f"posterior draws, effective {bridge['n_eff']:.0f}; {n_prop} draws of a "
            f"multivariate t proposal; {bridge['iterations']} iterations; se from the "
            f"relative MSE); {is_text}{caveat}",
            "bridge sampling",
            diag,
        )
    if np.isfinite(is_value) and khat < IS_KHAT_MAX:
        return LogEvidence(
            is_value,
            is_se,
            ESTIMATED,
            f"{is_text} fitted to the {reference.kind} reference draws (bridge sampling "
            f"failed){caveat}",
            "importance sampling",
            diag,
        )
    return LogEvidence(
        float("nan"),
        float("nan"),
        UNKNOWN,
        f"bridge sampling failed and {is_text}: no estimate to trust"
        + (_INFINITE_VARIANCE if khat >= IS_KHAT_MAX else ""),
        "none",
        diag,
    )


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ----------------------------------------------------------------------------- comparison


def exact_log_evidence(results: Sequence[FitResult]) -> float | None:
    """The catalog's closed-form ``log p(x)`` on the data the fits were made with, if known.

    A fit of a catalog entry on other data (``fit(name, data=...)``) gets the
    entry's closed form evaluated on that data (``entry.exact(result.data)``), not
    the catalog's value for its own data; a stored task (no ``data``: it was fitted
    on the catalog's data) gets the catalog's. None when the entry has no closed
    form or it cannot take the fit's data (the evidence is then estimated).
    """
    first = results[0]
    entry = first.entry
    if entry is None or entry.exact is None:
        return None
    data = getattr(first, "data", None)
    if not data:  # a stored task: fitted on the catalog's own data
        exact = entry.exact_posterior()
    else:
        try:
            exact = entry.exact(dict(data))
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError):
            return None  # a closed form that cannot take this data: estimate instead
    if exact is None or exact.log_evidence is None:
        return None
    value = float(exact.log_evidence)
    return value if math.isfinite(value) else None


def bridge_fit(fits: Sequence[FitResult]) -> FitResult:
    """The fit whose model bridge sampling evaluates the reference draws under.

    The reference's draws are of the model as written: a decentered fit's model
    has other latent sites (bridge sampling on it raised and fell back to guide
    IS), and a subsampled fit's model scores a minibatch (bridge sampling refused
    it, and a later full-data fit was not tried). First choice: a fit neither
    decentered nor subsampled; then one not decentered; then the first.
    """
    for ok in (
        lambda f: not decentered_sites_of(f) and subsampled(f) is None,
        lambda f: not decentered_sites_of(f),
    ):
        found = next((f for f in fits if ok(f)), None)
        if found is not None:
            return found
    return fits[0]


def _log_evidence(
    fits: Sequence[FitResult],
    named: Mapping[str, FitResult],
    summary: pd.DataFrame,
    given: float | None,
    num: int,
    seed: int,
    reference: Reference | None = None,
) -> LogEvidence:
    """The comparison's ``log p(x)``: given, exact, bridge sampling, else guide IS."""
    if given is not None:
        return LogEvidence(float(given), 0.0, GIVEN, "given by the caller", "given")
    exact = exact_log_evidence(fits)
    if exact is not None:
        return LogEvidence(
            float(exact), 0.0, EXACT, "closed form (catalog), on the fits' data", "closed form"
        )
    why = "no reference draws"
    if reference is not None:
        first = bridge_fit(fits)
        try:
            with param_scope(first):  # the model's pyro.param sites: the fit's
                le = reference_log_evidence(
                    source_model(first.model),
                    tuple(first.args),
                    reference,
                    max_plate_nesting=first.max_plate_nesting,
                    num_proposal=None,
                    seed=derive_seed(seed, EVIDENCE_SEED_OFFSET),
                )
        except Exception as exc:  # a model the potential cannot evaluate: fall back
            why = f"bridge sampling unavailable ({type(exc).__name__}: {str(exc)[:120]})"
        else:
            if le.kind != UNKNOWN:
                return le
            why = le.source
    return _guide_log_evidence(named, summary, num, seed, why)


def _guide_log_evidence(
    named: Mapping[str, FitResult], summary: pd.DataFrame, num: int, seed: int, why: str
) -> LogEvidence:
    usable = summary[np.isfinite(summary["khat"]) | (summary["khat"] == -np.inf)]
    usable = usable[usable["status"] != "nonfinite"]
    if "point_mass" in usable:  # equal weights (k-hat -inf) from a point, not a perfect q
        usable = usable[~usable["point_mass"].fillna(False).astype(bool)]
    if "failed" in usable:
        usable = usable[~usable["failed"].astype(bool)]
    if usable.empty:
        return LogEvidence(
            float("nan"),
            float("nan"),
            UNKNOWN,
            f"{why}; no method gives finite importance weights",
            "none",
        )
    best = usable.sort_values(["khat", "elbo"], ascending=[True, False]).iloc[0]
    result = named[best["method"]]
    lw = evidence_log_weights(result, num, derive_seed(seed, EVIDENCE_SEED_OFFSET))
    value, se = metrics.log_evidence_is(lw)
    khat = metrics.psis_khat(lw)
    text = (
        f"importance sampling with {best['method']} as proposal, {num} draws, "
        f"k-hat {khat:.2f} ({metrics.khat_verdict(khat)})"
    )
    diag = {"khat": _finite_or_none(khat), "n": num, "proposal": best["method"]}
    if not khat < IS_KHAT_MAX:
        return LogEvidence(
            float("nan"),
            float("nan"),
            UNKNOWN,
            f"{why}; {text}: refused, the weights are too heavy-tailed for an estimate"
            + (_INFINITE_VARIANCE if khat < metrics.KHAT_BAD else ""),
            "none",
            diag,
        )
    return LogEvidence(
        value,
        se,
        ESTIMATED,
        f"{text}; {why}; its se assumes the proposal covers the posterior",
        "guide importance sampling",
        diag,
    )


#: Most likelihood rows (draws x full-data rows of the subsampled plates) that ``compare``
#: and :func:`evidence_log_weights` evaluate to get the full-data log weights of a fit
#: whose model subsamples its data.
FULL_DATA_BUDGET = 20_000_000


def subsampled(result: Any) -> dict | None:
    """``settings["subsample"]`` of a fit whose model subsamples its data, else None."""
    sub = getattr(result, "subsample", None)
    if sub is None:
        sub = (getattr(result, "settings", None) or {}).get("subsample")
    return sub or None


def why_not_full_data(result: Any, subsample: dict, num_draws: int) -> str | None:
    """Why a subsampled fit's log weights cannot be evaluated on the full data (None: they can).

    Parameters
    ----------
    result : FitResult or StoredFit
    subsample : dict
        Its ``settings["subsample"]`` (:func:`subsampled`).
    num_draws : int
        Draws to evaluate.

    Returns
    -------
    str or None
        ``"stored draws"`` (a stored task: its draws cannot be re-evaluated),
        ``"memory-mapped data"`` (reading every row is what the batches avoid), or
        draws x rows over :data:`FULL_DATA_BUDGET`; None when affordable.
    """
    if getattr(result, "stored_evidence_log_weights", None) is not None:
        return "stored draws"
    data = getattr(result, "data", None) or {}
    values = list(getattr(result, "args", ())) + list(data.values())
    if any(isinstance(v, RowArray) for v in values):
        return "memory-mapped data"
    rows = sum(int(p["size"]) for p in subsample.get("plates", []))
    if rows * num_draws > FULL_DATA_BUDGET:
        return f"{num_draws} draws x {rows} rows > {FULL_DATA_BUDGET:.0e}"
    return None


def evidence_log_weights(result: FitResult, num: int, seed: int) -> np.ndarray:
    """``num`` log weights ``log p(x, z) - log q(z)`` of a fit's guide, drawn with ``seed``.

    What the importance-sampling estimate of ``log p(x)`` uses. A result that
    stores its own (a :class:`~vimodels.runs.tasks.StoredFit`, whose task called
    this function on the live fit) returns those. A fit whose model subsamples
    its data is evaluated on all the rows (:func:`vimodels.svi.subsample.full_data`),
    or, where :func:`why_not_full_data` says it cannot be, gets NaN weights.
    """
    stored = getattr(result, "stored_evidence_log_weights", None)
    if stored is not None:
        return stored(num, seed)
    # a model that subsamples its data: exact weights need every row (one batch's are noisy)
    sub = subsampled(result)
    if sub and why_not_full_data(result, sub, num) is not None:
        return np.full(num, np.nan)  # no estimate rather than a batch's noise
    rows = full_data() if sub else nullcontext()
    with param_scope(result), rows:  # the model's pyro.param sites: the fit's
        info = model_info(result.model, result.args, {}, result.max_plate_nesting)
        pyro.set_rng_seed(seed)
        _, lw = sample_guide(result.model, result.guide, result.args, {}, info, num)
    return lw


def check_bounds(summary: pd.DataFrame, le: LogEvidence) -> list[str]:
    """Flags for IWAE bounds (and ELBOs) above ``log p(x)`` by more than 3 standard errors.

    A lower bound cannot exceed ``log p(x)`` in expectation. When one does, the
    flag says which number is wrong: an exact value is right, so the bound's
    standard error is understated (heavy-tailed weights, see its k-hat); an
    estimate is wrong when the method's weights are well behaved (k-hat < 0.7),
    else the method's bound is the suspect.
    """
    flags: list[str] = []
    if le.kind == UNKNOWN or not np.isfinite(le.value):
        return flags
    le_se = le.se if np.isfinite(le.se) else 0.0
    for row in summary.itertuples():
        for label, value, se in (
            ("IWAE bound", getattr(row, "iwae", np.nan), getattr(row, "iwae_se", np.nan)),
            ("ELBO", getattr(row, "elbo", np.nan), getattr(row, "elbo_se", np.nan)),
        ):
            if not (np.isfinite(value) and np.isfinite(se)):
                continue
            total = math.hypot(se, le_se)
            excess = value - le.value
            if total == 0 or excess <= BOUND_SE * total:
                continue
            khat = float(getattr(row, "khat", np.nan))
            if le.kind in (EXACT, GIVEN):
                culprit = (
                    f"log p(x) is {le.kind}, so the {label}'s se is understated "
                    f"(k-hat {khat:.2f}): trust log p(x)"
                )
            elif khat < metrics.KHAT_BAD:
                culprit = (
                    f"{row.method}'s weights are well behaved (k-hat {khat:.2f}), so the "
                    f"log p(x) estimate ({le.method}) is too low or its se understated"
                )
            else:
                culprit = (
                    f"{row.method}'s weights are heavy-tailed (k-hat {khat:.2f}), so its "
                    f"{label} and se are the suspect numbers"
                )
            flags.append(
                f"{row.method}: {label} {value:.5g} +- {se:.2g} is above log p(x) "
                f"{le.value:.5g} +- {le_se:.2g} by {excess / total:.1f} se, but it is a "
                f"lower bound: {culprit}"
            )
            break
    return flags
