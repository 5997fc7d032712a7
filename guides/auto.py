"""Pyro's autoguides behind one naming scheme: ``auto_<family>``."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch
from pyro import poutine
from pyro.infer import autoguide
from pyro.infer.autoguide import initialization as init

from guides.spec import GuideSpec
from vimodels.errors import IncompatibleError, OptionError, check_option

#: auto_iaf_normal learns at this fraction of the fit's lr (GuideSpec.lr_scale)
IAF_LR_SCALE = 0.25

INIT_LOC_FNS: dict[str, Callable] = {
    "feasible": init.init_to_feasible,
    "median": init.init_to_median,
    "mean": init.init_to_mean,
    "sample": init.init_to_sample,
    "uniform": init.init_to_uniform,
}


def resolve_init_loc_fn(value: str | Callable | None) -> Callable | None:
    """Map an ``init_loc_fn`` option (a name in :data:`INIT_LOC_FNS` or a callable)."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and value.removeprefix("init_to_") in INIT_LOC_FNS:
        return INIT_LOC_FNS[value.removeprefix("init_to_")]
    raise OptionError(
        f"init_loc_fn must be a callable or one of {', '.join(INIT_LOC_FNS)}, got {value!r}"
    )


class AutoIAFNormal(autoguide.AutoIAFNormal):
    """Pyro's ``AutoIAFNormal`` without the parameter alias that breaks its JIT ELBO.

    Pyro's ``AutoNormalizingFlow.get_posterior`` keeps the flow's first
    parameter as ``self._prototype_tensor`` (only for its dtype and device);
    assigned to a ``PyroModule``, that registers the same ``nn.Parameter`` a
    second time under ``<name>._prototype_tensor``. ``torch.jit.trace`` then
    sees one tensor passed twice and gives the second input a fresh alias, so
    the traced ELBO fails Pyro's check ``constrained_param.unconstrained() is
    unconstrained_param`` (an ``AssertionError``: pyro-ppl/pyro issue 3132,
    open for Pyro 1.9) and the fit falls back to the Python ELBO. The alias
    also gives the first weight two Adam states, i.e. two updates a step.
    Here the prototype is a plain zero-dimensional tensor of the flow's dtype
    and device, which is all ``get_base_dist`` uses.
    """

    def get_posterior(self, *args, **kwargs):
        """The flow; builds it on the first call (prototype kept as a plain tensor).

        The flow's networks take the dtype of the model's latents: built in torch's
        default (float32) for a float64 model, their first matrix product raised
        ``expected m1 and m2 to have the same dtype``.
        """
        if self.transform is None:
            transform = self._init_transform_fn(self.latent_dim)
            like = self._latent_value()
            if isinstance(transform, torch.nn.Module) and like is not None:
                transform = transform.to(dtype=like.dtype, device=like.device)
            self.transform = transform
            for _, p in self.named_pyro_params():
                self._prototype_tensor = torch.zeros((), dtype=p.dtype, device=p.device)
                break
        return super().get_posterior(*args, **kwargs)

    def _latent_value(self) -> torch.Tensor | None:
        """The prototype trace's first floating latent value (its dtype and device), if any."""
        for _, site in self.prototype_trace.iter_stochastic_nodes():
            value = site["value"]
            if torch.is_tensor(value) and value.is_floating_point():
                return value
        return None


class AutoStructured(autoguide.AutoStructured):
    """Pyro's ``AutoStructured`` whose linear dependencies take the model's dtype.

    Pyro builds each ``"linear"`` dependency as a ``torch.nn.Linear`` in torch's
    default dtype (float32); for a float64 model the guide's first call raised
    ``expected m1 and m2 to have the same dtype``. The layers Pyro built are cast
    to the dtype and device of the guide's locations (the model's latents) once
    they exist; a dependency or conditional given as a callable is the user's and
    is left as given (it must take the model's dtype).
    """

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        like = next((p for p in self.locs.parameters() if p.is_floating_point()), None)
        if like is None:
            return
        for name, upstream in self.dependencies.items():
            for up, dep in upstream.items():
                if not (isinstance(dep, str) and dep == "linear"):
                    continue
                try:
                    layer = attrgetter(f"{name}.{up}")(self.deps)
                except AttributeError:  # a site Pyro built no dependency for
                    continue
                layer.to(dtype=like.dtype, device=like.device)


def _hide(model: Callable, hidden: tuple[str, ...]) -> Callable:
    return poutine.block(model, hide=list(hidden)) if hidden else model


def _common(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "init_scale" in options:
        value = options.pop("init_scale")
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        check_option("init_scale", value, kind=float, low=0.0, low_inclusive=False)
        out["init_scale"] = value
    if "init_loc_fn" in options:
        fn = resolve_init_loc_fn(options.pop("init_loc_fn"))
        if fn is not None:
            out["init_loc_fn"] = fn
    return out


def _reject_rest(name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    if options:
        raise OptionError(
            f"guide {name!r} does not take option(s) {', '.join(sorted(options))}; "
            f"it takes: {', '.join(allowed) or 'no options'}"
        )


def _simple(cls: type, name: str, allowed: tuple[str, ...]):
    def factory(model: Callable, data: dict, hidden: tuple[str, ...] = (), **options):
        options = dict(options)
        kwargs = _common(options)
        if "init_scale" not in allowed:
            kwargs.pop("init_scale", None)
        _reject_rest(name, options, allowed)
        return cls(_hide(model, hidden), **kwargs)

    factory.__name__ = f"make_{name}"
    return factory


def _lowrank(model: Callable, data: dict, hidden: tuple[str, ...] = (), **options):
    options = dict(options)
    kwargs = _common(options)
    if "rank" in options:
        rank = options.pop("rank")
        check_option("rank", rank, kind=int, low=1)
        kwargs["rank"] = rank
    _reject_rest("auto_lowrank_multivariate_normal", options, ("init_scale", "init_loc_fn", "rank"))
    return autoguide.AutoLowRankMultivariateNormal(_hide(model, hidden), **kwargs)


def _iaf(model: Callable, data: dict, hidden: tuple[str, ...] = (), **options):
    options = dict(options)
    kwargs = _common(options)
    kwargs.pop("init_scale", None)
    if "num_transforms" in options:
        n = options.pop("num_transforms")
        check_option("num_transforms", n, kind=int, low=1)
        kwargs["num_transforms"] = n
    if "hidden_dim" in options:
        h = options.pop("hidden_dim")
        hs = [h] if isinstance(h, int) else list(h)
        for v in hs:
            check_option("hidden_dim", v, kind=int, low=1)
        kwargs["hidden_dim"] = hs
    _reject_rest("auto_iaf_normal", options, ("init_loc_fn", "num_transforms", "hidden_dim"))
    kwargs.setdefault("num_transforms", 2)
    return AutoIAFNormal(_hide(model, hidden), **kwargs)


def _structured(model: Callable, data: dict, hidden: tuple[str, ...] = (), **options):
    options = dict(options)
    kwargs = _common(options)
    for key in ("conditionals", "dependencies"):
        if key in options:
            kwargs[key] = options.pop(key)
    _reject_rest(
        "auto_structured", options, ("init_scale", "init_loc_fn", "conditionals", "dependencies")
    )
    kwargs.setdefault("conditionals", "normal")
    kwargs.setdefault("dependencies", "linear")
    return AutoStructured(_hide(model, hidden), **kwargs)


_LAPLACE_OPTIONS = ("num_inits", "max_iters", "history_size", "dtype", "gtol", "ftol", "max_dim")

#: Guides fitted by L-BFGS instead of SVI (vimodels.mode, vimodels.svi.by_optimizer),
#: with the options each takes.
OPTIMIZER_GUIDES: dict[str, tuple[str, ...]] = {
    "pathfinder": (
        "num_paths",
        "num_draws",
        "num_elbo_draws",
        "history_size",
        "max_iters",
        "dtype",
        "gtol",
        "ftol",
        "mixture",
        "lbfgs_history_size",
        "resample",
    ),
    "auto_laplace": _LAPLACE_OPTIONS,
    "auto_laplace_is": _LAPLACE_OPTIONS,
    "auto_delta": ("num_inits", "max_iters", "history_size", "dtype", "gtol", "ftol"),
    "nested_laplace": ("hyper_sites", "grid_step", "grid_drop", "dtype", "resample"),
}


def _optimizer_options(name: str) -> tuple[str, ...]:
    return OPTIMIZER_GUIDES[name]


def _fitted_by_optimizer(name: str, call: str) -> Callable:
    """Pathfinder and nested Laplace have no SVI guide to build: ``vimodels.fit`` runs them."""

    def build(model: Callable, data: dict, hidden: tuple[str, ...] = (), **options):
        raise IncompatibleError(
            f"guide {name!r} is fitted by its own optimizer, not built for SVI: call "
            f"vimodels.fit(model, guide={name!r}) or {call}"
        )

    return build


_SCALE = ("init_scale", "init_loc_fn")

#: Autoguides that lay their parameters out from the shapes of one prototype trace
#: (Pyro's ``AutoContinuous`` family and ``AutoStructured``): a latent site inside a
#: subsampled plate gets one batch's worth of parameters, shared by whichever rows a
#: step draws. ``auto_normal`` (and ``auto_delta``) keep a parameter per row instead.
BATCH_SHAPED_GUIDES = frozenset(
    {
        "auto_diagonal_normal",
        "auto_multivariate_normal",
        "auto_lowrank_multivariate_normal",
        "auto_iaf_normal",
        "auto_structured",
    }
)

AUTO_GUIDES: tuple[GuideSpec, ...] = (
    GuideSpec(
        "auto_normal",
        _simple(autoguide.AutoNormal, "auto_normal", _SCALE),
        "AutoNormal: mean-field Normal per site in unconstrained space",
        options=_SCALE,
    ),
    GuideSpec(
        "auto_diagonal_normal",
        _simple(autoguide.AutoDiagonalNormal, "auto_diagonal_normal", _SCALE),
        "AutoDiagonalNormal: one diagonal Normal over all latents",
        options=_SCALE,
    ),
    GuideSpec(
        "auto_multivariate_normal",
        _simple(autoguide.AutoMultivariateNormal, "auto_multivariate_normal", _SCALE),
        "AutoMultivariateNormal: full-rank Gaussian over all latents",
        options=_SCALE,
    ),
    GuideSpec(
        "auto_lowrank_multivariate_normal",
        _lowrank,
        "AutoLowRankMultivariateNormal: low-rank plus diagonal covariance",
        options=(*_SCALE, "rank"),
    ),
    GuideSpec(
        "auto_iaf_normal",
        _iaf,
        "AutoIAFNormal: inverse autoregressive normalizing flow",
        options=("init_loc_fn", "num_transforms", "hidden_dim"),
        # each output of its MADE networks sums 3 x dim + 1 hidden units: at lr = 0.02 the
        # default radon and sleep-study fits blew up (loss 1e4 -> 1e27 in 5 steps, then inf)
        lr_scale=IAF_LR_SCALE,
    ),
    GuideSpec(
        "auto_delta",
        _simple(autoguide.AutoDelta, "auto_delta", ("init_loc_fn",)),
        "AutoDelta: point estimate, the MAP by L-BFGS; its ELBO omits entropy",
        options=_optimizer_options("auto_delta"),
    ),
    GuideSpec(
        "auto_laplace",
        _simple(autoguide.AutoLaplaceApproximation, "auto_laplace", ("init_loc_fn",)),
        "Laplace: L-BFGS mode, Gaussian from the exact Hessian (checked positive definite)",
        options=_optimizer_options("auto_laplace"),
    ),
    GuideSpec(
        "auto_laplace_is",
        _simple(autoguide.AutoLaplaceApproximation, "auto_laplace_is", ("init_loc_fn",)),
        "Laplace's Gaussian as a proposal; draws PSIS-resampled by log p - log q",
        options=_optimizer_options("auto_laplace_is"),
    ),
    GuideSpec(
        "pathfinder",
        _fitted_by_optimizer("pathfinder", "vimodels.pathfinder(model, data)"),
        "Pathfinder: 4 L-BFGS paths' best Gaussians, draws PSIS-resampled (Zhang et al. 2022)",
        options=_optimizer_options("pathfinder"),
    ),
    GuideSpec(
        "nested_laplace",
        _fitted_by_optimizer("nested_laplace", "vimodels.mode.nested_laplace(potential)"),
        "Nested Laplace (INLA's grid): Gaussians of the latents at grid points of a few "
        "hyperparameters, draws PSIS-resampled",
        options=_optimizer_options("nested_laplace"),
    ),
    GuideSpec(
        "auto_structured",
        _structured,
        "AutoStructured: Normal conditionals with linear dependencies between sites",
        options=(*_SCALE, "conditionals", "dependencies"),
    ),
)
