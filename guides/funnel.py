"""Hand-written guides for Neal's funnel.

``structured`` uses the funnel's own conditional form,
``x | v ~ Normal(m, exp(a + b v))``, which contains the target (``m = 0``,
``a = 0``, ``b = 1/2``); the Gaussian families cannot bend into the neck.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from guides._blocks import Site, full_rank, normal_param
from guides.spec import GuideSpec, handwritten

FAMILY = "neals_funnel"


def _mean_field(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    dim = int(data.get("dim", 4))

    def guide(dim: int = dim) -> None:
        v_loc, v_scale = normal_param("mean_field.v", torch.tensor(0.0), init_scale)
        x_loc, x_scale = normal_param("mean_field.x", torch.zeros(dim), init_scale)
        pyro.sample("v", dist.Normal(v_loc, v_scale))
        pyro.sample("x", dist.Normal(x_loc, x_scale).to_event(1))

    return guide


def _full_rank(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    dim = int(data.get("dim", 4))
    sites = [Site("v"), Site("x", shape=(dim,))]

    def guide(dim: int = dim) -> None:
        full_rank("full_rank", sites, {}, init_scale)

    return guide


def _structured(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
    dim = int(data.get("dim", 4))

    def guide(dim: int = dim) -> None:
        v_loc, v_scale = normal_param("structured.v", torch.tensor(0.0), init_scale)
        m = pyro.param("structured.x_loc", torch.zeros(dim))
        a = pyro.param("structured.x_log_scale", torch.zeros(dim))
        b = pyro.param("structured.x_slope", torch.zeros(dim))
        v = pyro.sample("v", dist.Normal(v_loc, v_scale))
        scale = torch.exp(a + b * v.unsqueeze(-1))
        pyro.sample("x", dist.Normal(m.expand(scale.shape), scale).to_event(1))

    return guide


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the funnel."""
    return (
        handwritten(
            "mean_field",
            _mean_field,
            "independent Normals for v and x",
            FAMILY,
        ),
        handwritten(
            "full_rank",
            _full_rank,
            "full-rank Gaussian over (v, x)",
            FAMILY,
        ),
        handwritten(
            "structured",
            _structured,
            "q(v) q(x | v) with scale exp(a + b v)",
            FAMILY,
        ),
    )
