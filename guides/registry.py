"""The guide registry: autoguides for any model, hand-written guides per family.

Built from explicit imports. A guide is looked up by name and, for hand-written
guides, by the model family it was written for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guides import conjugate, eight_schools, funnel, logistic, mixture, radon, sleepstudy, vae
from guides.auto import AUTO_GUIDES
from guides.spec import GuideSpec
from vimodels.errors import IncompatibleError, OptionError, UnknownNameError

GENERIC: dict[str, GuideSpec] = {spec.name: spec for spec in AUTO_GUIDES}

HANDWRITTEN: dict[str, dict[str, GuideSpec]] = {}
for _spec in (
    *eight_schools.specs(),
    *conjugate.specs(),
    *funnel.specs(),
    *radon.specs(),
    *sleepstudy.specs(),
    *mixture.specs(),
    *logistic.specs(),
    *vae.specs(),
):
    for _family in _spec.families or ():
        family_guides = HANDWRITTEN.setdefault(_family, {})
        assert _spec.name not in family_guides, f"duplicate guide {_family}/{_spec.name}"
        assert _spec.name not in GENERIC, f"hand-written guide shadows {_spec.name}"
        family_guides[_spec.name] = _spec


def guide_names(family: str | None = None) -> list[str]:
    """Guides usable for ``family`` (generic ones first); all names when ``family`` is None."""
    names = list(GENERIC)
    if family is None:
        for fam in HANDWRITTEN.values():
            names += [n for n in fam if n not in names]
    else:
        names += list(HANDWRITTEN.get(family, {}))
    return names


def get_guide_spec(name: str, family: str | None = None) -> GuideSpec:
    """Return the spec of guide ``name`` for a model of ``family``.

    Raises
    ------
    UnknownNameError
        If no guide has that name.
    IncompatibleError
        If the guide exists but was written for other model families.
    """
    if name in GENERIC:
        return GENERIC[name]
    if family is not None and name in HANDWRITTEN.get(family, {}):
        return HANDWRITTEN[family][name]
    owners = sorted(f for f, g in HANDWRITTEN.items() if name in g)
    if owners:
        raise IncompatibleError(
            f"guide {name!r} is hand-written for {', '.join(owners)}, not for "
            f"{family or 'a user model'}; guides for this model: "
            f"{', '.join(guide_names(family) if family is not None else GENERIC)}"
        )
    raise UnknownNameError("guide", name, guide_names(family))


def make_guide(
    name: str,
    model: Callable,
    data: dict,
    family: str | None = None,
    hidden: tuple[str, ...] = (),
    **options: Any,
) -> Callable:
    """Build guide ``name`` for ``model`` with its ``data``.

    Parameters
    ----------
    name : str
        Registered guide name.
    model : callable
        The Pyro model (called as ``model(**data)``).
    data : dict
        Data passed to the model; hand-written guides use it to initialise.
    family : str, optional
        Model family, for hand-written guides.
    hidden : tuple of str
        Discrete sites to leave to enumeration (autoguides block them).
    **options
        Guide options (``init_scale``, ``init_loc_fn``, ``rank`` ...).
    """
    spec = get_guide_spec(name, family)
    if hidden and not spec.discrete:
        raise IncompatibleError(
            f"guide {name!r} cannot serve a model with discrete sites {list(hidden)}"
        )
    if spec.generic:
        return spec.factory(model, data, hidden=hidden, **options)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise OptionError(
            f"guide {name!r} does not take option(s) {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(spec.options) or 'no options'}"
        )
    return spec.factory(model, data, **options)
