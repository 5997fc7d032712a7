"""Binding a model to its data, and the checks that run once before any fitting.

:func:`vimodels.resolve.resolve_model` turns a catalog name, a catalog entry
or a user's Pyro function into ``(entry, model function, checked data, name)``;
:func:`bind` adds what a fit needs on top: one checked model trace, the discrete sites,
the plate depth, the sites to report and the model as a positional callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.poutine.util import site_is_subsample

from vimodels.catalog.base import CatalogEntry
from vimodels.data import trace_check
from vimodels.errors import IncompatibleError, OptionError
from vimodels.resolve import resolve_model
from vimodels.svi.reparam import check_reparam, decentered_model


class Bound:
    """``fn(**data)`` exposed as ``fn(*tensors)`` with the non-tensor data bound.

    JIT-compiled ELBOs need tensor inputs positionally; this adapter keeps the
    catalog's keyword contract for model and guide alike.
    """

    def __init__(self, fn: Callable, tensor_keys: tuple[str, ...], static: Mapping[str, Any]):
        self.fn = fn
        self.tensor_keys = tensor_keys
        self.static = dict(static)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *tensors: torch.Tensor):
        """Call the wrapped function with keyword data."""
        return self.fn(**dict(zip(self.tensor_keys, tensors)), **self.static)


def keyword_call(bound: Callable) -> Callable:
    """Call a positional ``Bound`` with ``_0``, ``_1``... keyword arguments."""

    def fn(**kwargs):
        return bound(*(kwargs[f"_{i}"] for i in range(len(kwargs))))

    fn.__name__ = getattr(bound, "__name__", "fn")
    return fn


def positional_kwargs(args: tuple) -> dict[str, Any]:
    """``{"_0": args[0], ...}``: the keyword form :func:`keyword_call` expects."""
    return {f"_{i}": a for i, a in enumerate(args)}


def latent_sites(tr: poutine.Trace) -> dict[str, dict]:
    """Latent sample sites of a trace (no observed, auxiliary or subsample sites)."""
    return {
        n: s
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not s["infer"].get("is_auxiliary")
        and not site_is_subsample(s)
    }


def discrete_sites(tr: poutine.Trace) -> tuple[str, ...]:
    """Latent sites with discrete support in a model trace."""
    return tuple(
        n
        for n, s in latent_sites(tr).items()
        if getattr(s["fn"], "support", None) is not None and s["fn"].support.is_discrete
    )


def plate_depth(tr: poutine.Trace) -> int:
    """Deepest vectorized plate dimension used in a trace (0 when none)."""
    depth = 0
    for site in tr.nodes.values():
        if site["type"] == "sample":
            for f in site["cond_indep_stack"]:
                if f.vectorized:
                    depth = max(depth, -f.dim)
    return depth


def check_guide_matches(
    model_tr: poutine.Trace,
    guide: Callable,
    args: tuple,
    hidden: tuple[str, ...],
    guide_name: str,
    model_name: str,
) -> None:
    """Raise IncompatibleError unless the guide's sites are the model's latent sites."""
    try:
        with poutine.block():
            guide_tr = poutine.trace(guide).get_trace(*args)
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        raise IncompatibleError(
            f"guide {guide_name!r} fails on model {model_name!r}: {exc}"
        ) from exc
    latent = set(latent_sites(model_tr)) - set(hidden)
    guided = set(latent_sites(guide_tr))
    missing, extra = sorted(latent - guided), sorted(guided - latent)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"model sites not in the guide: {', '.join(missing)}")
        if extra:
            parts.append(f"guide sites not in the model: {', '.join(extra)}")
        raise IncompatibleError(
            f"guide {guide_name!r} does not fit model {model_name!r} ({'; '.join(parts)})"
        )


@dataclass(frozen=True)
class Binding:
    """A model bound to checked data: what every step of a fit reads.

    Attributes
    ----------
    entry : CatalogEntry or None
        The catalog entry, or None for a user's model.
    name : str
        The model's name.
    model_fn : callable
        The model as given, called as ``model_fn(**data)``.
    model_kw : callable
        ``model_fn``, with discrete sites marked for parallel enumeration when it has any.
    model : Bound
        ``model_kw`` called positionally with the tensor data.
    data : dict
        The checked data; ``args`` are its tensors in ``tensor_keys`` order, ``static`` the rest.
    trace : pyro.poutine.Trace
        One checked run of the model.
    hidden : tuple of str
        Discrete latent sites (summed out by the ``enum`` ELBO).
    depth : int
        Plate nesting the ELBO must allow for.
    sites : tuple of str
        Sites that results report.
    site_shapes : dict of str to tuple of int
        Shape of every sample site's value.
    decentered : tuple of str
        The user's sites that ``reparam="decenter"`` decentered (empty: the model
        as written). ``model_fn`` is then the decentered model
        (:mod:`vimodels.svi.reparam`), which records these sites as deterministic.
    """

    entry: CatalogEntry | None
    name: str
    model_fn: Callable
    model_kw: Callable
    model: Bound
    data: dict
    tensor_keys: tuple[str, ...]
    static: dict
    args: tuple
    trace: poutine.Trace = field(repr=False)
    hidden: tuple[str, ...]
    depth: int
    sites: tuple[str, ...]
    site_shapes: dict[str, tuple[int, ...]]
    decentered: tuple[str, ...] = ()

    @property
    def family(self) -> str | None:
        """The catalog family whose hand-written guides apply (None for a user's model)."""
        return self.entry.family if self.entry is not None else None


def bind(
    model: str | CatalogEntry | Callable,
    data: Mapping[str, Any] | None,
    *,
    discrete_ok: bool,
    sites: tuple[str, ...] | None = None,
    reparam: str | None = None,
) -> Binding:
    """Resolve a model, check its data with one traced run, and work out what a fit needs.

    Parameters
    ----------
    model, data
        As :func:`vimodels.fit` takes them.
    discrete_ok : bool
        Whether the ELBO sums out discrete latent sites (else they are an error).
    sites : tuple of str, optional
        Sites to report; default: the entry's sites of interest, or every latent
        and deterministic site of a user's model (as written, before any ``reparam``).
    reparam : {None, "decenter"}
        ``"decenter"``: bind the model decentered (:mod:`vimodels.svi.reparam`).

    Raises
    ------
    IncompatibleError
        For discrete latent sites under an ELBO that cannot sum them out; for
        ``reparam="decenter"`` on a model with nothing to decenter.
    OptionError
        For an unknown ``reparam``.
    """
    reparam = check_reparam(reparam)
    entry, model_fn, data_dict, name = resolve_model(model, data)
    tensor_keys = tuple(k for k, v in data_dict.items() if isinstance(v, torch.Tensor))
    static = {k: v for k, v in data_dict.items() if k not in tensor_keys}
    args = tuple(data_dict[k] for k in tensor_keys)
    tr = trace_check(model_fn, data_dict, name)
    check_has_latent(tr, name)
    decentered: tuple[str, ...] = ()
    user_tr = tr
    if reparam == "decenter":
        model_fn, decentered = decentered_model(model_fn, data_dict, name)
        tr = trace_check(model_fn, data_dict, name)
    hidden = discrete_sites(tr)
    if hidden and not discrete_ok:
        raise IncompatibleError(
            f"model {name!r} has discrete latent site(s) {', '.join(hidden)}; only the "
            f"'enum' ELBO sums them out (others would sample them from the prior). "
            f"Use elbo='enum'"
        )
    depth = plate_depth(tr)
    if entry is not None and entry.max_plate_nesting is not None:
        depth = max(depth, entry.max_plate_nesting)
    if sites is None:
        sites = entry.sites if entry is not None else _default_sites(user_tr, hidden)
    sites = check_sites(tr, sites)
    model_kw = config_enumerate(model_fn, default="parallel") if hidden else model_fn
    site_shapes = {
        n: tuple(s["value"].shape)
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and isinstance(s["value"], torch.Tensor)
    }
    return Binding(
        entry=entry,
        name=name,
        model_fn=model_fn,
        model_kw=model_kw,
        model=Bound(model_kw, tensor_keys, static),
        data=data_dict,
        tensor_keys=tensor_keys,
        static=static,
        args=args,
        trace=tr,
        hidden=hidden,
        depth=depth,
        sites=tuple(sites),
        site_shapes=site_shapes,
        decentered=decentered,
    )


def check_has_latent(tr: poutine.Trace, model_name: str) -> None:
    """Raise IncompatibleError when the model has no latent site (nothing to infer)."""
    if not latent_sites(tr):
        raise IncompatibleError(
            f"model {model_name!r} has no latent site (every pyro.sample has obs=): there is "
            "no posterior to fit; add a pyro.sample site without obs= for each unknown"
        )


def check_sites(tr: poutine.Trace, sites: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """``sites`` as a tuple of latent or deterministic site names, else OptionError."""
    if isinstance(sites, str):
        sites = (sites,)
    valid = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and not site_is_subsample(s)
        and (not s["is_observed"] or s["infer"].get("_deterministic"))
    ]
    unknown = [x for x in sites if x not in valid]
    if unknown:
        raise OptionError(
            f"unknown site(s) {unknown} in sites=; the model's latent and deterministic "
            f"sites are: {', '.join(valid)}"
        )
    return tuple(sites)


def _default_sites(tr: poutine.Trace, hidden: tuple[str, ...]) -> tuple[str, ...]:
    """Every continuous latent and every deterministic site of a user's model."""
    return tuple(
        n
        for n, s in tr.nodes.items()
        if (
            s["type"] == "sample"
            and not s["is_observed"]
            and n not in hidden
            and not site_is_subsample(s)
        )
        or (s["type"] == "sample" and s["infer"].get("_deterministic"))
    )
