"""Benchmarks 1 and 2: fit() against the SVI loop a user would write by hand.

1. Overhead: ``fit()`` vs a hand-written Pyro loop with the same guide, ELBO,
   optimizer and steps (target <= 1.05x wall time, everything included).
2. Default speed: ``fit()`` with its defaults vs the loop a user writes by
   default (``Trace_ELBO``, validation on, particles not vectorized), same number
   of particles (target <= 0.5x time per step).

Each pair is measured interleaved ``repeats`` times in the same process (the
order alternates between repeats) and the median ratio is reported.

1b. First call: the same pair, each as the first call in a fresh process
   (imports done before the clock starts), so one-time costs of the first
   ``fit()`` in a process count (target <= 1.05x).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import vimodels
from vimodels.svi.convergence import ConvergenceRule

MODEL = "eight_schools_noncentered"


def _hand_loop(
    num_steps: int, num_particles: int, vectorize: bool, validate: bool, seed: int = 0
) -> tuple[float, float]:
    """Wall and CPU seconds of a hand-written SVI loop."""
    entry = vimodels.get_model(MODEL)
    data = entry.data()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    torch.set_num_threads(1)
    with pyro.validation_enabled(validate):
        t0, c0 = time.perf_counter(), time.process_time()
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
        return time.perf_counter() - t0, time.process_time() - c0


def _fit(num_steps: int, num_particles: int, **kwargs) -> tuple[float, float, float]:
    """Wall and CPU seconds of a whole ``fit()`` call, and the wall time of its loop."""
    t0, c0 = time.perf_counter(), time.process_time()
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
    return time.perf_counter() - t0, time.process_time() - c0, result.wall_time


def _same_work_fit(num_steps: int) -> tuple[float, float]:
    wall, cpu, _ = _fit(
        num_steps, 1, jit=False, lr_decay=None, validate_first_step=False, num_eval=2
    )
    return wall, cpu


def _pair_result(name: str, hand: list, ours: list) -> dict:
    """Median wall and CPU ratios of interleaved ``(wall, cpu)`` pairs."""
    ratios = [o[0] / h[0] for h, o in zip(hand, ours)]
    cpu_ratios = [o[1] / h[1] for h, o in zip(hand, ours)]
    return {
        "name": name,
        "baseline_s": statistics.median(h[0] for h in hand),
        "ours_s": statistics.median(o[0] for o in ours),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "baseline_cpu_s": statistics.median(h[1] for h in hand),
        "ours_cpu_s": statistics.median(o[1] for o in ours),
        "cpu_ratio": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "target": 1.05,
    }


def overhead(num_steps: int = 2000, repeats: int = 3) -> dict:
    """Benchmark 1: identical work (Adam, Trace_ELBO, no JIT, validation off).

    Wall and CPU time (one torch thread: CPU time is what an idle machine's
    wall time would be, and it is far less sensitive to other jobs).
    """
    hand, ours = [], []
    for r in range(repeats):
        if r % 2:
            ours.append(_same_work_fit(num_steps))
            hand.append(_hand_loop(num_steps, 1, vectorize=False, validate=False))
        else:
            hand.append(_hand_loop(num_steps, 1, vectorize=False, validate=False))
            ours.append(_same_work_fit(num_steps))
    return _pair_result("overhead: fit() / hand-written loop (same work)", hand, ours)


def _first_call_child(which: str, num_steps: int) -> None:
    """In a fresh process: time the first hand loop or the first ``fit()``."""
    if which == "hand":
        wall, cpu = _hand_loop(num_steps, 1, vectorize=False, validate=False)
    else:
        wall, cpu = _same_work_fit(num_steps)
    print(json.dumps({"wall": wall, "cpu": cpu}))


def first_call(num_steps: int = 2000, repeats: int = 3) -> dict:
    """Benchmark 1b: the pair of benchmark 1, each the first call in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    times: dict[str, list[tuple[float, float]]] = {"hand": [], "fit": []}
    for r in range(repeats):
        order = ("hand", "fit") if r % 2 == 0 else ("fit", "hand")
        for which in order:
            code = (
                "import sys; sys.path.insert(0, 'benchmarks'); import bench_fit; "
                f"bench_fit._first_call_child({which!r}, {num_steps})"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
            )
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[which].append((res["wall"], res["cpu"]))
    return _pair_result(
        "overhead, first call in a fresh process: fit() / hand-written loop",
        times["hand"],
        times["fit"],
    )


def default_speed(num_steps: int = 2000, num_particles: int = 8, repeats: int = 3) -> dict:
    """Benchmark 2: defaults vs a user's default loop, time per step."""
    ratios, hand_times, fit_times = [], [], []
    for _ in range(repeats):
        hand, _ = _hand_loop(num_steps, num_particles, vectorize=False, validate=True)
        _, _, loop = _fit(num_steps, num_particles)
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
