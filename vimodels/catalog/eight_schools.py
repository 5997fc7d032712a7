"""Eight schools (Rubin 1981): SAT coaching effects, centered and non-centered.

Data: estimated treatment effects ``y`` (SAT points) and their standard errors
``sigma`` for eight schools, as printed in Gelman et al., *Bayesian Data
Analysis*, section 5.5.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from vimodels.catalog.base import CatalogEntry, NutsSettings, as_tensor

Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def load_eight_schools() -> dict[str, torch.Tensor]:
    """Return ``{"y": (8,), "sigma": (8,)}`` in SAT points."""
    return {"y": as_tensor(Y), "sigma": as_tensor(SIGMA)}


def centered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Centered parameterisation: ``theta_j ~ Normal(mu, tau)``.

    Parameters
    ----------
    sigma : Tensor, shape (J,)
        Known standard errors of the school effects.
    y : Tensor, shape (J,), optional
        Observed effects; ``None`` samples them (prior/posterior predictive).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def noncentered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Non-centered parameterisation: ``theta = mu + tau * theta_tilde``.

    ``theta`` is recorded as a deterministic site so both forms report it.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


EIGHT_SCHOOLS_CENTERED = CatalogEntry(
    name="eight_schools_centered",
    description=(
        "Eight schools, centered: SAT coaching effects (points) and standard errors, "
        "Gelman et al. BDA 5.5; the funnel in (tau, theta) troubles NUTS and VI"
    ),
    model=centered,
    loader=load_eight_schools,
    sites=("mu", "tau", "theta"),
    family="eight_schools_centered",
    observed=("y",),
    # The funnel in (tau, theta) defeats NUTS on this form (divergences, R-hat > 1.01 for
    # tau at any affordable length): `vimodels nuts eight_schools_centered` shows it with
    # short chains and depth-8 trees, honestly untrusted. The reference comes from NUTS on
    # the non-centered form, the same posterior over (mu, tau, theta).
    nuts=NutsSettings(
        num_warmup=300,
        num_samples=300,
        num_chains=4,
        target_accept_prob=0.95,
        max_tree_depth=8,
        metric="diag",
    ),
    reference_from="eight_schools_noncentered",
    default_guides=("mean_field", "full_rank", "structured"),
    max_plate_nesting=1,
)

EIGHT_SCHOOLS_NONCENTERED = CatalogEntry(
    name="eight_schools_noncentered",
    description=(
        "Eight schools, non-centered: SAT coaching effects (points) and standard errors, "
        "Gelman et al. BDA 5.5; theta = mu + tau * theta_tilde"
    ),
    model=noncentered,
    loader=load_eight_schools,
    sites=("mu", "tau", "theta"),
    family="eight_schools_noncentered",
    observed=("y",),
    nuts=NutsSettings(
        num_warmup=500, num_samples=500, num_chains=4, target_accept_prob=0.9, metric="diag"
    ),
    default_guides=("mean_field", "full_rank", "structured"),
    max_plate_nesting=1,
)
