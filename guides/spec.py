"""The guide interface: a named factory and what it applies to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GuideFactory = Callable[..., Callable[..., Any]]


@dataclass(frozen=True)
class GuideSpec:
    """A registered guide.

    Attributes
    ----------
    name : str
        Registry name, snake_case (``auto_*`` for Pyro autoguides).
    factory : callable
        ``factory(model, data, **options) -> guide``; the guide is called as ``guide(**data)``.
    description : str
        One line shown by ``vimodels list``.
    families : tuple of str or None
        Model families the guide is written for; ``None`` means any model.
    discrete : bool
        Whether the guide can serve a model with discrete latent sites
        (by hiding them for enumeration).
    options : tuple of str
        Options the factory accepts.
    lr_scale : float
        The guide's parameters learn at ``lr_scale`` times the fit's ``lr``. Adam
        moves every parameter by about ``lr`` per step; where an output sums many
        parameters (a flow's autoregressive network), that moves it by ``lr`` times
        the width, so the guide gets a smaller step.
    """

    name: str
    factory: GuideFactory
    description: str
    families: tuple[str, ...] | None = None
    discrete: bool = True
    options: tuple[str, ...] = ()
    lr_scale: float = 1.0

    @property
    def generic(self) -> bool:
        """True for guides that apply to any model."""
        return self.families is None


def handwritten(
    name: str,
    factory: GuideFactory,
    description: str,
    family: str,
    *,
    discrete: bool = False,
    options: tuple[str, ...] = ("init_scale",),
) -> GuideSpec:
    """A :class:`GuideSpec` for a guide written for one model family.

    Hand-written guides take ``init_scale`` (the initial sd in unconstrained
    space) and, unless said otherwise, do not serve discrete models.
    """
    return GuideSpec(name, factory, description, (family,), discrete, options)
