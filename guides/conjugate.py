"""Hand-written guides for the conjugate linear regression.

The exact posterior of ``beta`` is Gaussian, so ``full_rank`` contains it and
``mean_field`` misses exactly its correlations.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from guides._blocks import normal_param
from guides.spec import GuideSpec, handwritten

FAMILY = "conjugate_linear_regression"


def _mean_field(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    dim = data["X"].shape[-1]
    init = data["X"].new_zeros(dim)

    def guide(X, y=None, noise_scale=None, prior_scale=None, subsample_size=None) -> None:
        loc, scale = normal_param("mean_field.beta", init, init_scale)
        pyro.sample("beta", dist.Normal(loc, scale).to_event(1))

    return guide


def _full_rank(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    dim = data["X"].shape[-1]
    init = data["X"].new_zeros(dim)

    def guide(X, y=None, noise_scale=None, prior_scale=None, subsample_size=None) -> None:
        loc = pyro.param("full_rank.beta.loc", init.clone())
        tril = pyro.param(
            "full_rank.beta.scale_tril",
            init_scale * torch.eye(dim),
            constraint=constraints.lower_cholesky,
        )
        pyro.sample("beta", dist.MultivariateNormal(loc, scale_tril=tril))

    return guide


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the conjugate regression."""
    return (
        handwritten(
            "mean_field",
            _mean_field,
            "independent Normals for each coefficient",
            FAMILY,
        ),
        handwritten(
            "full_rank",
            _full_rank,
            "full-rank Gaussian over beta (contains the posterior)",
            FAMILY,
        ),
    )
