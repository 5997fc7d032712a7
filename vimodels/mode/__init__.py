"""Optimizer-based inference: L-BFGS modes, the Laplace approximation, Pathfinder.

- :func:`find_mode`: the mode of a model's unconstrained log density by L-BFGS
  (strong Wolfe, float64, several starts, a convergence report);
- :func:`laplace`: a Gaussian at the mode with the exact Hessian, checked
  positive definite (:class:`~vimodels.errors.CurvatureError` names the direction);
- :func:`pathfinder`: multi-path Pathfinder (Zhang et al. 2022);
- :func:`nested_laplace`: Gaussians of the latents at the grid points of a few
  hyperparameters (R-INLA's grid integration).

``vimodels.fit(model, guide="pathfinder" | "auto_laplace" | "auto_delta")`` runs
them as a fit, and ``init="laplace" | "pathfinder"`` starts SVI from them.
This package does not import :mod:`diagnostics`.
"""

from vimodels.mode.laplace import Gaussian, LaplaceResult, laplace
from vimodels.mode.lbfgs import ModeReport, ModeResult, find_mode
from vimodels.mode.nested import NestedLaplaceResult, nested_laplace
from vimodels.mode.pathfinder import PathfinderResult, pathfinder
from vimodels.mode.potential import Potential, make_potential

__all__ = [
    "Gaussian",
    "LaplaceResult",
    "ModeReport",
    "ModeResult",
    "NestedLaplaceResult",
    "PathfinderResult",
    "Potential",
    "find_mode",
    "laplace",
    "make_potential",
    "nested_laplace",
    "pathfinder",
]
