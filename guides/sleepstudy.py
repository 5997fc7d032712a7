"""Hand-written guides for the sleep-study random-slopes model.

Unconstrained coordinates (all in units of the prior scales): ``intercept_std``,
``slope_std``, ``log tau_std`` (2), the one free coordinate of the 2 x 2
correlation Cholesky factor ``L_omega``, ``log sigma_std``, and the subject
effects ``b_std = b / [50, 10]`` (18 x 2). Guides
start from least-squares estimates (pooled line, spread of per-subject lines,
residual sd).

- ``mean_field``: independent Normals.
- ``full_rank``: one Gaussian over all 42 coordinates.
- ``structured``: a full-rank Gaussian over the six global coordinates and,
  given them, ``b_j`` from its exact conditional posterior: with
  ``Sigma = S S'``, ``S = diag(tau) L_omega``, and the subject's design
  ``X_j = [1, day]``, the model is linear-Gaussian in ``b_j``, whose
  conditional precision is ``Sigma^-1 + X_j' X_j / sigma^2`` and mean
  ``precision^-1 X_j' (y_j - X_j [intercept, slope]) / sigma^2``, mapped to
  ``b_std`` by the fixed scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from guides import _blocks
from guides._blocks import Site
from guides.spec import GuideSpec
from vimodels.catalog.sleepstudy import INTERCEPT_PRIOR, SIGMA_SCALE, SLOPE_PRIOR, TAU_SCALE

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
    return [Site("b_std", constraints.real, (2,), plate="subjects", plate_size=num_subjects)]


def subject_stats(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-subject ``X_j'X_j`` (J, 2, 2) and ``X_j'y_j`` (J, 2) with ``X_j = [1, day]``."""
    subject, days, y = data["subject"], data["days"], data["reaction"]
    num = int(data["num_subjects"])
    design = torch.stack([torch.ones_like(days), days], dim=-1)  # (N, 2)
    xtx = torch.zeros(num, 2, 2).index_add_(0, subject, design.unsqueeze(-1) * design.unsqueeze(-2))
    xty = torch.zeros(num, 2).index_add_(0, subject, design * y.unsqueeze(-1))
    return xtx, xty


def _initial(data: dict) -> dict[str, torch.Tensor]:
    """Least-squares starting point in unconstrained space."""
    xtx, xty = subject_stats(data)
    pooled = torch.linalg.solve(xtx.sum(0), xty.sum(0))
    per_subject = torch.linalg.solve(xtx + 1e-3 * torch.eye(2), xty)  # (J, 2)
    tau = (per_subject - pooled).std(0).clamp(min=1.0)
    subject, days, y = data["subject"], data["days"], data["reaction"]
    fitted = per_subject[subject, 0] + per_subject[subject, 1] * days
    sigma = (y - fitted).std().clamp(min=1.0)
    return {
        "intercept_std": (pooled[0] - INTERCEPT_PRIOR[0]) / INTERCEPT_PRIOR[1],
        "slope_std": (pooled[1] - SLOPE_PRIOR[0]) / SLOPE_PRIOR[1],
        "tau_std": (tau / torch.tensor(TAU_SCALE)).log(),
        "L_omega": torch.zeros(1),
        "sigma_std": (sigma / SIGMA_SCALE).log(),
        "b_std": (per_subject - pooled) / torch.tensor(TAU_SCALE),
    }


def _mean_field(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    sites = _globals() + _locals(int(data["num_subjects"]))
    init = _initial(data)
    return _blocks.keyword_guide(lambda: _blocks.mean_field("mean_field", sites, init, init_scale))


def _full_rank(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    sites = _globals() + _locals(int(data["num_subjects"]))
    init = _initial(data)
    return _blocks.keyword_guide(lambda: _blocks.full_rank("full_rank", sites, init, init_scale))


def b_conditional(
    g: dict[str, torch.Tensor], xtx: torch.Tensor, xty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``p(b_std_j | globals, y)``: mean (..., J, 2) and precision (..., J, 2, 2).

    With ``b = D b_std``, ``D = diag(50, 10)``, the subject's regression is
    ``y_j - X_j [intercept, slope] = X_j D b_std_j + noise``.
    """
    d = xtx.new_tensor(TAU_SCALE)
    scale_tril = g["tau_std"].unsqueeze(-1) * g["L_omega"]  # (..., 1, 2, 2) under particles
    eye = torch.eye(2, dtype=xtx.dtype)
    s_inv = torch.linalg.solve_triangular(scale_tril, eye.expand_as(scale_tril), upper=False)
    prior_precision = s_inv.transpose(-1, -2) @ s_inv
    intercept = INTERCEPT_PRIOR[0] + INTERCEPT_PRIOR[1] * g["intercept_std"]
    slope = SLOPE_PRIOR[0] + SLOPE_PRIOR[1] * g["slope_std"]
    fixed = torch.stack([intercept, slope], dim=-1).unsqueeze(-1)  # (..., 1, 2, 1)
    prec_y = (SIGMA_SCALE * g["sigma_std"]).pow(-2)[..., None, None]
    resid = xty.unsqueeze(-1) - xtx @ fixed  # X'(y - X b): (..., J, 2, 1)
    precision = prior_precision + xtx * (d.unsqueeze(-1) * d) * prec_y
    loc = torch.linalg.solve(precision, d.unsqueeze(-1) * resid * prec_y).squeeze(-1)
    return loc, precision


def _structured(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    num = int(data["num_subjects"])
    xtx, xty = subject_stats(data)
    init = _initial(data)

    def body() -> None:
        g = _blocks.full_rank("structured.global", _globals(), init, init_scale)
        loc, precision = b_conditional(g, xtx, xty)
        with pyro.plate("subjects", num, dim=-1):
            pyro.sample("b_std", dist.MultivariateNormal(loc, precision_matrix=precision))

    return _blocks.keyword_guide(body)


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the sleep-study model."""
    return (
        GuideSpec(
            "mean_field",
            _mean_field,
            "independent Normals in unconstrained space",
            families=(FAMILY,),
            discrete=False,
            options=("init_scale",),
        ),
        GuideSpec(
            "full_rank",
            _full_rank,
            "one full-rank Gaussian over all 42 coordinates",
            families=(FAMILY,),
            discrete=False,
            options=("init_scale",),
        ),
        GuideSpec(
            "structured",
            _structured,
            "full-rank Gaussian over the globals, subject effects from their exact "
            "conditional given them",
            families=(FAMILY,),
            discrete=False,
            options=("init_scale",),
        ),
    )
