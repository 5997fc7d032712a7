"""Hand-written guides for the breast-cancer logistic regression.

- ``mean_field``: independent Normals for the intercept and each coefficient.
- ``full_rank``: one Gaussian over the intercept and all coefficients; the
  posterior of nearly collinear features (radius, perimeter, area) is strongly
  correlated, which only this guide can represent.

Both start at zero (the prior mean) with sd ``init_scale``.
"""

from __future__ import annotations

from collections.abc import Callable

from guides import _blocks
from guides._blocks import Site
from guides.spec import GuideSpec, handwritten

FAMILY = "breast_cancer_logistic_regression"


def _sites(num_features: int) -> list[Site]:
    return [Site("intercept"), Site("beta", shape=(num_features,))]


def _factory(kind: str) -> Callable:
    block = _blocks.mean_field if kind == "mean_field" else _blocks.full_rank

    def factory(model: Callable, data: dict, init_scale: float = 0.1, **_) -> Callable:
        sites = _sites(int(data["X"].shape[-1]))
        return _blocks.keyword_guide(lambda: block(kind, sites, {}, init_scale))

    return factory


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the logistic regression."""
    return (
        handwritten(
            "mean_field",
            _factory("mean_field"),
            "independent Normals for the intercept and each coefficient",
            FAMILY,
        ),
        handwritten(
            "full_rank",
            _factory("full_rank"),
            "one full-rank Gaussian over the intercept and coefficients",
            FAMILY,
        ),
    )
