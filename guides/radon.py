"""Hand-written guides for the radon hierarchical regressions.

All guides work in unconstrained space (log for the sd parameters) and start
from moment estimates of the data (county means, the floor contrast, the sd of
log radon), so short fits begin near the posterior.

- ``mean_field``: independent Normals for every coordinate.
- ``full_rank``: one Gaussian over every coordinate (89 to 175 of them).
- ``structured``: a full-rank Gaussian over the global parameters and, given
  them, the county effects drawn from their exact conditional posterior.
  For fixed globals the model is linear-Gaussian in the county effects, so
  ``p(a_j | globals, y)`` is Normal with precision
  ``n_j / sigma_y^2 + 1 / sigma_a^2`` and mean
  ``(sum_i (y_i - beta x_i) / sigma_y^2 + m_j / sigma_a^2) / precision``
  (``m_j`` the county's prior mean), computed from per-county sufficient
  statistics; the varying-slope model gets the bivariate version. The only
  approximation left is the Gaussian over the globals, which is why this
  guide reproduces the posterior sd of ``sigma_a`` that mean-field misses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from guides import _blocks
from guides._blocks import Site
from guides.spec import GuideSpec, handwritten

CENTERED = "radon_varying_intercept_centered"
NONCENTERED = "radon_varying_intercept_noncentered"
SLOPE = "radon_varying_slope"
CONTEXTUAL = "radon_contextual"
FAMILIES = (CENTERED, NONCENTERED, SLOPE, CONTEXTUAL)

_POS = constraints.positive


@dataclass(frozen=True)
class CountyStats:
    """Per-county sufficient statistics, each of shape (J,).

    ``n`` homes, ``sx`` first-floor homes (sum of floor), ``sxx`` sum of
    floor squared, ``sy`` sum of log radon, ``sxy`` sum of floor * log radon.
    """

    n: torch.Tensor
    sx: torch.Tensor
    sxx: torch.Tensor
    sy: torch.Tensor
    sxy: torch.Tensor


def county_stats(data: dict) -> CountyStats:
    """Sufficient statistics of the observed data per county."""
    county, x, y = data["county"], data["floor"], data["log_radon"]
    num = int(data["num_counties"])

    def total(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num, dtype=values.dtype).index_add_(0, county, values)

    return CountyStats(
        n=total(torch.ones_like(x)), sx=total(x), sxx=total(x * x), sy=total(y), sxy=total(x * y)
    )


def _globals(family: str) -> list[Site]:
    if family == SLOPE:
        return [
            Site("mu_a"),
            Site("sigma_a", _POS),
            Site("mu_b"),
            Site("sigma_b", _POS),
            Site("sigma_y", _POS),
        ]
    if family == CONTEXTUAL:
        return [
            Site("mu_a"),
            Site("gamma_uranium"),
            Site("gamma_floor_mean"),
            Site("sigma_a", _POS),
            Site("beta"),
            Site("sigma_y", _POS),
        ]
    return [Site("mu_a"), Site("sigma_a", _POS), Site("beta"), Site("sigma_y", _POS)]


def _locals(family: str, num_counties: int) -> list[Site]:
    def county(name: str) -> Site:
        return Site(name, plate="counties", plate_size=num_counties)

    if family == CENTERED:
        return [county("a")]
    if family == SLOPE:
        return [county("a_tilde"), county("b_tilde")]
    return [county("a_tilde")]


def _initial(family: str, data: dict) -> dict[str, torch.Tensor]:
    """Unconstrained moment estimates: county means, floor contrast, log sds."""
    stats = county_stats(data)
    y, x = data["log_radon"], data["floor"]
    beta = y[x > 0.5].mean() - y[x < 0.5].mean() if bool((x > 0.5).any()) else y.new_zeros(())
    seen = stats.n > 0
    county_mean = torch.where(seen, (stats.sy - beta * stats.sx) / stats.n.clamp(min=1), 0.0)
    mu_a = county_mean[seen].mean()
    county_mean = torch.where(seen, county_mean, mu_a)
    # shrink the raw county means halfway to the overall mean: a start, not an estimate
    a = 0.5 * (county_mean + mu_a)
    sigma_a = (a - mu_a).std().clamp(min=0.05)
    init = {"mu_a": mu_a, "sigma_a": sigma_a.log(), "beta": beta, "sigma_y": y.std().log()}
    if family == CENTERED:
        init["a"] = a
    elif family == SLOPE:
        init.update(
            {
                "mu_b": beta,
                "sigma_b": y.new_tensor(0.1).log(),
                "a_tilde": (a - mu_a) / sigma_a,
                "b_tilde": torch.zeros_like(a),
            }
        )
    else:
        init["a_tilde"] = (a - mu_a) / sigma_a
    if family == CONTEXTUAL:
        init.update({"gamma_uranium": y.new_zeros(()), "gamma_floor_mean": y.new_zeros(())})
    return init


def _mean_field(family: str) -> Callable:
    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        sites = _globals(family) + _locals(family, int(data["num_counties"]))
        init = _initial(family, data)
        return _blocks.keyword_guide(
            lambda: _blocks.mean_field("mean_field", sites, init, init_scale)
        )

    return factory


def _full_rank(family: str) -> Callable:
    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        sites = _globals(family) + _locals(family, int(data["num_counties"]))
        init = _initial(family, data)
        return _blocks.keyword_guide(
            lambda: _blocks.full_rank("full_rank", sites, init, init_scale)
        )

    return factory


def intercept_conditional(
    prior_mean: torch.Tensor,
    sigma_a: torch.Tensor,
    beta: torch.Tensor,
    sigma_y: torch.Tensor,
    stats: CountyStats,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``p(a_j | globals, y)`` of the varying-intercept models.

    Parameters
    ----------
    prior_mean : Tensor, shape (..., J) or broadcastable
        Prior mean of each county intercept.
    sigma_a, beta, sigma_y : Tensor, shape (..., 1) or ()
        County sd, floor effect and residual sd.
    stats : CountyStats

    Returns
    -------
    loc, scale : Tensor, shape (..., J)
    """
    prec_y, prec_a = sigma_y.pow(-2), sigma_a.pow(-2)
    precision = stats.n * prec_y + prec_a
    loc = ((stats.sy - beta * stats.sx) * prec_y + prior_mean * prec_a) / precision
    return loc, precision.rsqrt()


def _structured(family: str) -> Callable:
    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        num = int(data["num_counties"])
        stats = county_stats(data)
        glob = _globals(family)
        init = _initial(family, data)
        covariates = (data.get("log_uranium"), data.get("floor_mean"))

        def local_draws(g: dict[str, torch.Tensor]) -> None:
            if family == SLOPE:
                _slope_conditional(g, stats, num)
                return
            prior_mean = g["mu_a"]
            if family == CONTEXTUAL:
                prior_mean = (
                    prior_mean
                    + g["gamma_uranium"] * covariates[0]
                    + g["gamma_floor_mean"] * covariates[1]
                )
            loc, scale = intercept_conditional(
                prior_mean, g["sigma_a"], g["beta"], g["sigma_y"], stats
            )
            with pyro.plate("counties", num, dim=-1):
                if family == CENTERED:
                    pyro.sample("a", dist.Normal(loc, scale))
                else:  # a_tilde = (a - prior_mean) / sigma_a
                    pyro.sample(
                        "a_tilde",
                        dist.Normal((loc - prior_mean) / g["sigma_a"], scale / g["sigma_a"]),
                    )

        def body() -> None:
            local_draws(_blocks.full_rank("structured.global", glob, init, init_scale))

        return _blocks.keyword_guide(body)

    return factory


def _slope_conditional(g: dict[str, torch.Tensor], stats: CountyStats, num: int) -> None:
    """Draw ``(a_tilde_j, b_tilde_j)`` from their exact bivariate conditional.

    Precision ``L = X_j'X_j / sigma_y^2 + diag(1 / sigma_a^2, 1 / sigma_b^2)``;
    ``a`` from its marginal, then ``b | a`` with precision ``L_22``.
    """
    prec_y = g["sigma_y"].pow(-2)
    prec_a, prec_b = g["sigma_a"].pow(-2), g["sigma_b"].pow(-2)
    l11 = stats.n * prec_y + prec_a
    l12 = stats.sx * prec_y
    l22 = stats.sxx * prec_y + prec_b
    h1 = stats.sy * prec_y + g["mu_a"] * prec_a
    h2 = stats.sxy * prec_y + g["mu_b"] * prec_b
    det = l11 * l22 - l12 * l12
    m1 = (l22 * h1 - l12 * h2) / det
    m2 = (l11 * h2 - l12 * h1) / det
    sd_a = (l22 / det).sqrt()
    with pyro.plate("counties", num, dim=-1):
        a_tilde = pyro.sample(
            "a_tilde", dist.Normal((m1 - g["mu_a"]) / g["sigma_a"], sd_a / g["sigma_a"])
        )
        a = g["mu_a"] + g["sigma_a"] * a_tilde
        loc_b = m2 - l12 / l22 * (a - m1)
        pyro.sample(
            "b_tilde", dist.Normal((loc_b - g["mu_b"]) / g["sigma_b"], l22.rsqrt() / g["sigma_b"])
        )


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the four radon families."""
    out = []
    for family in FAMILIES:
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
                "one full-rank Gaussian over all unconstrained coordinates",
                family,
            ),
            handwritten(
                "structured",
                _structured(family),
                "full-rank Gaussian over the globals, county effects from their exact "
                "conditional given them",
                family,
            ),
        ]
    return tuple(out)
