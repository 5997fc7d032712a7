"""Hand-written guides for the Gaussian mixtures (enumerated and marginalized).

The guides cover the continuous sites only: ``weights`` (simplex, K - 1 free
coordinates by stick breaking), ``locs_first`` (ordered vector), ``locs_rest``
(D > 1) and ``scales_std`` (log scale). The ``assignment`` site is never
sampled: ``TraceEnum_ELBO`` sums it out exactly given the guide's draw of the
continuous sites, so the same guides serve both variants.

Starting point: the components split the data into K equal-count bins along
the first coordinate; each starts at its bin's mean and sd (standardized).

- ``mean_field``: independent Normals in unconstrained space.
- ``full_rank``: one Gaussian over all unconstrained coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions import constraints

from guides import _blocks
from guides._blocks import Site
from guides.spec import GuideSpec

FAMILY = "gaussian_mixture"


def _sites(num_components: int, dim: int, shared_scale: bool) -> list[Site]:
    K = num_components
    sites = [
        Site("weights", constraints.simplex, (K,)),
        Site("locs_first", constraints.ordered_vector, (K,)),
    ]
    if dim > 1:
        sites.append(Site("locs_rest", constraints.real, (K, dim - 1)))
    sites.append(Site("scales_std", constraints.positive, (1 if shared_scale else K, dim)))
    return sites


def _initial(data: dict, sites: list[Site]) -> dict[str, torch.Tensor]:
    """Equal-count bins along the first coordinate, standardized, as a start."""
    x = (data["x"] - data["center"]) / data["spread"]
    K = int(data["num_components"])
    order = x[:, 0].argsort()
    bins = [x[idx] for idx in torch.tensor_split(order, K)]
    means = torch.stack([b.mean(0) if len(b) else x.mean(0) for b in bins])  # (K, D)
    sds = torch.stack([b.std(0) if len(b) > 1 else x.std(0) for b in bins]).clamp(min=0.05)
    if data.get("shared_scale", False):
        sds = sds.pow(2).mean(0, keepdim=True).sqrt()
    first = means[:, 0].cummax(0).values + 1e-3 * torch.arange(K)  # strictly increasing
    values = {
        "weights": torch.full((K,), 1.0 / K),
        "locs_first": first,
        "locs_rest": means[:, 1:],
        "scales_std": sds,
    }
    return {s.name: s.unconstrain(values[s.name]) for s in sites}


def _factory(kind: str) -> Callable:
    block = _blocks.mean_field if kind == "mean_field" else _blocks.full_rank

    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        sites = _sites(
            int(data["num_components"]),
            int(data["center"].shape[-1]),
            bool(data.get("shared_scale", False)),
        )
        init = _initial(data, sites)
        return _blocks.keyword_guide(lambda: block(kind, sites, init, init_scale))

    return factory


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the Gaussian-mixture family (both variants)."""
    return (
        GuideSpec(
            "mean_field",
            _factory("mean_field"),
            "independent Normals over the unconstrained weights, locations and scales; "
            "assignments enumerated",
            families=(FAMILY,),
            discrete=True,
            options=("init_scale",),
        ),
        GuideSpec(
            "full_rank",
            _factory("full_rank"),
            "one full-rank Gaussian over the unconstrained weights, locations and "
            "scales; assignments enumerated",
            families=(FAMILY,),
            discrete=True,
            options=("init_scale",),
        ),
    )
