"""Hand-written guides for the sleep-study random-slopes model.

Unconstrained coordinates: ``intercept``, ``slope``, ``log tau`` (2), the one
free coordinate of the 2 x 2 correlation Cholesky factor ``L_omega``,
``log sigma``, and the subject effects ``b`` (18 x 2). Guides
start from least-squares estimates (pooled line, spread of per-subject lines,
residual sd).

- ``mean_field``: independent Normals.
- ``full_rank``: one Gaussian over all 42 coordinates.
- ``structured``: a full-rank Gaussian over the six global coordinates and,
  given them, ``b_j`` from its exact conditional posterior: with
  ``Sigma = S S'``, ``S = diag(tau) L_omega``, and the subject's design
  ``X_j = [1, day]``, the model is linear-Gaussian in ``b_j``, whose
  conditional precision is ``Sigma^-1 + X_j' X_j / sigma^2`` and mean
  ``precision^-1 X_j' (y_j - X_j [intercept, slope]) / sigma^2``.
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

FAMILY = "sleepstudy_random_slopes"


def _globals() -> list[Site]:
    return [
        Site("intercept"),
        Site("slope"),
        Site("tau", constraints.positive, (2,)),
        Site("L_omega", constraints.corr_cholesky, (2, 2)),
        Site("sigma", constraints.positive),
    ]


def _locals(num_subjects: int) -> list[Site]:
    return [Site("b", constraints.real, (2,), plate="subjects", plate_size=num_subjects)]


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
        "intercept": pooled[0],
        "slope": pooled[1],
        "tau": tau.log(),
        "L_omega": torch.zeros(1),
        "sigma": sigma.log(),
        "z": (per_subject - pooled) / tau,
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
    """Exact ``p(b_j | globals, y)``: mean (..., J, 2) and precision (..., J, 2, 2)."""
    scale_tril = g["tau"].unsqueeze(-1) * g["L_omega"]  # (..., 1, 2, 2) under particles
    eye = torch.eye(2, dtype=xtx.dtype)
    s_inv = torch.linalg.solve_triangular(scale_tril, eye.expand_as(scale_tril), upper=False)
    prior_precision = s_inv.transpose(-1, -2) @ s_inv
    fixed = torch.stack([g["intercept"], g["slope"]], dim=-1).unsqueeze(-1)  # (..., 1, 2, 1)
    prec_y = g["sigma"].pow(-2)[..., None, None]
    resid = xty.unsqueeze(-1) - xtx @ fixed  # X'(y - X b): (..., J, 2, 1)
    precision = prior_precision + xtx * prec_y
    loc = torch.linalg.solve(precision, resid * prec_y).squeeze(-1)
    return loc, precision


def _structured(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    num = int(data["num_subjects"])
    xtx, xty = subject_stats(data)
    init = _initial(data)

    def body() -> None:
        g = _blocks.full_rank("structured.global", _globals(), init, init_scale)
        loc, precision = b_conditional(g, xtx, xty)
        with pyro.plate("subjects", num, dim=-1):
            pyro.sample("b", dist.MultivariateNormal(loc, precision_matrix=precision))

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
