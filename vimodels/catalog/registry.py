"""The model registry: a plain dict built from explicit imports."""

from __future__ import annotations

from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.conjugate import CONJUGATE_LINEAR_REGRESSION
from vimodels.catalog.eight_schools import EIGHT_SCHOOLS_CENTERED, EIGHT_SCHOOLS_NONCENTERED
from vimodels.catalog.funnel import NEALS_FUNNEL
from vimodels.catalog.logistic import BREAST_CANCER_LOGISTIC_REGRESSION
from vimodels.catalog.mixture import (
    FAITHFUL_GAUSSIAN_MIXTURE,
    FAITHFUL_GAUSSIAN_MIXTURE_MARGINALIZED,
    GALAXIES_GAUSSIAN_MIXTURE,
    GALAXIES_GAUSSIAN_MIXTURE_MARGINALIZED,
)
from vimodels.catalog.radon import (
    RADON_CONTEXTUAL,
    RADON_VARYING_INTERCEPT_CENTERED,
    RADON_VARYING_INTERCEPT_NONCENTERED,
    RADON_VARYING_SLOPE,
)
from vimodels.catalog.sleepstudy import SLEEPSTUDY_RANDOM_SLOPES
from vimodels.catalog.vae import DIGITS_VAE
from vimodels.errors import UnknownNameError
from vimodels.validation.registry import VALIDATION_MODELS

_ENTRIES: tuple[CatalogEntry, ...] = (
    EIGHT_SCHOOLS_CENTERED,
    EIGHT_SCHOOLS_NONCENTERED,
    CONJUGATE_LINEAR_REGRESSION,
    NEALS_FUNNEL,
    RADON_VARYING_INTERCEPT_CENTERED,
    RADON_VARYING_INTERCEPT_NONCENTERED,
    RADON_VARYING_SLOPE,
    RADON_CONTEXTUAL,
    SLEEPSTUDY_RANDOM_SLOPES,
    GALAXIES_GAUSSIAN_MIXTURE,
    GALAXIES_GAUSSIAN_MIXTURE_MARGINALIZED,
    FAITHFUL_GAUSSIAN_MIXTURE,
    FAITHFUL_GAUSSIAN_MIXTURE_MARGINALIZED,
    BREAST_CANCER_LOGISTIC_REGRESSION,
    DIGITS_VAE,
)

MODELS: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}
assert len(MODELS) == len(_ENTRIES), "catalog names must be unique"


def get_model(name: str) -> CatalogEntry:
    """Return the catalog entry called ``name`` (raises UnknownNameError listing valid names).

    ``pdb_*`` names resolve to the validation suite (:mod:`vimodels.validation`).
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        if isinstance(name, str) and name in VALIDATION_MODELS:
            return VALIDATION_MODELS[name]
        raise UnknownNameError("model", name, MODELS) from None


def list_models() -> list[str]:
    """Names of all registered models, in registration order."""
    return list(MODELS)
