"""Hand-written guides for the sleep-study random-slopes model.

Unconstrained coordinates (see :mod:`vimodels.catalog.sleepstudy`):
``intercept_std``, ``slope_std``, ``log tau_std`` (2), the one free
coordinate of the 2 x 2 correlation Cholesky factor ``L_omega``,
``log sigma_std``, and the subject lines ``subject_std`` (18 x 2). Guides
start from least-squares estimates (pooled line, spread of per-subject lines,
residual sd).

- ``mean_field``: independent Normals.
- ``full_rank``: one Gaussian over all 42 coordinates.
- ``structured``: a full-rank Gaussian over the six global coordinates and,
  given them, each ``subject_std_j`` from its exact conditional posterior. In
  those coordinates a subject's data read ``y_ij - 250 = Z_ij subject_std_j +
  noise`` with ``Z_ij = (50, 10 (day_ij - 4.5))``, so with prior
  ``N(m, C)`` (:func:`~vimodels.catalog.sleepstudy.subject_prior`) the
  conditional precision is ``C^-1 + Z_j' Z_j / sigma^2`` and the mean
  ``precision^-1 (C^-1 m + Z_j' (y_j - 250) / sigma^2)``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from guides import _blocks
from guides._blocks import Site
from guides.spec import GuideSpec, handwritten
from vimodels.catalog.sleepstudy import (
    INTERCEPT_PRIOR,
    MID_DAY,
    ORIGIN,
    SIGMA_SCALE,
    SLOPE_PRIOR,
    TAU_SCALE,
    subject_prior,
)

FAMILY = "sleepstudy_random_slopes"


def _globals() -> list[Site]:
    return [
        Site("intercept_std"),
        Site("slope_std"),
        Site("tau_std", constraints.positive, (2,)),
        Site("L_omega", constraints.corr_cholesky, (2, 2)),
        Site("sigma_std", constraints.positive),
    ]


def _locals(num_subjects: int) -> list[Site]:
    return [Site("subject_std", constraints.real, (2,), plate="subjects", plate_size=num_subjects)]


def subject_stats(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-subject ``Z_j'Z_j`` (J, 2, 2) and ``Z_j'(y_j - 250)`` (J, 2).

    ``Z_ij = (50, 10 (day_ij - 4.5))``: the design in ``subject_std`` units.
    """
    subject, days, y = data["subject"], data["days"], data["reaction"]
    num = int(data["num_subjects"])
    design = torch.stack(
        [torch.full_like(days, TAU_SCALE[0]), TAU_SCALE[1] * (days - MID_DAY)], dim=-1
    )  # (N, 2)
    ztz = torch.zeros(num, 2, 2, dtype=days.dtype).index_add_(
        0, subject, design.unsqueeze(-1) * design.unsqueeze(-2)
    )
    zty = torch.zeros(num, 2, dtype=days.dtype).index_add_(
        0, subject, design * (y - ORIGIN).unsqueeze(-1)
    )
    return ztz, zty


def _initial(data: dict) -> dict[str, torch.Tensor]:
    """Least-squares starting point in unconstrained space."""
    subject, days, y = data["subject"], data["days"], data["reaction"]
    num = int(data["num_subjects"])
    design = torch.stack([torch.ones_like(days), days], dim=-1)
    xtx = torch.zeros(num, 2, 2, dtype=days.dtype).index_add_(
        0, subject, design.unsqueeze(-1) * design.unsqueeze(-2)
    )
    xty = torch.zeros(num, 2, dtype=days.dtype).index_add_(0, subject, design * y.unsqueeze(-1))
    pooled = torch.linalg.solve(xtx.sum(0), xty.sum(0))
    lines = torch.linalg.solve(xtx + 1e-3 * torch.eye(2, dtype=days.dtype), xty)  # (J, 2)
    scale = days.new_tensor(TAU_SCALE)
    tau = (lines - pooled).std(0).clamp(min=1.0)
    fitted = lines[subject, 0] + lines[subject, 1] * days
    sigma = (y - fitted).std().clamp(min=1.0)
    mid = torch.stack([lines[:, 0] + MID_DAY * lines[:, 1] - ORIGIN, lines[:, 1]], dim=-1)
    return {
        "intercept_std": (pooled[0] - INTERCEPT_PRIOR[0]) / INTERCEPT_PRIOR[1],
        "slope_std": (pooled[1] - SLOPE_PRIOR[0]) / SLOPE_PRIOR[1],
        "tau_std": (tau / scale).log(),
        "L_omega": torch.zeros(1, dtype=days.dtype),
        "sigma_std": (sigma / SIGMA_SCALE).log(),
        "subject_std": mid / scale,
    }


def _mean_field(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    sites = _globals() + _locals(int(data["num_subjects"]))
    init = _initial(data)
    return _blocks.keyword_guide(lambda: _blocks.mean_field("mean_field", sites, init, init_scale))


def _full_rank(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    sites = _globals() + _locals(int(data["num_subjects"]))
    init = _initial(data)
    return _blocks.keyword_guide(lambda: _blocks.full_rank("full_rank", sites, init, init_scale))


def covariance_tril(precision: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``precision^-1``, shape (..., n, n), as torch's MVN takes it.

    torch's own algorithm for ``precision_matrix=`` (the Cholesky factor of the
    flipped precision), with ``cholesky_ex`` in place of ``cholesky``: no error
    check reads the factorization's status back into Python, so a fit's step
    that draws from it can be compiled into one graph (:mod:`vimodels.compile.step`).
    A precision that is not positive definite (never, mathematically: the prior's
    precision plus a positive semi-definite term) gives NaN, which the first step's
    distribution validation rejects and the fit's NaN-loss check stops on later.
    """
    flipped, info = torch.linalg.cholesky_ex(torch.flip(precision, (-2, -1)))
    l_inv = torch.flip(flipped, (-2, -1)).transpose(-1, -2)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device).expand_as(
        l_inv
    )
    tril = torch.linalg.solve_triangular(l_inv, eye, upper=False)
    failed = (info > 0)[..., None, None]
    return torch.where(failed, torch.full_like(tril, float("nan")), tril)


def subject_conditional(
    g: dict[str, torch.Tensor], ztz: torch.Tensor, zty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``p(subject_std_j | globals, y)``: mean and covariance factor.

    Returns the mean (..., J, 2) and the lower Cholesky factor of the covariance
    (..., J, 2, 2) (:func:`covariance_tril` of the precision).
    """
    intercept = INTERCEPT_PRIOR[0] + INTERCEPT_PRIOR[1] * g["intercept_std"]
    slope = SLOPE_PRIOR[0] + SLOPE_PRIOR[1] * g["slope_std"]
    loc, scale_tril = subject_prior(intercept, slope, g["tau_std"], g["L_omega"])
    eye = torch.eye(2, dtype=ztz.dtype, device=ztz.device).expand_as(scale_tril)
    s_inv = torch.linalg.solve_triangular(scale_tril, eye, upper=False)
    prior_precision = s_inv.transpose(-1, -2) @ s_inv  # (..., 1, 2, 2) under particles
    prec_y = (SIGMA_SCALE * g["sigma_std"]).pow(-2)[..., None, None]
    precision = prior_precision + ztz * prec_y
    h = prior_precision @ loc.unsqueeze(-1) + zty.unsqueeze(-1) * prec_y
    tril = covariance_tril(precision)
    # the mean solves precision @ mean = h: mean = tril @ tril^T @ h (no solve, which
    # checks for a singular matrix by reading a value)
    mean = (tril @ (tril.transpose(-1, -2) @ h)).squeeze(-1)
    return mean, tril


def _structured(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    num = int(data["num_subjects"])
    ztz, zty = subject_stats(data)
    init = _initial(data)

    def body() -> None:
        g = _blocks.full_rank("structured.global", _globals(), init, init_scale)
        loc, tril = subject_conditional(g, ztz, zty)
        with pyro.plate("subjects", num, dim=-1):
            pyro.sample("subject_std", dist.MultivariateNormal(loc, scale_tril=tril))

    return _blocks.keyword_guide(body)


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the sleep-study model."""
    return (
        handwritten(
            "mean_field",
            _mean_field,
            "independent Normals in unconstrained space",
            FAMILY,
        ),
        handwritten(
            "full_rank",
            _full_rank,
            "one full-rank Gaussian over all 42 coordinates",
            FAMILY,
        ),
        handwritten(
            "structured",
            _structured,
            "full-rank Gaussian over the globals, subject lines from their exact "
            "conditional given them",
            FAMILY,
        ),
    )
