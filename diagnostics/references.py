"""The reference for a model, by kind: exact draws, NUTS (cached, checked), or external draws.

:func:`get_reference` chooses: a catalog entry's closed-form sampler where it
has one (``auto``/``exact``), the project's NUTS (:func:`run_nuts`), a
reparameterized equivalent where the catalog names one, or posteriordb's Stan
draws for the validation suite (``external``). A NUTS reference that fails its
checks is retried on the model with its centered sites decentered
(:mod:`diagnostics.reparam`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diagnostics.external import external_reference
from diagnostics.nuts.reference import (
    EXACT_KIND,
    NUTS_KIND,
    Reference,
    exact_reference,
    reparameterized_reference,
    run_nuts,
)
from diagnostics.reparam import retry_reparameterized
from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.registry import get_model
from vimodels.errors import OptionError


def get_reference(
    model: str | CatalogEntry | Callable,
    data: Mapping[str, Any] | None = None,
    *,
    kind: str = "auto",
    reparam: bool = True,
    **nuts_options: Any,
) -> Reference:
    """The reference for a model: exact draws where a closed-form sampler exists, else NUTS.

    Parameters
    ----------
    model, data
        As for :func:`run_nuts`.
    kind : str
        ``"auto"``, ``"nuts"``, ``"exact"`` or ``"external"`` (a validation entry's
        posteriordb draws, :func:`diagnostics.external.external_reference`).
    reparam : bool
        When NUTS on the model as written fails its checks with divergences, R-hat
        or E-BFMI, retry it with its centered location-scale sites decentered
        (:func:`diagnostics.reparam.retry_reparameterized`) and use that reference
        if it passes; its ``reference_from`` says so.
    **nuts_options
        Passed to :func:`run_nuts` (``settings``, ``seed``, ``cache_dir`` ...); for exact
        draws only ``seed`` is used.
    """
    if kind == "external":  # posteriordb's draws, for the validation suite's pdb_* entries
        return external_reference(model)
    if kind not in ("auto", NUTS_KIND, EXACT_KIND):
        raise OptionError(f"reference kind must be auto, nuts, exact or external, got {kind!r}")
    entry = (
        get_model(model)
        if isinstance(model, str)
        else (model if isinstance(model, CatalogEntry) else None)
    )
    has_exact = (
        entry is not None
        and data is None
        and entry.exact is not None
        and entry.exact_posterior().sampler is not None
    )
    if kind == EXACT_KIND or (kind == "auto" and has_exact):
        if entry is None or not has_exact:
            raise OptionError(
                "exact reference draws need a catalog entry with an exact "
                "posterior sampler (and its own data)"
            )
        return exact_reference(entry, seed=nuts_options.get("seed", 0))
    if entry is not None and data is None and entry.reference_from is not None:
        return reparameterized_reference(entry, run_nuts(entry.reference_from, **nuts_options))
    ref = run_nuts(model, data, **nuts_options)
    return retry_reparameterized(model, data, ref, **nuts_options) if reparam else ref
