"""Pyro translations of nine posteriordb Stan programs.

Each function below translates one ``model.stan`` of
``vimodels/validation/posteriordb/`` line by line: the same priors (Stan's
implicit flat priors as :class:`~vimodels.validation.distributions.Flat`),
the same constraints, the same likelihood. Site names are Stan's parameter
names, so ``beta[1]`` in the reference is ``beta[0]`` of site ``beta``.
Everything is float64, as in Stan (the GP's Cholesky factor needs it).

Translation notes (what is not a one-to-one copy):

- Stan drops constants; Pyro's distributions are normalised. Half-Cauchy and
  half-normal priors on ``<lower=0>`` parameters differ from Stan's ``target``
  by ``log 2`` only, a constant.
- GARCH(1,1): ``beta1`` has the *dependent* bound ``upper = 1 - alpha1``.
  Pyro's samplers fix each site's transform once, so the model samples
  ``beta1_raw`` on (0, 1) with log density ``log(1 - alpha1)`` (the Jacobian
  of ``beta1 = (1 - alpha1) * beta1_raw``) and records ``beta1``: Stan's flat
  prior on ``(0, 1 - alpha1)`` exactly, unnormalised as in Stan (a normalised
  uniform would add ``-log(1 - alpha1)`` and change the posterior of ``alpha1``).
- HMM: the two states are summed out by the forward algorithm
  (:class:`pyro.distributions.DiscreteHMM`, a parallel scan). Stan's forward
  recursion starts from ``normal_lpdf(y[1] | mu[k], 1)``, the first state
  uniform without an initial distribution; DiscreteHMM's initial state comes
  one transition *before* the first observation, so the first transition has
  uniform rows (the first observed state uniform, ``-log 2``: a constant). Rows of the
  transition matrix are ``theta1`` and ``theta2`` (from state j to k), each
  uniform on the simplex (``Dirichlet(1, 1)``, density 1, as Stan's implicit
  prior); ``mu`` is ``positive_ordered`` with the two normal priors of the
  program, unnormalised on the ordered cone.
- The time-series likelihoods condition on past observations (``y`` is data
  in the recursion), so they cannot be run as prior predictives.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from vimodels.validation.distributions import Flat, Restricted

DTYPE = torch.float64
DATA_DIR = Path(__file__).resolve().parent / "posteriordb"


@cache
def read_json(posterior: str, filename: str) -> dict[str, Any]:
    """Parse ``posteriordb/<posterior>/<filename>`` (cached; do not mutate)."""
    with open(DATA_DIR / posterior / filename, encoding="utf-8") as f:
        return json.load(f)


def stan_data(posterior: str) -> dict[str, Any]:
    """The posterior's ``data.json`` as posteriordb ships it."""
    return read_json(posterior, "data.json")


def _t(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=DTYPE)


def _scalar(like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype)


# ----------------------------------------------------------------------------- regressions


def flat_regression(
    X: torch.Tensor, y: torch.Tensor | None = None, sigma_cauchy_scale: float = 0.0
) -> None:
    """``y ~ normal(X @ beta, sigma)`` with a flat prior on ``beta`` (the four regressions).

    Parameters
    ----------
    X : Tensor, shape (N, D)
        Design matrix built in the loader (the Stan program's transformed data),
        first column ones.
    y : Tensor, shape (N,), optional
        Response; ``None`` samples it.
    sigma_cauchy_scale : float
        ``> 0``: ``sigma ~ cauchy(0, scale)`` on ``sigma > 0`` (kidiq);
        ``0``: Stan's implicit flat prior on ``sigma > 0``.
    """
    beta = pyro.sample("beta", Flat(constraints.real, (X.shape[-1],), dtype=X.dtype))
    if sigma_cauchy_scale > 0:
        sigma = pyro.sample("sigma", dist.HalfCauchy(_scalar(X, sigma_cauchy_scale)))
    else:
        sigma = pyro.sample("sigma", Flat(constraints.positive, dtype=X.dtype))
    with pyro.plate("data", X.shape[0], dim=-1):
        mean = (X * beta).sum(-1)  # beta: (..., 1, D) under a particle plate
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def flat_regression_qr(
    Q: torch.Tensor, R_inv: torch.Tensor, y: torch.Tensor, sigma_cauchy_scale: float = 0.0
) -> None:
    """:func:`flat_regression` on QR coordinates: the same posterior, for NUTS.

    With the thin QR factorisation ``X = Q R`` (``Q`` scaled by ``sqrt(N - 1)``,
    ``R`` by ``1 / sqrt(N - 1)``), ``theta = R beta`` has a flat prior too (a
    linear map: constant Jacobian), and nearly uncorrelated posterior
    coordinates, which a diagonal NUTS metric handles in short trees. ``beta =
    R^{-1} theta`` is recorded, so the draws of ``beta`` and ``sigma`` are those
    of :func:`flat_regression`'s posterior.

    Parameters
    ----------
    Q : Tensor, shape (N, D)
    R_inv : Tensor, shape (D, D)
    y : Tensor, shape (N,)
    sigma_cauchy_scale : float
        As for :func:`flat_regression`.
    """
    theta = pyro.sample("theta", Flat(constraints.real, (Q.shape[-1],), dtype=Q.dtype))
    pyro.deterministic("beta", (R_inv * theta[..., None, :]).sum(-1))
    if sigma_cauchy_scale > 0:
        sigma = pyro.sample("sigma", dist.HalfCauchy(_scalar(Q, sigma_cauchy_scale)))
    else:
        sigma = pyro.sample("sigma", Flat(constraints.positive, dtype=Q.dtype))
    with pyro.plate("data", Q.shape[0], dim=-1):
        mean = (Q * theta).sum(-1)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def qr_data(data: dict[str, Any]) -> dict[str, Any]:
    """The data of :func:`flat_regression_qr` (``Q``, ``R_inv``) from :func:`flat_regression`'s."""
    out = {k: v for k, v in data.items() if k != "X"}
    X = data["X"]
    scale = float(np.sqrt(X.shape[0] - 1))
    Q, R = torch.linalg.qr(X)
    out["Q"] = Q * scale
    out["R_inv"] = torch.linalg.inv(R / scale)
    return out


def _design(columns: list[Any]) -> torch.Tensor:
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    return _t(np.column_stack([np.ones_like(cols[0])] + cols))


def load_kidiq() -> dict[str, Any]:
    """kidiq: ``kid_score`` on ``mom_hs``, ``mom_iq`` and their product."""
    d = stan_data("kidiq-kidscore_interaction")
    hs, iq = np.asarray(d["mom_hs"], float), np.asarray(d["mom_iq"], float)
    return {
        "X": _design([hs, iq, hs * iq]),
        "y": _t(d["kid_score"]),
        "sigma_cauchy_scale": 2.5,
    }


def load_mesquite() -> dict[str, Any]:
    """mesquite: ``log(weight)`` on ``log(diam1 * diam2 * canopy_height)``."""
    d = stan_data("mesquite-logmesquite_logvolume")
    volume = np.asarray(d["diam1"], float) * np.asarray(d["diam2"], float)
    volume = volume * np.asarray(d["canopy_height"], float)
    return {"X": _design([np.log(volume)]), "y": _t(np.log(np.asarray(d["weight"], float)))}


def load_earnings() -> dict[str, Any]:
    """earnings: ``log(earn)`` on ``height``, ``male`` and ``height * male`` (unscaled)."""
    d = stan_data("earnings-logearn_interaction")
    height, male = np.asarray(d["height"], float), np.asarray(d["male"], float)
    return {
        "X": _design([height, male, height * male]),
        "y": _t(np.log(np.asarray(d["earn"], float))),
    }


def load_nes() -> dict[str, Any]:
    """nes1972: ``partyid7`` on ideology, race, age group (3 dummies), education, gender, income."""
    d = stan_data("nes1972-nes")
    age = np.asarray(d["age_discrete"])
    cols = [d["real_ideo"], d["race_adj"], age == 2, age == 3, age == 4]
    cols += [d["educ1"], d["gender"], d["income"]]
    return {"X": _design(cols), "y": _t(d["partyid7"])}


# ----------------------------------------------------------------------------- time series


def ar_k(lags: torch.Tensor, y_tail: torch.Tensor) -> None:
    """AR(K): ``y[t] ~ normal(alpha + sum_k beta[k] * y[t - k], sigma)`` for ``t > K``.

    Parameters
    ----------
    lags : Tensor, shape (T - K, K)
        ``lags[i, k - 1] = y[K + i - k]`` (0-based ``y``): the lagged observations.
    y_tail : Tensor, shape (T - K,)
        ``y[K:]``, the modelled observations.
    """
    K = lags.shape[-1]
    ten = _scalar(lags, 10.0)
    alpha = pyro.sample("alpha", dist.Normal(_scalar(lags, 0.0), ten))
    beta = pyro.sample("beta", dist.Normal(lags.new_zeros(K), ten).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_scalar(lags, 2.5)))
    mu = alpha[..., None] + (lags * beta[..., None, :]).sum(-1)
    pyro.sample("y", dist.Normal(mu, sigma[..., None]).to_event(1), obs=y_tail)


def load_ark() -> dict[str, Any]:
    """arK: simulated AR(5) series (T = 200)."""
    d = stan_data("arK-arK")
    y, K = np.asarray(d["y"], float), int(d["K"])
    T = len(y)
    lags = np.column_stack([y[K - k : T - k] for k in range(1, K + 1)])
    return {"lags": _t(lags), "y_tail": _t(y[K:])}


def linear_recursion(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x[0] = d[0]``, ``x[t] = d[t] + a x[t-1]`` along the last axis, in log2(T) steps.

    A parallel (Hillis-Steele) scan: after the step of shift ``k``, ``x[t] =
    sum_{j < 2k} a^j d[t - j]``; the same sums as the sequential recursion, in
    another order.

    Parameters
    ----------
    d : Tensor, shape (..., T)
    a : Tensor, shape (...) broadcastable against ``d[..., 0]``
    """
    x = d
    power = a[..., None]
    k = 1
    n = d.shape[-1]
    while k < n:
        shifted = torch.cat([torch.zeros_like(x[..., :k]), x[..., :-k]], -1)
        x = x + power * shifted
        power = power * power
        k *= 2
    return x


def arma11(y: torch.Tensor, theta_unit: float = 1.0) -> None:
    """ARMA(1,1): ``err[t] = y[t] - mu - phi y[t-1] - theta err[t-1] ~ normal(0, sigma)``.

    ``nu[1] = mu + phi * mu`` (Stan's program assumes ``err[0] = 0`` and ``y[0] = mu``).
    The recursion is linear, ``err[t] = d[t] - theta * err[t-1]`` with
    ``d[t] = y[t] - mu - phi * y[t-1]``, and is evaluated by a parallel scan
    (:func:`linear_recursion`: 8 steps instead of 200; the same sums). ``err ~ normal(0, sigma)``
    is written ``y ~ normal(y - err, sigma)``: the same density.

    Parameters
    ----------
    y : Tensor, shape (T,)
    theta_unit : float
        1 (the program as written): ``theta`` is a latent site. Otherwise the
        latent is ``theta_raw ~ normal(0, 2 / theta_unit)`` and ``theta =
        theta_unit * theta_raw`` is recorded: the same prior and posterior on
        ``theta`` (a linear map), other unconstrained coordinates. NUTS starts
        uniformly in (-2, 2) on them; with ``theta_unit = 0.4`` every start has
        ``|theta| < 1`` (see the ``pdb_arma11`` entry for why that matters).
    """
    mu = pyro.sample("mu", dist.Normal(_scalar(y, 0.0), _scalar(y, 10.0)))
    phi = pyro.sample("phi", dist.Normal(_scalar(y, 0.0), _scalar(y, 2.0)))
    if theta_unit == 1.0:
        theta = pyro.sample("theta", dist.Normal(_scalar(y, 0.0), _scalar(y, 2.0)))
    else:
        raw = pyro.sample("theta_raw", dist.Normal(_scalar(y, 0.0), _scalar(y, 2.0 / theta_unit)))
        theta = pyro.deterministic("theta", theta_unit * raw)
    sigma = pyro.sample("sigma", dist.HalfCauchy(_scalar(y, 2.5)))
    m, p = mu[..., None], phi[..., None]
    prev = torch.cat([y.new_zeros(1), y[:-1]])  # y[t-1], with the first replaced below
    first = torch.zeros_like(y)
    first[0] = 1.0
    d = y - m - p * (prev + first * m)  # d[1] = y[1] - mu - phi * mu
    err = linear_recursion(d, -theta)
    pyro.sample("y", dist.Normal(y - err, sigma[..., None]).to_event(1), obs=y)


def load_arma() -> dict[str, Any]:
    """arma: simulated ARMA(1,1) series (T = 200)."""
    return {"y": _t(stan_data("arma-arma11")["y"])}


def garch11(y: torch.Tensor, sigma1: float) -> None:
    """GARCH(1,1): ``sigma[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 + beta1 sigma[t-1]^2``.

    Flat priors on ``mu``, ``alpha0 > 0``, ``alpha1`` in (0, 1) and ``beta1`` in
    ``(0, 1 - alpha1)`` (sampled as ``beta1_raw``, see the module docstring). The
    variance recursion is linear in ``sigma^2``, ``sigma[t]^2 = c[t] + beta1
    sigma[t-1]^2`` with ``c[t] = alpha0 + alpha1 (y[t-1] - mu)^2``, and is evaluated
    by a parallel scan (:func:`linear_recursion`).
    """
    mu = pyro.sample("mu", Flat(constraints.real, dtype=y.dtype))
    alpha0 = pyro.sample("alpha0", Flat(constraints.positive, dtype=y.dtype))
    alpha1 = pyro.sample("alpha1", Flat(constraints.unit_interval, dtype=y.dtype))
    room = 1.0 - alpha1
    beta1_raw = pyro.sample("beta1_raw", Flat(constraints.unit_interval, log_factor=room.log()))
    beta1 = pyro.deterministic("beta1", room * beta1_raw)
    prev = torch.cat([y.new_zeros(1), y[:-1]])
    first = torch.zeros_like(y)
    first[0] = 1.0
    # c[1] = sigma1^2 (the start), c[t] = alpha0 + alpha1 (y[t-1] - mu)^2 for t >= 2
    c = first * sigma1**2 + (1.0 - first) * (
        alpha0[..., None] + alpha1[..., None] * (prev - mu[..., None]) ** 2
    )
    var = linear_recursion(c, beta1)
    loc = mu[..., None].expand(var.shape)
    pyro.sample("y", dist.Normal(loc, var.sqrt()).to_event(1), obs=y)


def load_garch() -> dict[str, Any]:
    """garch: simulated GARCH(1,1) series (T = 200) and the known ``sigma1``."""
    d = stan_data("garch-garch11")
    return {"y": _t(d["y"]), "sigma1": float(d["sigma1"])}


# ----------------------------------------------------------------------------- GP, HMM


def gp_pois_regr(x: torch.Tensor, k: torch.Tensor, centered: int = 0) -> None:
    """Latent GP, Poisson counts: ``k ~ poisson_log(f)``, ``f = L(alpha, rho) f_tilde``.

    ``L`` is the Cholesky factor of the exponentiated-quadratic covariance
    ``alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + 1e-10 I``; ``rho ~ gamma(25, 4)``
    (shape, rate), ``alpha ~ normal(0, 2)`` on ``alpha > 0``, ``f_tilde ~ normal(0, 1)``.

    Parameters
    ----------
    x, k : Tensor, shape (N,)
    centered : int
        0 (the program as written): ``f_tilde`` is the latent site. ``c > 0``: the
        first ``c`` elements are sampled *centered*, as the innovations
        ``f_innov[j] = L[j, j] f_tilde[j] ~ normal(0, L[j, j])`` (the part of
        ``f[j]`` not predicted by ``f[:j]``), the others as ``f_tilde_rest ~
        normal(0, 1)``; ``f_tilde`` is recorded. The same joint density of
        ``(rho, alpha, f_tilde)`` (a change of variables whose Jacobian the
        normal densities carry), so the same posterior, in coordinates where
        the elements that the counts pin down do not stretch with
        ``alpha * L[j, j]`` (a partially non-centered parameterization,
        Papaspiliopoulos, Roberts and Skold 2007; see ``pdb_gp_pois_regr_pc``).
    """
    n = x.shape[-1]
    rho = pyro.sample("rho", dist.Gamma(_scalar(x, 25.0), _scalar(x, 4.0)))
    alpha = pyro.sample("alpha", dist.HalfNormal(_scalar(x, 2.0)))
    if centered == 0:
        f_tilde = pyro.sample("f_tilde", dist.Normal(x.new_zeros(n), 1.0).to_event(1))
    d2 = (x[:, None] - x[None, :]) ** 2
    r, a = rho[..., None, None], alpha[..., None, None]
    cov = a**2 * torch.exp(-0.5 * d2 / r**2) + 1e-10 * torch.eye(n, dtype=x.dtype)
    L = torch.linalg.cholesky(cov)
    if centered > 0:
        scale = torch.diagonal(L, dim1=-2, dim2=-1)[..., :centered]
        innov = pyro.sample("f_innov", dist.Normal(torch.zeros_like(scale), scale).to_event(1))
        rest = pyro.sample("f_tilde_rest", dist.Normal(x.new_zeros(n - centered), 1.0).to_event(1))
        batch = torch.broadcast_shapes(innov.shape[:-1], rest.shape[:-1])
        parts = [(innov / scale).expand(batch + (centered,)), rest.expand(batch + (n - centered,))]
        f_tilde = pyro.deterministic("f_tilde", torch.cat(parts, -1))
    f = pyro.deterministic("f", (L @ f_tilde[..., None])[..., 0])
    pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)


def load_gp() -> dict[str, Any]:
    """gp_pois_regr: 11 simulated counts on a grid of x in [-10, 10]."""
    d = stan_data("gp_pois_regr-gp_pois_regr")
    return {"x": _t(d["x"]), "k": _t(d["k"])}


def hmm_example(y: torch.Tensor) -> None:
    """Two-state Gaussian HMM, states summed out: ``y[t] ~ normal(mu[z[t]], 1)``.

    ``theta1``, ``theta2``: transition probabilities out of states 1 and 2
    (uniform on the simplex); ``mu``: positive and ordered, ``mu[1] ~ normal(3, 1)``,
    ``mu[2] ~ normal(10, 1)``.
    """
    ones = y.new_ones(2)
    theta1 = pyro.sample("theta1", dist.Dirichlet(ones))
    theta2 = pyro.sample("theta2", dist.Dirichlet(ones))
    prior = dist.Normal(y.new_tensor([3.0, 10.0]), 1.0).to_event(1)
    mu = pyro.sample("mu", Restricted(prior, constraints.positive_ordered_vector))
    log_theta = torch.stack([theta1, theta2], -2).log()  # [j, k]: from state j to k
    # DiscreteHMM's initial state precedes the first observation: a first transition with
    # uniform rows makes the first observed state uniform, as Stan's gamma[1, k] (up to
    # the constant -log 2); the later steps move by theta.
    steps = y.shape[-1]
    first = torch.zeros_like(log_theta).unsqueeze(-3)
    rest = log_theta.unsqueeze(-3).expand(log_theta.shape[:-2] + (steps - 1, 2, 2))
    transition = torch.cat([first, rest], -3)
    emission = dist.Normal(mu.unsqueeze(-2), y.new_ones(()))
    hmm = dist.DiscreteHMM(y.new_zeros(2), transition, emission, duration=steps)
    pyro.sample("y", hmm, obs=y)


def load_hmm() -> dict[str, Any]:
    """hmm_example: 100 simulated observations of a 2-state HMM."""
    return {"y": _t(stan_data("hmm_example-hmm_example")["y"])}
