"""``fit()``: SVI as a short pipeline of named steps.

1. :func:`check_fit_options` validates every option before any work;
2. :func:`vimodels.svi.binding.bind` resolves the model, checks its data with
   one traced run and works out sites, plate depth and discrete sites;
3. :func:`build_objective` makes the guide and the ELBO by name;
4. :func:`vimodels.svi.loop.run_loop` runs the steps (seeded, one torch thread
   by default, validation on for the first step only, JIT and the compiled
   step where valid, the convergence rule, iterate averaging, a guard on
   non-finite steps and Ctrl-C);
5. :func:`finish` turns the loop's outcome into an immutable
   :class:`~vimodels.svi.result.FitResult` with an ELBO estimate and the
   settings that were really used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoLaplaceApproximation

import guides as guide_registry
from guides.auto import BATCH_SHAPED_GUIDES
from vimodels.catalog.base import CatalogEntry
from vimodels.compile.units import private_units
from vimodels.data import RowArray
from vimodels.errors import (
    IncompatibleError,
    OptionError,
    check_option,
    check_seed,
    derive_seed,
)
from vimodels.mode.plates import local_latent_sites, rows_of, subsampled_plates
from vimodels.svi import elbos as elbo_registry
from vimodels.svi.binding import (
    Binding,
    Bound,
    bind,
    check_guide_matches,
    keyword_call,
    positional_kwargs,
)
from vimodels.svi.by_optimizer import (
    OPTIMIZER_GUIDES,
    apply_init,
    check_init,
    fit_by_optimizer,
    gaussian_for_init,
    init_learning_rate,
)
from vimodels.svi.convergence import ConvergenceRule
from vimodels.svi.divergence import DivergenceRule
from vimodels.svi.iwae import IWAE
from vimodels.svi.loop import LoopOutcome, LoopSettings, Objective, run_loop
from vimodels.svi.minibatch_eval import EVAL_BATCHES, minibatch_elbo
from vimodels.svi.reparam import DECENTERED_SUFFIX, reparam_note, reparam_settings
from vimodels.svi.result import DIVERGED, NONFINITE, FitProgress, FitResult
from vimodels.svi.subsample import IndexSupplier, full_data
from vimodels.svi.weights import elbo_estimate, log_weights
from vimodels.versions import versions

# Adam moves each unconstrained parameter by about lr per step: beyond this no fit is sensible
LR_MAX = 1000.0


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
    init: str | None = None,
    subsample: str = "epoch",
    reparam: str | None = None,
) -> FitResult:
    """Fit a guide to a model with SVI (or, for three guides, by L-BFGS).

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
        Adam learning rate. A registry guide learns at its ``lr_scale`` times it
        (``auto_iaf_normal``: 0.25, its flow's outputs sum hundreds of weights);
        ``result.settings`` holds the ``lr`` used and the ``lr_scale``.
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
    init : str, optional
        ``"laplace"`` or ``"pathfinder"``: start a Gaussian autoguide
        (``auto_normal``, ``auto_multivariate_normal``,
        ``auto_lowrank_multivariate_normal``) at the L-BFGS mode and the Laplace
        covariance, or at Pathfinder's best Gaussian, so SVI only refines
        (:mod:`vimodels.mode`); ``lr`` is lowered to 0.1 times the smallest sd of
        that Gaussian where that is smaller (Adam moves every coordinate by
        about ``lr`` per step, which would throw a tightly pinned parameter
        out of its posterior); ``settings["init"]`` reports both.
    subsample : {"epoch", "independent", "pyro"}
        How the indices of a plate declared with ``subsample_size`` are drawn
        (:mod:`vimodels.svi.subsample`): from one pseudo-random permutation
        per pass over the data (``"epoch"``), as independent batches, or by
        Pyro's ``randperm`` (``"pyro"``, cost per step growing with the data).
        With subsampling, JIT and the compiled step are off, and the final
        ELBO comes from ``num_eval`` draws on 100 independent batches, its
        standard error including the subsampling noise
        (:mod:`vimodels.svi.minibatch_eval`); ``settings["subsample"]`` says
        what ran. The README's section "Large data" gives the data contract.
    reparam : {None, "decenter"}
        ``"decenter"``: fit the model with Pyro's ``LocScaleReparam(centered=0)``
        on each latent location-scale site whose location or scale depends on
        another latent site (``theta ~ Normal(mu, tau)`` becomes
        ``theta_decentered ~ Normal(0, 1)``, ``theta = mu + tau * theta_decentered``;
        :mod:`vimodels.svi.reparam`). A centered hierarchical model's funnel,
        which has no mode and which no Gaussian fits, becomes close to Gaussian.
        The posterior and the evidence are the model's own (a change of
        variables): ``sample``, ArviZ export and ``compare`` report the user's
        sites (recorded as deterministic values of the decentered draws, next to
        the ``<site>_decentered`` latents), and the ELBO bounds the same
        ``log p(x)``. ``settings["reparam"]`` and the message name the sites
        decentered. Applies to the registry's autoguides, ``pathfinder``,
        ``auto_laplace(_is)``, ``auto_delta`` and ``init``; a hand-written guide
        must name the decentered model's sites (else IncompatibleError). A model
        with nothing to decenter raises IncompatibleError (the fit would be the
        model as written). Default None: the model as written.

    Returns
    -------
    FitResult

    Notes
    -----
    ``guide="pathfinder"``, ``"auto_laplace"``, ``"auto_laplace_is"`` and ``"auto_delta"``
    are fitted by L-BFGS, not Adam (:func:`vimodels.svi.by_optimizer.fit_by_optimizer`): Pathfinder,
    the mode plus the exact Hessian, the constrained MAP; ``"nested_laplace"`` by Newton's
    method on a grid of hyperparameters (:mod:`vimodels.mode.nested`). The SVI options
    (``num_steps``, ``lr``, ``elbo_options``, ``callback`` ...) do not apply to them;
    their ``guide_options`` are the optimizer's (``num_paths``, ``max_iters`` ...).
    """
    rule, elbo_spec = check_fit_options(
        num_steps,
        lr,
        seed,
        num_eval,
        lr_decay,
        num_particles,
        num_threads,
        callback,
        convergence,
        elbo,
    )
    # NumPy integers pass the checks: from here on plain Python numbers (JSON, range())
    num_steps, seed, num_eval, lr = int(num_steps), int(seed), int(num_eval), float(lr)
    num_particles = None if num_particles is None else int(num_particles)
    num_threads = None if num_threads is None else int(num_threads)
    lr_decay = None if lr_decay is None else float(lr_decay)
    check_init(init, guide)
    if isinstance(guide, str) and guide in OPTIMIZER_GUIDES:
        return fit_by_optimizer(
            model,
            data,
            guide=guide,
            elbo=elbo,
            seed=seed,
            num_eval=num_eval,
            sites=sites,
            guide_options=guide_options,
            num_threads=num_threads,
            reparam=reparam,
        )
    # minibatch: plates' subsample indices drawn in O(batch) (vimodels/svi/subsample.py)
    supplier = IndexSupplier(seed, subsample)  # OptionError for an unknown scheme
    with supplier:
        binding = bind(model, data, discrete_ok=elbo_spec.discrete, sites=sites, reparam=reparam)
    if supplier.subsampled and isinstance(guide, str) and guide in BATCH_SHAPED_GUIDES:
        plates = subsampled_plates(binding.trace)
        local = local_latent_sites(binding.trace, plates)
        if local:  # a batch's worth of parameters, shared by every batch's rows
            plate, (size, taken) = next(iter(plates.items()))
            raise IncompatibleError(
                f"guide {guide!r} sizes its parameters from one trace, so site(s) "
                f"{', '.join(local)} in subsampled plate {plate!r} would get {taken} sets of "
                f"parameters shared by whichever {taken} of its {size} rows a step draws; "
                "use guide='auto_normal' (a parameter per row) or fit without subsample_size"
            )
    if supplier.subsampled and subsample != "pyro":
        jit = False  # NumPy-drawn indices would be frozen into a traced graph
    guide_opts, elbo_opts = dict(guide_options or {}), dict(elbo_options or {})
    start = None
    if init is not None:
        with torch_threads(num_threads):
            start = gaussian_for_init(init, binding.model_fn, binding.data, seed, binding.hidden)
        lr, lr_note = init_learning_rate(lr, start[0])
        start = (start[0], start[1], f"{start[2]}; {lr_note}" if lr_note else start[2])

    def build(jit_now: bool) -> Objective:
        objective = build_objective(
            binding,
            guide,
            elbo,
            guide_opts,
            elbo_opts,
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            jit=bool(jit_now and elbo_spec.jit),
        )
        if start is not None:
            apply_init(objective.guide, start[0], start[1], binding.args)
        return objective

    # a guide whose outputs sum many parameters (a flow) learns at a fraction of lr
    lr_scale = (
        guide_registry.get_guide_spec(guide, binding.family).lr_scale
        if isinstance(guide, str)
        else 1.0
    )
    lr *= lr_scale
    loop_settings = LoopSettings(
        num_steps=num_steps,
        lr=lr,
        lr_decay=lr_decay,
        seed=seed,
        rule=rule,
        jit=jit,
        validate_first_step=validate_first_step,
        average=average,
        progress=sys.stderr.isatty() if progress is None else bool(progress),
        compile_key=compile_key(binding, guide, guide_opts, elbo, elbo_opts),
        label=f"{binding.name}/{guide if isinstance(guide, str) else 'guide'}/{elbo}",
        divergence=DivergenceRule(log_evidence=known_log_evidence(binding)),
    )
    # vectorized particles on a model that does not broadcast over them train a wrong
    # objective (cross terms: the likelihood counted P times, sds shrunk by 1/sqrt(P))
    particles_note = None
    # (a subsampled model on all its rows: each pass would draw its own rows)
    why, always_vectorized = particles_do_not_broadcast(binding, build, supplier.subsampled)
    if why is not None:
        if always_vectorized:  # iwae: its K particles are one vectorized pass
            raise IncompatibleError(
                f"elbo {elbo!r} draws its particles in one vectorized pass and the model does "
                f"not broadcast over them ({why}); write the model so that it broadcasts (see "
                "README, 'When things go wrong') or use elbo='trace'"
            )
        vectorize_particles = False
        particles_note = f"particles drawn one at a time: {why}"
    # private_units: the JIT ELBO's traced function is freed with the fit (torch's global
    # compilation unit would keep ~20 MB per fit for the life of the process)
    with (
        pyro.get_param_store().scope() as state,
        torch_threads(num_threads),
        supplier,
        private_units(),
    ):
        pyro.set_rng_seed(seed)
        outcome = run_loop(binding, build, loop_settings, callback)
        result = finish(
            binding,
            outcome,
            loop_settings,
            state,
            elbo,
            guide_opts,
            elbo_opts,
            num_eval,
            supplier=supplier if supplier.subsampled else None,
        )
    if start is not None:
        result.settings["init"] = start[2]
    if particles_note is not None:
        result.settings["particles_note"] = particles_note
    result.settings["lr_scale"] = lr_scale
    return record_reparam(result, binding.decentered)


def record_reparam(result: FitResult, decentered: tuple[str, ...]) -> FitResult:
    """``result`` with ``settings["reparam"]`` set, and the message naming decentered sites.

    (:func:`~vimodels.svi.by_optimizer.fit_by_optimizer` records the same.)
    """
    result.settings["reparam"] = reparam_settings(decentered) if decentered else None
    if not decentered:
        return result
    return dataclasses.replace(result, message=f"{result.message}; {reparam_note(decentered)}")


def check_fit_options(
    num_steps: Any,
    lr: Any,
    seed: Any,
    num_eval: Any,
    lr_decay: Any,
    num_particles: Any,
    num_threads: Any,
    callback: Any,
    convergence: ConvergenceRule | None,
    elbo: str,
) -> tuple[ConvergenceRule, elbo_registry.ElboSpec]:
    """Validate a fit's options before any work; return the stopping rule and the ELBO's spec.

    Raises
    ------
    OptionError, UnknownNameError
        Naming the option, its valid range or type, or the valid ELBO names.
    """
    check_option("num_steps", num_steps, kind=int, low=1)
    if isinstance(lr, int) and not isinstance(lr, bool):
        lr = float(lr)
    check_option("lr", lr, kind=float, low=0.0, low_inclusive=False, high=LR_MAX)
    check_seed(seed)
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
    return convergence or ConvergenceRule(), elbo_registry.get_elbo_spec(elbo)


#: Most rows (summed over the subsampled plates) for which a subsampled model's
#: vectorized particles are checked on the full data before training.
PARTICLE_CHECK_ROWS = 1_000_000


def particles_do_not_broadcast(
    binding: Binding, build: Callable[[bool], Objective], subsampled: bool = False
) -> tuple[str | None, bool]:
    """Why the model does not broadcast over the ELBO's vectorized particles (or ``None``).

    Returns the reason and whether the ELBO can only vectorize its particles (IWAE).

    Only where the ELBO vectorizes more than one particle: a few guide draws under
    a particle plate are checked against one-draw evaluation
    (:func:`vimodels.svi.draws.sample_guide`), in a scope of their own (the fit's
    parameters, random state and data batches are untouched). A model that
    subsamples its data is checked with every plate on all its rows
    (:func:`vimodels.svi.subsample.full_data`: each pass would otherwise draw its
    own rows), where the data are in memory and the subsampled plates hold at most
    :data:`PARTICLE_CHECK_ROWS` rows; otherwise it is not checked.
    """
    objective = build(False)
    loss = objective.loss
    many = int(getattr(loss, "num_particles", 1)) > 1
    always = isinstance(loss, IWAE)
    if not (many and (always or getattr(loss, "vectorize_particles", False))):
        return None, always
    rows = contextlib.nullcontext()
    if subsampled:
        memory_mapped = any(isinstance(v, RowArray) for v in binding.data.values())
        if memory_mapped or rows_of(subsampled_plates(binding.trace)) > PARTICLE_CHECK_ROWS:
            return None, always
        rows = full_data()
    report: dict = {}
    with (
        rows,
        pyro.get_param_store().scope(),
        torch.random.fork_rng(devices=[]),
        torch.no_grad(),
        pyro.validation_enabled(False),
    ):
        log_weights(
            keyword_call(binding.model),
            keyword_call(objective.guide),
            positional_kwargs(binding.args),
            4,
            binding.depth,
            report=report,
        )
    return (None if report.get("vectorized") else report.get("reason")), always


def build_objective(
    binding: Binding,
    guide: str | Callable,
    elbo: str,
    guide_opts: Mapping[str, Any],
    elbo_opts: Mapping[str, Any],
    *,
    num_particles: int | None,
    vectorize_particles: bool,
    jit: bool,
) -> Objective:
    """The guide (by registry name, or the user's function) and the ELBO (by name)."""
    if callable(guide) and not isinstance(guide, str):
        g = Bound(guide, binding.tensor_keys, binding.static)
        name = getattr(guide, "__name__", "user_guide")
        if binding.decentered:  # it must name the decentered model's latent sites
            try:
                check_guide_matches(
                    binding.trace, g, binding.args, binding.hidden, name, binding.name
                )
            except IncompatibleError as exc:
                why = decentered_guide_message(name, binding)
                raise IncompatibleError(f"{why} ({exc})") from exc
    else:
        generic = guide_registry.get_guide_spec(guide, binding.family).generic
        if binding.decentered and not generic:
            # a family's guide names the model's sites as written: it cannot apply
            raise IncompatibleError(decentered_guide_message(guide, binding))
        made = guide_registry.make_guide(
            guide,
            binding.model if generic else binding.model_kw,
            binding.data,
            family=binding.family,
            hidden=binding.hidden,
            **guide_opts,
        )
        g = made if generic else Bound(made, binding.tensor_keys, binding.static)
        name = guide
    loss = elbo_registry.make_elbo(
        elbo,
        num_particles=num_particles,
        vectorize_particles=vectorize_particles,
        jit=jit,
        max_plate_nesting=binding.depth,
        **elbo_opts,
    )
    return Objective(g, name, loss, jit)


def decentered_guide_message(guide: str, binding: Binding) -> str:
    """Why a hand-written guide cannot serve a model fitted with ``reparam="decenter"``."""
    new = ", ".join(s + DECENTERED_SUFFIX for s in binding.decentered)
    return (
        f"guide {guide!r} is hand-written for model {binding.name!r} as written; "
        f"reparam='decenter' fits it with {', '.join(binding.decentered)} replaced by the "
        f"latent site(s) {new} (the originals recorded as deterministic), which the guide "
        "does not name. Use an autoguide (auto_normal, auto_multivariate_normal, pathfinder, "
        "auto_laplace ...) or reparam=None"
    )


def finish(
    binding: Binding,
    outcome: LoopOutcome,
    loop: LoopSettings,
    state: dict,
    elbo: str,
    guide_opts: Mapping[str, Any],
    elbo_opts: Mapping[str, Any],
    num_eval: int,
    supplier: IndexSupplier | None = None,
) -> FitResult:
    """The loop's outcome as a :class:`FitResult`: Laplace step, ELBO estimate, settings.

    Runs inside the fit's parameter-store scope ``state``. With ``supplier``
    (the model subsamples its data) the ELBO comes from minibatches.
    """
    objective, message = outcome.objective, outcome.message
    status, converged = outcome.status, outcome.converged
    sample_guide, laplace_note = objective.guide, None
    if (
        isinstance(objective.guide, AutoLaplaceApproximation)
        and outcome.status not in (NONFINITE, DIVERGED)
        and len(outcome.losses)
    ):
        try:
            sample_guide = objective.guide.laplace_approximation(*binding.args)
        except (RuntimeError, ValueError) as exc:  # Hessian not positive definite
            laplace_note = (
                "Laplace approximation failed (the Hessian at the estimate is not "
                f"positive definite: {type(exc).__name__}); draws are the MAP point. "
                "Run more steps so the estimate reaches a mode"
            )
            message = f"{message}; {laplace_note}"
    loss_fn = objective.loss
    settings = {
        "guide": objective.name,
        "guide_options": dict(guide_opts),
        "elbo": elbo,
        "elbo_class": type(getattr(loss_fn, "inner", loss_fn)).__name__,
        "elbo_options": dict(elbo_opts),
        "num_particles": loss_fn.num_particles,
        "vectorize_particles": bool(getattr(loss_fn, "vectorize_particles", False)),
        "jit": objective.jit,
        "jit_note": outcome.jit_note,
        "step_compiler": "fx" if outcome.compiled else ("jit" if objective.jit else "python"),
        "step_compiler_note": outcome.compile_note,
        "num_steps_max": loop.num_steps,
        "lr": loop.lr,
        "lr_decay": loop.lr_decay,
        "optimizer": "Adam",
        "num_threads": torch.get_num_threads(),
        "max_plate_nesting": binding.depth,
        "discrete_sites": list(binding.hidden),
        "convergence": {
            "window": outcome.window,
            "z": loop.rule.z,
            "rtol": loop.rule.rtol,
            "patience": loop.rule.patience,
            "early_stop": loop.rule.early_stop,
        },
        "num_eval": num_eval,
        "average": loop.average,
        "averaged": outcome.averaged,
        "laplace_note": laplace_note,
        "divergence": loop.divergence.for_guide(sample_guide).as_dict(),
        "versions": versions(),
        "subsample": None,
        "spikes": outcome.spikes,
    }
    subsampled = None
    if supplier is not None:  # --- minibatch
        subsampled = {**supplier.record(), "eval_batches": min(num_eval, EVAL_BATCHES)}
        if subsampled["scheme"] != "pyro":
            subsampled["note"] = "JIT and the compiled step are off (indices drawn in NumPy)"
        elif objective.jit or outcome.compiled:
            # Pyro's draws inside a JIT-traced or compiled step never reach Python: the
            # supplier saw only the tracing and the checks, so count one batch per step
            # (and per particle when particles are not vectorized)
            per_step = 1 if settings["vectorize_particles"] else settings["num_particles"]
            for plate in subsampled["plates"]:
                plate["batches"] = len(outcome.losses) * per_step
                plate["epochs"] = round(plate["batches"] * plate["batch"] / plate["size"], 4)
            subsampled["note"] = (
                "batches counted from the steps: Pyro draws them inside the compiled step"
            )
        settings["subsample"] = subsampled
    est, se = math.nan, math.nan
    evaluation: dict = {"vectorized": None, "reason": None}
    if len(outcome.losses) and status != DIVERGED:
        pyro.set_rng_seed(derive_seed(loop.seed, 3))
        with torch.no_grad(), pyro.validation_enabled(False):
            if subsampled is not None:  # --- minibatch: draws on independent data batches
                est, se = minibatch_elbo(
                    keyword_call(binding.model),
                    keyword_call(sample_guide),
                    positional_kwargs(binding.args),
                    num_eval,
                    binding.depth,
                    seed=derive_seed(loop.seed, 3),
                    report=evaluation,
                )
            else:  # --- end minibatch
                log_w = log_weights(
                    keyword_call(binding.model),
                    keyword_call(sample_guide),
                    positional_kwargs(binding.args),
                    num_eval,
                    binding.depth,
                    report=evaluation,
                )
                est, se = elbo_estimate(log_w)
        # a finite ELBO above what any sound fit can reach is a failure, not a result
        rule = loop.divergence.for_guide(sample_guide)
        diverged = rule.check_elbo(est, se, float(outcome.losses[0]), loop.num_steps)
        if diverged:
            status, converged, est, se = DIVERGED, False, math.nan, math.nan
            message = f"{diverged}; {message}"
    # whether the ELBO's draws were evaluated under a particle plate, and why not
    settings["eval_vectorized"] = evaluation["vectorized"]
    settings["eval_vectorized_note"] = evaluation["reason"]
    params = {
        name: pyro.param(name).detach().double().numpy().copy()
        for name in pyro.get_param_store().keys()
    }
    return FitResult(
        model_name=binding.name,
        guide_name=objective.name,
        elbo_name=elbo,
        losses=outcome.losses,
        elbo=est,
        elbo_se=se,
        params=params,
        status=status,
        converged=converged,
        num_steps=len(outcome.losses),
        wall_time=outcome.wall_time,
        seed=loop.seed,
        settings=settings,
        message=message,
        sites=binding.sites,
        entry=binding.entry,
        model=binding.model,
        guide=sample_guide,
        args=binding.args,
        data=binding.data,
        param_state=state,
        max_plate_nesting=binding.depth,
        discrete_sites=binding.hidden,
        site_shapes=binding.site_shapes,
        subsample=subsampled,
    )


def known_log_evidence(binding: Binding) -> float | None:
    """The exact ``log p(x)`` of a catalog entry on the bound data, where it is known."""
    entry = binding.entry
    if entry is None or entry.exact is None:
        return None
    for site in binding.trace.nodes.values():
        fn = site.get("fn")
        if site["type"] == "sample" and getattr(fn, "subsample_size", None) not in (
            None,
            getattr(fn, "size", None),
        ):
            # minibatch losses are not -log w of an unbiased weight: no Markov bound
            return None
    try:
        value = entry.exact(binding.data).log_evidence
    except (TypeError, ValueError, KeyError, RuntimeError):  # data it cannot take
        return None
    return float(value) if value is not None else None


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``num_threads`` torch intra-op threads (None: leave torch's setting)."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compile_key(
    binding: Binding,
    guide: str | Callable,
    guide_opts: Mapping[str, Any],
    elbo: str,
    elbo_opts: Mapping[str, Any],
) -> tuple | None:
    """What fixes a fit's compiled step besides its parameters and data (None: do not reuse)."""
    guide_id = ("registry", guide, binding.family) if isinstance(guide, str) else guide
    key = (
        binding.model_fn,
        repr(sorted(binding.static.items())),
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
