"""The Laplace approximation: a Gaussian at the mode with the exact Hessian's inverse.

In unconstrained space, ``q(u) = N(u*, H^-1)`` with ``u*`` the mode of the log
density (log-Jacobian included) and ``H = -d^2 log p / du^2`` at ``u*`` by
autograd (exact; ``dim`` gradient evaluations through a double backward).
``H`` must be positive definite; if it is not, :class:`~vimodels.errors.CurvatureError`
names the direction of the most negative curvature (the site element with
the largest weight in that eigenvector).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vimodels.errors import CurvatureError, OptionError, check_option
from vimodels.mode.lbfgs import ModeResult, find_mode, potential_for
from vimodels.mode.potential import Potential

# Above this many unconstrained dimensions the exact Hessian (dim backward passes,
# dim^2 memory) is refused unless max_dim is raised.
MAX_HESSIAN_DIM = 2000


@dataclass(frozen=True)
class Gaussian:
    """A Gaussian over the flat unconstrained latents.

    Attributes
    ----------
    loc : Tensor, shape (dim,)
    scale_tril : Tensor, shape (dim, dim)
        Lower Cholesky factor of the covariance.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor

    @property
    def cov(self) -> torch.Tensor:
        """Covariance, shape (dim, dim)."""
        return self.scale_tril @ self.scale_tril.T

    @property
    def sd(self) -> torch.Tensor:
        """Marginal standard deviations, shape (dim,)."""
        return self.scale_tril.pow(2).sum(-1).sqrt()


@dataclass(frozen=True)
class LaplaceResult:
    """A Laplace approximation.

    Attributes
    ----------
    gaussian : Gaussian
        ``N(mode, H^-1)`` in unconstrained space.
    hessian : Tensor, shape (dim, dim)
        ``-d^2 log p / du^2`` at the mode (the precision).
    mode : ModeResult
    potential : Potential
    """

    gaussian: Gaussian
    hessian: torch.Tensor = field(repr=False)
    mode: ModeResult = field(repr=False)
    potential: Potential = field(repr=False)

    @property
    def loc(self) -> torch.Tensor:
        """The mode, shape (dim,)."""
        return self.gaussian.loc

    @property
    def cov(self) -> torch.Tensor:
        """``H^-1``, shape (dim, dim)."""
        return self.gaussian.cov


def negative_hessian(
    potential: Potential, u: torch.Tensor, max_dim: int = MAX_HESSIAN_DIM
) -> torch.Tensor:
    """``-d^2 log p / du^2`` at ``u`` by autograd, symmetrized, shape (dim, dim).

    Raises
    ------
    OptionError
        If ``potential.dim > max_dim`` (the fix: raise ``max_dim``, or use Pathfinder,
        whose curvature estimate is low rank).
    """
    if potential.dim > max_dim:
        raise OptionError(
            f"the exact Hessian of {potential.dim} unconstrained dimensions exceeds "
            f"max_dim={max_dim} ({potential.dim} backward passes, {potential.dim}^2 numbers); "
            "pass a larger max_dim, or use Pathfinder (guide='pathfinder'), whose inverse-"
            "Hessian estimate is low rank"
        )
    u = u.detach().to(potential.dtype)
    h = torch.autograd.functional.hessian(lambda v: -potential.log_density(v), u)
    return 0.5 * (h + h.T)


def check_positive_definite(
    precision: torch.Tensor, potential: Potential, rtol: float | None = None
) -> torch.Tensor:
    """The lower Cholesky factor of ``precision``, or a :class:`CurvatureError`.

    ``precision`` counts as positive definite when its smallest eigenvalue
    exceeds ``rtol`` times its largest (default: ``dim`` times the dtype's
    machine epsilon). Otherwise the error names the eigenvalue and the site
    element carrying the largest weight of its eigenvector: the direction in
    which the log density is flat or curves upward.
    """
    dim = precision.shape[0]
    if rtol is None:
        rtol = dim * float(torch.finfo(precision.dtype).eps)
    if not bool(torch.isfinite(precision).all()):
        bad = int((~torch.isfinite(precision)).any(-1).nonzero()[0])
        raise CurvatureError(
            f"the Hessian at the mode is not finite (first in {potential.describe(bad)}); "
            "the mode may sit on the edge of the support: check the model's constraints"
        )
    evals, evecs = torch.linalg.eigh(precision)
    top = float(evals[-1].abs())
    if float(evals[0]) > rtol * max(top, 1e-300):
        return torch.linalg.cholesky(precision)
    weights = evecs[:, 0]
    worst = int(weights.abs().argmax())
    where = potential.describe(worst)
    share = float(weights[worst] ** 2)
    num_bad = int((evals <= rtol * max(top, 1e-300)).sum())
    raise CurvatureError(
        f"the Hessian of the negative log density at the mode is not positive definite: "
        f"{num_bad} of {dim} eigenvalue(s) <= 0 (smallest {float(evals[0]):.3g}, largest "
        f"{float(evals[-1]):.3g}); the most negative direction is mostly {where} "
        f"({share:.0%} of its weight). The point is not a strict mode there: the run "
        "stopped early, or the posterior is flat or unbounded in that direction "
        "(an unidentified parameter, a funnel). Check the mode report, give that site a "
        "proper prior or reparameterize it, or fit with SVI or Pathfinder instead"
    )


def laplace_from_mode(
    mode: ModeResult, max_dim: int = MAX_HESSIAN_DIM, rtol: float | None = None
) -> LaplaceResult:
    """The Laplace approximation at an already found mode (see :func:`laplace`)."""
    potential = mode.potential
    if not potential.jacobian:
        raise OptionError(
            "the Laplace approximation needs the mode of the unconstrained density: "
            "find it with jacobian=True"
        )
    h = negative_hessian(potential, mode.u, max_dim)
    chol = check_positive_definite(h, potential, rtol)
    # covariance factor: H = C C^T  =>  H^-1 = C^-T C^-1; its lower Cholesky factor
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    cov = torch.cholesky_inverse(chol)
    cov = 0.5 * (cov + cov.T)
    try:
        scale_tril = torch.linalg.cholesky(cov)
    except RuntimeError:  # badly conditioned: go through the triangular inverse
        inv_c = torch.linalg.solve_triangular(chol, eye, upper=False)
        q, r = torch.linalg.qr(inv_c)  # C^-T = Q R  =>  cov = R^T R
        scale_tril = (r * torch.sign(torch.diagonal(r))[:, None]).T
    return LaplaceResult(Gaussian(mode.u.detach(), scale_tril), h, mode, potential)


def laplace(
    model: Callable | str | Any,
    data: Mapping[str, Any] | None = None,
    *,
    mode: ModeResult | None = None,
    max_dim: int = MAX_HESSIAN_DIM,
    dtype: torch.dtype = torch.float64,
    **mode_options: Any,
) -> LaplaceResult:
    """The Laplace approximation of a model's posterior in unconstrained space.

    Parameters
    ----------
    model : callable, str or CatalogEntry
        As for :func:`~vimodels.mode.lbfgs.find_mode`.
    data : dict, optional
    mode : ModeResult, optional
        A mode already found (with ``jacobian=True``); else :func:`find_mode` runs.
    max_dim : int
        Largest dimension for the exact Hessian.
    dtype : torch.dtype
        float64 by default.
    **mode_options
        Passed to :func:`find_mode` (``num_inits``, ``seed``, ``max_iters`` ...).

    Returns
    -------
    LaplaceResult

    Raises
    ------
    CurvatureError
        If the Hessian at the mode is not positive definite (names the direction).
    OptionError
        If the dimension exceeds ``max_dim``.
    """
    check_option("max_dim", max_dim, kind=int, low=1)
    if mode is None:
        seed = mode_options.get("seed", 0)
        potential = potential_for(model, data, dtype=dtype, jacobian=True, seed=seed)
        if potential.dim > max_dim:
            negative_hessian(potential, potential.init_values, max_dim)  # raises
        mode = find_mode(None, potential=potential, **mode_options)
    return laplace_from_mode(mode, max_dim)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached float64 NumPy copy."""
    return t.detach().double().cpu().numpy().copy()
