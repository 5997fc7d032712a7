"""Bayesian linear regression with a Gaussian prior and known noise.

The posterior and the log evidence are Gaussian in closed form, so this entry
validates guides, ELBOs and the NUTS reference against exact answers.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from vimodels.catalog.base import CatalogEntry, ExactPosterior, NutsSettings, as_tensor

NUM_DATA = 50
NUM_FEATURES = 3
NOISE_SCALE = 1.0
PRIOR_SCALE = 2.0
DATA_SEED = 20240611
FEATURE_CORRELATION = 0.8


def load_synthetic(
    num_data: int = NUM_DATA, num_features: int = NUM_FEATURES, seed: int = DATA_SEED
) -> dict[str, torch.Tensor | float]:
    """Simulate the fixed synthetic data set.

    Returns
    -------
    dict
        ``X`` (N, D) standard-normal features with pairwise correlation 0.8,
        ``y`` (N,) responses with unit noise, ``noise_scale`` and ``prior_scale`` (floats).
    """
    rng = np.random.default_rng(seed)
    # equicorrelated features (rho = FEATURE_CORRELATION) make the posterior correlated,
    # so mean-field families lose a visible amount of ELBO
    corr = np.full((num_features, num_features), FEATURE_CORRELATION)
    np.fill_diagonal(corr, 1.0)
    X = rng.standard_normal((num_data, num_features)) @ np.linalg.cholesky(corr).T
    beta = rng.normal(0.0, PRIOR_SCALE, size=num_features)
    y = X @ beta + rng.normal(0.0, NOISE_SCALE, size=num_data)
    return {
        "X": as_tensor(X),
        "y": as_tensor(y),
        "noise_scale": NOISE_SCALE,
        "prior_scale": PRIOR_SCALE,
    }


def linear_regression(
    X: torch.Tensor,
    y: torch.Tensor | None = None,
    noise_scale: float = NOISE_SCALE,
    prior_scale: float = PRIOR_SCALE,
    subsample_size: int | None = None,
) -> None:
    """Linear regression ``y ~ Normal(X @ beta, noise_scale)``, ``beta ~ Normal(0, prior_scale)``.

    Parameters
    ----------
    X : Tensor, shape (N, D)
    y : Tensor, shape (N,), optional
    noise_scale, prior_scale : float
        Known noise sd and prior sd (units of ``y``).
    subsample_size : int, optional
        Minibatch size for the data plate (the likelihood is rescaled by N / size).
    """
    num_features = X.shape[-1]
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(num_features), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=subsample_size, dim=-1) as idx:
        mean = (X[idx] * beta).sum(-1)  # beta: (..., 1, D) under a particle plate
        pyro.sample("obs", dist.Normal(mean, noise_scale), obs=None if y is None else y[idx])


def exact_posterior(data: dict) -> ExactPosterior:
    """Closed-form Gaussian posterior of ``beta`` and the exact log evidence (nats)."""
    X = data["X"].double().numpy()
    y = data["y"].double().numpy()
    s2, p2 = data["noise_scale"] ** 2, data["prior_scale"] ** 2
    precision = X.T @ X / s2 + np.eye(X.shape[1]) / p2
    cov = np.linalg.inv(precision)
    mean = cov @ X.T @ y / s2
    marginal_cov = s2 * np.eye(len(y)) + p2 * X @ X.T
    sign, logdet = np.linalg.slogdet(marginal_cov)
    quad = y @ np.linalg.solve(marginal_cov, y)
    log_evidence = -0.5 * (len(y) * np.log(2 * np.pi) + logdet + quad)

    def sampler(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"beta": rng.multivariate_normal(mean, cov, size=n)}

    return ExactPosterior(
        mean={"beta": mean},
        sd={"beta": np.sqrt(np.diag(cov))},
        cov=cov,
        log_evidence=float(log_evidence),
        sampler=sampler,
    )


CONJUGATE_LINEAR_REGRESSION = CatalogEntry(
    name="conjugate_linear_regression",
    description=(
        "synthetic_ linear regression, 50 points x 3 correlated (rho 0.8) normal features, "
        "known unit noise, Normal(0, 2) prior: exact Gaussian posterior and log evidence"
    ),
    model=linear_regression,
    loader=load_synthetic,
    sites=("beta",),
    family="conjugate_linear_regression",
    observed=("y",),
    nuts=NutsSettings(num_warmup=300, num_samples=500, num_chains=4, metric="diag"),
    exact=exact_posterior,
    max_plate_nesting=1,
)
