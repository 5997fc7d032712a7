"""Hand-written guides for eight schools (centered and non-centered).

All three work in the unconstrained space ``(mu, log tau, theta or theta_tilde)``:

- ``mean_field``: independent Normals (LogNormal for ``tau``).
- ``full_rank``: one 10-dimensional Gaussian.
- ``structured``: a bivariate Gaussian for ``(mu, log tau)`` and, given them,
  ``theta_j`` from the exact conditional form of the model,
  ``theta_j | mu, tau ~ Normal((m_j / s_j^2 + mu / tau^2) / (1 / s_j^2 + 1 / tau^2),
  (1 / s_j^2 + 1 / tau^2)^(-1/2))`` with learned pseudo-data ``m_j, s_j``
  (initialised at ``y_j, sigma_j``, where it is exact). The non-centered guide
  maps that conditional through ``theta_tilde = (theta - mu) / tau``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from guides._blocks import Site, full_rank, normal_param
from guides.spec import GuideSpec, handwritten

CENTERED = "eight_schools_centered"
NONCENTERED = "eight_schools_noncentered"


def _local_site(family: str) -> str:
    return "theta" if family == CENTERED else "theta_tilde"


def _init_local(family: str, y: torch.Tensor) -> torch.Tensor:
    return (0.5 * y + 2.0) if family == CENTERED else torch.zeros_like(y)


def _mean_field(family: str) -> Callable:
    site = _local_site(family)

    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        y = data["y"]

        def guide(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
            mu_loc, mu_scale = normal_param("mean_field.mu", y_init.new_tensor(4.0), init_scale)
            tau_loc, tau_scale = normal_param(
                "mean_field.log_tau", y_init.new_tensor(1.5), init_scale
            )
            loc, scale = normal_param(f"mean_field.{site}", _init_local(family, y_init), init_scale)
            pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
            pyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))
            with pyro.plate("schools", sigma.shape[-1], dim=-1):
                pyro.sample(site, dist.Normal(loc, scale))

        y_init = y
        return guide

    return factory


def _full_rank(family: str) -> Callable:
    site = _local_site(family)

    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        y = data["y"]
        num = y.shape[-1]
        sites = [
            Site("mu"),
            Site("tau", constraints.positive),
            Site(site, plate="schools", plate_size=num),
        ]
        init = {"mu": y.new_tensor(4.0), "tau": y.new_tensor(1.5), site: _init_local(family, y)}

        def guide(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
            full_rank("full_rank", sites, init, init_scale)

        return guide

    return factory


def _structured(family: str) -> Callable:
    site = _local_site(family)

    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        y0, sigma0 = data["y"], data["sigma"]
        init = {"mu": y0.new_tensor(4.0), "tau": y0.new_tensor(1.5)}
        global_sites = [Site("mu"), Site("tau", constraints.positive)]

        def guide(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
            glob = full_rank("structured.global", global_sites, init, init_scale)
            mu, tau = glob["mu"], glob["tau"]
            m = pyro.param("structured.pseudo_y", y0.detach().clone())
            s = pyro.param(
                "structured.pseudo_sigma", sigma0.detach().clone(), constraint=constraints.positive
            )
            precision = s.pow(-2) + tau.pow(-2)
            cond_loc = (m * s.pow(-2) + mu * tau.pow(-2)) / precision
            cond_scale = precision.rsqrt()
            with pyro.plate("schools", sigma.shape[-1], dim=-1):
                if family == CENTERED:
                    pyro.sample(site, dist.Normal(cond_loc, cond_scale))
                else:
                    pyro.sample(site, dist.Normal((cond_loc - mu) / tau, cond_scale / tau))

        return guide

    return factory


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for both eight-schools families."""
    out = []
    for family in (CENTERED, NONCENTERED):
        out += [
            handwritten(
                "mean_field",
                _mean_field(family),
                "independent Normals in unconstrained space",
                family,
            ),
            handwritten(
                "full_rank",
                _full_rank(family),
                "one full-rank Gaussian over (mu, log tau, theta)",
                family,
            ),
            handwritten(
                "structured",
                _structured(family),
                "q(mu, log tau) q(theta | mu, tau) with the model's conditional form",
                family,
            ),
        ]
    return tuple(out)
