"""Any valid Pyro model, run by the same machinery as the catalog's.

Two things a valid Pyro model may do that the fitting and sampling code
would otherwise trip on:

- **sites whose distribution cannot be sampled**, such as
  ``pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))``
  with its prior given by ``pyro.factor``. Guides set such sites, NUTS moves
  them in unconstrained space; only the initial run of the model needs a
  value, and Pyro's initialization strategies get one by sampling. The
  adapted model wraps those sites' distributions in :class:`InitSampleable`,
  which keeps the support and the log density and draws uniformly in
  ``(-2, 2)`` on the unconstrained space (Pyro's ``init_to_uniform``), so
  every initialization strategy works;
- **positional-only arguments** (``def model(x, y, /)``): the adapted model
  takes them by name, like every other model here.

:func:`adapt_model` returns the model itself when it needs neither.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to, constraints, transform_to

_ADAPTED = "_vimodels_adapted"
RADIUS = 2.0


def _register_mixture_support() -> None:
    """Give ``MixtureSameFamily``'s support its components' transforms.

    torch wraps the support of a ``MixtureSameFamily`` in a
    ``MixtureSameFamilyConstraint`` that ``biject_to`` / ``transform_to`` do not
    know, so a model with a mixture prior (``pyro.sample("x",
    dist.MixtureSameFamily(...))``) raised ``NotImplementedError: Cannot
    transform MixtureSameFamilyConstraint constraints`` in every autoguide, in
    NUTS and in the mode search. The values of such a site lie in its
    components' support, so their bijection serves. Registered once, process-wide
    (torch's registries are global), only where torch has the class and nothing
    is registered for it yet.
    """
    cls = getattr(constraints, "MixtureSameFamilyConstraint", None)
    if cls is None:
        return
    for registry in (biject_to, transform_to):
        if cls not in registry._registry:
            registry.register(cls)(lambda c, _r=registry: _r(c.base_constraint))


_register_mixture_support()


class InitSampleable(TorchDistribution):
    """A distribution that cannot be sampled, made samplable for initialization only.

    Same support, shapes and ``log_prob`` as ``base``; :meth:`sample` draws
    uniformly in ``(-2, 2)`` on the unconstrained space of the support.

    Parameters
    ----------
    base : Distribution
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: Any) -> None:
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:  # noqa: D102
        return self.base.support

    def expand(self, batch_shape: Any, _instance: Any = None) -> InitSampleable:  # noqa: D102
        return InitSampleable(self.base.expand(batch_shape))

    def sample(self, sample_shape: Any = ()) -> torch.Tensor:  # noqa: D102
        shape = self._extended_shape(torch.Size(sample_shape))
        t = transform_to(self.support)
        u = (torch.rand(t.inverse_shape(shape)) * 2 - 1) * RADIUS
        with torch.no_grad():
            return t(u)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.base.log_prob(value)


def _plain(msg: dict) -> bool:
    return (
        msg["type"] == "sample"
        and not msg["is_observed"]
        and msg["value"] is None
        and type(msg["fn"]).__name__ != "_Subsample"
    )


class _FindUnsampleable(Messenger):
    """Record (and wrap) latent sites whose distribution raises NotImplementedError on sample."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def _pyro_sample(self, msg: dict) -> None:
        if not _plain(msg) or isinstance(msg["fn"], InitSampleable):
            return
        try:
            with torch.no_grad():
                msg["fn"].sample()
        except NotImplementedError:
            self.found.append(msg["name"])
            msg["fn"] = InitSampleable(msg["fn"])


class _WrapSites(Messenger):
    """Wrap the named latent sites' distributions in :class:`InitSampleable`."""

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names

    def _pyro_sample(self, msg: dict) -> None:
        if (
            msg["name"] in self.names
            and not msg["is_observed"]
            and not isinstance(msg["fn"], InitSampleable)
        ):
            msg["fn"] = InitSampleable(msg["fn"])


def unsampleable_sites(model: Callable, data: Mapping[str, Any]) -> tuple[str, ...]:
    """Latent sites of ``model(**data)`` whose distribution cannot be sampled.

    Runs the model once with the random state saved and restored (the run
    draws nothing the caller would see). A model that fails is left for the
    caller's checks to report: the result is then what was found up to there.
    """
    finder = _FindUnsampleable()
    state = pyro.util.get_rng_state()
    try:
        with poutine.block(), finder:
            model(**data)
    except Exception:  # the data checks that follow say what is wrong
        pass
    finally:
        pyro.util.set_rng_state(state)
    return tuple(dict.fromkeys(finder.found))


def keyword_model(model: Callable) -> Callable:
    """``model`` callable by keyword for each of its parameters (positional-only included)."""
    if getattr(model, _ADAPTED, False):
        return model
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):
        return model
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if not positional:
        return model

    @functools.wraps(model)
    def by_keyword(**data: Any) -> Any:
        args = [data.pop(n) for n in positional if n in data]
        return model(*args, **data)

    by_keyword.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(kind=p.POSITIONAL_OR_KEYWORD) if p.kind is p.POSITIONAL_ONLY else p
            for p in params
        ]
    )
    return by_keyword


def adapt_model(model: Callable, data: Mapping[str, Any]) -> Callable:
    """``model`` (called as ``model(**data)``), adapted where vimodels' machinery needs it.

    Returns the model itself when it has no site that cannot be sampled;
    otherwise a wrapper (``functools.wraps``: same name, source and
    signature) that wraps those sites' distributions in :class:`InitSampleable`.
    Apply :func:`keyword_model` first for models with positional-only arguments.
    """
    if getattr(model, _ADAPTED, False):
        return model
    names = unsampleable_sites(model, data)
    if not names:
        return model
    wrap = frozenset(names)

    @functools.wraps(model)
    def adapted(*args: Any, **kwargs: Any) -> Any:
        with _WrapSites(wrap):
            return model(*args, **kwargs)

    setattr(adapted, _ADAPTED, True)
    adapted.unsampleable_sites = names  # type: ignore[attr-defined]
    return adapted
