"""Pathfinder (Zhang, Carpenter, Gelman and Vehtari, JMLR 23(306), 2022).

Along an L-BFGS path of the unconstrained log density, each iterate ``x_l``
gets a Gaussian ``N(x_l + Sigma_l g_l, Sigma_l)`` whose covariance ``Sigma_l`` is
the L-BFGS inverse-Hessian estimate at ``x_l``: a diagonal ``alpha`` (updated
per accepted pair, the paper's Algorithm 3 / eq. 4.5) plus the compact
low-rank BFGS update of the last ``history_size`` pairs
``Sigma = diag(alpha) + beta gamma beta^T`` (Byrd, Nocedal and Schnabel 1994).
Each Gaussian's ELBO is estimated from ``num_elbo_draws`` draws; the path
returns the one with the best ELBO (Algorithm 1). Multi-path Pathfinder
(Algorithm 2) runs several paths from random starts and importance-resamples
their pooled draws with Pareto-smoothed weights.

Functions are pure and small (``pair_update``, ``inverse_hessian_factors``,
``gaussian_draws``): the path is given, each Gaussian is a value.

Checked line by line against the paper's Algorithms 1-5 and two reference
implementations (Stan's ``src/stan/services/pathfinder/single.hpp`` and
BlackJAX's ``blackjax/optimizers/lbfgs.py`` / ``blackjax/vi/pathfinder.py``):
the same curvature check (a pair enters the history only if ``s.z > eps
|z|^2``; Stan keeps every pair and only skips the ``alpha`` update), the same
``alpha`` recursion from ``alpha_0 = 1`` (Stan's ``alpha = y.s / (y.alpha.y /
alpha + y^2 - (y.alpha.y / s.alpha^-1.s) (s / alpha)^2)`` is this module's
``pair_update`` multiplied out), the same compact factors ``beta``, ``gamma``
and the same centre ``x + Sigma grad log p`` (Stan: ``x - H g`` with ``g`` the
gradient of ``-log p``), the same sampler and ``log q``. Differences: the
ELBO draws are shared by the iterates of a path (Stan and BlackJAX draw
afresh per iterate), and the multi-path importance weights use the mixture's
density (Stan uses each draw's own component).

What Pathfinder cannot do, by construction (measured 2026-12-02):

- Its covariance is a secant estimate: BFGS updates of ``diag(alpha)`` by the
  last J pairs satisfy the newest secant equation exactly, the older ones and
  the directions no pair explored only approximately. On the catalog's
  conjugate regression (3 parameters, an exact Gaussian posterior) the chosen
  Gaussian's covariance is off by 0.5-11 % of its largest entry (seeds 0-3, J
  = 5 or 10), where Laplace's exact Hessian is exact to rounding; its mean
  is at the mode to 1e-7-0.013 sd. What it promises is a small KL (measured
  <= 0.01 nats there).
- On benchmark 10's ``poly26`` (26 parameters, posterior sds 0.001-0.84,
  Hessian condition ~1e7) the estimate at the L-BFGS end point, in the
  posterior's own whitened coordinates, has sds from 0.001 to 2.7 (1 is
  exact) whatever the history: J = 5 gives KL(q || Laplace) = 84 nats, J = 26
  (one pair per dimension) 75 nats, and starting ``alpha`` at the inverse
  Hessian diagonal changes nothing (the ``alpha`` recursion is invariant under
  a diagonal rescaling: it forgets its start). The directions of large
  posterior variance that the path never moved along keep a tiny ``alpha``
  learned from the stiff ones. Laplace (exact Hessian) is the method there.
- On eight schools (a funnel) every candidate Gaussian is a quasi-Newton
  step from a point of the path with the curvature seen there. Over the 4
  paths of seed 0 the best candidate's ELBO (4000 draws) is -38.8 to -42.8
  nats; the same Gaussians built with the exact Hessian at every iterate
  reach only -56.4 (local curvature is the funnel's neck); the best Gaussian
  (full-rank SVI, 5000 steps) is -31.63 +- 0.04. The ELBO optimum is not in
  Pathfinder's family, so "within one standard error of the best Gaussian"
  is out of reach; what it promises, and ``tests/mode`` checks, is a
  Gaussian far better than Laplace's (by > 10 nats) and within 8 nats of the
  best one, from one L-BFGS run per path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vimodels.errors import OptionError, check_option
from vimodels.mode.fast import compiled_log_density_batch
from vimodels.mode.laplace import Gaussian
from vimodels.mode.lbfgs import LbfgsPath, lbfgs_run, potential_for, resolve_inits
from vimodels.mode.potential import Potential
from vimodels.mode.psis import psis


@dataclass(frozen=True)
class LowRankInverseHessian:
    """``Sigma = diag(alpha) + beta @ gamma @ beta.T`` (dim x dim, never formed unless asked).

    Attributes
    ----------
    alpha : Tensor, shape (dim,)
    beta : Tensor, shape (dim, 2m)
    gamma : Tensor, shape (2m, 2m)
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The covariance as a dense (dim, dim) matrix."""
        out = self.beta @ self.gamma @ self.beta.T
        return out + torch.diag(self.alpha)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``Sigma @ v`` for ``v`` of shape (dim,)."""
        return self.alpha * v + self.beta @ (self.gamma @ (self.beta.T @ v))


@dataclass(frozen=True)
class PathGaussian:
    """The Gaussian of one iterate and its ELBO estimate.

    Attributes
    ----------
    iteration : int
        Index on the path (0: the start).
    loc : Tensor, shape (dim,)
    inverse_hessian : LowRankInverseHessian
    elbo : float
        Monte Carlo ELBO (nats); ``-inf`` when the factor is not positive definite
        or a draw's log density is not finite.
    """

    iteration: int
    loc: torch.Tensor
    inverse_hessian: LowRankInverseHessian = field(repr=False)
    elbo: float

    def gaussian(self) -> Gaussian:
        """Dense loc and lower Cholesky factor of the covariance."""
        cov = self.inverse_hessian.dense()
        cov = 0.5 * (cov + cov.T)
        return Gaussian(self.loc, torch.linalg.cholesky(cov))


@dataclass(frozen=True)
class SinglePathResult:
    """One Pathfinder path.

    Attributes
    ----------
    best : PathGaussian or None
        The Gaussian with the best ELBO (None: no finite ELBO on the path).
    elbos : ndarray, shape (L,)
        ELBO estimate per iterate 1..L (``-inf`` where unusable).
    path : LbfgsPath
    """

    best: PathGaussian | None
    elbos: np.ndarray
    path: LbfgsPath = field(repr=False)


@dataclass(frozen=True)
class PathfinderResult:
    """Multi-path Pathfinder.

    Attributes
    ----------
    components : tuple of Gaussian
        Each usable path's best Gaussian (unconstrained); the pooled draws come
        from their equal-weight mixture.
    component_elbos : tuple of float
        Each component's ELBO from its ``num_draws // P`` pooled draws (nats).
    best : int
        The component with the highest of these: "the" Pathfinder Gaussian.
    paths : tuple of SinglePathResult
        All paths, usable or not.
    draws : Tensor, shape (num_draws, dim)
        PSIS-resampled unconstrained draws (with replacement) from the pooled draws.
    k_hat : float
        Pareto k of the pooled importance weights (< 0.7: the resampling is reliable).
    elbo : float
        ELBO of the mixture from the pooled draws (nats).
    num_evals : int
        Log density evaluations (L-BFGS and ELBO draws).
    wall_time : float
        Seconds.
    message : str
    potential : Potential
    """

    components: tuple[Gaussian, ...]
    component_elbos: tuple[float, ...]
    best: int
    paths: tuple[SinglePathResult, ...] = field(repr=False)
    draws: torch.Tensor = field(repr=False)
    k_hat: float
    elbo: float
    num_evals: int
    wall_time: float
    message: str
    potential: Potential = field(repr=False)

    def constrained_draws(self) -> dict[str, np.ndarray]:
        """The resampled draws per site, ``(num_draws, *site_shape)``, constrained."""
        with torch.no_grad():
            return {
                k: v.detach().double().cpu().numpy()
                for k, v in self.potential.constrain(self.draws).items()
            }


# --- Algorithm 3: the inverse-Hessian estimate -------------------------------------------


def accept_pair(s: torch.Tensor, z: torch.Tensor, eps: float = 2.2e-16) -> bool:
    """The curvature condition ``s.z > eps ||z||^2`` that keeps the estimate positive definite.

    ``s = x_{l+1} - x_l`` and ``z = g_l - g_{l+1}`` (``g``: gradient of log p).
    """
    return bool(torch.dot(s, z) > eps * torch.dot(z, z))


def pair_update(alpha: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The diagonal ``alpha`` after one accepted pair (the paper's eq. for Algorithm 3).

    With ``a = z.(alpha z)``, ``b = z.s``, ``c = s.(s / alpha)``, element-wise
    ``1/alpha' = a / (b alpha) + z^2 / b - a s^2 / (b c alpha^2)``; shapes (dim,).
    """
    a = torch.dot(z * alpha, z)
    b = torch.dot(z, s)
    c = torch.dot(s / alpha, s)
    inv = a / (b * alpha) + z**2 / b - a * s**2 / (b * c * alpha**2)
    return 1.0 / inv


def inverse_hessian_factors(
    alpha: torch.Tensor, S: torch.Tensor, Z: torch.Tensor
) -> LowRankInverseHessian:
    """The compact BFGS inverse Hessian from pairs ``S``, ``Z`` (dim, m) and diagonal ``alpha``.

    ``beta = [diag(alpha) Z, S]`` and
    ``gamma = [[0, -R^-1], [-R^-T, R^-T (Z^T diag(alpha) Z + D) R^-1]]``
    with ``R = triu(S^T Z)``, ``D = diag(S^T Z)``.
    """
    m = S.shape[1]
    StZ = S.T @ Z
    R = torch.triu(StZ)
    eye = torch.eye(m, dtype=S.dtype)
    min_r = -torch.linalg.solve_triangular(R, eye, upper=True)
    az = alpha.sqrt()[:, None] * Z
    dd = min_r.T @ (az.T @ az + torch.diag(torch.diagonal(StZ))) @ min_r
    gamma = torch.cat(
        [
            torch.cat([torch.zeros(m, m, dtype=S.dtype), min_r], 1),
            torch.cat([min_r.T, dd], 1),
        ],
        0,
    )
    beta = torch.cat([alpha[:, None] * Z, S], 1)
    return LowRankInverseHessian(alpha, beta, gamma)


def gaussian_draws(
    loc: torch.Tensor, ih: LowRankInverseHessian, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws of ``N(loc, Sigma)`` from standard normals ``u`` (num, dim), in O(dim m^2).

    ``Sigma = diag(sqrt alpha) (I + Q R gamma R^T Q^T) diag(sqrt alpha)`` with
    ``Q R = diag(1/sqrt alpha) beta``; ``L = chol(I + R gamma R^T)``; a draw is
    ``loc + sqrt(alpha) (Q (L - I) Q^T u + u)``, ``u ~ N(0, I)``. Passing the same
    ``u`` for every iterate of a path (common random numbers) makes the ELBO
    comparison between iterates much sharper than independent draws would.

    Returns
    -------
    draws : Tensor, shape (num, dim)
    log_q : Tensor, shape (num,)

    Raises
    ------
    torch.linalg.LinAlgError
        When ``I + R gamma R^T`` is not positive definite.
    """
    dim = loc.shape[0]
    sa = ih.alpha.sqrt()
    Q, R = torch.linalg.qr(ih.beta / sa[:, None])
    k = R.shape[0]
    eye = torch.eye(k, dtype=loc.dtype)
    inner = eye + R @ ih.gamma @ R.T
    L = torch.linalg.cholesky(0.5 * (inner + inner.T))
    logdet = torch.log(ih.alpha).sum() + 2.0 * torch.log(torch.diagonal(L)).sum()
    v = u + ((u @ Q) @ (L - eye).T) @ Q.T
    draws = loc + sa * v
    log_q = -0.5 * (logdet + (u * u).sum(-1) + dim * math.log(2 * math.pi))
    return draws, log_q


# --- Algorithm 1: one path ---------------------------------------------------------------


def path_gaussians(
    path: LbfgsPath, history_size: int = 5
) -> list[tuple[int, torch.Tensor, LowRankInverseHessian]]:
    """``(l, loc_l, Sigma_l)`` for the iterates l = 1..L of a path (skipped pairs keep Sigma).

    ``loc_l = x_l + Sigma_l g_l``: the quasi-Newton step from ``x_l``.
    """
    x, g = path.positions, path.grads
    dim = x.shape[1]
    alpha = torch.ones(dim, dtype=x.dtype)
    S: list[torch.Tensor] = []
    Z: list[torch.Tensor] = []
    out = []
    for lvl in range(1, x.shape[0]):
        s = x[lvl] - x[lvl - 1]
        z = g[lvl - 1] - g[lvl]
        if accept_pair(s, z):
            alpha = pair_update(alpha, s, z)
            S.append(s)
            Z.append(z)
            S, Z = S[-history_size:], Z[-history_size:]
        if not S or not bool(torch.isfinite(alpha).all()) or bool((alpha <= 0).any()):
            continue
        ih = inverse_hessian_factors(alpha, torch.stack(S, 1), torch.stack(Z, 1))
        out.append((lvl, x[lvl] + ih.matvec(g[lvl]), ih))
    return out


def elbo_of(
    potential: Potential, loc: torch.Tensor, ih: LowRankInverseHessian, u: torch.Tensor
) -> float:
    """Monte Carlo ELBO of ``N(loc, Sigma)`` from standard normals ``u`` (num, dim).

    Nats; ``-inf`` when the Gaussian or a draw's log density is unusable.
    """
    try:
        draws, log_q = gaussian_draws(loc, ih, u)
    except (RuntimeError, torch.linalg.LinAlgError):
        return -math.inf
    if not bool(torch.isfinite(draws).all()):
        return -math.inf
    log_p = compiled_log_density_batch(potential, draws.shape[0])(draws)
    w = log_p - log_q
    if not bool(torch.isfinite(w).all()):
        return -math.inf
    return float(w.mean())


def single_path(
    potential: Potential,
    start: torch.Tensor,
    *,
    generator: torch.Generator,
    history_size: int = 5,
    num_elbo_draws: int = 25,
    max_iters: int = 1000,
    path: LbfgsPath | None = None,
    lbfgs_history_size: int | None = None,
    **lbfgs_options: Any,
) -> SinglePathResult:
    """Single-path Pathfinder (Algorithm 1): the best-ELBO Gaussian along one L-BFGS path.

    Parameters
    ----------
    potential : Potential
        With ``jacobian=True``.
    start : Tensor, shape (dim,)
    generator : torch.Generator
        For the ELBO draws (one set of ``num_elbo_draws`` standard normals per
        path, shared by its iterates).
    history_size : int
        Pairs in the inverse-Hessian estimate (J; Stan's 5, the paper's 6).
    num_elbo_draws : int
        Draws per ELBO estimate (K; Stan's 25, the paper's 5).
    max_iters : int
        L-BFGS iterations at most.
    path : LbfgsPath, optional
        An existing path (then ``start`` is ignored).
    lbfgs_history_size : int, optional
        The optimizer's own memory; default ``history_size`` (the paper's
        choice). A longer memory reaches the mode of a correlated posterior in
        far fewer iterations (26-parameter regression with near-collinear
        features: about a hundred with 100, over 1000 with 5), but a shorter
        path offers fewer Gaussians: on eight schools memory 100 gave an ELBO
        of -42.8 where the default gives -33 to -39.
    """
    if path is None:
        path = lbfgs_run(
            potential,
            start,
            max_iters=max_iters,
            history_size=lbfgs_history_size or history_size,
            **lbfgs_options,
        )
    best: PathGaussian | None = None
    elbos = np.full(path.num_iters, -np.inf)
    u = torch.randn(num_elbo_draws, potential.dim, generator=generator, dtype=potential.dtype)
    for lvl, loc, ih in path_gaussians(path, history_size):
        e = elbo_of(potential, loc, ih, u)
        elbos[lvl - 1] = e
        if math.isfinite(e) and (best is None or e > best.elbo):
            best = PathGaussian(lvl, loc, ih, e)
    return SinglePathResult(best, elbos, path)


# --- Algorithm 2: several paths, importance resampling ------------------------------------


def mixture_log_density(components: tuple[Gaussian, ...], u: torch.Tensor) -> torch.Tensor:
    """``log (1/P) sum_p N(u; loc_p, Sigma_p)`` for rows of ``u`` (n, dim), shape (n,)."""
    parts = []
    for c in components:
        d = torch.distributions.MultivariateNormal(c.loc, scale_tril=c.scale_tril)
        parts.append(d.log_prob(u))
    return torch.logsumexp(torch.stack(parts), 0) - math.log(len(components))


def pathfinder(
    model: Callable | str | Any,
    data: Mapping[str, Any] | None = None,
    *,
    num_paths: int = 4,
    num_draws: int = 1000,
    num_elbo_draws: int = 25,
    history_size: int = 5,
    max_iters: int = 1000,
    seed: int = 0,
    init: torch.Tensor | np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
    potential: Potential | None = None,
    **lbfgs_options: Any,
) -> PathfinderResult:
    """Multi-path Pathfinder on a model's unconstrained posterior.

    Parameters
    ----------
    model : callable, str or CatalogEntry
        A Pyro model called as ``model(**data)``, or a catalog name or entry.
    data : dict, optional
    num_paths : int
        Paths; the first starts at ``init`` (default: the prior median), the
        others at Uniform(-2, 2) points (the paper starts all at random points).
    num_draws : int
        Pooled draws (``num_draws // num_paths`` per path, at least one) and
        resampled draws.
    num_elbo_draws : int
        Draws per ELBO estimate along a path (K; Stan's default 25, the paper's 5).
    history_size : int
        Pairs of the inverse-Hessian estimate (J; Stan's 5, the paper's 6).
    max_iters : int
        L-BFGS iterations per path at most.
    seed : int
    init : array, shape (dim,), optional
    dtype : torch.dtype
        float64 by default.
    potential : Potential, optional
        Reuse one (then ``model``, ``data`` and ``dtype`` are ignored).
    **lbfgs_options
        ``gtol``, ``ftol`` of :func:`~vimodels.mode.lbfgs.lbfgs_run`, and
        ``lbfgs_history_size`` (default: ``history_size``) of :func:`single_path`.

    Returns
    -------
    PathfinderResult

    Raises
    ------
    OptionError
        If no path produced a usable Gaussian.
    """
    for name, value in (
        ("num_paths", num_paths),
        ("num_draws", num_draws),
        ("num_elbo_draws", num_elbo_draws),
        ("history_size", history_size),
        ("max_iters", max_iters),
    ):
        check_option(name, value, kind=int, low=1)
    check_option("seed", seed, kind=int, low=0)
    if potential is None:
        potential = potential_for(model, data, dtype=dtype, jacobian=True, seed=seed)
    t0 = time.perf_counter()
    evals_before = potential.num_evals
    gen = torch.Generator().manual_seed(seed)
    starts = resolve_inits(potential, num_paths, seed, init)
    results = tuple(
        single_path(
            potential,
            s,
            generator=gen,
            history_size=history_size,
            num_elbo_draws=num_elbo_draws,
            max_iters=max_iters,
            **lbfgs_options,
        )
        for s in starts
    )
    usable = [r for r in results if r.best is not None]
    if not usable:
        reasons = ", ".join(sorted({r.path.reason for r in results}))
        raise OptionError(
            f"Pathfinder found no usable Gaussian on {num_paths} path(s) (L-BFGS ended by: "
            f"{reasons}); try more paths, a larger max_iters, or an init inside the support"
        )
    components, kept = [], []
    for r in usable:
        try:
            components.append(r.best.gaussian())
            kept.append(r)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
    if not components:
        raise OptionError(
            "Pathfinder's best Gaussians were all numerically singular; try dtype=torch.float64"
        )
    components = tuple(components)
    per = max(1, num_draws // len(components))
    pooled = torch.cat(
        [
            c.loc
            + torch.randn(per, c.loc.shape[0], generator=gen, dtype=c.loc.dtype) @ c.scale_tril.T
            for c in components
        ]
    )
    with torch.no_grad():
        log_p = potential.log_density_batch(pooled)
        log_q = mixture_log_density(components, pooled)
        own = torch.cat(
            [
                torch.distributions.MultivariateNormal(c.loc, scale_tril=c.scale_tril).log_prob(
                    pooled[i * per : (i + 1) * per]
                )
                for i, c in enumerate(components)
            ]
        )
    # each component's own ELBO from its share of the pooled draws (not the 25-draw
    # estimates that chose it along its path, which favour lucky draws)
    own_w = (log_p - own).double().numpy().reshape(len(components), per)
    component_elbos = tuple(float(w.mean()) if np.isfinite(w).all() else -math.inf for w in own_w)
    best = int(np.argmax(component_elbos))
    log_w = (log_p - log_q).double().numpy()
    finite = np.isfinite(log_w)
    log_w = np.where(finite, log_w, -np.inf)
    # a pooled draw where log p is -inf (outside the support) makes the mixture's ELBO -inf:
    # the mean over the other draws would overstate it
    outside = int((~finite).sum())
    elbo = float(log_w.mean()) if not outside else -math.inf
    lw, k_hat = psis(np.where(finite, log_w, np.min(log_w[finite]) - 1e3))
    probs = np.exp(lw - lw.max())
    probs = np.where(finite, probs, 0.0)
    probs /= probs.sum()
    rng = np.random.default_rng(seed)
    idx = rng.choice(pooled.shape[0], size=num_draws, replace=True, p=probs)
    draws = pooled[torch.as_tensor(idx)]
    iters = [r.best.iteration for r in kept]
    msg = (
        f"{len(components)} of {num_paths} path(s) usable; best Gaussians at L-BFGS "
        f"iterations {iters} of {[r.path.num_iters for r in kept]}; their ELBOs "
        f"{', '.join(f'{e:.4g}' for e in component_elbos)} (best: path {best + 1}); "
        f"mixture ELBO {elbo:.4g}"
        + (f" ({outside} of {len(log_w)} pooled draws where log p is -inf)" if outside else "")
        + f"; Pareto k {k_hat:.2f}"
    )
    return PathfinderResult(
        components,
        component_elbos,
        best,
        results,
        draws,
        k_hat,
        elbo,
        potential.num_evals - evals_before,
        time.perf_counter() - t0,
        msg,
        potential,
    )
