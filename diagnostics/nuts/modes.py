"""Modes the chains never visited: an L-BFGS check of a NUTS reference.

R-hat compares chains with each other, so it cannot see a mode that no chain
found: on an equal mixture of N(-8, 0.5) and N(8, 0.5), four chains started in
Uniform(-2, 2) all land in the same mode one time in eight, and every check
passes with half the posterior missing. This check runs L-BFGS
(:func:`vimodels.mode.find_mode`) from the draws' median and from a few more
starts drawn the way the chains' are, and looks at where each converged run
ended, in the space the draws whiten to (their mean and covariance in
unconstrained space):

- *visited*: within ``radius`` of a draw (3, or 1.5 times the draws' own
  99th-percentile nearest-neighbour spacing if larger);
- *unvisited*: farther than that from every draw (a strongly correlated mode's
  draws span a wide box, so a per-coordinate box would hide a mode in it).

A mode's probability mass is estimated by Laplace's approximation,
``log p(u*) + d/2 log 2 pi - 1/2 log det H`` with ``H`` the negative Hessian
of the unconstrained log density (Jacobian included). The check fails when an
unvisited mode holds at least :data:`MASS_RATIO_MIN` of the mass of the best
visited mode, or when every converged run ends away from the draws. A local
mode far down in density passes (the Old Faithful mixture has one 207 nats
below its main mode); a run that finds the density unbounded, or no converged
run, makes the check not applicable (None is returned). A mode whose basin no
start reaches stays unseen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from diagnostics.nuts.checks import Check
from vimodels.errors import IncompatibleError
from vimodels.mode.laplace import negative_hessian
from vimodels.mode.lbfgs import UNBOUNDED, find_mode
from vimodels.mode.potential import make_potential

#: An unvisited mode with at least this fraction of the visited mode's Laplace mass fails.
MASS_RATIO_MIN = 0.01

#: L-BFGS starts (the prior median, then Uniform(-2, 2) points, as Stan's chains start).
NUM_STARTS = 4

#: Most unconstrained dimensions for which the check runs (a Hessian per unvisited mode).
MAX_DIM = 500


_RELABELLED = (
    " (about equal mass: in a symmetric model, such as a mixture without an ordering "
    "constraint, it is the same solution relabelled; an ordering constraint removes it)"
)


class _Nearness:
    """How far a point is from the reference draws, in the draws' whitened space.

    Whitened by the draws' mean and covariance (so a strongly correlated mode's
    narrow direction counts), a point's distance to its nearest draw is compared
    with the draws' own spacing: ``radius`` is the larger of 3 and 1.5 times the
    99th percentile of the distance from a draw (500 evenly spaced ones) to its
    nearest other draw.
    """

    def __init__(self, u: torch.Tensor) -> None:
        n, d = u.shape
        self.mean = u.mean(0)
        centred = u - self.mean
        cov = centred.T @ centred / max(n - 1, 1)
        cov = cov + 1e-9 * torch.diagonal(cov).mean().clamp_min(1e-12) * torch.eye(d, dtype=u.dtype)
        self.sd = torch.diagonal(cov).sqrt()
        self.chol = torch.linalg.cholesky(cov)
        self.white = self._whiten(u)
        idx = torch.linspace(0, n - 1, min(500, n)).round().long().unique()
        dist = torch.cdist(self.white[idx], self.white)
        dist[torch.arange(len(idx)), idx] = math.inf
        spacing = float(torch.quantile(dist.min(1).values, 0.99)) if n > 1 else 0.0
        self.radius = max(3.0, 1.5 * spacing)

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.linalg.solve_triangular(
            self.chol, (x - self.mean).reshape(-1, len(self.mean)).T, upper=False
        )
        return z.T

    def distance(self, x: torch.Tensor) -> float:
        """Whitened distance from ``x`` (dim,) to the nearest draw."""
        return float(torch.cdist(self._whiten(x), self.white).min())

    def describe(self, potential: Any, x: torch.Tensor) -> str:
        """Where ``x`` is: its most deviant coordinate and its distance from the draws."""
        k = int(torch.argmax(((x - self.mean) / self.sd).abs()))
        return (
            f"{potential.describe(k)} = {float(x[k]):.4g} unconstrained (draws' mean "
            f"{float(self.mean[k]):.4g}, sd {float(self.sd[k]):.3g}; {self.distance(x):.1f} "
            f"whitened units from the nearest draw, where draws lie within {self.radius / 1.5:.2g} "
            "of each other)"
        )


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
) -> Check | None:
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
        Starts of the chains' kind, after the draws' median.

    Returns
    -------
    Check or None
        ``modes``: value the log mass ratio of the heaviest unvisited mode to the
        best visited one (``-inf`` when none), threshold ``log MASS_RATIO_MIN``;
        None where the check does not apply (discrete sites, more than
        :data:`MAX_DIM` dimensions, an unbounded density, no run converged).
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
    near = _Nearness(u_draws)
    # the draws' median first (it ends in the mode the chains sampled), then the chains' kind
    result = find_mode(
        model,
        data,
        potential=potential,
        init=u_draws.median(0).values,
        num_inits=num_starts + 1,
        seed=seed,
    )
    if any(p.reason == UNBOUNDED for p in result.paths):
        return None
    visited, unvisited = [], []
    for p in result.paths:
        if not p.converged:
            continue
        end, lp = p.positions[-1], float(p.log_densities[-1])
        (visited if near.distance(end) <= near.radius else unvisited).append((lp, end))
    threshold = math.log(MASS_RATIO_MIN)
    if not visited and unvisited:
        return Check(
            "modes",
            False,
            math.inf,
            threshold,
            f"every converged L-BFGS run ({len(unvisited)}), the one from the draws' median "
            "included, ended at a mode away from the draws: the chains did not sample a mode",
        )
    if not visited:
        return None
    lp_in, u_in = max(visited, key=lambda t: t[0])
    if not unvisited:
        return Check(
            "modes",
            True,
            -math.inf,
            threshold,
            f"{len(visited)} of {len(result.paths)} L-BFGS runs (the draws' median and "
            f"{num_starts} starts of the chains' kind) ended among the draws; none found a "
            "mode away from them",
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
            worst = ratio
            where = near.describe(potential, u)
    if worst == -math.inf:
        return Check(
            "modes",
            True,
            -math.inf,
            threshold,
            f"L-BFGS ended outside the draws at {len(unvisited)} point(s), none a mode "
            "(Hessian not positive definite)",
        )
    ok = worst < threshold
    share = math.exp(min(worst, 50.0))
    return Check(
        "modes",
        ok,
        float(worst),
        threshold,
        (
            f"a mode no chain visited, at {where}, holds {share:.3g}x the mass of the "
            f"sampled mode by Laplace's approximation"
            + ("" if ok else ": the draws miss part of the posterior")
            + (_RELABELLED if abs(worst) < math.log(2.0) else "")
            + ("" if ok else "; run more chains or start them more widely")
        ),
    )
