"""ELBOs by name: one mapping from a name to a configured Pyro ELBO.

=============  ==============================================================
name           objective
=============  ==============================================================
``trace``      ``Trace_ELBO``: Monte Carlo ELBO, reparameterized where possible
``meanfield``  ``TraceMeanField_ELBO``: analytic KL where Pyro knows it
``iwae``       :class:`vimodels.svi.iwae.IWAE`, K particles, per data point
``renyi``      ``RenyiELBO(alpha)``: Renyi divergence bound, alpha != 1
``tracegraph`` ``TraceGraph_ELBO``: Rao-Blackwellized score-function terms
``enum``       ``TraceEnum_ELBO``: discrete latent sites enumerated exactly
``weighted_kl````-(E[log p(x|z)] - beta * KL(q || p))`` (beta-VAE objective)
=============  ==============================================================

Gradient estimators (option ``estimator``): ``trace`` takes ``"standard"`` or
``"stl"`` (sticking the landing, :mod:`vimodels.svi.estimators`); ``iwae`` takes
``"standard"`` or ``"dreg"`` (doubly reparameterized, :mod:`vimodels.svi.iwae`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.infer as infer
from pyro.poutine.messenger import Messenger

from vimodels.errors import OptionError, UnknownNameError, check_option
from vimodels.svi.estimators import StickingTheLanding
from vimodels.svi.iwae import ESTIMATORS as IWAE_ESTIMATORS
from vimodels.svi.iwae import IWAE

TRACE_ESTIMATORS = ("standard", "stl")


@dataclass(frozen=True)
class ElboSpec:
    """A registered objective.

    Attributes
    ----------
    name : str
        Registry name.
    description : str
        One line for ``vimodels list`` and the README.
    build : callable
        ``build(num_particles, vectorize, jit, max_plate_nesting, **options) -> ELBO``.
    default_particles : int
        Particles used when the caller gives none.
    jit : bool
        Whether a JIT-compiled variant exists.
    vectorize : bool
        Whether particles can be vectorized.
    discrete : bool
        Whether the ELBO handles discrete latent sites (by enumeration).
    options : tuple of str
        Extra options it takes.
    """

    name: str
    description: str
    build: Callable[..., Any]
    default_particles: int = 1
    jit: bool = True
    vectorize: bool = True
    discrete: bool = False
    options: tuple[str, ...] = ()


def _plate_kwargs(max_plate_nesting: int | None) -> dict[str, Any]:
    return {} if max_plate_nesting is None else {"max_plate_nesting": max_plate_nesting}


def _pyro(cls: type, jit_cls: type | None):
    def build(
        num_particles: int,
        vectorize: bool,
        jit: bool,
        max_plate_nesting: int | None,
        **options: Any,
    ):
        if options:
            raise OptionError(f"{cls.__name__} takes no options, got {sorted(options)}")
        chosen = jit_cls if (jit and jit_cls is not None) else cls
        kwargs = dict(
            num_particles=num_particles,
            vectorize_particles=vectorize,
            **_plate_kwargs(max_plate_nesting),
        )
        if chosen is jit_cls:
            kwargs["ignore_jit_warnings"] = True
        return chosen(**kwargs)

    return build


def _trace(
    num_particles: int,
    vectorize: bool,
    jit: bool,
    max_plate_nesting: int | None,
    estimator: str = "standard",
    **options: Any,
):
    if options:
        raise OptionError(f"trace takes only 'estimator', got {sorted(options)}")
    if estimator not in TRACE_ESTIMATORS:
        raise OptionError(
            f"trace estimator must be one of {', '.join(TRACE_ESTIMATORS)}, got {estimator!r}"
        )
    if estimator == "stl":
        return StickingTheLanding(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
    return _pyro(infer.Trace_ELBO, infer.JitTrace_ELBO)(
        num_particles, vectorize, jit, max_plate_nesting
    )


def _enum(
    num_particles: int, vectorize: bool, jit: bool, max_plate_nesting: int | None, **options: Any
):
    if options:
        raise OptionError(f"TraceEnum_ELBO takes no options, got {sorted(options)}")
    cls = infer.JitTraceEnum_ELBO if jit else infer.TraceEnum_ELBO
    kwargs = dict(
        num_particles=num_particles,
        vectorize_particles=vectorize,
        max_plate_nesting=1 if max_plate_nesting is None else max_plate_nesting,
    )
    if jit:
        kwargs["ignore_jit_warnings"] = True
    return cls(**kwargs)


def _renyi(
    num_particles: int,
    vectorize: bool,
    jit: bool,
    max_plate_nesting: int | None,
    alpha: float = 0.5,
    **options: Any,
):
    if options:
        raise OptionError(f"renyi takes only 'alpha', got {sorted(options)}")
    if isinstance(alpha, int) and not isinstance(alpha, bool):
        alpha = float(alpha)
    check_option("alpha", alpha, kind=float)
    if alpha == 1.0:
        raise OptionError("renyi alpha must differ from 1 (alpha = 1 is the ELBO: use 'trace')")
    return infer.RenyiELBO(
        alpha=alpha,
        num_particles=num_particles,
        vectorize_particles=vectorize,
        **_plate_kwargs(max_plate_nesting),
    )


def _iwae(
    num_particles: int,
    vectorize: bool,
    jit: bool,
    max_plate_nesting: int | None,
    estimator: str = "standard",
    **options: Any,
):
    if options:
        raise OptionError(f"iwae takes only 'estimator', got {sorted(options)}")
    if estimator not in IWAE_ESTIMATORS:
        raise OptionError(
            f"iwae estimator must be one of {', '.join(IWAE_ESTIMATORS)}, got {estimator!r}"
        )
    return IWAE(
        num_particles=num_particles, max_plate_nesting=max_plate_nesting, estimator=estimator
    )


class ScaleLatent(Messenger):
    """Multiply the scale of every unobserved sample site by ``beta``."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


class WeightedKL:
    """``-(E_q[log p(x | z)] - beta * KL(q(z) || p(z)))``: the beta-weighted ELBO.

    Wraps a ``TraceMeanField_ELBO`` (analytic KL where known) or ``Trace_ELBO``;
    the latent sites of model and guide are scaled by ``beta``.
    """

    def __init__(self, inner: infer.ELBO, beta: float):
        self.inner = inner
        self.beta = beta
        self.num_particles = inner.num_particles
        self.vectorize_particles = inner.vectorize_particles
        self._wrapped: dict[int, Callable] = {}

    def _wrap(self, fn: Callable) -> Callable:
        if id(fn) not in self._wrapped:
            self._wrapped[id(fn)] = ScaleLatent(self.beta)(fn)
        return self._wrapped[id(fn)]

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Loss as a float."""
        return self.inner.loss(self._wrap(model), self._wrap(guide), *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Loss, with gradients accumulated into the parameters."""
        return self.inner.loss_and_grads(self._wrap(model), self._wrap(guide), *args, **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """Differentiable loss tensor."""
        return self.inner.differentiable_loss(self._wrap(model), self._wrap(guide), *args, **kwargs)


def _weighted_kl(
    num_particles: int,
    vectorize: bool,
    jit: bool,
    max_plate_nesting: int | None,
    beta: float = 1.0,
    analytic: bool = True,
    **options: Any,
):
    if options:
        raise OptionError(f"weighted_kl takes 'beta' and 'analytic', got {sorted(options)}")
    if isinstance(beta, int) and not isinstance(beta, bool):
        beta = float(beta)
    check_option("beta", beta, kind=float, low=0.0)
    jit = jit and not analytic  # JitTraceMeanField_ELBO is slower than the Python version
    cls = (
        infer.TraceMeanField_ELBO
        if analytic
        else (infer.JitTrace_ELBO if jit else infer.Trace_ELBO)
    )
    kwargs = dict(
        num_particles=num_particles,
        vectorize_particles=vectorize,
        **_plate_kwargs(max_plate_nesting),
    )
    if jit:
        kwargs["ignore_jit_warnings"] = True
    return WeightedKL(cls(**kwargs), beta)


_SPECS = (
    ElboSpec(
        "trace",
        "Trace_ELBO: Monte Carlo ELBO (estimator=stl: sticking the landing)",
        _trace,
        options=("estimator",),
    ),
    # JitTraceMeanField_ELBO measured 8x slower than the Python version here: no JIT.
    ElboSpec(
        "meanfield",
        "TraceMeanField_ELBO: ELBO with analytic KL terms",
        _pyro(infer.TraceMeanField_ELBO, None),
        jit=False,
    ),
    ElboSpec(
        "iwae",
        "importance-weighted bound, K per data point (estimator=dreg: DReG)",
        _iwae,
        default_particles=8,
        jit=False,
        options=("estimator",),
    ),
    ElboSpec(
        "renyi",
        "RenyiELBO: Renyi alpha-divergence bound (alpha=0.5 by default)",
        _renyi,
        default_particles=8,
        jit=False,
        options=("alpha",),
    ),
    ElboSpec(
        "tracegraph",
        "TraceGraph_ELBO: score-function terms with Rao-Blackwellization",
        _pyro(infer.TraceGraph_ELBO, infer.JitTraceGraph_ELBO),
    ),
    ElboSpec(
        "enum", "TraceEnum_ELBO: discrete latent sites summed out exactly", _enum, discrete=True
    ),
    ElboSpec(
        "weighted_kl",
        "beta-weighted KL: E[log p(x|z)] - beta * KL(q || p)",
        _weighted_kl,
        options=("beta", "analytic"),
    ),
)

ELBOS: dict[str, ElboSpec] = {spec.name: spec for spec in _SPECS}


def get_elbo_spec(name: str) -> ElboSpec:
    """Return the spec of ELBO ``name`` (UnknownNameError lists the valid names)."""
    try:
        return ELBOS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("ELBO", name, ELBOS) from None


def make_elbo(
    name: str,
    num_particles: int | None = None,
    vectorize_particles: bool = True,
    jit: bool = False,
    max_plate_nesting: int | None = None,
    **options: Any,
):
    """Build ELBO ``name``.

    Parameters
    ----------
    name : str
        Registered name (see :data:`ELBOS`).
    num_particles : int, optional
        Particles per step (K for ``iwae``); the ELBO's default when omitted.
    vectorize_particles : bool
        Draw the particles in one vectorized pass (ignored where unsupported).
    jit : bool
        Use the JIT-compiled variant where one exists.
    max_plate_nesting : int, optional
        Plate depth of the model.
    **options
        ELBO-specific options (``alpha`` for ``renyi``, ``beta`` for ``weighted_kl``,
        ``estimator`` for ``trace`` and ``iwae``).
    """
    spec = get_elbo_spec(name)
    n = spec.default_particles if num_particles is None else num_particles
    check_option("num_particles", n, kind=int, low=1)
    vectorize = bool(vectorize_particles and spec.vectorize and n > 1)
    return spec.build(n, vectorize, bool(jit and spec.jit), max_plate_nesting, **options)
