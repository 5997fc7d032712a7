"""Optimizer-based methods as a :class:`~vimodels.svi.result.FitResult`, like any SVI fit.

``fit_by_optimizer`` runs ``pathfinder``, ``auto_laplace`` (L-BFGS mode plus the
exact Hessian), ``auto_laplace_is`` (the same, importance-resampled),
``auto_delta`` (L-BFGS constrained MAP) or ``nested_laplace`` (Gaussians at the
grid points of a few hyperparameters, importance-resampled) and wraps the result: its guide is a
Pyro guide over the model's latent sites (a fixed Gaussian or mixture of
Gaussians; ``AutoDelta`` at the MAP), so ``sample``, ``log_weights``, PSIS
k-hat, ArviZ export, compare and sweeps treat it as any other fit.
``vimodels.fit(model, guide=name)`` calls it for these names.

Pathfinder (by default) and ``auto_laplace_is`` resample: the guide is the
proposal (the equal-weight mixture of the paths' best Gaussians, as in the
paper's multi-path Algorithm 2, or Laplace's Gaussian) and
``settings["resample"]`` makes ``sample`` and ArviZ export return draws
resampled by Pareto-smoothed importance weights ``log p - log q``
(:mod:`vimodels.svi.resample`); the fit's Pareto k is in
``settings["resample"]["k_hat"]`` and the message, which flags 0.7 or more.

The methods themselves are in :mod:`vimodels.mode`; this module only binds
the model (as SVI does) and wraps their result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_value

from guides.auto import OPTIMIZER_GUIDES
from vimodels.errors import IncompatibleError, OptionError, check_option
from vimodels.mode.guides import gaussian_guide, initialize_gaussian_guide
from vimodels.mode.laplace import MAX_HESSIAN_DIM, Gaussian, laplace_from_mode
from vimodels.mode.lbfgs import ModeResult, find_mode
from vimodels.mode.nested import nested_laplace
from vimodels.mode.pathfinder import PathfinderResult, pathfinder
from vimodels.mode.potential import Potential, make_potential
from vimodels.svi.binding import bind, keyword_call, latent_sites, positional_kwargs
from vimodels.svi.reparam import reparam_note, reparam_settings
from vimodels.svi.resample import khat_note, resample_settings
from vimodels.svi.result import CONVERGED, DIVERGED, MAX_STEPS, FitResult
from vimodels.svi.weights import elbo_estimate, log_weights
from vimodels.versions import versions

#: Guides that ``fit(..., init="laplace" | "pathfinder")`` can start from a Gaussian.
INIT_GUIDES = ("auto_normal", "auto_multivariate_normal", "auto_lowrank_multivariate_normal")
INIT_METHODS = ("laplace", "pathfinder")


def check_init(init: Any, guide: Any) -> None:
    """Raise OptionError / IncompatibleError for an ``init`` that ``fit`` cannot use."""
    if init is None:
        return
    if init not in INIT_METHODS:
        raise OptionError(f"init must be None, 'laplace' or 'pathfinder', got {init!r}")
    if not (isinstance(guide, str) and guide in INIT_GUIDES):
        name = guide if isinstance(guide, str) else getattr(guide, "__name__", "user guide")
        raise IncompatibleError(
            f"init={init!r} starts a Gaussian autoguide ({', '.join(INIT_GUIDES)}); "
            f"guide {name!r} is not one. Drop init or use one of those guides"
        )


def options_for_guide(options: Mapping[str, Any], guide: Any) -> dict[str, Any]:
    """``options`` without ``init`` where ``guide`` cannot start from a Gaussian.

    A grid (``compare``, sweeps) passes one set of fit options to every guide:
    ``init`` then starts the Gaussian autoguides and leaves the others as they are.
    """
    out = dict(options)
    if out.get("init") is not None and not (isinstance(guide, str) and guide in INIT_GUIDES):
        out.pop("init")
    return out


# options the SVI guides take that mean nothing here but may come from a grid
_IGNORED = ("init_loc_fn",)


def _check_options(guide: str, options: Mapping[str, Any]) -> dict[str, Any]:
    opts = {k: v for k, v in options.items() if k not in _IGNORED}
    unknown = set(opts) - set(OPTIMIZER_GUIDES[guide])
    if unknown:
        raise OptionError(
            f"guide {guide!r} does not take option(s) {', '.join(sorted(unknown))}; it takes: "
            f"{', '.join(OPTIMIZER_GUIDES[guide])}"
        )
    for key in (
        "num_paths",
        "num_draws",
        "num_elbo_draws",
        "history_size",
        "max_iters",
        "lbfgs_history_size",
        "num_inits",
    ):
        if key in opts:
            check_option(key, opts[key], kind=int, low=1)
    if "num_inits" in opts:
        check_option("num_inits", opts["num_inits"], kind=int, low=1)
    if "dtype" in opts:
        dt = opts["dtype"]
        dt = {"float64": torch.float64, "float32": torch.float32}.get(dt, dt)
        if dt not in (torch.float64, torch.float32):
            raise OptionError(f"dtype must be 'float64' or 'float32', got {opts['dtype']!r}")
        opts["dtype"] = dt
    return opts


def mode_report_dict(mode: ModeResult) -> dict[str, Any]:
    """JSON-friendly form of a mode's report."""
    r = mode.report
    return {
        "converged": r.converged,
        "message": r.message,
        "unbounded": r.unbounded,
        "best": r.best,
        "num_evals": r.num_evals,
        "wall_time_s": r.wall_time,
        "runs": [asdict(run) for run in r.runs],
    }


def fit_by_optimizer(
    model: Any,
    data: Mapping[str, Any] | None = None,
    *,
    guide: str,
    elbo: str = "trace",
    seed: int = 0,
    num_eval: int = 1000,
    sites: tuple[str, ...] | None = None,
    guide_options: Mapping[str, Any] | None = None,
    num_threads: int | None = 1,
    reparam: str | None = None,
) -> Any:
    """Fit ``pathfinder``, ``auto_laplace`` or ``auto_delta`` by L-BFGS; a ``FitResult``.

    Parameters
    ----------
    model, data, seed, num_eval, sites, num_threads, reparam
        As for :func:`vimodels.fit`.
    guide : str
        One of :data:`OPTIMIZER_GUIDES`.
    elbo : str
        Recorded as the result's ``elbo_name``; the reported ELBO is the standard
        one, ``mean(log p(x, z) - log q(z))`` over ``num_eval`` guide draws.
    guide_options : dict, optional
        Options of the method (see :data:`OPTIMIZER_GUIDES`; ``dtype`` as
        ``"float64"`` or ``"float32"``).

    Returns
    -------
    FitResult
        ``status`` ``converged`` when the L-BFGS runs met their tolerance,
        ``diverged`` (ELBO NaN, draws at the last iterate) when ``auto_delta``'s
        or ``auto_laplace``'s density is unbounded (no mode exists), else
        ``max_steps``; ``losses`` are ``-log p`` along the chosen L-BFGS run (none for
        ``nested_laplace``: ``settings["nested_laplace"]`` has log p~ at its grid points);
        ``settings["mode"]`` (Laplace, delta) or ``settings["pathfinder"]`` report it.

    Raises
    ------
    CurvatureError
        ``auto_laplace`` when the Hessian at the mode is not positive definite.
    IncompatibleError
        For a model with discrete latent sites.
    """
    if guide not in OPTIMIZER_GUIDES:
        raise OptionError(f"guide must be one of {', '.join(OPTIMIZER_GUIDES)}, got {guide!r}")
    opts = _check_options(guide, guide_options or {})
    check_option("seed", seed, kind=int, low=0)
    check_option("num_eval", num_eval, kind=int, low=2)
    binding = bind(model, data, discrete_ok=True, sites=sites, reparam=reparam)
    # the fitted Gaussian draws in the dtype the model's latents have (float64 data
    # makes float64 latents; a float32 draw would then meet float64 in a matmul)
    latent_dtype = next(
        (
            s["value"].dtype
            for s in latent_sites(binding.trace).values()
            if torch.is_floating_point(s["value"])
        ),
        torch.float32,
    )
    if binding.hidden:
        raise IncompatibleError(
            f"guide {guide!r} needs continuous latents; model {binding.name!r} has discrete "
            f"site(s) {', '.join(binding.hidden)}. Use an SVI guide with elbo='enum', or "
            "marginalize them in the model"
        )
    depth, args, bound_model = binding.depth, binding.args, binding.model
    dtype = opts.pop("dtype", torch.float64)
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        check_option("num_threads", num_threads, kind=int, low=1)
        torch.set_num_threads(num_threads)
    settings: dict[str, Any] = {
        "guide": guide,
        "guide_options": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in opts.items()},
        "elbo": elbo,
        "optimizer": "L-BFGS (strong Wolfe)",
        "dtype": str(dtype).removeprefix("torch."),
        "num_threads": torch.get_num_threads(),
        "max_plate_nesting": depth,
        "discrete_sites": [],
        "num_eval": num_eval,
        "average": False,
        "averaged": None,
        "step_compiler": "none",
        "versions": versions(),
        "reparam": reparam_settings(binding.decentered) if binding.decentered else None,
    }
    try:
        with pyro.get_param_store().scope() as state:
            t0 = time.perf_counter()
            potential = make_potential(
                binding.model_fn,
                binding.data,
                dtype=dtype,
                jacobian=guide != "auto_delta",
                seed=seed,
            )
            unbounded = False
            resample = guide == "auto_laplace_is"
            if guide == "nested_laplace":
                resample = bool(opts.pop("resample", True))
                nl = nested_laplace(potential, **opts)
                sample_guide = gaussian_guide(
                    bound_model,
                    tuple(Gaussian(m, t) for m, t in zip(nl.locs, nl.scale_trils)),
                    latent_dtype,
                    potential,
                    nl.logits,
                )
                # no loss trajectory: log p~ at the grid points is not an ELBO to plot
                losses = np.zeros(0)
                converged = "NOT converged" not in nl.message
                num_steps = nl.iterations
                message = f"nested Laplace: {nl.message}"
                params = {
                    "locs": nl.locs.double().numpy(),
                    "scale_trils": nl.scale_trils.double().numpy(),
                    "logits": nl.logits.double().numpy(),
                }
                settings["nested_laplace"] = {
                    "message": nl.message,
                    "hyper_sites": list(nl.hyper_sites),
                    "mode": nl.mode.tolist(),
                    "hyper_cov": nl.hyper_cov.tolist(),
                    "num_grid_points": len(nl.grid),
                    "grid": nl.grid.tolist(),
                    "log_marginal": nl.log_marginal.tolist(),
                    "num_evals": nl.num_evals,
                    "wall_time_s": nl.wall_time,
                }
            elif guide == "pathfinder":
                resample = bool(opts.pop("resample", True))
                # the proposal of the resampling is the paper's mixture of the paths
                mixture = bool(opts.pop("mixture", resample))
                pf = pathfinder(None, potential=potential, seed=seed, **opts)
                sample_guide = _pathfinder_guide(bound_model, pf, mixture, latent_dtype, potential)
                best_path = max(
                    (r for r in pf.paths if r.best is not None), key=lambda r: r.best.elbo
                )
                losses = -best_path.path.log_densities.double().numpy()
                converged = all(r.path.converged for r in pf.paths if r.best is not None)
                num_steps = int(sum(r.path.num_iters for r in pf.paths))
                message = f"Pathfinder: {pf.message}"
                params = {
                    "locs": np.stack([c.loc.double().numpy() for c in pf.components]),
                    "scale_trils": np.stack([c.scale_tril.double().numpy() for c in pf.components]),
                }
                settings["pathfinder"] = {
                    "message": pf.message,
                    "k_hat": pf.k_hat,
                    "elbo_mixture": pf.elbo,
                    "num_evals": pf.num_evals,
                    "num_components": len(pf.components),
                    "component_elbos": list(pf.component_elbos),
                    "guide": "mixture" if mixture else f"component {pf.best + 1}",
                    "best_iterations": [r.best.iteration for r in pf.paths if r.best],
                    "path_lengths": [r.path.num_iters for r in pf.paths],
                    "path_reasons": [r.path.reason for r in pf.paths],
                }
            else:
                mode_opts = {k: v for k, v in opts.items() if k != "max_dim"}
                mode = find_mode(None, potential=potential, seed=seed, **mode_opts)
                path = mode.paths[mode.report.best]
                losses = -path.log_densities.double().numpy()
                converged = mode.report.converged
                num_steps = int(sum(p.num_iters for p in mode.paths))
                settings["mode"] = mode_report_dict(mode)
                unbounded = mode.report.unbounded is not None
                if unbounded:  # no mode: no Laplace; the delta guide keeps a result to inspect
                    sample_guide = _delta_guide(bound_model, args, mode, latent_dtype)
                    message = f"{guide}: {mode.report.message}"
                    params = None
                elif guide in ("auto_laplace", "auto_laplace_is"):
                    lap = laplace_from_mode(mode, opts.get("max_dim", MAX_HESSIAN_DIM))
                    sample_guide = gaussian_guide(
                        bound_model, (lap.gaussian,), latent_dtype, potential
                    )
                    message = f"Laplace at the L-BFGS mode: {mode.report.message}"
                    if resample:
                        message = f"importance-resampled {message}"
                    params = {
                        "loc": lap.loc.double().numpy(),
                        "scale_tril": lap.gaussian.scale_tril.double().numpy(),
                    }
                else:
                    sample_guide = _delta_guide(bound_model, args, mode, latent_dtype)
                    message = f"MAP by L-BFGS: {mode.report.message}"
                    params = None
            wall = time.perf_counter() - t0
            pyro.set_rng_seed(seed + 3)
            evaluation: dict[str, Any] = {}
            if unbounded:  # log p at the last iterate is arbitrary: no ELBO to report
                est, se = float("nan"), float("nan")
            else:
                with torch.no_grad(), pyro.validation_enabled(False):
                    log_w = log_weights(
                        keyword_call(bound_model),
                        keyword_call(sample_guide),
                        positional_kwargs(args),
                        num_eval,
                        depth,
                        report=evaluation,
                    )
                # as an SVI fit records it: later draws skip the particle check it passed
                settings["eval_vectorized"] = evaluation.get("vectorized")
                settings["eval_vectorized_note"] = evaluation.get("reason")
                est, se = elbo_estimate(log_w)
                if resample:
                    settings["resample"] = resample_settings(log_w)
                    rs = settings["resample"]
                    note = khat_note(rs["k_hat"], len(log_w), rs["zero_weight"])
                    message = f"{message}; {note}"
            if params is None:
                params = {
                    name: pyro.param(name).detach().double().numpy().copy()
                    for name in pyro.get_param_store().keys()
                }
    finally:
        torch.set_num_threads(threads_before)
    if binding.decentered:
        message = f"{message}; {reparam_note(binding.decentered)}"
    return FitResult(
        model_name=binding.name,
        guide_name=guide,
        elbo_name=elbo,
        losses=np.asarray(losses, dtype=float),
        elbo=est,
        elbo_se=se,
        params=params,
        status=DIVERGED if unbounded else (CONVERGED if converged else MAX_STEPS),
        converged=converged,
        num_steps=num_steps,
        wall_time=wall,
        seed=seed,
        settings=settings,
        message=message,
        sites=binding.sites,
        entry=binding.entry,
        model=bound_model,
        guide=sample_guide,
        args=args,
        data=binding.data,
        param_state=state,
        max_plate_nesting=depth,
        discrete_sites=(),
        site_shapes=binding.site_shapes,
    )


def _pathfinder_guide(
    model: Callable,
    pf: PathfinderResult,
    mixture: bool,
    dtype: torch.dtype,
    potential: Potential | None = None,
) -> Any:
    """The best component's Gaussian, or (``mixture``) the equal-weight mixture of all."""
    components = pf.components if mixture else (pf.components[pf.best],)
    return gaussian_guide(model, components, dtype, potential)


def _delta_guide(model: Callable, args: tuple, mode: ModeResult, dtype: torch.dtype) -> Any:
    """An ``AutoDelta`` whose parameters are the constrained MAP (registered in the scope).

    In ``dtype``, the model's latents' (a float64 model's MAP was rounded to torch's
    default float32: 1e-7 relative, a posterior sd where the data pin a coefficient
    of order 100 to 1e-4).
    """
    values = {k: torch.as_tensor(v, dtype=dtype) for k, v in mode.values.items()}
    guide = autoguide.AutoDelta(model, init_loc_fn=init_to_value(values=values))
    guide(*args)  # creates the parameters at the MAP
    return guide


def gaussian_for_init(
    init: str,
    model_fn: Callable,
    data: Mapping[str, Any],
    seed: int,
    hidden: tuple[str, ...] = (),
) -> tuple[Gaussian, Potential, str]:
    """The Gaussian an SVI fit starts from (``init="laplace"`` or ``"pathfinder"``).

    Returns
    -------
    gaussian : Gaussian
        Laplace's, or the best-ELBO one of Pathfinder's paths.
    potential : Potential
        Its layout.
    note : str
        One line for the fit's settings.

    Raises
    ------
    IncompatibleError
        ``init="laplace"`` on a density without a mode (unbounded).
    """
    if init not in ("laplace", "pathfinder"):
        raise OptionError(f"init must be None, 'laplace' or 'pathfinder', got {init!r}")
    if hidden:
        raise IncompatibleError(
            f"init={init!r} needs continuous latents; the model has discrete site(s) "
            f"{', '.join(hidden)}"
        )
    t0 = time.perf_counter()
    potential = make_potential(model_fn, data, dtype=torch.float64, seed=seed)
    if init == "laplace":
        mode = find_mode(None, potential=potential, seed=seed)
        if mode.report.unbounded is not None:
            raise IncompatibleError(
                f"init='laplace' needs a mode, and {mode.report.unbounded}; or start with "
                "init='pathfinder' or no init"
            )
        lap = laplace_from_mode(mode)
        note = f"laplace: {mode.report.message}"
        gaussian = lap.gaussian
    else:
        pf = pathfinder(None, potential=potential, seed=seed)
        gaussian = pf.components[pf.best]
        note = f"pathfinder: {pf.message}"
    return gaussian, potential, f"{note} ({time.perf_counter() - t0:.2f} s)"


def init_learning_rate(lr: float, gaussian: Gaussian) -> tuple[float, str | None]:
    """Adam's learning rate for SVI started at ``gaussian``: at most 0.1 of its smallest sd.

    Adam's steps are about ``lr`` in every coordinate whatever its scale: at
    the default 0.02 a parameter with posterior sd 0.001 would be thrown 20 sd
    from the start in one step. Returns the rate and a note (None if unchanged).
    """
    cap = 0.1 * float(gaussian.sd.min())
    if cap >= lr:
        return lr, None
    return cap, (
        f"lr lowered from {lr:g} to {cap:.3g} (0.1 x the smallest posterior sd of the start)"
    )


def apply_init(guide: Any, gaussian: Gaussian, potential: Potential, args: tuple) -> None:
    """Run ``guide`` once (creating its parameters) and start them at ``gaussian``.

    Called inside the fit's parameter-store scope, before the first SVI step.
    """
    with poutine.block():
        guide(*args)
    initialize_gaussian_guide(guide, gaussian, potential)
