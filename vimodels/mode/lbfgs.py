"""Modes of a model's unconstrained log density by L-BFGS.

``lbfgs_run`` is one run of ``torch.optim.LBFGS`` (strong Wolfe line search)
that records its path (positions, log densities and gradients at the accepted
iterates: Pathfinder builds its Gaussians from them). ``find_mode`` runs it
from several starting points and returns the best mode with a report.

Stopping rule of one run (Stan's defaults, in spirit): the largest gradient
element below ``gtol``, or a relative change of the log density below
``ftol`` on ``patience`` consecutive iterations, or the line search making no
progress, or ``max_iters`` iterations, or ``max_evals`` evaluations. A run
counts as converged only if its last gradient is small (``gtol``, or below
``GRAD_TOL_REL * max(1, |log p|)`` when it stopped on a flat objective or no
progress).

An unbounded density (centered eight schools: a hierarchical scale going to 0
with the group effects at their mean sends ``log p`` to ``+inf``) has no mode;
:func:`lbfgs_run` stops with reason ``unbounded`` when the log density keeps
climbing while the gradient grows by ``UNBOUNDED_GRAD_GROWTH`` and a
coordinate runs past ``UNBOUNDED_U`` (see :func:`_unbounded`), and
:func:`find_mode` then stops and says so instead of trying the other starts.
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
from vimodels.mode.fast import compiled_value_and_grad
from vimodels.mode.potential import Potential, make_potential
from vimodels.resolve import resolve_model

GRADIENT = "gradient"
OBJECTIVE = "objective"
NO_PROGRESS = "no_progress"
MAX_ITERS = "max_iters"
NONFINITE = "nonfinite"
MAX_EVALS = "max_evals"
UNBOUNDED = "unbounded"

#: a run stopped on a flat objective or no progress converged only if its
#: largest gradient element is at most this times ``max(1, |log p|)``
GRAD_TOL_REL = 1e-3
#: unbounded: some unconstrained coordinate beyond this (a scale below e^-15) ...
UNBOUNDED_U = 15.0
#: ... the largest gradient element this many times its smallest so far (at least 1) ...
UNBOUNDED_GRAD_GROWTH = 1e6
#: ... and log p still rising by over 1 nat across this many iterations
UNBOUNDED_WINDOW = 10


@dataclass(frozen=True)
class LbfgsPath:
    """One L-BFGS run: the accepted iterates in order.

    Attributes
    ----------
    positions : Tensor, shape (L + 1, dim)
        Unconstrained iterates, the start first.
    log_densities : Tensor, shape (L + 1,)
        ``log p`` at each (nats).
    grads : Tensor, shape (L + 1, dim)
        ``d log p / du`` at each.
    num_evals : int
        Log-density-and-gradient evaluations (line search included).
    reason : str
        Why it stopped: ``gradient``, ``objective``, ``no_progress``,
        ``max_iters``, ``max_evals``, ``nonfinite`` or ``unbounded``.
    converged : bool
        ``gradient``, or ``objective`` or no progress with a small gradient
        (:data:`GRAD_TOL_REL`).
    """

    positions: torch.Tensor
    log_densities: torch.Tensor
    grads: torch.Tensor
    num_evals: int
    reason: str
    converged: bool

    @property
    def num_iters(self) -> int:
        """Accepted iterations (steps after the start)."""
        return self.positions.shape[0] - 1

    @property
    def grad_max(self) -> float:
        """Largest absolute gradient element at the last iterate."""
        return float(self.grads[-1].abs().max())


@dataclass(frozen=True)
class RunReport:
    """One start of :func:`find_mode`: where it ended and why (JSON-friendly)."""

    start: int
    log_density: float
    grad_max: float
    num_iters: int
    num_evals: int
    reason: str
    converged: bool


@dataclass(frozen=True)
class ModeReport:
    """How :func:`find_mode` went.

    Attributes
    ----------
    converged : bool
        Whether the best run met a convergence criterion (never when unbounded).
    message : str
        One line: the mode's log density, gradient, iterations, agreement of the runs.
    runs : tuple of RunReport
        Per start, the best one first is ``best``.
    best : int
        Index into ``runs`` of the returned mode.
    num_evals : int
        Evaluations over all runs.
    wall_time : float
        Seconds.
    unbounded : str or None
        Where a run found the density unbounded, one line naming the site
        (then ``converged`` is False and no mode exists); else None.
    """

    converged: bool
    message: str
    runs: tuple[RunReport, ...]
    best: int
    num_evals: int
    wall_time: float
    unbounded: str | None = None


@dataclass(frozen=True)
class ModeResult:
    """A mode of the unconstrained log density.

    Attributes
    ----------
    u : Tensor, shape (dim,)
        The mode, flat unconstrained (layout of ``potential.blocks``).
    values : dict of str to ndarray
        Constrained value per latent site.
    log_density : float
        ``log p`` at the mode (nats; with the log-Jacobian if ``potential.jacobian``).
    report : ModeReport
    potential : Potential
    paths : tuple of LbfgsPath
        Every run's path, in start order.
    """

    u: torch.Tensor
    values: dict[str, np.ndarray]
    log_density: float
    report: ModeReport
    potential: Potential = field(repr=False)
    paths: tuple[LbfgsPath, ...] = field(repr=False, default=())


def hessian_diagonal(potential: Potential, u: torch.Tensor) -> torch.Tensor:
    """``-d^2 log p / du_i^2`` at ``u`` (dim,): one backward pass per coordinate."""
    x = u.detach().clone().requires_grad_(True)
    lp = potential.log_density(x)
    if not torch.isfinite(lp):  # outside the support: no curvature (NaN: the unit scale)
        return torch.full_like(x, math.nan).detach()
    (g,) = torch.autograd.grad(lp, x, create_graph=True)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        (row,) = torch.autograd.grad(g[i], x, retain_graph=i + 1 < x.shape[0])
        out[i] = -row[i]
    return out.detach()


def diagonal_scale(potential: Potential, u: torch.Tensor) -> torch.Tensor:
    """Coordinate scales ``1 / sqrt(H_ii)`` at ``u`` (1 where the curvature is not positive).

    L-BFGS runs in ``z = u / scale``: on a Gaussian with sds over 4 decades this
    turns a condition number of 1e8 into that of the correlation matrix.
    """
    h = hessian_diagonal(potential, u)
    ok = torch.isfinite(h) & (h > 0)
    scale = torch.where(ok, h.clamp_min(1e-300).rsqrt(), torch.ones_like(h))
    return scale.clamp(1e-8, 1e8)


def lbfgs_run(
    potential: Potential,
    start: torch.Tensor,
    *,
    max_iters: int = 1000,
    history_size: int = 10,
    gtol: float = 1e-8,
    ftol: float = 1e-13,
    patience: int = 3,
    precondition: bool | None = None,
    restarts: int = 2,
    max_evals: int | None = None,
) -> LbfgsPath:
    """Maximise ``potential`` from ``start`` by L-BFGS with a strong Wolfe line search.

    Parameters
    ----------
    potential : Potential
    start : Tensor, shape (dim,)
    max_iters : int
        Iterations at most (all restarts together).
    history_size : int
        L-BFGS memory (pairs).
    gtol : float
        Stop when ``max |d log p / du| <= gtol``.
    ftol : float
        Stop when ``|change of log p| <= ftol * max(1, |log p|)`` on ``patience``
        consecutive iterations.
    precondition : bool, optional
        Run in coordinates scaled by ``1 / sqrt`` of the Hessian's diagonal
        (:func:`diagonal_scale`, ``dim`` backward passes, counted as evaluations);
        default: when ``dim <= 500``.
    restarts : int
        With preconditioning: times a run that stopped unconverged (no progress,
        or a flat objective with a large gradient) restarts from where it ended
        with the scales recomputed there.
    max_evals : int, optional
        Log-density evaluations at most (line searches included, Hessian
        passes not); default ``3 * max_iters``.

    Returns
    -------
    LbfgsPath
        Positions and gradients in the original coordinates ``u``.
    """
    dtype = potential.dtype
    if precondition is None:
        precondition = potential.dim <= 500
    u0 = start.detach().clone().to(dtype)
    positions: list[torch.Tensor] = []
    lps: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    evals = 0
    budget = 3 * max_iters if max_evals is None else max_evals
    reason = MAX_ITERS
    for attempt in range(restarts + 1 if precondition else 1):
        if precondition:
            scale = diagonal_scale(potential, u0)
            evals += potential.dim
        else:
            scale = torch.ones(potential.dim, dtype=dtype)
        left = max_iters - max(0, len(positions) - 1)
        if attempt > 0:  # the restart point is already recorded
            positions, lps, grads = positions[:-1], lps[:-1], grads[:-1]
            left += 1
        reason, n = _run(
            potential,
            u0,
            scale,
            left,
            history_size,
            gtol,
            ftol,
            patience,
            positions,
            lps,
            grads,
            budget,
        )
        evals += n
        budget -= n
        if reason in (GRADIENT, NONFINITE, MAX_ITERS, MAX_EVALS, UNBOUNDED) or not positions:
            break
        if reason == OBJECTIVE and float(grads[-1].abs().max()) <= 1e-3:
            break
        u0 = positions[-1]
    if not positions:  # the start itself is not finite
        lp0 = torch.tensor(-math.inf, dtype=dtype)
        positions, lps, grads = [start.detach().clone()], [lp0], [torch.zeros_like(start)]
    grad_max = float(grads[-1].abs().max())
    # a flat objective or a stalled line search is a mode only where the gradient is small
    converged = reason == GRADIENT or (
        reason in (OBJECTIVE, NO_PROGRESS)
        and grad_max <= GRAD_TOL_REL * max(1.0, abs(float(lps[-1])))
    )
    return LbfgsPath(
        torch.stack(positions),
        torch.stack([torch.as_tensor(v, dtype=dtype) for v in lps]),
        torch.stack(grads),
        evals,
        reason,
        converged,
    )


def _run(
    potential: Potential,
    u0: torch.Tensor,
    scale: torch.Tensor,
    max_iters: int,
    history_size: int,
    gtol: float,
    ftol: float,
    patience: int,
    positions: list[torch.Tensor],
    lps: list[torch.Tensor],
    grads: list[torch.Tensor],
    max_evals: int,
) -> tuple[str, int]:
    """One L-BFGS run in ``z = u / scale``; appends accepted iterates (in ``u``) to the lists.

    ``torch.optim.LBFGS`` with ``max_iter=1`` evaluates the closure at the
    start of every ``step``: the point its previous line search accepted and
    already evaluated. Evaluations are kept per step, keyed on the point's
    bytes, and that one is served from them (the same bits, so the same
    iterates; one evaluation per iteration fewer).
    """
    z = (u0 / scale).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=1,
        max_eval=25,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    evals = 0
    last: list[tuple[torch.Tensor, torch.Tensor]] = []
    fast = compiled_value_and_grad(potential)
    # this step's evaluations: bytes of z -> (log p, d(-log p)/dz, the loss returned)
    seen: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def evaluate() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if fast is not None:  # the frozen graph of value and gradient (vimodels.mode.fast)
            lp, g = fast(z.detach() * scale)
            if not torch.isfinite(lp):
                return torch.tensor(math.inf, dtype=z.dtype), torch.zeros_like(z), _huge(z)
            return lp, -g * scale, -lp
        with torch.enable_grad():
            x = z.detach().clone().requires_grad_(True)
            lp = potential.log_density(x * scale)
            if not torch.isfinite(lp):
                # a finite, very poor value lets the line search back off
                return torch.tensor(math.inf, dtype=z.dtype), torch.zeros_like(z), _huge(z)
            (g,) = torch.autograd.grad(-lp, x, allow_unused=True)
        return lp.detach(), torch.zeros_like(z) if g is None else g.detach(), -lp.detach()

    def closure() -> torch.Tensor:
        nonlocal evals
        key = z.detach().cpu().numpy().tobytes()
        if key not in seen:
            evals += 1
            seen[key] = evaluate()
        lp, gz, loss = seen[key]
        z.grad = gz.clone()
        last.append((lp, gz))
        return loss

    reason = MAX_ITERS
    flat = 0
    taken = 0
    first = len(lps)
    g_low = math.inf
    while True:
        last.clear()
        before = z.detach().clone()
        opt.step(closure)
        lp, gz = last[0]  # the first evaluation of a step is at its starting point
        keep = seen.get(z.detach().cpu().numpy().tobytes())  # where the next step starts
        seen.clear()
        if keep is not None:
            seen[z.detach().cpu().numpy().tobytes()] = keep
        if not math.isfinite(float(lp)):
            reason = NONFINITE
            break
        g = -gz / scale  # closure stored d(-log p)/dz; d log p / du = (d log p / dz) / scale
        positions.append(before * scale)
        lps.append(lp)
        grads.append(g)
        g_max = float(g.abs().max())
        if g_max <= gtol:
            reason = GRADIENT
            break
        g_low = min(g_low, max(g_max, 1.0))
        if _unbounded(positions, lps, first, g_max, g_low):
            reason = UNBOUNDED
            break
        if len(lps) > 1:
            change = abs(float(lps[-1] - lps[-2]))
            flat = flat + 1 if change <= ftol * max(1.0, abs(float(lp))) else 0
            if flat >= patience:
                reason = OBJECTIVE
                break
        if taken >= max_iters:
            break
        if evals >= max_evals:
            reason = MAX_EVALS
            break
        taken += 1
        if torch.equal(z.detach(), before):
            reason = NO_PROGRESS
            break
    return reason, evals


def _huge(z: torch.Tensor) -> torch.Tensor:
    """The loss returned where ``log p`` is not finite (the line search backs off)."""
    return torch.tensor(1e300, dtype=z.dtype)


def _unbounded(
    positions: list[torch.Tensor], lps: list[torch.Tensor], first: int, g_max: float, g_low: float
) -> bool:
    """Whether this run is climbing an unbounded density (no mode to find).

    All of: a coordinate beyond :data:`UNBOUNDED_U`, the gradient grown
    :data:`UNBOUNDED_GRAD_GROWTH`-fold over its smallest value in this run,
    and ``log p`` up by more than 1 nat over the last :data:`UNBOUNDED_WINDOW`
    iterations. A run towards a mode has a shrinking gradient; one along an
    unbounded ridge (a scale to 0) gains ``log p`` at a steady rate while the
    curvature across the ridge, and so the gradient, grows without end.
    """
    if len(lps) - first <= UNBOUNDED_WINDOW or g_max < UNBOUNDED_GRAD_GROWTH * g_low:
        return False
    if float(positions[-1].abs().max()) <= UNBOUNDED_U:
        return False
    return float(lps[-1] - lps[-1 - UNBOUNDED_WINDOW]) > 1.0


def unbounded_message(potential: Potential, path: LbfgsPath) -> str:
    """One line: which site ran off, how far ``log p`` rose, and what to do instead."""
    moved = (path.positions[-1] - path.positions[0]).abs()
    i = int(moved.argmax())
    block = next(b for b in potential.blocks if b.start <= i < b.start + b.size)
    site = block.name if block.size == 1 else f"{block.name}[{i - block.start}]"
    u_end = float(path.positions[-1][i])
    return (
        f"the density is unbounded along {site} (unconstrained value {u_end:.3g} after "
        f"{path.num_iters} iterations, log density {float(path.log_densities[0]):.4g} -> "
        f"{float(path.log_densities[-1]):.4g} and still rising, max |gradient| "
        f"{path.grad_max:.2g}): no mode exists (typically a hierarchical scale going to 0 "
        "in a centered model); use a non-centered model or a guide other than "
        "auto_delta/auto_laplace"
    )


def resolve_inits(
    potential: Potential, num_inits: int, seed: int, init: torch.Tensor | np.ndarray | None = None
) -> torch.Tensor:
    """Starting points ``(num_inits, dim)``: ``init`` (or the prior median), then random.

    The random ones are Uniform(-2, 2) per unconstrained coordinate (Stan's default).
    """
    first = potential.init_values if init is None else torch.as_tensor(init, dtype=potential.dtype)
    if first.shape != (potential.dim,):
        raise OptionError(
            f"init must have shape ({potential.dim},) (the flat unconstrained latents "
            f"{', '.join(potential.site_names())}), got {tuple(first.shape)}"
        )
    if num_inits == 1:
        return first[None]
    return torch.cat([first[None], potential.random_inits(num_inits - 1, seed)])


def find_mode(
    model: Callable | str | Any,
    data: Mapping[str, Any] | None = None,
    *,
    num_inits: int = 4,
    init: torch.Tensor | np.ndarray | None = None,
    seed: int = 0,
    max_iters: int = 1000,
    history_size: int = 100,
    gtol: float = 1e-8,
    ftol: float = 1e-13,
    dtype: torch.dtype = torch.float64,
    jacobian: bool = True,
    potential: Potential | None = None,
    max_evals: int | None = None,
) -> ModeResult:
    """The mode of a model's unconstrained log density, by L-BFGS from several starts.

    Parameters
    ----------
    model : callable, str or CatalogEntry
        A Pyro model called as ``model(**data)``, or a catalog name or entry.
    data : dict, optional
        The model's data (a catalog entry's by default).
    num_inits : int
        Starts: ``init`` (default: the prior median), then Uniform(-2, 2) points.
    init : array, shape (dim,), optional
        The first start (flat unconstrained).
    seed : int
        Seed of the random starts, and of the prior draws that estimate the
        prior median (when the potential is built here; see :func:`make_potential`).
        The global random state is neither read nor changed, so the same seed
        gives the same mode in every process.
    max_iters, history_size, gtol, ftol
        See :func:`lbfgs_run`; the memory defaults to torch's 100 pairs, which
        makes L-BFGS a full BFGS on posteriors of up to 100 dimensions (on a
        26-parameter regression with near-collinear features, memory 10 needed
        over 1000 iterations per start, memory 100 a few dozen).
    dtype : torch.dtype
        float64 (default) or float32.
    jacobian : bool
        True: the mode of the unconstrained density (Laplace's centre);
        False: the constrained MAP (``AutoDelta``'s objective).
    potential : Potential, optional
        Reuse a potential built by :func:`make_potential` (then ``model``,
        ``data``, ``dtype`` and ``jacobian`` are ignored).
    max_evals : int, optional
        Evaluations per start at most (see :func:`lbfgs_run`).

    Returns
    -------
    ModeResult
        The best run's end point; ``report.message`` says whether the runs agree.
        A run that finds the density unbounded ends the search: the result is
        that run's end point, ``report.converged`` False and ``report.unbounded``
        and ``report.message`` say along which site.
    """
    check_option("num_inits", num_inits, kind=int, low=1)
    check_option("max_iters", max_iters, kind=int, low=1)
    check_option("history_size", history_size, kind=int, low=1)
    check_option("seed", seed, kind=int, low=0)
    if potential is None:
        potential = potential_for(model, data, dtype=dtype, jacobian=jacobian, seed=seed)
    t0 = time.perf_counter()
    starts = resolve_inits(potential, num_inits, seed, init)
    found: list[LbfgsPath] = []
    for s in starts:
        found.append(
            lbfgs_run(
                potential,
                s,
                max_iters=max_iters,
                history_size=history_size,
                gtol=gtol,
                ftol=ftol,
                max_evals=max_evals,
            )
        )
        if found[-1].reason == UNBOUNDED:  # no mode exists: other starts cannot find one
            break
    paths = tuple(found)
    runs = tuple(
        RunReport(
            i,
            float(p.log_densities[-1]),
            p.grad_max,
            p.num_iters,
            p.num_evals,
            p.reason,
            p.converged,
        )
        for i, p in enumerate(paths)
    )
    finite = [i for i, r in enumerate(runs) if math.isfinite(r.log_density)]
    if not finite:
        raise OptionError(
            f"L-BFGS found no finite log density from {num_inits} start(s); give an init "
            "inside the support or check the model"
        )
    unbounded = next((i for i, p in enumerate(paths) if p.reason == UNBOUNDED), None)
    best = (
        unbounded
        if unbounded is not None
        else max(finite, key=lambda i: (runs[i].converged, runs[i].log_density))
    )
    path = paths[best]
    u = path.positions[-1]
    lp = float(path.log_densities[-1])
    same = sum(
        1
        for r in runs
        if math.isfinite(r.log_density) and abs(r.log_density - lp) <= 1e-6 * max(1.0, abs(lp))
    )
    r = runs[best]
    msg = (
        f"{'converged' if r.converged else 'NOT converged'} ({r.reason}) after {r.num_iters} "
        f"iterations, {r.num_evals} evaluations: log density {lp:.6g}, max |gradient| "
        f"{r.grad_max:.2g}; {same} of {num_inits} start(s) reached it"
    )
    if same < len(finite):
        msg += " (the others ended elsewhere: several modes or unfinished runs)"
    note = None
    if unbounded is not None:
        note = unbounded_message(potential, path)
        msg = (
            f"NOT converged: {note}; start {best + 1} of {num_inits}, {r.num_evals} "
            "evaluations (the other starts were not run)"
        )
    report = ModeReport(
        r.converged,
        msg,
        runs,
        best,
        sum(p.num_evals for p in paths),
        time.perf_counter() - t0,
        note,
    )
    with torch.no_grad():
        values = {k: v.detach().cpu().numpy().copy() for k, v in potential.constrain(u).items()}
    return ModeResult(u, values, lp, report, potential, paths)


def potential_for(
    model: Callable | str | Any,
    data: Mapping[str, Any] | None,
    *,
    dtype: torch.dtype = torch.float64,
    jacobian: bool = True,
    seed: int = 0,
) -> Potential:
    """:func:`make_potential` for a catalog name or entry, or a model with its data.

    Resolved as a fit resolves it (:func:`vimodels.resolve.resolve_model`), so a
    user's model gets the same checks and adaptations (positional-only
    arguments, sites that cannot be sampled).
    """
    _, fn, data_dict, _ = resolve_model(model, data)
    return make_potential(fn, data_dict, dtype=dtype, jacobian=jacobian, seed=seed)
