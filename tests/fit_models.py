"""Small user models shared by the fit tests (imported as ``fit_models``: tests/ is on sys.path)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


def normal_model(x):
    """Normal mean with a N(0, 10^2) prior and unit noise: a conjugate posterior."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def nan_model(x):
    """A model whose likelihood turns NaN once the estimate of ``mu`` passes 3."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = torch.where(mu > 3.0, torch.tensor(float("nan")), torch.tensor(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, scale), obs=x)


def nan_guide(x):
    """A point-like guide for :func:`nan_model`."""
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 0.01))
