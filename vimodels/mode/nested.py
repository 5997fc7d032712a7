"""Nested Laplace: a grid over a few hyperparameters, a Gaussian over the rest at each point.

For a latent Gaussian model (a Gaussian process with its length scale and
amplitude; a hierarchical model with its group scale) the posterior of the
latent field ``x`` given the hyperparameters ``h`` is close to Gaussian, while
``p(h | data)`` is not (funnels, skewed scales). Integrated nested Laplace
(Rue, Martino and Chopin, JRSS B 2009; R-INLA's ``int.strategy = "grid"``)
uses both facts:

1. for fixed ``h``, the conditional mode ``x*(h)`` by Newton's method with the
   exact Hessian ``A(h) = -d^2 log p / dx^2``, and the Laplace approximation of
   the marginal ``log p~(h) = log p(x*(h), h, data) - 1/2 log det A(h) +
   d_x/2 log 2 pi`` (exact where ``x | h`` is Gaussian);
2. the mode of ``log p~(h)`` (Newton on finite differences; ``h`` has at most
   :data:`MAX_HYPER_DIM` dimensions) and its curvature ``Sigma_h``;
3. a grid in ``z``, ``h = mode + V Lambda^(1/2) z``, step ``dz`` along the
   eigenvectors of ``Sigma_h``, out along each axis until ``log p~`` has
   dropped by ``drop`` nats, keeping the points within ``drop`` of the top.

The proposal is the mixture over grid points ``k`` with weights
``p~(h_k)``: ``h ~ N(h_k, dz^2 Sigma_h)`` (a kernel as wide as the grid step)
and ``x | h ~ N(x*_k + J_k (h - h_k), A_k^-1)`` with ``J_k = -A_k^-1 B_k``
(``B = -d^2 log p / dx dh``: how the conditional mode moves within the cell).
The fit (``guide="nested_laplace"``) importance-resamples it by Pareto-smoothed
weights ``log p - log q``, as ``pathfinder`` does, so what is left of the
approximation is measured by the Pareto k.

Everything is evaluated on batches of points through the potential's
batched density (one model run for all grid points), with exact Hessians by
autograd (``dim`` backward passes per Newton step for the whole batch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pyro.distributions import constraints

from vimodels.errors import CurvatureError, IncompatibleError, OptionError, check_option
from vimodels.mode.laplace import MAX_HESSIAN_DIM
from vimodels.mode.potential import Potential

#: the grid has ``(2 * extent + 1) ** d`` points at most: more than 3 grid dimensions
#: is thousands of conditional Laplace approximations
MAX_HYPER_DIM = 3
#: grid step along each standardized axis (R-INLA's ``dz`` default is 0.75)
GRID_STEP = 0.75
#: keep grid points within this many nats of the top (R-INLA's ``diff.logdens`` is 6)
GRID_DROP = 6.0
#: farthest grid point along an axis, in standardized units (the message says when an
#: axis stopped here with log p~ still within ``grid_drop`` of the top)
MAX_Z = 12.0
#: grid points at most (the box of the axis extents); more is an error naming the fix
MAX_GRID_POINTS = 20_000
#: rows per batched evaluation (memory: rows x dim x dim Hessians)
CHUNK = 1024
#: Newton's method for x | h: the decrement ``g^T A^-1 g`` (nats) below which the last full
#: step is taken and the row stops; never below what the dtype resolves at ``|log p|``
NEWTON_TOL = 1e-12
NEWTON_ITERS = 60
#: finite-difference step for the curvature of log p~(h), in (current) standard deviations
FD_STEP = 0.1
#: the mode of log p~(h): Newton's decrement ``g^T H^-1 g`` (its square root is the
#: distance to the mode in posterior sd) at which it stops. log p~ carries the noise of
#: the inner Newton solves (about 1e-6 nats on radon), so a smaller decrement is not
#: reached reliably: below DECREMENT_DONE (0.03 sd) a step that loses ends the search
DECREMENT_TOL = 1e-6
DECREMENT_DONE = 1e-3


@dataclass(frozen=True)
class NestedLaplaceResult:
    """The grid and its Gaussians (everything over the flat unconstrained latents).

    Attributes
    ----------
    hyper_sites : tuple of str
        The sites on the grid.
    hyper_index, latent_index : Tensor, shape (d_h,), (d_x,)
        Their flat coordinates, and the other sites'.
    mode : Tensor, shape (d_h,)
        Mode of ``log p~(h)``.
    hyper_cov : Tensor, shape (d_h, d_h)
        Inverse of ``-d^2 log p~ / dh^2`` at the mode.
    grid : Tensor, shape (K, d_h)
        The kept grid points.
    log_marginal : Tensor, shape (K,)
        ``log p~(h_k)`` (nats, unnormalized).
    locs : Tensor, shape (K, dim)
        Component means (flat layout).
    scale_trils : Tensor, shape (K, dim, dim)
        Lower Cholesky factors of the component covariances.
    logits : Tensor, shape (K,)
        Mixture log weights (normalized).
    num_evals : int
        Points at which the density (value, gradient, Hessian) was evaluated.
    iterations : int
        Newton steps of the search for the mode of ``log p~``.
    wall_time : float
        Seconds.
    message : str
    """

    hyper_sites: tuple[str, ...]
    hyper_index: torch.Tensor
    latent_index: torch.Tensor
    mode: torch.Tensor
    hyper_cov: torch.Tensor
    grid: torch.Tensor
    log_marginal: torch.Tensor
    locs: torch.Tensor = field(repr=False)
    scale_trils: torch.Tensor = field(repr=False)
    logits: torch.Tensor = field(repr=False)
    num_evals: int = 0
    iterations: int = 0
    wall_time: float = 0.0
    message: str = ""


def default_hyper_sites(potential: Potential) -> tuple[str, ...]:
    """The latent sites with a constrained support (scales, length scales, correlations).

    In a latent Gaussian model these are the hyperparameters; the sites on the
    real line (effects, coefficients, the latent field) are the Gaussian part.
    """
    return tuple(b.name for b in potential.blocks if not _real(b.support))


def _real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def split_index(
    potential: Potential, hyper_sites: Sequence[str] | None
) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
    """``(names, hyper flat indices, latent flat indices)``; OptionError for a bad choice."""
    names = potential.site_names()
    if hyper_sites is None:
        chosen = default_hyper_sites(potential)
        if not chosen:
            raise IncompatibleError(
                "nested_laplace found no hyperparameter to put on its grid (it takes the "
                "latent sites with a constrained support, such as scales); name them "
                f"with guide_options={{'hyper_sites': [...]}} from: {', '.join(names)}"
            )
    else:
        if isinstance(hyper_sites, str):
            hyper_sites = (hyper_sites,)
        chosen = tuple(hyper_sites)
        unknown = [s for s in chosen if s not in names]
        if unknown or not chosen:
            raise OptionError(
                f"hyper_sites must name latent sites of the model ({', '.join(names)}); "
                f"got {list(chosen)}"
            )
    blocks = [b for b in potential.blocks if b.name in chosen]
    hyper = [i for b in blocks for i in range(b.start, b.start + b.size)]
    if len(hyper) > MAX_HYPER_DIM:
        raise IncompatibleError(
            f"nested_laplace puts {len(hyper)} unconstrained dimensions on its grid "
            f"({', '.join(b.name for b in blocks)}); at most {MAX_HYPER_DIM} (the grid grows "
            "as 9^d). Name the few that make the posterior non-Gaussian with "
            "guide_options={'hyper_sites': [...]}"
        )
    latent = [i for i in range(potential.dim) if i not in set(hyper)]
    if not latent:
        raise IncompatibleError(
            "nested_laplace needs latent sites besides the grid's; with every site on the "
            "grid use NUTS or auto_laplace_is"
        )
    if len(latent) > MAX_HESSIAN_DIM:
        raise IncompatibleError(
            f"nested_laplace needs the exact Hessian of {len(latent)} latent dimensions; "
            f"at most {MAX_HESSIAN_DIM}"
        )
    return tuple(b.name for b in blocks), torch.tensor(hyper), torch.tensor(latent)


class _Batch:
    """Value, gradient and Hessian of the potential at a batch of points ``(n, dim)``.

    One model run for all rows where the potential batches
    (:meth:`~vimodels.mode.potential.Potential.log_density_batch` decided it);
    row by row otherwise, and for a batch where the model's linear algebra fails.
    """

    def __init__(self, potential: Potential):
        self.potential = potential
        self.points = 0
        self.batched = bool(potential._batch_ok)

    def value(self, u: torch.Tensor) -> torch.Tensor:
        self.points += u.shape[0]
        with torch.no_grad():
            try:
                if not self.batched:
                    raise torch.linalg.LinAlgError("row by row")
                out = self.potential._batched(u)
            except torch.linalg.LinAlgError:
                out = torch.stack([self.potential.log_density(row) for row in u])
        return torch.where(torch.isnan(out), -math.inf, out)

    def derivatives(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log p (n,)``, gradient ``(n, dim)`` and Hessian ``(n, dim, dim)`` of ``log p``."""
        self.points += u.shape[0]
        if not self.batched:
            return self._rowwise(u)
        with torch.enable_grad():
            x = u.detach().clone().requires_grad_(True)
            try:
                lp = self.potential._batched(x)
            except torch.linalg.LinAlgError:
                return self._rowwise(u)
            (g,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
            rows = []
            for i in range(u.shape[1]):
                (r,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=i + 1 < u.shape[1])
                rows.append(r)
        hess = torch.stack(rows, 1)
        lp = torch.where(torch.isnan(lp), -math.inf, lp)
        return lp.detach(), g.detach(), 0.5 * (hess + hess.transpose(1, 2)).detach()

    def _rowwise(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lps, gs, hs = [], [], []
        for row in u:
            with torch.enable_grad():
                x = row.detach().clone().requires_grad_(True)
                lp = self.potential.log_density(x)
                if not torch.isfinite(lp) or not lp.requires_grad:
                    lps.append(torch.tensor(-math.inf, dtype=u.dtype))
                    gs.append(torch.zeros_like(row))
                    hs.append(torch.zeros(u.shape[1], u.shape[1], dtype=u.dtype))
                    continue
                (g,) = torch.autograd.grad(lp, x, create_graph=True)
                h = torch.stack(
                    [
                        torch.autograd.grad(g[i], x, retain_graph=i + 1 < len(row))[0]
                        for i in range(len(row))
                    ]
                )
            lps.append(lp.detach())
            gs.append(g.detach())
            hs.append(0.5 * (h + h.T).detach())
        return torch.stack(lps), torch.stack(gs), torch.stack(hs)


def _assemble(hyper: torch.Tensor, latent: torch.Tensor, hi: torch.Tensor, li: torch.Tensor):
    n = hyper.shape[0]
    u = hyper.new_empty(n, len(hi) + len(li))
    u[:, hi] = hyper
    u[:, li] = latent
    return u


def _newton_direction(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton's direction ``A^-1 g`` per row; ``|A|^-1 g`` where ``A`` is not positive definite.

    ``|A|`` has the absolute values of ``A``'s eigenvalues (floored at 1e-6 of the
    largest), so the direction still ascends where the curvature is negative
    (saddle-free Newton). Returns the direction ``(n, d)`` and whether ``A`` was
    positive definite ``(n,)``.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    pd = info == 0
    d = torch.zeros_like(g)
    if bool(pd.any()):
        d[pd] = torch.cholesky_solve(g[pd, :, None], chol[pd])[..., 0]
    if not bool(pd.all()):
        evals, evecs = torch.linalg.eigh(a[~pd])
        mag = evals.abs()
        mag = torch.maximum(mag, 1e-6 * mag.amax(-1, keepdim=True).clamp_min(1e-12))
        coef = (evecs.transpose(1, 2) @ g[~pd, :, None])[..., 0] / mag
        d[~pd] = (evecs @ coef[..., None])[..., 0]
    return d, pd


def conditional_modes(
    batch: _Batch,
    hyper: torch.Tensor,
    x0: torch.Tensor,
    hi: torch.Tensor,
    li: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Newton's method for ``x*(h)`` at each row of ``hyper`` (n, d_h), from ``x0`` (n, d_x).

    Evaluated in chunks of :data:`CHUNK` rows.

    Returns
    -------
    x : Tensor, shape (n, d_x)
        The conditional modes.
    log_marginal : Tensor, shape (n,)
        ``log p~(h)`` (``-inf`` where ``x | h`` has no mode with a positive
        definite curvature).
    hess : Tensor, shape (n, dim, dim)
        ``d^2 log p`` at ``(h, x*)``, full.
    lp : Tensor, shape (n,)
        ``log p(h, x*)``.
    """
    if hyper.shape[0] > CHUNK:
        parts = [
            _conditional_modes(batch, hyper[i : i + CHUNK], x0[i : i + CHUNK], hi, li)
            for i in range(0, hyper.shape[0], CHUNK)
        ]
        return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]
    return _conditional_modes(batch, hyper, x0, hi, li)


def _conditional_modes(
    batch: _Batch,
    hyper: torch.Tensor,
    x0: torch.Tensor,
    hi: torch.Tensor,
    li: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x0.detach().clone()
    eps = torch.finfo(x.dtype).eps
    done = torch.zeros(hyper.shape[0], dtype=torch.bool)
    for _ in range(NEWTON_ITERS):
        lp, g, h = batch.derivatives(_assemble(hyper, x, hi, li))
        bad = ~(torch.isfinite(lp) & torch.isfinite(h).flatten(1).all(-1))
        gx = torch.where(bad[:, None], 0.0, g[:, li])
        a = -h[:, li][:, :, li]
        a[bad] = torch.eye(len(li), dtype=a.dtype)
        d, pd = _newton_direction(a, gx)
        if not bool(pd.all()):  # a saddle or worse: also move along the most negative curvature
            evals, evecs = torch.linalg.eigh(a[~pd])
            v = evecs[:, :, 0]
            side = torch.where((gx[~pd] * v).sum(-1) < 0, -1.0, 1.0)
            d[~pd] = d[~pd] + v * (side / evals[:, 0].abs().clamp_min(1e-8).sqrt())[:, None]
        decrement = (gx * d).sum(-1)
        # rounding of log p at this size: no line search can see gains below it
        noise = 100 * eps * lp.abs().clamp_min(1.0)
        small = pd & (decrement <= torch.clamp(noise, min=NEWTON_TOL)) & ~done & ~bad
        if bool(small.any()):  # the last full Newton step (quadratic convergence), then stop
            rows = small.nonzero()[:, 0]
            cand = x[rows] + d[rows]
            new = batch.value(_assemble(hyper[rows], cand, hi, li))
            ok = torch.isfinite(new) & (new >= lp[rows] - noise[rows])
            x[rows[ok]] = cand[ok]
        done = done | bad | small
        if bool(done.all()):
            break
        # backtracking (Armijo) on the rows still moving
        t = torch.ones_like(lp)
        move = ~done
        for _ls in range(40):
            rows = move.nonzero()[:, 0]
            cand = x[rows] + t[rows, None] * d[rows]
            if bool((cand == x[rows]).all()):
                break  # steps below the resolution of x: as far as these rows get
            new = batch.value(_assemble(hyper[rows], cand, hi, li))
            gain = 1e-4 * t[rows] * decrement[rows]
            ok = torch.isfinite(new) & (new >= lp[rows] + gain) & ((new > lp[rows]) | pd[rows])
            x[rows[ok]] = cand[ok]
            move[rows[ok]] = False
            if not bool(move.any()):
                break
            t = torch.where(move, t * 0.5, t)
        done = done | move  # no step improved: as far as Newton gets
    lp, g, h = batch.derivatives(_assemble(hyper, x, hi, li))
    a = -h[:, li][:, :, li]
    chol, info = torch.linalg.cholesky_ex(a)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    lm = lp - 0.5 * logdet + 0.5 * len(li) * math.log(2 * math.pi)
    lm = torch.where((info == 0) & torch.isfinite(lm), lm, -math.inf)
    return x, lm, h, lp


def _stencil(d: int, dtype: torch.dtype) -> torch.Tensor:
    """Offsets for central differences: 0, +-e_i, and +-e_i +-e_j (i < j); (m, d)."""
    pts = [torch.zeros(d, dtype=dtype)]
    eye = torch.eye(d, dtype=dtype)
    for i in range(d):
        pts += [eye[i], -eye[i]]
    for i in range(d):
        for j in range(i + 1, d):
            for si in (1, -1):
                for sj in (1, -1):
                    pts.append(si * eye[i] + sj * eye[j])
    return torch.stack(pts)


def _curvature(f: torch.Tensor, d: int, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and Hessian of ``f`` from its values on :func:`_stencil` scaled by ``step``."""
    grad = torch.empty(d, dtype=f.dtype)
    hess = torch.empty(d, d, dtype=f.dtype)
    for i in range(d):
        fp, fm = f[1 + 2 * i], f[2 + 2 * i]
        grad[i] = (fp - fm) / (2 * step[i])
        hess[i, i] = (fp - 2 * f[0] + fm) / step[i] ** 2
    k = 1 + 2 * d
    for i in range(d):
        for j in range(i + 1, d):
            fpp, fpm, fmp, fmm = f[k : k + 4]
            hess[i, j] = hess[j, i] = (fpp - fpm - fmp + fmm) / (4 * step[i] * step[j])
            k += 4
    return grad, hess


def hyper_mode(
    batch: _Batch,
    h0: torch.Tensor,
    x0: torch.Tensor,
    hi: torch.Tensor,
    li: torch.Tensor,
    max_iters: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int]:
    """The mode of ``log p~(h)`` by Newton's method on central differences.

    Each iteration evaluates the stencil around the current point; a step that
    lowered ``log p~`` (or left its support) is halved from the previous point.

    Returns ``(mode, hyper_cov, x*(mode), converged, iterations)``.
    """
    d = h0.shape[0]
    offsets = _stencil(d, h0.dtype)
    h, x = h0.clone(), x0.clone()
    step = torch.full((d,), 0.05, dtype=h0.dtype)
    accepted = None  # (h, f(h), x*(h), cov, decrement) at the last accepted point
    converged = False
    halvings = 0
    it = 0
    while it < max_iters:
        it += 1
        pts = h + offsets * step
        xs, f, _, _ = conditional_modes(batch, pts, x.expand(len(pts), -1), hi, li)
        worse = accepted is not None and not bool(
            f[0] >= accepted[1] - 1e-12 * max(1.0, abs(accepted[1]))
        )
        if worse and accepted[4] < DECREMENT_DONE:
            break  # already within DECREMENT_DONE: the rest is the noise of log p~
        if worse and halvings < 20:  # overshot (or left the support): halve the step
            h = accepted[0] + 0.5 * (h - accepted[0])
            halvings += 1
            continue
        if worse:
            break  # no gain along the direction: the last accepted point
        if not bool(torch.isfinite(f[0])):
            raise CurvatureError(
                "nested_laplace: the conditional density of the other latent sites has no "
                "mode with a positive definite curvature at the grid sites' unconstrained "
                f"value(s) {[round(v, 4) for v in h.tolist()]}: it is not close to Gaussian "
                "there (a scale of theirs left off the grid?). Put the sites that make it so "
                "on the grid with guide_options={'hyper_sites': [...]}, or use pathfinder"
            )
        halvings = 0
        x = xs[0]
        f = torch.where(torch.isfinite(f), f, f[0] - 1e6)
        grad, hess = _curvature(f, d, step)
        chol, info = torch.linalg.cholesky_ex(-hess)
        cov, decrement = None, math.inf
        if int(info) == 0:
            direction = torch.cholesky_solve(grad[:, None], chol)[:, 0]
            decrement = float(grad @ direction)
            cov = torch.cholesky_inverse(chol)
            step = (FD_STEP * cov.diagonal().sqrt()).clamp(1e-4, 0.5)
        else:
            direction = grad / max(1.0, float(grad.abs().max()))
        accepted = (h, float(f[0]), x, cov, decrement)
        if decrement < DECREMENT_TOL:
            converged = True
            break
        h = h + direction * min(1.0, 2.0 / max(float(direction.abs().max()), 1e-300))
    if accepted is None or accepted[3] is None:
        where = h.tolist() if accepted is None else accepted[0].tolist()
        raise CurvatureError(
            "nested_laplace: log p~(h) of the hyperparameters has no negative definite "
            f"curvature after {it} Newton steps (last point {where}): its marginal "
            "posterior may be improper or flat; give the hyperparameters proper priors"
        )
    h, _, x, cov, decrement = accepted
    # stopped without gain: a mode only if Newton's decrement was small too
    converged = converged or decrement < DECREMENT_DONE
    return h, 0.5 * (cov + cov.T), x, converged, it


def grid_points(
    batch: _Batch,
    mode: torch.Tensor,
    cov: torch.Tensor,
    x_mode: torch.Tensor,
    hi: torch.Tensor,
    li: torch.Tensor,
    step: float,
    drop: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """R-INLA's grid over the hyperparameters, and each point's conditional Laplace fit.

    Returns ``(h (K, d_h), x* (K, d_x), log p~ (K,), Hessians (K, dim, dim), z map,
    truncated)``; ``truncated`` names the axis ends that stopped at :data:`MAX_Z` with
    ``log p~`` still within ``drop`` of the top.

    Along each axis direction the points ``+-k * step`` are evaluated a few at a time
    until ``log p~`` falls ``drop`` below the top (that point is the extent, one past the
    last within, as R-INLA); then the box of the extents, keeping the points within ``drop``.
    """
    d = mode.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    zmap = evecs * evals.clamp_min(1e-300).sqrt()  # h = mode + zmap @ z
    kmax = max(1, math.ceil(MAX_Z / step))
    _, f0, _, _ = conditional_modes(batch, mode[None], x_mode[None], hi, li)
    top = float(f0[0])
    directions = [(i, sign) for i in range(d) for sign in (1.0, -1.0)]
    extents = [kmax] * len(directions)
    open_ = list(range(len(directions)))
    last_x = {j: x_mode for j in open_}
    k0 = 0
    per_block = max(4, math.ceil(4.0 / step))  # about 4 sd of each direction per block
    while open_ and k0 < kmax:
        ks = torch.arange(k0 + 1, min(k0 + per_block, kmax) + 1, dtype=mode.dtype)
        z = torch.zeros(len(open_) * len(ks), d, dtype=mode.dtype)
        starts = []
        for n, j in enumerate(open_):
            i, sign = directions[j]
            z[n * len(ks) : (n + 1) * len(ks), i] = sign * ks * step
            starts.append(last_x[j].expand(len(ks), -1))
        xs, f, _, _ = conditional_modes(batch, mode + z @ zmap.T, torch.cat(starts), hi, li)
        still = []
        for n, j in enumerate(open_):
            block = f[n * len(ks) : (n + 1) * len(ks)]
            below = (~(block >= top - drop)).nonzero()
            if len(below):
                extents[j] = k0 + int(below[0, 0]) + 1
            else:
                last_x[j] = xs[(n + 1) * len(ks) - 1]
                still.append(j)
        open_ = still
        k0 += len(ks)
        # the box already has at least this many points: refuse before evaluating more
        _check_size([extents[j] if j not in open_ else k0 for j in range(2 * d)], step, drop)
    truncated = [
        f"{'+' if directions[j][1] > 0 else '-'}axis {directions[j][0] + 1}" for j in open_
    ]
    _check_size(extents, step, drop)
    ranges = [
        torch.arange(-extents[2 * i + 1], extents[2 * i] + 1, dtype=mode.dtype) * step
        for i in range(d)
    ]
    z = torch.cartesian_prod(*ranges).reshape(-1, d)
    h = mode + z @ zmap.T
    x, f, hess, _ = conditional_modes(batch, h, x_mode.expand(len(h), -1), hi, li)
    keep = torch.isfinite(f) & (f >= max(top, float(f.max())) - drop)
    return h[keep], x[keep], f[keep], hess[keep], zmap, truncated


def _check_size(extents: list[int], step: float, drop: float) -> None:
    """IncompatibleError when the box of these axis extents has over :data:`MAX_GRID_POINTS`."""
    sizes = [extents[2 * i] + extents[2 * i + 1] + 1 for i in range(len(extents) // 2)]
    total = math.prod(sizes)
    if total > MAX_GRID_POINTS:
        raise IncompatibleError(
            f"nested_laplace's grid would have {total} points or more "
            f"({' x '.join(map(str, sizes))}); at most {MAX_GRID_POINTS}: raise grid_step "
            f"(now {step:g}) or lower grid_drop (now {drop:g})"
        )


def _components(
    grid: torch.Tensor,
    x: torch.Tensor,
    hess: torch.Tensor,
    zmap: torch.Tensor,
    step: float,
    hi: torch.Tensor,
    li: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each grid point's Gaussian over ``(h, x)`` in the flat layout: ``(locs, scale_trils)``."""
    k, d = grid.shape
    dim = len(hi) + len(li)
    a = -hess[:, li][:, :, li]
    b = -hess[:, li][:, :, hi]
    chol = torch.linalg.cholesky(a)
    a_inv = torch.cholesky_inverse(chol)
    jac = -torch.cholesky_solve(b, chol)  # (K, d_x, d_h): d x* / d h
    kern = (step**2) * (zmap @ zmap.T)  # h's kernel covariance
    cov = grid.new_zeros(k, dim, dim)
    hh = hi[:, None], hi[None, :]
    cov[:, hh[0], hh[1]] = kern
    xh = jac @ kern
    cov[:, li[:, None], hi[None, :]] = xh
    cov[:, hi[:, None], li[None, :]] = xh.transpose(1, 2)
    cov[:, li[:, None], li[None, :]] = xh @ jac.transpose(1, 2) + a_inv
    cov = 0.5 * (cov + cov.transpose(1, 2))
    locs = _assemble(grid, x, hi, li)
    return locs, torch.linalg.cholesky(cov)


def nested_laplace(
    potential: Potential,
    *,
    hyper_sites: Sequence[str] | None = None,
    grid_step: float = GRID_STEP,
    grid_drop: float = GRID_DROP,
) -> NestedLaplaceResult:
    """Nested Laplace over ``hyper_sites`` (default :func:`default_hyper_sites`).

    Parameters
    ----------
    potential : Potential
        The model's flat unconstrained log density (Jacobian included); evaluated
        on batches of points where it batches, row by row where not (slower).
    hyper_sites : sequence of str, optional
        Sites on the grid: at most :data:`MAX_HYPER_DIM` unconstrained dimensions.
    grid_step : float
        Step along each standardized axis (posterior sds of ``log p~``'s curvature).
    grid_drop : float
        Grid points within this many nats of the top of ``log p~`` are kept.

    Returns
    -------
    NestedLaplaceResult

    Raises
    ------
    IncompatibleError
        No hyperparameter found, too many, or none left for the Gaussian part.
    CurvatureError
        Where ``x | h`` or ``log p~(h)`` has no mode with a definite curvature.
    """
    check_option("grid_step", grid_step, kind=(int, float), low=1e-3)
    check_option("grid_drop", grid_drop, kind=(int, float), low=0.5)
    if not potential.jacobian:
        raise OptionError("nested_laplace needs the unconstrained density: jacobian=True")
    t0 = time.perf_counter()
    names, hi, li = split_index(potential, hyper_sites)
    u0 = potential.init_values.detach().to(potential.dtype)
    # can it batch? (checked once, on two different rows)
    shift = torch.linspace(-0.5, 0.7, potential.dim, dtype=u0.dtype)
    potential.log_density_batch(torch.stack([u0, u0 + shift]))
    batch = _Batch(potential)
    mode, cov, x_mode, converged, iters = hyper_mode(batch, u0[hi], u0[li], hi, li)
    grid, x, f, hess, zmap, truncated = grid_points(
        batch, mode, cov, x_mode, hi, li, float(grid_step), float(grid_drop)
    )
    if grid.shape[0] == 0:
        raise CurvatureError("nested_laplace: no grid point has a finite log p~(h)")
    locs, trils = _components(grid, x, hess, zmap, float(grid_step), hi, li)
    logits = torch.log_softmax(f, 0)
    sds = ", ".join(f"{s:.3g}" for s in cov.diagonal().sqrt().tolist())
    message = (
        f"{len(grid)} grid points over {', '.join(names)} (step {grid_step:g} sd, within "
        f"{grid_drop:g} nats); mode of log p~ {'found' if converged else 'NOT converged'} "
        f"after {iters} Newton steps, sd {sds} (unconstrained)"
    )
    if truncated:
        message += (
            f"; grid cut at {MAX_Z:g} sd along {', '.join(truncated)} with log p~ still within "
            f"{grid_drop:g} nats of the top (a long tail: the resampling's Pareto k tells "
            "whether it matters)"
        )
    return NestedLaplaceResult(
        names,
        hi,
        li,
        mode,
        cov,
        grid,
        f,
        locs,
        trils,
        logits,
        batch.points,
        iters,
        time.perf_counter() - t0,
        message,
    )
