"""Small models for the mode tests (imported as ``mode_models``)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch


def correlated_gaussian(dim: int = 50, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance: sds log-spaced over 4 decades (0.01 to 100), AR(1) correlation 0.9.

    The mean is 3 sd from zero in every coordinate (signs alternate).
    """
    sd = np.logspace(-2, 2, dim)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(dim)  # correlate coordinates of unlike scale
    idx = np.arange(dim)
    corr = 0.9 ** np.abs(idx[:, None] - idx[None, :])
    sd = sd[perm]
    cov = corr * sd[:, None] * sd[None, :]
    mean = 3.0 * sd * np.where(idx % 2 == 0, 1.0, -1.0)
    return mean, cov


def gaussian_model(mean, scale_tril):
    """``z ~ MVN(mean, L L^T)``: the posterior is the prior, its mode is ``mean``."""
    pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=scale_tril))


def flat_direction_model(y):
    """``a``, ``b`` informed by ``y``; ``c``: flat density (prior cancelled), no data."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    c = pyro.sample("c", dist.Normal(0.0, 1.0))
    pyro.factor("flat_c", -dist.Normal(0.0, 1.0).log_prob(c))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(a + b.sum(-1), 1.0), obs=y)


def positive_model(y):
    """A scale parameter: lognormal-ish posterior, unconstrained via log."""
    s = pyro.sample("s", dist.HalfNormal(2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


def as_tensors(*arrays):
    """Float64 tensors of NumPy arrays."""
    return tuple(torch.as_tensor(a, dtype=torch.float64) for a in arrays)
