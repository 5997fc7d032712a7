"""Benchmarks 1 and 2: fit() against the SVI loop a user would write by hand.

1. Overhead: ``fit()`` vs a hand-written Pyro loop with the same guide, ELBO,
   optimizer and steps (target <= 1.05x wall time, everything included).
2. Default speed: ``fit()`` with its defaults vs the loop a user writes by
   default (``Trace_ELBO``, validation on, particles not vectorized), same number
   of particles (target <= 0.5x time per step).

Each pair is measured interleaved ``repeats`` times in the same process and the
median ratio is reported.
"""

from __future__ import annotations

import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import vimodels
from vimodels.convergence import ConvergenceRule

MODEL = "eight_schools_noncentered"


def _hand_loop(
    num_steps: int, num_particles: int, vectorize: bool, validate: bool, seed: int = 0
) -> float:
    entry = vimodels.get_model(MODEL)
    data = entry.data()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    torch.set_num_threads(1)
    with pyro.validation_enabled(validate):
        t0 = time.perf_counter()
        guide = AutoNormal(entry.model)
        svi = SVI(
            entry.model,
            guide,
            pyro.optim.Adam({"lr": 0.02}),
            Trace_ELBO(
                num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1
            ),
        )
        for _ in range(num_steps):
            svi.step(**data)
        return time.perf_counter() - t0


def _fit(num_steps: int, num_particles: int, **kwargs) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = vimodels.fit(
        MODEL,
        guide="auto_normal",
        elbo="trace",
        num_steps=num_steps,
        num_particles=num_particles,
        progress=False,
        convergence=ConvergenceRule(early_stop=False),
        **kwargs,
    )
    return time.perf_counter() - t0, result.wall_time


def overhead(num_steps: int = 2000, repeats: int = 3) -> dict:
    """Benchmark 1: identical work (Adam, Trace_ELBO, no JIT, validation off)."""
    ratios, hand_times, fit_times = [], [], []
    for _ in range(repeats):
        hand = _hand_loop(num_steps, 1, vectorize=False, validate=False)
        total, _ = _fit(
            num_steps, 1, jit=False, lr_decay=None, validate_first_step=False, num_eval=2
        )
        hand_times.append(hand)
        fit_times.append(total)
        ratios.append(total / hand)
    return {
        "name": "overhead: fit() / hand-written loop (same work)",
        "baseline_s": statistics.median(hand_times),
        "ours_s": statistics.median(fit_times),
        "ratio": statistics.median(ratios),
        "target": 1.05,
    }


def default_speed(num_steps: int = 2000, num_particles: int = 8, repeats: int = 3) -> dict:
    """Benchmark 2: defaults vs a user's default loop, time per step."""
    ratios, hand_times, fit_times = [], [], []
    for _ in range(repeats):
        hand = _hand_loop(num_steps, num_particles, vectorize=False, validate=True)
        _, loop = _fit(num_steps, num_particles)
        hand_times.append(hand / num_steps)
        fit_times.append(loop / num_steps)
        ratios.append(loop / hand)
    return {
        "name": f"default speed: time per step, {num_particles} particles",
        "baseline_s": statistics.median(hand_times),
        "ours_s": statistics.median(fit_times),
        "ratio": statistics.median(ratios),
        "target": 0.5,
    }


def default_speed_one_particle(num_steps: int = 2000, repeats: int = 3) -> dict:
    """Benchmark 2 with a single particle (no vectorization to gain)."""
    out = default_speed(num_steps, 1, repeats)
    out["name"] = "default speed: time per step, 1 particle"
    return out
