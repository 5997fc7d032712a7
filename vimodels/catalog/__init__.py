"""Model catalog: Pyro models bound to their data."""

from vimodels.catalog.base import CatalogEntry, ExactPosterior, NutsSettings
from vimodels.catalog.registry import MODELS, get_model, list_models

__all__ = ["CatalogEntry", "ExactPosterior", "NutsSettings", "MODELS", "get_model", "list_models"]
