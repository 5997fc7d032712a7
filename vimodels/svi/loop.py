"""The SVI loop: steps, the first-step JIT fallback, the compiled step, stopping, averaging.

:func:`run_loop` takes a bound model and a way to build the guide and ELBO,
and returns a :class:`LoopOutcome`: the losses, how the loop ended, and the
objective that ran (rebuilt without JIT when tracing failed at the first
step). The parameters live in the caller's Pyro parameter-store scope.

A run ends on the first of: the step budget; the convergence rule
(:mod:`vimodels.svi.convergence`), unless a parameter coordinate has stopped
moving under a noisy loss (:mod:`vimodels.svi.stuck`: the fit is stuck, runs
on, and is not converged); Ctrl-C; a non-finite loss or gradient
(``nonfinite``, the step is not applied); a finite loss outside any
plausible range (``diverged``, :class:`~vimodels.svi.divergence.DivergenceRule`);
or most of the latest steps' losses spiking (``diverged``). A step whose loss
spikes far above the recent losses (:class:`~vimodels.svi.spike.SpikeGuard`) is
not applied (neither the parameters nor Adam's state see its gradient), is
left out of the losses the convergence rule judges, and is counted in the
message and in ``LoopOutcome.spikes``.
The divergence rule, checked after every step:

- where ``log p(x)`` is known (``U``, a catalog entry's exact log evidence), a
  loss below ``-U - 30 - log(num_steps)``: each loss is ``-log w`` with
  ``E[w] = p(x)``, so by Markov's inequality a sound run shows one with
  probability below ``exp(-30)``;
- always, a loss below ``L0 - 1000 * max(|L0|, 1)`` with ``L0`` the first loss:
  ``-ELBO`` can improve on ``L0`` by no more than the initial guide's KL to the
  posterior, and a gain of a thousand times the loss's own scale is numerical
  runaway (the 1000-dimensional full-rank repro went from 1.9e3 to -7e7 at
  step 15 and -1e26 at step 18), not learning.

:func:`vimodels.svi.fit.finish` applies the same bounds to the final ELBO
estimate (and, where ``U`` is known, rejects an ELBO more than 5 standard
errors above it). A diverged fit is never ``converged``; its message names the
step and the bound.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyro
from tqdm.auto import tqdm

from vimodels.compile.step import StepCompileError, compile_step
from vimodels.compile.step import supports as compiles_step
from vimodels.svi.averaging import IterateAverage
from vimodels.svi.binding import Binding, check_guide_matches
from vimodels.svi.convergence import ConvergenceRule, is_flat, level_since_half
from vimodels.svi.divergence import DivergenceRule
from vimodels.svi.draws import model_info, sample_guide
from vimodels.svi.optim import make_optimizer, svi_step
from vimodels.svi.result import (
    CONVERGED,
    DIVERGED,
    INTERRUPTED,
    MAX_STEPS,
    NONFINITE,
    FitProgress,
)
from vimodels.svi.spike import SpikeGuard
from vimodels.svi.stuck import StepActivity, noisy, stuck_note

# Fits shorter than this keep the JIT ELBO: compiling the step costs about half
# a second (plus a one-off second or two per process for torch's tracing
# machinery) and saves about a millisecond per step of a small model.
COMPILE_MIN_STEPS = 1000


@dataclass(frozen=True)
class Objective:
    """A guide and the ELBO it is fitted under.

    Attributes
    ----------
    guide : callable
        The guide, called positionally like the bound model.
    name : str
        The guide's name (registry name or function name).
    loss : pyro.infer.ELBO
        The ELBO object (``loss_and_grads``).
    jit : bool
        Whether the ELBO is the JIT variant.
    """

    guide: Callable
    name: str
    loss: Any
    jit: bool


@dataclass(frozen=True)
class LoopSettings:
    """How to run the loop (checked by :func:`vimodels.fit` before it starts)."""

    num_steps: int
    lr: float
    lr_decay: float | None
    seed: int
    rule: ConvergenceRule
    jit: bool | None
    validate_first_step: bool
    average: bool
    progress: bool
    compile_key: tuple | None
    label: str
    divergence: DivergenceRule = DivergenceRule()


@dataclass(frozen=True)
class LoopOutcome:
    """How the loop ended.

    Attributes
    ----------
    losses : ndarray, shape (steps,)
        Loss per completed step (nats).
    status : str
        ``converged``, ``max_steps``, ``nonfinite``, ``diverged`` or ``interrupted``.
    message : str
        One line on how it ended and what was averaged.
    converged : bool
        Whether the stopping rule saw the loss flatten (even without early stopping).
    wall_time : float
        Seconds in the loop.
    window : int
        The convergence rule's window (steps).
    averaged : dict or None
        The stretch of iterates averaged (:meth:`IterateAverage.commit`).
    objective : Objective
        The guide and ELBO that ran.
    jit_note, compile_note : str or None
        Why JIT or the compiled step did not run, where they did not.
    compiled : bool
        Whether the compiled step ran.
    spikes : dict or None
        The steps skipped because their loss spiked (:meth:`SpikeGuard.summary`).
    """

    losses: np.ndarray
    status: str
    message: str
    converged: bool
    wall_time: float
    window: int
    averaged: dict | None
    objective: Objective
    jit_note: str | None
    compile_note: str | None
    compiled: bool
    spikes: dict | None = None


def run_loop(
    binding: Binding,
    build: Callable[[bool], Objective],
    settings: LoopSettings,
    callback: Callable[[FitProgress], None] | None = None,
) -> LoopOutcome:
    """Run SVI steps until convergence, the step budget, a non-finite step or Ctrl-C.

    Parameters
    ----------
    binding : Binding
        The model bound to its data.
    build : callable
        ``build(jit)`` makes the guide and ELBO (called again without JIT when
        the first JIT step fails).
    settings : LoopSettings
        Steps, learning rate, seed, stopping rule, JIT and progress options.
    callback : callable, optional
        Called with a :class:`FitProgress` after every successful step.
    """
    s = settings
    use_jit = bool(s.jit is not False)
    objective = build(use_jit)
    check_guide_matches(
        binding.trace, objective.guide, binding.args, binding.hidden, objective.name, binding.name
    )
    use_jit = objective.jit
    optim = make_optimizer(s.lr, s.lr_decay, s.num_steps)
    pyro.set_rng_seed(s.seed)
    window = s.rule.resolve_window(s.num_steps)
    averager = IterateAverage()
    activity = StepActivity()
    guard = SpikeGuard()
    losses: list[float] = []
    kept: list[float] = []  # the losses of the steps applied (the convergence rule's)
    status, message = MAX_STEPS, ""
    flat_checks, converged = 0, False
    stuck: str | None = None  # why a flat loss was not called converged
    jit_note = compile_note = None
    compiled = None
    in_callbacks = 0.0
    bar = (
        tqdm(total=s.num_steps, desc=s.label, file=sys.stderr, leave=False) if s.progress else None
    )
    t0 = time.perf_counter()
    try:
        for step in range(s.num_steps):
            validate = s.validate_first_step and step == 0
            if step == 1 and s.jit is not False and not jit_note and compiles_step(objective.loss):
                compiled, compile_note = _compile(binding, objective, s)
            accept = partial(guard.accepts, step)
            try:
                if compiled is not None:
                    loss, finite = compiled.step(optim, accept)
                else:
                    with pyro.validation_enabled(validate):
                        loss, finite = svi_step(
                            binding.model, objective.guide, objective.loss, optim, binding.args,
                            accept,
                        )  # fmt: skip
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # JIT tracing failures vary widely
                if step != 0 or not use_jit:
                    raise
                jit_note = (
                    f"JIT unavailable for {s.label} ({type(exc).__name__}); using the Python ELBO"
                )
                print(jit_note, file=sys.stderr)
                use_jit = False
                pyro.get_param_store().clear()
                pyro.set_rng_seed(s.seed)
                objective = build(False)
                optim = make_optimizer(s.lr, s.lr_decay, s.num_steps)
                guard = SpikeGuard()
                accept = partial(guard.accepts, step)
                with pyro.validation_enabled(validate):
                    loss, finite = svi_step(
                        binding.model, objective.guide, objective.loss, optim, binding.args,
                        accept,
                    )  # fmt: skip
            if not finite:
                status = NONFINITE
                what = (
                    f"the loss was {loss}"
                    if not math.isfinite(loss)
                    else f"a gradient was non-finite (the loss was {loss:.6g})"
                )
                message = f"stopped at step {step}: {what}; kept the parameters of step {step - 1}"
                break
            losses.append(loss)
            if guard.skipped and guard.skipped[-1] == step:
                diverged = guard.diverged(step)
                if diverged:
                    status, converged = DIVERGED, False
                    message = diverged
                    break
            else:
                kept.append(loss)
            diverged = s.divergence.for_guide(objective.guide).check_step(
                step, loss, losses[0], s.num_steps
            )
            if diverged:
                status, converged = DIVERGED, False
                message = f"{diverged}; the parameters ran away (try a smaller lr)"
                break
            if step == 0:  # collected also without averaging: the drift check reads it
                averager.start(1, batch=max(1, window // 10))
            else:
                averager.update()
            if step == 0:
                activity.start()
            else:
                activity.update()
            if callback is not None:
                t_cb = time.perf_counter()
                draw = _current_draw(binding, objective.guide, averager if s.average else None)
                callback(FitProgress(step + 1, loss, t_cb - t0 - in_callbacks, draw))
                in_callbacks += time.perf_counter() - t_cb
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss:.4g}")
            if (step + 1) % window == 0:
                activity.end_window()
                kept_arr = np.asarray(kept)
                if is_flat(kept_arr, window, s.rule) and (
                    not s.rule.half_window or level_since_half(kept_arr, window, s.rule)
                ):
                    flat_checks += 1
                    if flat_checks >= s.rule.patience:
                        # a flat loss over parameters that no longer move is a stuck fit
                        stuck = stuck_note(activity, kept_arr, window, s.rule.rtol)
                        if stuck is None and noisy(kept_arr, window, s.rule.rtol):
                            stuck = averager.drift_note(step + 1)
                        converged = converged or stuck is None
                    if converged and s.rule.early_stop:
                        status = CONVERGED
                        message = (
                            f"converged at step {step + 1}: no significant improvement "
                            f"over {s.rule.patience} windows of {window} steps"
                            + (f" nor since step {(step + 1) // 2}" if s.rule.half_window else "")
                        )
                        break
                else:
                    flat_checks, stuck = 0, None
    except KeyboardInterrupt:
        status = INTERRUPTED
        message = f"interrupted at step {len(losses)}; kept the parameters learned"
    finally:
        if bar is not None:
            bar.close()
    averaged = averager.commit() if s.average and status not in (NONFINITE, DIVERGED) else None
    wall = time.perf_counter() - t0
    if status == MAX_STEPS:
        if converged:
            message = f"ran all {s.num_steps} steps; the loss had flattened"
        elif stuck is not None:
            message = f"ran all {s.num_steps} steps; not converged: {stuck}"
        else:
            message = f"ran all {s.num_steps} steps; the loss was still improving (not converged)"
    if averaged is not None:
        first, n = averaged["from_step"], averaged["steps"]
        message = (
            f"{message}; the parameters are the average of the iterates "
            f"of steps {first}-{first + n - 1}"
        )
        if averaged["num_drifting"]:
            message += (
                f" (at most: each coordinate over its longest recent stretch without drift; "
                f"{averaged['num_drifting']} of {averaged['num_coordinates']} have no such "
                "stretch and keep their last iterate)"
            )
    elif s.average and status != NONFINITE and averager.selection() is not None:
        message += (
            "; not averaged: every parameter was still drifting (its last iterate is kept); "
            "run more steps"
        )
    if guard.note() is not None:
        message = f"{message}; {guard.note()}"
    return LoopOutcome(
        losses=np.asarray(losses, dtype=float),
        status=status,
        message=message,
        converged=converged,
        wall_time=wall,
        window=window,
        averaged=averaged,
        objective=objective,
        jit_note=jit_note,
        compile_note=compile_note,
        compiled=compiled is not None,
        spikes=guard.summary(),
    )


def _compile(binding: Binding, objective: Objective, s: LoopSettings) -> tuple[Any, str | None]:
    """The compiled step after the first (validated) step, or None and the reason."""
    if s.num_steps < COMPILE_MIN_STEPS:
        return None, f"not compiled: fewer than {COMPILE_MIN_STEPS} steps"
    try:
        step = compile_step(
            objective.loss, binding.model, objective.guide, binding.args, key=s.compile_key
        )
    except StepCompileError as exc:
        return None, f"compiled step unavailable ({exc})"[:300]
    return step, None


def _current_draw(
    binding: Binding, guide: Callable, averager: IterateAverage | None
) -> Callable[[int, tuple[str, ...] | None], dict[str, np.ndarray]]:
    """``draw(n, sites)``: guide draws at the parameters the fit would return now."""
    checked: dict = {"info": None, "vectorized": False}

    def draw(num: int, which: tuple[str, ...] | None) -> dict[str, np.ndarray]:
        with averager.swapped() if averager is not None else nullcontext():
            if checked["info"] is None:  # traced once per fit
                checked["info"] = model_info(binding.model, binding.args, {}, binding.depth)
            report: dict = {}
            draws, _ = sample_guide(
                binding.model, guide, binding.args, {}, checked["info"], num,
                report=report, sites=tuple(which or binding.sites),
                check=not checked["vectorized"], weights=False,
            )  # fmt: skip
            # a vectorized pass that passed the particle check once is not checked again
            checked["vectorized"] = bool(report["vectorized"])
            return draws

    return draw
