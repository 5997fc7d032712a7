"""A second NUTS try for a reference that fails its checks: the model decentered by Pyro.

A model written the natural way (a horseshoe regression's ``beta ~ Normal(0, tau *
lam)``, a hierarchical model's ``theta ~ Normal(mu, tau)``) has a funnel for a
posterior: NUTS diverges in its neck, its chains disagree and the reference is
rightly UNTRUSTED. The same posterior written non-centered samples well.
:func:`retry_reparameterized` reruns NUTS on the user's model under
``poutine.reparam`` with ``LocScaleReparam(centered=0)`` on each latent
location-scale site (Normal, StudentT, Cauchy, Laplace, ...; real support) whose
location or scale depends on another latent site, the sites Pyro's
``AutoReparam(centered=0.0)`` would decenter, less those whose parameters are
fixed. The reparameterized model draws ``<site>_decentered`` and records each
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

import torch
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

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

REPARAM = "LocScaleReparam"
# checks whose failure points at the posterior's geometry (a funnel), not at too few draws
_GEOMETRY_CHECKS = ("divergences", "rhat", "ebfmi")


def reparam_label(sites: tuple[str, ...]) -> str:
    """``"reference from the reparameterized model (LocScaleReparam on: a, b)"``."""
    return f"reference from the reparameterized model ({REPARAM} on: {', '.join(sites)})"


def _loc_scale_base(fn: Any) -> Any | None:
    """The location-scale family under ``Independent`` wrappers, or None."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    params = set(getattr(fn, "arg_constraints", {}))
    if not {"loc", "scale"} <= params:
        return None
    support = fn.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return fn if support == constraints.real else None


def decentering_sites(fn: Callable, data: Mapping[str, Any]) -> tuple[str, ...]:
    """Latent location-scale sites whose location or scale depends on another latent site.

    Parameters
    ----------
    fn : callable
        The model, called as ``fn(**data)`` (resolved: :func:`vimodels.resolve.resolve_model`).
    data : dict

    Returns
    -------
    tuple of str
        In the model's order; empty when there is none. Where Pyro cannot trace
        the dependencies (:func:`pyro.infer.inspect.get_dependencies` fails on the
        model), every latent location-scale site whose parameters are not constant.
    """
    tr = poutine.trace(fn).get_trace(**data)
    latent = {
        name: site
        for name, site in tr.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary")
        and type(site["fn"]).__name__ != "_Subsample"
    }
    candidates = [name for name, site in latent.items() if _loc_scale_base(site["fn"])]
    if not candidates:
        return ()
    try:
        deps = get_dependencies(fn, (), dict(data))["prior_dependencies"]
    except Exception:  # noqa: BLE001 - provenance tracking fails on some ops: decenter all
        deps = None
    out = []
    for name in candidates:
        if deps is not None:
            upstream = set(deps.get(name, {})) - {name}
            if upstream & set(latent):
                out.append(name)
        else:
            base = _loc_scale_base(latent[name]["fn"])
            if not (_constant(base.loc) and _constant(base.scale)):
                out.append(name)
    return tuple(out)


def _constant(x: Any) -> bool:
    x = torch.as_tensor(x)
    return bool(x.numel() == 0 or torch.all(x == x.reshape(-1)[0]))


class _RecordAsDeterministic(Messenger):
    """Mark the sites ``poutine.reparam`` replaced as deterministic (as ``pyro.deterministic``).

    Entered outside the reparam handler, so it sees each site after the handler
    turned it into a masked ``Delta`` of the transformed draw.
    """

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.names and msg["is_observed"]:
            msg["infer"] = {**(msg.get("infer") or {}), "_deterministic": True}


def reparameterized_model(fn: Callable, sites: tuple[str, ...], name: str) -> Callable:
    """``fn`` under ``LocScaleReparam(centered=0)`` on ``sites``, called as ``model(**data)``.

    Each site ``s`` becomes a latent ``s_decentered`` and a deterministic ``s``
    holding the user's value, so draws of the original sites come back from the
    sampler's deterministic record.
    """
    names = frozenset(sites)

    def reparameterized(**data: Any) -> Any:
        config = {s: LocScaleReparam(centered=0.0) for s in sites}
        with _RecordAsDeterministic(names), poutine.reparam(config=config):
            return fn(**data)

    reparameterized.__name__ = f"{name}__reparam"
    reparameterized.__qualname__ = reparameterized.__name__
    return reparameterized


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
            f"retried under the reparameterized model ({REPARAM}(centered=0) on: "
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
        f"sampled instead ({REPARAM}(centered=0)), each site recorded back as the "
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
            "reparam": {"method": f"{REPARAM}(centered=0)", "sites": list(sites)},
            "first_try": {"cache_key": first.cache_key, "failing": failing},
        },
    )
