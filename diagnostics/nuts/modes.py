"""Modes the chains never visited: an L-BFGS check of a NUTS reference.

R-hat compares chains with each other, so it cannot see a mode that no chain
found: on an equal mixture of N(-8, 0.5) and N(8, 0.5), four chains started in
Uniform(-2, 2) all land in the same mode one time in eight, and every check
passes with half the posterior missing. This check runs L-BFGS from a few more
starts drawn the same way (:func:`vimodels.mode.find_mode`) and looks at where
each converged run ended:

- *visited*: inside the box the reference draws span in unconstrained space,
  widened by ``margin`` of their sd per coordinate;
- *unvisited*: outside it in some coordinate.

A mode's probability mass is estimated by Laplace's approximation,
``log p(u*) + d/2 log 2 pi - 1/2 log det H`` with ``H`` the negative Hessian
of the unconstrained log density (Jacobian included). The check fails when an
unvisited mode holds at least :data:`MASS_RATIO_MIN` of the mass of the best
visited mode. A local mode far down in density passes (the Old Faithful
mixture has one 211 nats below its main mode); a run that finds the density
unbounded, or no run that ends inside the draws, makes the check not
applicable (None is returned).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vimodels.errors import IncompatibleError
from vimodels.mode.laplace import negative_hessian
from vimodels.mode.lbfgs import UNBOUNDED, find_mode
from vimodels.mode.potential import make_potential


@dataclass(frozen=True)
class ModeCheck:
    """The outcome of :func:`unvisited_mode_check` (the reference wraps it as a ``Check``).

    Attributes
    ----------
    ok : bool
    value : float
        Log Laplace-mass ratio of the heaviest unvisited mode to the best visited one
        (``-inf``: none).
    threshold : float
        ``log MASS_RATIO_MIN``.
    detail : str
    """

    ok: bool
    value: float
    threshold: float
    detail: str


#: An unvisited mode with at least this fraction of the visited mode's Laplace mass fails.
MASS_RATIO_MIN = 0.01

#: L-BFGS starts (the prior median, then Uniform(-2, 2) points, as Stan's chains start).
NUM_STARTS = 4

#: Most unconstrained dimensions for which the check runs (a Hessian per unvisited mode).
MAX_DIM = 500


def _unconstrained_draws(potential: Any, draws: Mapping[str, np.ndarray]) -> torch.Tensor:
    """``(chain * draw, dim)`` reference draws in the potential's flat layout."""
    parts = []
    for b in potential.blocks:
        x = np.asarray(draws[b.name])
        n = int(np.prod(x.shape[: x.ndim - len(b.shape)], dtype=int))
        x = torch.as_tensor(x, dtype=potential.dtype).reshape((n, *b.shape))
        parts.append(b.transform.inv(x).reshape(n, -1))
    return torch.cat(parts, -1)


def _log_mass(potential: Any, u: torch.Tensor, log_density: float) -> float:
    """Laplace's log mass at a mode ``u``; NaN where the Hessian is not positive definite."""
    h = negative_hessian(potential, u, max_dim=MAX_DIM)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not torch.isfinite(chol).all():
        return math.nan
    logdet = 2.0 * float(torch.log(torch.diagonal(chol)).sum())
    return log_density + 0.5 * potential.dim * math.log(2 * math.pi) - 0.5 * logdet


def unvisited_mode_check(
    model: Callable,
    data: Mapping[str, Any],
    draws: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
    num_starts: int = NUM_STARTS,
    margin: float = 1.0,
) -> ModeCheck | None:
    """Whether L-BFGS finds a mode with real mass that no chain visited.

    Parameters
    ----------
    model : callable
        The Pyro model, called as ``model(**data)``; continuous latent sites only.
    data : dict
    draws : dict of str to ndarray
        Reference draws ``(chain, draw, *shape)`` of every continuous latent site.
    seed : int
        Seed of the L-BFGS starts.
    num_starts : int
    margin : float
        Widening of the draws' box, in reference sds per coordinate.

    Returns
    -------
    ModeCheck or None
        Value the log mass ratio of the heaviest unvisited mode to the
        best visited one (``-inf`` when none), threshold ``log MASS_RATIO_MIN``;
        None where the check does not apply (discrete sites, more than
        :data:`MAX_DIM` dimensions, an unbounded density, no run ending inside).
    """
    try:
        potential = make_potential(model, data, dtype=torch.float64, seed=seed)
    except (IncompatibleError, ValueError, RuntimeError, TypeError):
        return None
    if potential.dim > MAX_DIM or any(b.name not in draws for b in potential.blocks):
        return None
    u_draws = _unconstrained_draws(potential, draws)
    if not torch.isfinite(u_draws).all():
        return None
    sd = u_draws.std(0).clamp_min(1e-12)
    lo = u_draws.min(0).values - margin * sd
    hi = u_draws.max(0).values + margin * sd
    result = find_mode(model, data, potential=potential, num_inits=num_starts, seed=seed)
    if any(p.reason == UNBOUNDED for p in result.paths):
        return None
    visited, unvisited = [], []
    for p in result.paths:
        if not p.converged:
            continue
        end, lp = p.positions[-1], float(p.log_densities[-1])
        inside = bool(((end >= lo) & (end <= hi)).all())
        (visited if inside else unvisited).append((lp, end))
    if not visited:
        return None
    lp_in, u_in = max(visited, key=lambda t: t[0])
    threshold = math.log(MASS_RATIO_MIN)
    if not unvisited:
        return ModeCheck(
            True,
            -math.inf,
            threshold,
            f"{len(visited)} of {len(result.paths)} L-BFGS runs from the chains' kind of "
            "start ended inside the draws; none found a mode outside them",
        )
    mass_in = _log_mass(potential, u_in, lp_in)
    if math.isnan(mass_in):  # no curvature at the sampled mode: nothing to weigh against
        return None
    worst, where = -math.inf, ""
    for lp, u in unvisited:
        mass = _log_mass(potential, u, lp)
        ratio = mass - mass_in
        if math.isnan(ratio):  # a saddle point or a failed Hessian: not a mode to weigh
            continue
        if ratio > worst:
            k = int(torch.argmax(torch.maximum(lo - u, u - hi) / sd))
            worst = ratio
            where = (
                f"{potential.describe(k)} = {float(u[k]):.4g} unconstrained (draws span "
                f"{float(lo[k] + margin * sd[k]):.4g} to {float(hi[k] - margin * sd[k]):.4g})"
            )
    if worst == -math.inf:
        return ModeCheck(
            True,
            -math.inf,
            threshold,
            f"L-BFGS ended outside the draws at {len(unvisited)} point(s), none a mode "
            "(Hessian not positive definite)",
        )
    ok = worst < threshold
    share = math.exp(min(worst, 50.0))
    return ModeCheck(
        ok,
        float(worst),
        threshold,
        (
            f"a mode no chain visited, at {where}, holds {share:.3g}x the mass of the "
            f"sampled mode by Laplace's approximation"
            + (
                ""
                if ok
                else ": the draws miss part of the posterior; run more chains "
                "or start them more widely"
            )
        ),
    )
