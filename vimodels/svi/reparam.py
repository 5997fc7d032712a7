"""A model decentered by Pyro: ``LocScaleReparam(centered=0)`` on its dependent sites.

A hierarchical model written the natural way (``theta ~ Normal(mu, tau)``) has a
funnel for a posterior, which no Gaussian fits and which has no mode; the same
posterior written non-centered (``theta = mu + tau * theta_decentered`` with
``theta_decentered ~ Normal(0, 1)``) is close to Gaussian. This module finds the
sites to decenter and builds the decentered model; ``fit(..., reparam="decenter")``
(:func:`vimodels.svi.binding.bind`) fits it, and the NUTS reference's second try
(:mod:`diagnostics.reparam`) samples it.

The sites are the latent location-scale sites (Normal, StudentT, Cauchy, Laplace
...; real support) whose location or scale depends on another latent site: the
sites Pyro's ``AutoReparam(centered=0.0)`` would decenter, less those whose
parameters are fixed; and the ``MultivariateNormal`` sites whose location or
Cholesky factor depends on another latent site (correlated random effects),
which Pyro has no reparameterizer for: ``x = loc + scale_tril @ z``,
``z ~ Normal(0, I)``. The decentered model draws ``<site>_decentered`` and
records each original site as a deterministic function of it, so its draws map
back onto the user's sites exactly. The change of variables is the model's own
(Pyro's reparameterizer): the joint density of the observed data and the other
latents is unchanged once ``<site>_decentered`` is integrated out, so the
decentered model has the same posterior over the user's sites and the same
evidence ``log p(x)``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.infer.reparam import LocScaleReparam
from pyro.infer.reparam.reparam import Reparam
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

from vimodels.errors import IncompatibleError, OptionError

REPARAM = "LocScaleReparam"
#: How the sites are decentered, as results record it.
REPARAMETERIZER = f"{REPARAM}(centered=0); MultivariateNormal: loc + scale_tril @ z"
#: The same in words, for messages and labels (a MultivariateNormal site is not
#: decentered by ``LocScaleReparam``, which takes univariate families only).
DECENTERING = f"{REPARAM}(centered=0), a MultivariateNormal as loc + scale_tril @ z"
#: Values of ``fit(reparam=...)`` besides None.
REPARAM_METHODS = ("decenter",)
#: Suffix of the latent site that replaces a decentered one.
DECENTERED_SUFFIX = "_decentered"


def check_reparam(reparam: Any) -> str | None:
    """``reparam`` if it is None or one of :data:`REPARAM_METHODS`, else OptionError."""
    if reparam is None or (isinstance(reparam, str) and reparam in REPARAM_METHODS):
        return reparam
    raise OptionError(
        f"reparam must be None or one of {', '.join(repr(m) for m in REPARAM_METHODS)}, "
        f"got {reparam!r}"
    )


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


def _mvn_base(fn: Any) -> Any | None:
    """The ``MultivariateNormal`` under ``Independent`` wrappers, or None."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, torch.distributions.MultivariateNormal) else None


def _params(fn: Any) -> tuple[Any, Any]:
    """``(loc, scale)`` of a location-scale site, ``(loc, scale_tril)`` of a multivariate one."""
    mvn = _mvn_base(fn)
    if mvn is not None:
        return mvn.loc, mvn.scale_tril
    base = _loc_scale_base(fn)
    return base.loc, base.scale


class _DecenterMultivariateNormal(Reparam):
    """``x ~ MultivariateNormal(loc, scale_tril)`` as ``x = loc + scale_tril @ z``, ``z ~ N(0, I)``.

    What ``LocScaleReparam(centered=0)`` does for a univariate family; like it, the
    original site becomes a masked ``Delta`` of the transformed draw.
    """

    def apply(self, msg: dict) -> dict:
        name, value, is_observed = msg["name"], msg["value"], msg["is_observed"]
        fn, event_dim = self._unwrap(msg["fn"])
        loc, tril = fn.loc, fn.scale_tril
        z_value = None
        if value is not None:  # differentiably invert the transform
            z_value = torch.linalg.solve_triangular(
                tril, (value - loc).unsqueeze(-1), upper=False
            ).squeeze(-1)
        noise = dist.Normal(torch.zeros_like(loc), 1.0).to_event(1)
        z = pyro.sample(
            f"{name}{DECENTERED_SUFFIX}",
            self._wrap(noise, event_dim),
            obs=z_value,
            infer={"is_observed": is_observed},
        )
        if value is None:
            value = loc + (tril @ z.unsqueeze(-1)).squeeze(-1)
        new_fn = dist.Delta(value, event_dim=event_dim).mask(False)
        return {"fn": new_fn, "value": value, "is_observed": True}


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
    with poutine.block():
        tr = poutine.trace(fn).get_trace(**data)
    latent = {
        name: site
        for name, site in tr.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary")
        and type(site["fn"]).__name__ != "_Subsample"
    }
    candidates = [
        name
        for name, site in latent.items()
        if _loc_scale_base(site["fn"]) is not None or _mvn_base(site["fn"]) is not None
    ]
    if not candidates:
        return ()
    try:
        with poutine.block():
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
            loc, scale = _params(latent[name]["fn"])
            if not (_constant(loc) and _constant(scale)):
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


@functools.lru_cache(maxsize=32)
def reparameterized_model(fn: Callable, sites: tuple[str, ...], name: str) -> Callable:
    """``fn`` under ``LocScaleReparam(centered=0)`` on ``sites``, called as ``model(**data)``.

    (A ``MultivariateNormal`` site: ``loc + scale_tril @ z``.) Each site ``s``
    becomes a latent ``s_decentered`` and a deterministic ``s`` holding the
    user's value, so draws of the original sites come back from the sampler's
    deterministic record. The same arguments give the same function, so a later
    fit of the same decentered model reuses its compiled step, as fits of the
    model as written do (``fit``'s compile key holds the model function).
    """
    names = frozenset(sites)

    def config(msg: dict) -> Reparam | None:
        if msg["name"] not in names:
            return None
        if _mvn_base(msg["fn"]) is not None:
            return _DecenterMultivariateNormal()
        return LocScaleReparam(centered=0.0)

    def reparameterized(**data: Any) -> Any:
        with _RecordAsDeterministic(names), poutine.reparam(config=config):
            return fn(**data)

    reparameterized.__name__ = f"{name}__reparam"
    reparameterized.__qualname__ = reparameterized.__name__
    reparameterized.source_model = fn  # type: ignore[attr-defined]  # the model as written
    return reparameterized


def source_model(model: Callable) -> Callable:
    """The model as the user wrote it: ``model`` itself, or what a decentered one wraps.

    A fit's ``model`` (:class:`vimodels.svi.binding.Bound`, called with the fit's
    ``args``) comes back as the same adapter around the model as written.
    """
    inner = getattr(model, "fn", None)
    if inner is not None and hasattr(inner, "source_model"):
        out = copy.copy(model)
        out.fn = inner.source_model
        out.__name__ = getattr(inner.source_model, "__name__", out.__name__)
        return out
    return getattr(model, "source_model", model)


def decentered_model(
    fn: Callable, data: Mapping[str, Any], name: str
) -> tuple[Callable, tuple[str, ...]]:
    """``fn`` decentered for ``fit(reparam="decenter")``, and the sites decentered.

    Raises
    ------
    IncompatibleError
        When the model has no site to decenter: ``reparam="decenter"`` would fit
        the model as written, which is not what was asked for.
    """
    sites = decentering_sites(fn, data)
    if not sites:
        raise IncompatibleError(
            f"reparam='decenter' found nothing to decenter in model {name!r}: no latent "
            "location-scale site (Normal, StudentT, Cauchy, Laplace ..., MultivariateNormal) "
            "has a location or scale that depends on another latent site. Fit it as written "
            "(reparam=None)"
        )
    return reparameterized_model(fn, sites, name), sites


def reparam_settings(sites: tuple[str, ...]) -> dict[str, Any]:
    """What a fit's ``settings["reparam"]`` records of a decentered fit."""
    return {
        "method": "decenter",
        "reparameterizer": REPARAMETERIZER,
        "sites": list(sites),
        "latent": [s + DECENTERED_SUFFIX for s in sites],
    }


def reparam_note(sites: tuple[str, ...]) -> str:
    """One line for a decentered fit's message."""
    return (
        f"decentered ({DECENTERING}, on: {', '.join(sites)}; draws of these sites "
        "are recorded from the fitted model)"
    )


def decentered_sites_of(result: Any) -> tuple[str, ...]:
    """The sites a fit decentered (``settings["reparam"]["sites"]``); empty for none.

    Reads a :class:`~vimodels.svi.result.FitResult` or anything with the same
    ``settings`` (a stored fit's summary holds them too).
    """
    settings = getattr(result, "settings", None) or {}
    return tuple((settings.get("reparam") or {}).get("sites") or ())
