"""A second NUTS try for a reference that fails its checks: the model decentered by Pyro.

A model written the natural way (a horseshoe regression's ``beta ~ Normal(0, tau *
lam)``, a hierarchical model's ``theta ~ Normal(mu, tau)``) has a funnel for a
posterior: NUTS diverges in its neck, its chains disagree and the reference is
rightly UNTRUSTED. The same posterior written non-centered samples well.
:func:`retry_reparameterized` reruns NUTS on the user's model under
``poutine.reparam`` with ``LocScaleReparam(centered=0)`` on each latent
location-scale site (Normal, StudentT, Cauchy, Laplace, ...; real support) whose
location or scale depends on another latent site (found, and the model built,
by :mod:`vimodels.svi.reparam`, which ``fit(..., reparam="decenter")`` uses too).
The reparameterized model draws ``<site>_decentered`` and records each
original site as a deterministic function of it, so its draws map back onto the
user's sites exactly.

The retry is checked like any reference (R-hat, bulk and tail ESS, divergences,
E-BFMI) and used only when it passes; it is cached under its own key (the
reparameterized model's fingerprint names the decentered sites). Every output
says where the draws came from: :attr:`Reference.reference_from`, shown by
``describe()``, ``summary()``, the report, ``summary.csv`` and the netcdf attrs.
When the retry fails too, the first reference stands, untrusted, with both
described in its notes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

from diagnostics.nuts.reference import (
    NUTS_KIND,
    Reference,
    _settings_for,
    rebadged,
    run_nuts,
)
from vimodels.catalog.base import CatalogEntry
from vimodels.resolve import resolve_model
from vimodels.svi.draws import ModelInfo, model_info
from vimodels.svi.reparam import (
    DECENTERING,
    decentering_sites,
    reparam_settings,
    reparameterized_model,
)

# checks whose failure points at the posterior's geometry (a funnel), not at too few draws
_GEOMETRY_CHECKS = ("divergences", "rhat", "ebfmi")


def reparam_label(sites: tuple[str, ...]) -> str:
    """``"reference from the reparameterized model (<DECENTERING>, on: a, b)"``."""
    return f"reference from the reparameterized model ({DECENTERING}, on: {', '.join(sites)})"


def should_retry(ref: Reference) -> bool:
    """An untrusted NUTS reference failing a check that a funnel explains (not ESS alone)."""
    if ref.trusted or ref.kind != NUTS_KIND:
        return False
    return any(not c.ok and c.name in _GEOMETRY_CHECKS for c in ref.checks)


def retry_reparameterized(
    model: str | CatalogEntry | Callable,
    data: Mapping[str, Any] | None,
    first: Reference,
    **nuts_options: Any,
) -> Reference:
    """``first`` if it passes or cannot be helped, else NUTS on the decentered model.

    Parameters
    ----------
    model, data
        As for :func:`~diagnostics.nuts.reference.run_nuts`.
    first : Reference
        The reference of the model as written.
    **nuts_options
        The options ``first`` was run with (settings, seed, sites, cache ...).

    Returns
    -------
    Reference
        The retried reference, for the user's sites, when it passes its checks
        (``reference_from`` names the decentered sites); else ``first``, with a
        note describing the failed retry.
    """
    if not should_retry(first):
        return first
    entry, fn, data_dict, name = resolve_model(model, data)
    sites = decentering_sites(fn, data_dict)
    if not sites:
        return first
    info = model_info(fn, (), data_dict, entry.max_plate_nesting if entry is not None else None)
    options = dict(nuts_options)
    options["settings"] = _settings_for(entry, options.get("settings"))
    options["sites"] = tuple(options.get("sites") or first.sites)
    if options.get("progress"):
        print(f"  {first.describe()}: retrying under {reparam_label(sites)}", file=sys.stderr)
    second = run_nuts(reparameterized_model(fn, sites, name), data_dict, **options)
    if not second.trusted:
        failing = "; ".join(c.detail for c in second.checks if not c.ok)
        note = (
            f"retried under the reparameterized model ({DECENTERING}, on: "
            f"{', '.join(sites)}): that reference fails its checks too ({failing}); "
            "the draws above are from the model as written"
        )
        retry = {"sites": list(sites), "trusted": False, "failing": failing}
        return dataclasses.replace(
            first,
            notes=first.notes + (note,),
            settings={**first.settings, "reparam_retry": retry},
        )
    return _rebadged_retry(first, second, sites, name, info)


def _rebadged_retry(
    first: Reference, second: Reference, sites: tuple[str, ...], name: str, info: ModelInfo
) -> Reference:
    """``second``, the trusted retry's draws, as the reference of the model as written."""
    label = reparam_label(sites)
    failing = "; ".join(c.detail for c in first.checks if not c.ok)
    note = (
        f"{label}: NUTS on the model as written failed its checks ({failing}); the draws "
        f"come from the same model with {', '.join(s + '_decentered' for s in sites)} "
        f"sampled instead ({DECENTERING}), each site recorded back as the "
        "model's own value"
    )
    return rebadged(
        second,
        info,
        model_name=name,
        sites=tuple(first.sites),
        reference_from=label,
        note=note,
        settings={
            "reparam": reparam_settings(tuple(sites)),
            "first_try": {"cache_key": first.cache_key, "failing": failing},
        },
    )
