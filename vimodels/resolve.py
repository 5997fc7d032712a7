"""The one place a model argument becomes ``(entry, model function, checked data, name)``.

A catalog name, a catalog entry or a user's Pyro function: fits
(:func:`vimodels.svi.binding.bind`), NUTS references, mode finding and the
command line all resolve their model here, so they see the same checked data
and the same adaptations of a user's model (:mod:`vimodels.adapt`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vimodels.adapt import adapt_model, keyword_model
from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.registry import get_model
from vimodels.data import prepare_data
from vimodels.errors import OptionError


def resolve_model(
    model: str | CatalogEntry | Callable, data: Mapping | None = None
) -> tuple[CatalogEntry | None, Callable, dict, str]:
    """``(entry or None, model function, checked data, name)`` for a name, entry or function.

    Raises
    ------
    UnknownNameError, OptionError, DataError
        For an unknown catalog name, a non-model argument or bad data.
    """
    if isinstance(model, str):
        entry = get_model(model)
    elif isinstance(model, CatalogEntry):
        entry = model
    elif callable(model):
        name = getattr(model, "__name__", "user_model")
        fn = keyword_model(model)
        data_dict = prepare_data(fn, data)
        return None, adapt_model(fn, data_dict), data_dict, name
    else:
        raise OptionError(
            f"model must be a catalog name, a CatalogEntry or a Pyro model function, "
            f"got {type(model).__name__}"
        )
    base = entry.data()
    if data is not None:
        base.update(data)
    return entry, entry.model, prepare_data(entry.model, base), entry.name
