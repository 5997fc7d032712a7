"""Neal's funnel: a prior-only stress test with known marginals.

``v ~ Normal(0, 3)`` and ``x_i | v ~ Normal(0, exp(v / 2))``. There is no data,
so the "posterior" is the prior: exact draws are cheap, the log evidence is 0,
and the neck of the funnel defeats mean-field and full-rank Gaussians in known
ways (they under-disperse ``v``).
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from vimodels.catalog.base import CatalogEntry, ExactPosterior, NutsSettings

DIM = 4
V_SCALE = 3.0


def funnel(dim: int = DIM) -> None:
    """Neal's funnel with ``dim`` dependent coordinates.

    Parameters
    ----------
    dim : int
        Number of ``x`` coordinates (event shape ``(dim,)``).
    """
    v = pyro.sample("v", dist.Normal(0.0, V_SCALE))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (dim,))
    pyro.sample("x", dist.Normal(torch.zeros_like(scale), scale).to_event(1))


def exact_posterior(data: dict) -> ExactPosterior:
    """Exact marginals: ``v`` Normal(0, 3); ``x_i`` mean 0, sd ``exp(9 / 4)``; log Z = 0."""
    dim = int(data.get("dim", DIM))
    sd_x = float(np.exp(V_SCALE**2 / 4))  # Var x = E[exp(v)] = exp(9 / 2)

    def sampler(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        v = rng.normal(0.0, V_SCALE, size=n)
        x = rng.standard_normal((n, dim)) * np.exp(v / 2)[:, None]
        return {"v": v, "x": x}

    return ExactPosterior(
        mean={"v": np.zeros(()), "x": np.zeros(dim)},
        sd={"v": np.full((), V_SCALE), "x": np.full(dim, sd_x)},
        cov=None,
        log_evidence=0.0,
        sampler=sampler,
    )


def load_funnel() -> dict:
    """No data: only the static dimension."""
    return {"dim": DIM}


NEALS_FUNNEL = CatalogEntry(
    name="neals_funnel",
    description=(
        "synthetic_ Neal's funnel, v ~ N(0, 3), 4 coordinates x_i ~ N(0, exp(v/2)); "
        "exact marginals, log Z = 0"
    ),
    model=funnel,
    loader=load_funnel,
    sites=("v", "x"),
    family="neals_funnel",
    nuts=NutsSettings(
        num_warmup=1000, num_samples=1000, num_chains=4, target_accept_prob=0.95, metric="diag"
    ),
    exact=exact_posterior,
    default_guides=("mean_field", "full_rank", "structured"),
    max_plate_nesting=0,
)
