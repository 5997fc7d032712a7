"""The model registry: a plain dict built from explicit imports."""

from __future__ import annotations

from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.conjugate import CONJUGATE_LINEAR_REGRESSION
from vimodels.catalog.eight_schools import EIGHT_SCHOOLS_CENTERED, EIGHT_SCHOOLS_NONCENTERED
from vimodels.catalog.funnel import NEALS_FUNNEL
from vimodels.catalog.vae import DIGITS_VAE
from vimodels.errors import UnknownNameError

_ENTRIES: tuple[CatalogEntry, ...] = (
    EIGHT_SCHOOLS_CENTERED,
    EIGHT_SCHOOLS_NONCENTERED,
    CONJUGATE_LINEAR_REGRESSION,
    NEALS_FUNNEL,
    DIGITS_VAE,
)

MODELS: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}
assert len(MODELS) == len(_ENTRIES), "catalog names must be unique"


def get_model(name: str) -> CatalogEntry:
    """Return the catalog entry called ``name`` (raises UnknownNameError listing valid names)."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("model", name, MODELS) from None


def list_models() -> list[str]:
    """Names of all registered models, in registration order."""
    return list(MODELS)
