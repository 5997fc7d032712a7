"""The SVI fit loop and its immutable result.

``fit`` accepts a catalog name, a :class:`CatalogEntry` or a user's Pyro model
with a data dict, builds the guide and ELBO by name, and runs Adam with:

- a seed (same seed, same losses on CPU) and one torch thread by default
  (small models run many times slower with two threads on a loaded 2-core
  machine; pass ``num_threads`` to change it);
- Pyro validation on for the first step and off in the hot loop;
- JIT-compiled ELBOs where valid, falling back with a one-line message, and
  for reparameterized ``trace`` and ``meanfield`` fits of at least
  :data:`COMPILE_MIN_STEPS` steps the loss and its gradients compiled together
  into one graph (:mod:`vimodels.compile.step`), checked against Pyro's ELBO;
  which ran is ``settings["step_compiler"]`` (``"fx"``, ``"jit"`` or ``"python"``);
- a statistical convergence rule (:mod:`vimodels.svi.convergence`);
- a guard that stops at the first non-finite loss or gradient, keeping the
  last good parameters, and a Ctrl-C handler that keeps the partial result.
"""

from __future__ import annotations

import importlib.metadata
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoLaplaceApproximation
from pyro.infer.util import zero_grads
from pyro.poutine.util import site_is_subsample

import guides as guide_registry
from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.registry import get_model
from vimodels.compile.step import StepCompileError, compile_step
from vimodels.compile.step import supports as compiles_step
from vimodels.data import prepare_data, trace_check
from vimodels.errors import IncompatibleError, OptionError, check_option
from vimodels.svi import elbos as elbo_registry
from vimodels.svi.averaging import IterateAverage
from vimodels.svi.convergence import ConvergenceRule, is_flat
from vimodels.svi.weights import draw_sites, elbo_estimate, log_weights

# Fits shorter than this keep the JIT ELBO: compiling the step costs about half
# a second (plus a one-off second or two per process for torch's tracing
# machinery) and saves about a millisecond per step of a small model.
COMPILE_MIN_STEPS = 1000

CONVERGED = "converged"
MAX_STEPS = "max_steps"
NONFINITE = "nonfinite"
INTERRUPTED = "interrupted"


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


@dataclass(frozen=True)
class FitProgress:
    """What a fit's ``callback`` sees after each successful step.

    Attributes
    ----------
    step : int
        Steps completed so far (1 after the first step).
    loss : float
        Loss of the step just taken (negative objective, nats).
    elapsed : float
        Seconds since the loop started, excluding the time spent in earlier
        callbacks.
    """

    step: int
    loss: float
    elapsed: float
    _draw: Callable = field(repr=False)

    def sample(
        self, num_samples: int = 1000, seed: int | None = None, sites: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Draw from the guide at the current parameters, as :meth:`FitResult.sample` does.

        The fit's random stream is saved and restored around the draws, so a
        callback that samples does not change the fit. (An ``auto_laplace`` guide
        draws its MAP point here; its Laplace approximation is built at the end.)

        Returns
        -------
        dict of str to ndarray
            ``(num_samples, *site_shape)`` per site (default: the sites of interest).
        """
        check_option("num_samples", num_samples, kind=int, low=1)
        state = pyro.util.get_rng_state()
        try:
            if seed is not None:
                pyro.set_rng_seed(seed)
            with pyro.validation_enabled(False):
                return self._draw(num_samples, sites)
        finally:
            pyro.util.set_rng_state(state)


@dataclass(frozen=True)
class FitResult:
    """What a fit produced. Immutable; parameters are kept in their own store state.

    Attributes
    ----------
    model_name, guide_name, elbo_name : str
    losses : ndarray, shape (num_steps,)
        Loss (negative objective, nats) per step.
    elbo, elbo_se : float
        ELBO estimate (nats) from ``num_eval`` draws and its standard error.
    params : dict of str to ndarray
        Constrained parameter values.
    status : str
        ``converged``, ``max_steps``, ``nonfinite`` or ``interrupted``.
    converged : bool
        Whether the stopping rule declared convergence.
    num_steps : int
        Steps completed (excluding a failed one).
    wall_time : float
        Seconds spent in the loop.
    seed : int
    settings : dict
        Settings actually used (ELBO class, particles, JIT, threads, guide options...).
    message : str
        One-line account of how the fit ended.
    sites : tuple of str
        Sites returned by :meth:`sample`.
    """

    model_name: str
    guide_name: str
    elbo_name: str
    losses: np.ndarray
    elbo: float
    elbo_se: float
    params: dict[str, np.ndarray]
    status: str
    converged: bool
    num_steps: int
    wall_time: float
    seed: int
    settings: dict[str, Any]
    message: str
    sites: tuple[str, ...]
    entry: CatalogEntry | None = field(repr=False, default=None)
    model: Callable = field(repr=False, default=None)
    guide: Callable = field(repr=False, default=None)
    args: tuple = field(repr=False, default=())
    data: dict = field(repr=False, default_factory=dict)
    param_state: dict = field(repr=False, default_factory=dict)
    max_plate_nesting: int = 1
    discrete_sites: tuple[str, ...] = ()
    site_shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)

    @property
    def partial(self) -> bool:
        """True when the fit was interrupted or stopped on a non-finite loss."""
        return self.status in (INTERRUPTED, NONFINITE)

    def sample(
        self, num_samples: int = 1000, seed: int | None = None, sites: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Draw from the fitted guide.

        Parameters
        ----------
        num_samples : int
            Number of draws.
        seed : int, optional
            Defaults to the fit's seed + 1.
        sites : tuple of str, optional
            Defaults to the sites of interest.

        Returns
        -------
        dict of str to ndarray
            Each array has shape ``(num_samples, *site_shape)``, constrained space.
        """
        check_option("num_samples", num_samples, kind=int, low=1)
        sites = tuple(sites or self.sites)
        pyro.set_rng_seed(self.seed + 1 if seed is None else seed)
        with pyro.get_param_store().scope(self.param_state):
            return draw_sites(
                _kw(self.model),
                _kw(self.guide),
                self._kwargs(),
                num_samples,
                self.max_plate_nesting,
                sites,
                self.site_shapes,
            )

    def log_weights(self, num_samples: int = 1000, seed: int | None = None) -> np.ndarray:
        """``log p(x, z) - log q(z)`` for ``num_samples`` guide draws, shape ``(num_samples,)``."""
        pyro.set_rng_seed(self.seed + 2 if seed is None else seed)
        with pyro.get_param_store().scope(self.param_state):
            return log_weights(
                _kw(self.model),
                _kw(self.guide),
                self._kwargs(),
                num_samples,
                self.max_plate_nesting,
                discrete=bool(self.discrete_sites),
            )

    def _kwargs(self) -> dict:
        return {f"_{i}": a for i, a in enumerate(self.args)}

    def to_inference_data(self, num_samples: int = 1000, seed: int | None = None):
        """ArviZ InferenceData of guide draws (see :mod:`diagnostics.convert`)."""
        from diagnostics.convert import fit_to_inference_data

        return fit_to_inference_data(self, num_samples=num_samples, seed=seed)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary: names, status, ELBO, timing and settings."""
        return {
            "model": self.model_name,
            "guide": self.guide_name,
            "elbo_name": self.elbo_name,
            "status": self.status,
            "converged": self.converged,
            "message": self.message,
            "num_steps": self.num_steps,
            "final_loss": float(self.losses[-1]) if len(self.losses) else None,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "wall_time_s": self.wall_time,
            "seed": self.seed,
            "settings": _jsonable(self.settings),
        }


def _kw(bound: Bound) -> Callable:
    """Call a positional ``Bound`` with ``_0``, ``_1``... keyword arguments."""

    def fn(**kwargs):
        return bound(*(kwargs[f"_{i}"] for i in range(len(kwargs))))

    fn.__name__ = getattr(bound, "__name__", "fn")
    return fn


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if callable(obj):
        return getattr(obj, "__name__", repr(obj))
    return repr(obj)


def _latent_sites(tr: poutine.Trace) -> dict[str, dict]:
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
        for n, s in _latent_sites(tr).items()
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
    latent = set(_latent_sites(model_tr)) - set(hidden)
    guided = set(_latent_sites(guide_tr))
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


def resolve_model(
    model: str | CatalogEntry | Callable, data: Mapping | None = None
) -> tuple[CatalogEntry | None, Callable, dict, str]:
    """``(entry or None, model function, checked data, name)`` for a name, entry or function.

    Raises
    ------
    UnknownNameError, OptionError, DataError
        For an unknown catalog name, a non-model argument or bad data.
    """
    if isinstance(model, str):
        entry = get_model(model)
    elif isinstance(model, CatalogEntry):
        entry = model
    elif callable(model):
        name = getattr(model, "__name__", "user_model")
        return None, model, prepare_data(model, data), name
    else:
        raise OptionError(
            f"model must be a catalog name, a CatalogEntry or a Pyro model function, "
            f"got {type(model).__name__}"
        )
    base = entry.data()
    if data is not None:
        base.update(data)
    return entry, entry.model, prepare_data(entry.model, base), entry.name


def fit(
    model: str | CatalogEntry | Callable,
    data: Mapping[str, Any] | None = None,
    *,
    guide: str | Callable = "auto_normal",
    elbo: str = "trace",
    num_steps: int = 2000,
    lr: float = 0.02,
    lr_decay: float | None = 0.1,
    num_particles: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    vectorize_particles: bool = True,
    jit: bool | None = None,
    num_threads: int | None = 1,
    guide_options: Mapping[str, Any] | None = None,
    elbo_options: Mapping[str, Any] | None = None,
    convergence: ConvergenceRule | None = None,
    num_eval: int = 1000,
    sites: tuple[str, ...] | None = None,
    validate_first_step: bool = True,
    average: bool = True,
    callback: Callable[[FitProgress], None] | None = None,
) -> FitResult:
    """Fit a guide to a model with SVI.

    Parameters
    ----------
    model : str, CatalogEntry or callable
        A catalog name (see ``vimodels list``), an entry, or a Pyro model called
        as ``model(**data)``.
    data : dict, optional
        Data for a user model; for a catalog entry, overrides of its data.
    guide : str or callable
        Registered guide name (``auto_*`` apply to any model) or a guide function
        called as ``guide(**data)``.
    elbo : str
        ELBO name (see :data:`vimodels.svi.elbos.ELBOS`).
    num_steps : int
        Maximum Adam steps.
    lr : float
        Adam learning rate.
    lr_decay : float, optional
        Final learning rate as a fraction of ``lr``, reached by geometric decay
        over ``num_steps`` (a factor per step); ``None`` keeps ``lr`` fixed.
        The default 0.1 lowers the noise floor of the final parameters: on eight
        schools the full-rank guide gains 0.2 nats of ELBO over a fixed ``lr``.
    num_particles : int, optional
        Particles per step (K for ``iwae``); the ELBO's default when omitted.
    seed : int
        Seed for Pyro, torch and numpy.
    progress : bool, optional
        Show a progress bar; default: only when stderr is a terminal.
    vectorize_particles : bool
        Vectorize particles where the ELBO supports it.
    jit : bool, optional
        JIT-compile the ELBO; default on where a JIT variant exists (falls back
        with a one-line message when the model cannot be traced). Unless it is
        False, a ``trace`` or ``meanfield`` fit of at least
        :data:`COMPILE_MIN_STEPS` steps whose guide draws are all
        reparameterized (no enumeration, no subsampling) runs its steps from
        the second on as one frozen graph of the loss and its gradients, where
        that graph matches Pyro's ELBO (same draws, same loss and gradients);
        otherwise it keeps its ELBO (``settings["step_compiler"]`` says which ran).
    num_threads : int or None
        Torch intra-op threads during the fit (1 by default; None leaves torch's).
    guide_options, elbo_options : dict, optional
        Passed to the guide factory and the ELBO.
    convergence : ConvergenceRule, optional
        Stopping rule; default :class:`ConvergenceRule()`.
    num_eval : int
        Draws for the final ELBO estimate.
    sites : tuple of str, optional
        Sites to report; defaults to the entry's sites of interest, or every
        latent and deterministic site of a user model.
    validate_first_step : bool
        Run the first step with Pyro validation on.
    average : bool
        Return the average of the recent iterates (unconstrained parameters)
        instead of the last one, per coordinate over the longest recent
        stretch of the run that shows no drift (:mod:`vimodels.svi.averaging`).
        Without it the result is the last iterate, whose means wander by up
        to several tenths of a posterior sd at one particle per step.
    callback : callable, optional
        Called as ``callback(progress)`` with a :class:`FitProgress` after every
        successful step, inside the fit's parameter scope; ``progress.sample(n)``
        draws from the guide as the fit would return it at that step (the
        iterate average once averaging has started). Its return value is ignored;
        its run time counts in ``wall_time`` but not in ``progress.elapsed``.

    Returns
    -------
    FitResult
    """
    check_option("num_steps", num_steps, kind=int, low=1)
    if isinstance(lr, int) and not isinstance(lr, bool):
        lr = float(lr)
    check_option("lr", lr, kind=float, low=0.0, low_inclusive=False)
    check_option("seed", seed, kind=int, low=0)
    check_option("num_eval", num_eval, kind=int, low=2)
    if lr_decay is not None:
        check_option(
            "lr_decay",
            float(lr_decay) if isinstance(lr_decay, int) else lr_decay,
            kind=float,
            low=0.0,
            low_inclusive=False,
            high=1.0,
        )
    if num_particles is not None:
        check_option("num_particles", num_particles, kind=int, low=1)
    if num_threads is not None:
        check_option("num_threads", num_threads, kind=int, low=1)
    if callback is not None and not callable(callback):
        raise OptionError(f"callback must be callable, got {type(callback).__name__}")
    rule = convergence or ConvergenceRule()
    elbo_spec = elbo_registry.get_elbo_spec(elbo)

    entry, model_fn, data_dict, model_name = resolve_model(model, data)
    tensor_keys = tuple(k for k, v in data_dict.items() if isinstance(v, torch.Tensor))
    static = {k: v for k, v in data_dict.items() if k not in tensor_keys}
    args = tuple(data_dict[k] for k in tensor_keys)

    model_tr = trace_check(model_fn, data_dict, model_name)
    hidden = discrete_sites(model_tr)
    if hidden and not elbo_spec.discrete:
        raise IncompatibleError(
            f"model {model_name!r} has discrete latent site(s) {', '.join(hidden)}; only the "
            f"'enum' ELBO sums them out (others would sample them from the prior). "
            f"Use elbo='enum'"
        )
    depth = plate_depth(model_tr)
    if entry is not None and entry.max_plate_nesting is not None:
        depth = max(depth, entry.max_plate_nesting)
    if sites is None:
        if entry is not None:
            sites = entry.sites
        else:
            sites = tuple(
                n
                for n, s in model_tr.nodes.items()
                if (
                    s["type"] == "sample"
                    and not s["is_observed"]
                    and n not in hidden
                    and not site_is_subsample(s)
                )
                or (s["type"] == "sample" and s["infer"].get("_deterministic"))
            )
    model_kw = config_enumerate(model_fn, default="parallel") if hidden else model_fn
    bound_model = Bound(model_kw, tensor_keys, static)
    site_shapes = {
        n: tuple(s["value"].shape)
        for n, s in model_tr.nodes.items()
        if s["type"] == "sample" and isinstance(s["value"], torch.Tensor)
    }

    guide_opts = dict(guide_options or {})
    elbo_opts = dict(elbo_options or {})
    use_jit = elbo_spec.jit if jit is None else bool(jit and elbo_spec.jit)
    threads_before = torch.get_num_threads()
    if progress is None:
        progress = sys.stderr.isatty()

    def build(jit_now: bool):
        if callable(guide) and not isinstance(guide, str):
            g = Bound(guide, tensor_keys, static)
            gname = getattr(guide, "__name__", "user_guide")
        else:
            family = entry.family if entry is not None else None
            made = guide_registry.make_guide(
                guide,
                bound_model if guide_registry.get_guide_spec(guide, family).generic else model_kw,
                data_dict,
                family=family,
                hidden=hidden,
                **guide_opts,
            )
            g = (
                made
                if guide_registry.get_guide_spec(guide, family).generic
                else Bound(made, tensor_keys, static)
            )
            gname = guide
        loss = elbo_registry.make_elbo(
            elbo,
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            jit=jit_now,
            max_plate_nesting=depth,
            **elbo_opts,
        )
        return g, gname, loss

    settings: dict[str, Any] = {}
    with pyro.get_param_store().scope() as state:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            pyro.set_rng_seed(seed)
            guide_fn, guide_name, loss_fn = build(use_jit)
            check_guide_matches(model_tr, guide_fn, args, hidden, guide_name, model_name)
            optim = _optimizer(lr, lr_decay, num_steps)
            jit_note = None
            compiled, compile_note = None, None
            compile_key = _compile_key(model_fn, static, guide, guide_opts, entry, elbo, elbo_opts)
            pyro.set_rng_seed(seed)
            t0 = time.perf_counter()
            losses: list[float] = []
            in_callbacks = 0.0
            status, message = MAX_STEPS, ""
            window = rule.resolve_window(num_steps)
            flat_checks = 0
            converged = False
            averager = IterateAverage()
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=num_steps,
                    desc=f"{model_name}/{guide_name}/{elbo}",
                    file=sys.stderr,
                    leave=False,
                )
            try:
                for step in range(num_steps):
                    validate = validate_first_step and step == 0
                    if step == 1 and jit is not False and not jit_note and compiles_step(loss_fn):
                        # after the first (validated) step, so that the parameters exist
                        if num_steps < COMPILE_MIN_STEPS:
                            compile_note = f"not compiled: fewer than {COMPILE_MIN_STEPS} steps"
                        else:
                            try:
                                compiled = compile_step(
                                    loss_fn, bound_model, guide_fn, args, key=compile_key
                                )
                            except StepCompileError as exc:
                                compile_note = f"compiled step unavailable ({exc})"[:300]
                    try:
                        if compiled is not None:
                            loss, finite = compiled.step(optim)
                        else:
                            with pyro.validation_enabled(validate):
                                loss, finite = _step(bound_model, guide_fn, loss_fn, optim, args)
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:  # JIT tracing failures vary widely
                        if step == 0 and use_jit:
                            jit_note = (
                                f"JIT unavailable for {model_name}/{guide_name}/{elbo} "
                                f"({type(exc).__name__}); using the Python ELBO"
                            )
                            print(jit_note, file=sys.stderr)
                            use_jit = False
                            pyro.get_param_store().clear()
                            pyro.set_rng_seed(seed)
                            guide_fn, guide_name, loss_fn = build(False)
                            optim = _optimizer(lr, lr_decay, num_steps)
                            with pyro.validation_enabled(validate):
                                loss, finite = _step(bound_model, guide_fn, loss_fn, optim, args)
                        else:
                            raise
                    if not finite:
                        status = NONFINITE
                        message = (
                            f"stopped at step {step}: the loss or a gradient was "
                            f"{loss} (non-finite); kept the parameters of step "
                            f"{step - 1}"
                        )
                        break
                    losses.append(loss)
                    if average and step == 0:
                        averager.start(1, batch=max(1, window // 10))
                    else:
                        averager.update()
                    if callback is not None:
                        t_cb = time.perf_counter()
                        callback(
                            FitProgress(
                                step + 1,
                                loss,
                                t_cb - t0 - in_callbacks,
                                _current_draw(
                                    bound_model, guide_fn, args, depth, sites, site_shapes, averager
                                ),
                            )
                        )
                        in_callbacks += time.perf_counter() - t_cb
                    if bar is not None:
                        bar.update(1)
                        if step % 50 == 0:
                            bar.set_postfix(loss=f"{loss:.4g}")
                    if (step + 1) % window == 0 and is_flat(np.asarray(losses), window, rule):
                        flat_checks += 1
                        if flat_checks >= rule.patience:
                            converged = True
                            if rule.early_stop:
                                status = CONVERGED
                                message = (
                                    f"converged at step {step + 1}: no significant "
                                    f"improvement over {rule.patience} windows of "
                                    f"{window} steps"
                                )
                                break
                    elif (step + 1) % window == 0:
                        flat_checks = 0
            except KeyboardInterrupt:
                status = INTERRUPTED
                message = f"interrupted at step {len(losses)}; kept the parameters learned"
            finally:
                if bar is not None:
                    bar.close()
            averaged = averager.commit() if status != NONFINITE else None
            wall = time.perf_counter() - t0
            if status == MAX_STEPS:
                message = f"ran all {num_steps} steps; " + (
                    "the loss had flattened"
                    if converged
                    else "the loss was still improving (not converged)"
                )
            if averaged is not None:
                first, n = averaged["from_step"], averaged["steps"]
                message = (
                    f"{message}; the parameters are the average of the iterates "
                    f"of steps {first}-{first + n - 1}"
                )
            sample_guide = guide_fn
            laplace_note = None
            if isinstance(guide_fn, AutoLaplaceApproximation) and status != NONFINITE and losses:
                try:
                    sample_guide = guide_fn.laplace_approximation(*args)
                except (RuntimeError, ValueError) as exc:  # Hessian not positive definite
                    laplace_note = (
                        "Laplace approximation failed (the Hessian at the estimate is not "
                        f"positive definite: {type(exc).__name__}); draws are the MAP point. "
                        "Run more steps so the estimate reaches a mode"
                    )
                    message = f"{message}; {laplace_note}"
            settings = {
                "guide": guide_name,
                "guide_options": guide_opts,
                "elbo": elbo,
                "elbo_class": type(getattr(loss_fn, "inner", loss_fn)).__name__,
                "elbo_options": elbo_opts,
                "num_particles": loss_fn.num_particles,
                "vectorize_particles": bool(getattr(loss_fn, "vectorize_particles", False)),
                "jit": use_jit,
                "jit_note": jit_note,
                "step_compiler": "fx" if compiled is not None else ("jit" if use_jit else "python"),
                "step_compiler_note": compile_note,
                "num_steps_max": num_steps,
                "lr": lr,
                "lr_decay": lr_decay,
                "optimizer": "Adam",
                "num_threads": torch.get_num_threads(),
                "max_plate_nesting": depth,
                "discrete_sites": list(hidden),
                "convergence": {
                    "window": window,
                    "z": rule.z,
                    "rtol": rule.rtol,
                    "patience": rule.patience,
                    "early_stop": rule.early_stop,
                },
                "num_eval": num_eval,
                "average": average,
                "averaged": averaged,
                "laplace_note": laplace_note,
                "versions": versions(),
            }
            pyro.set_rng_seed(seed + 3)
            if losses:
                with torch.no_grad(), pyro.validation_enabled(False):
                    log_w = log_weights(
                        _kw(bound_model),
                        _kw(sample_guide),
                        {f"_{i}": a for i, a in enumerate(args)},
                        num_eval,
                        depth,
                        discrete=bool(hidden),
                    )
                est, se = elbo_estimate(log_w)
            else:
                est, se = math.nan, math.nan
        finally:
            torch.set_num_threads(threads_before)
        params = {
            name: pyro.param(name).detach().double().numpy().copy()
            for name in pyro.get_param_store().keys()
        }
    return FitResult(
        model_name=model_name,
        guide_name=guide_name,
        elbo_name=elbo,
        losses=np.asarray(losses, dtype=float),
        elbo=est,
        elbo_se=se,
        params=params,
        status=status,
        converged=converged,
        num_steps=len(losses),
        wall_time=wall,
        seed=seed,
        settings=settings,
        message=message,
        sites=tuple(sites),
        entry=entry,
        model=bound_model,
        guide=sample_guide,
        args=args,
        data=data_dict,
        param_state=state,
        max_plate_nesting=depth,
        discrete_sites=hidden,
        site_shapes=site_shapes,
    )


def _current_draw(
    model: Bound,
    guide: Callable,
    args: tuple,
    depth: int,
    sites: tuple[str, ...],
    site_shapes: dict[str, tuple[int, ...]],
    averager: IterateAverage,
) -> Callable[[int, tuple[str, ...] | None], dict[str, np.ndarray]]:
    """``draw(n, sites)``: guide draws at the parameters the fit would return now."""

    def draw(num: int, which: tuple[str, ...] | None) -> dict[str, np.ndarray]:
        with averager.swapped():
            return draw_sites(
                _kw(model),
                _kw(guide),
                {f"_{i}": a for i, a in enumerate(args)},
                num,
                depth,
                tuple(which or sites),
                site_shapes,
            )

    return draw


class FusedAdam:
    """Adam over all parameters with a handful of ``torch._foreach`` calls, lr decaying per step.

    Called as ``optim(params)`` with the parameters of the step, like a Pyro
    optimizer, and computes what ``torch.optim.Adam`` computes (Pyro's
    ``ClippedAdam`` for a decaying rate). Pyro keeps one torch optimizer per
    parameter and steps them one by one, at about 0.2 ms per parameter and
    step (``torch.optim.Adam`` over all of them still costs about 0.5 ms):
    a fifth of a step of a small model. Parameters first seen later join with
    their own step count; parameters absent from a step are not moved.

    Parameters
    ----------
    lr : float
        Initial learning rate.
    gamma : float
        Factor applied to the learning rate before every step (1: fixed).
    betas, eps : float
        Adam's moment decays and denominator offset.
    """

    def __init__(
        self,
        lr: float,
        gamma: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.lr = lr
        self.gamma = gamma
        self.betas = betas
        self.eps = eps
        self._state: dict[torch.Tensor, list] = {}  # param -> [step, exp_avg, exp_avg_sq]

    def __call__(self, params: set[torch.Tensor]) -> None:
        """One Adam step of ``params`` (their ``.grad`` holds the gradient)."""
        self.lr *= self.gamma  # before the step, as Pyro's ClippedAdam: step n uses lr gamma^n
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        for p in ps:
            if p not in self._state:
                self._state[p] = [0, torch.zeros_like(p), torch.zeros_like(p)]
        states = [self._state[p] for p in ps]
        for st in states:
            st[0] += 1
        b1, b2 = self.betas
        m = [st[1] for st in states]
        v = [st[2] for st in states]
        grads = [p.grad for p in ps]
        with torch.no_grad():
            torch._foreach_lerp_(m, grads, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** st[0]) for st in states])
            torch._foreach_add_(denom, self.eps)
            steps = [-self.lr / (1.0 - b1 ** st[0]) for st in states]
            torch._foreach_addcdiv_(ps, m, denom, steps)


def _optimizer(lr: float, lr_decay: float | None, num_steps: int) -> FusedAdam:
    gamma = 1.0 if lr_decay is None else float(lr_decay) ** (1.0 / num_steps)
    return FusedAdam(lr, gamma)


def _compile_key(
    model_fn: Callable,
    static: Mapping[str, Any],
    guide: str | Callable,
    guide_opts: Mapping[str, Any],
    entry: CatalogEntry | None,
    elbo: str,
    elbo_opts: Mapping[str, Any],
) -> tuple | None:
    """What fixes a fit's compiled step besides its parameters and data (None: do not reuse)."""
    family = entry.family if entry is not None else None
    guide_id = ("registry", guide, family) if isinstance(guide, str) else guide
    key = (
        model_fn,
        repr(sorted(static.items())),
        guide_id,
        repr(sorted(guide_opts.items())),
        elbo,
        repr(sorted(elbo_opts.items())),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _step(
    model: Callable, guide: Callable, loss_fn: Any, optim: Any, args: tuple
) -> tuple[float, bool]:
    """One SVI step that refuses to apply non-finite gradients."""
    with poutine.trace(param_only=True) as capture, warnings.catch_warnings():
        # non-finite losses are detected and reported below, with the step number
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        loss = loss_fn.loss_and_grads(model, guide, *args)
    params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    loss = float(loss)
    finite = math.isfinite(loss) and all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params
    )
    if finite:
        optim(params)
    zero_grads(params)
    return loss, finite


def versions() -> dict[str, str]:
    """Versions of the libraries that shape numerical results.

    ArviZ's version is read from its installed metadata: importing ArviZ only
    for it cost the first fit of a process about two seconds.
    """
    try:
        arviz_version = importlib.metadata.version("arviz")
    except importlib.metadata.PackageNotFoundError:
        arviz_version = "not installed"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "arviz": arviz_version,
    }
