"""Benchmark 2c: the cost of the loss-spike guard (``vimodels.svi.spike``) per SVI step.

Two measurements:

1. ``SpikeGuard.accepts`` alone, called with a noisy loss (microseconds per call,
   the median refresh every ``REFRESH`` calls included);
2. whole fits (compiled step, 1 particle, same seed), alternating the real guard
   with a null guard that accepts every loss and keeps nothing, so both see the
   same machine load: loop time per step (wall) and CPU time per step of the
   whole fit (process time, which the load inflates less), and the ratios
   guard / null.

Usage: python benchmarks/bench_spike.py [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import vimodels  # noqa: E402
from vimodels.svi import loop  # noqa: E402
from vimodels.svi.spike import SpikeGuard  # noqa: E402

CASES = (
    ("eight_schools_noncentered", "structured"),
    ("radon_varying_intercept_noncentered", "auto_normal"),
)


class NullGuard:
    """Accepts every loss and records nothing (the loop without the guard)."""

    skipped: list[int] = []

    def accepts(self, step: int, loss: float) -> bool:
        return True

    def diverged(self, step: int) -> None:
        return None

    def summary(self) -> None:
        return None

    def note(self) -> None:
        return None


def micro(calls: int = 200_000) -> float:
    """Microseconds per ``SpikeGuard.accepts`` call on a noisy loss."""
    losses = (100.0 + np.random.default_rng(0).normal(size=calls)).tolist()
    guard = SpikeGuard()
    t = time.perf_counter()
    for i, x in enumerate(losses):
        guard.accepts(i, x)
    return (time.perf_counter() - t) / calls * 1e6


def _per_step(model: str, guide: str, steps: int, guard) -> tuple[float, float]:
    """Loop wall time and whole-fit CPU time per step (seconds)."""
    loop.SpikeGuard = guard
    cpu = time.process_time()
    r = vimodels.fit(
        model, guide=guide, num_steps=steps, progress=False, num_eval=10, seed=0,
        convergence=vimodels.ConvergenceRule(early_stop=False),
    )  # fmt: skip
    assert r.settings["step_compiler"] == "fx", r.settings["step_compiler_note"]
    cpu = time.process_time() - cpu
    return r.wall_time / r.num_steps, cpu / r.num_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    print(f"SpikeGuard.accepts: {micro():.2f} us per call")
    for model, guide in CASES:
        _per_step(model, guide, 1000, SpikeGuard)  # warm up (compile cache, imports)
        times: dict[str, list[tuple[float, float]]] = {"null": [], "guard": []}
        for _ in range(a.repeats):
            times["null"].append(_per_step(model, guide, a.steps, NullGuard))
            times["guard"].append(_per_step(model, guide, a.steps, SpikeGuard))
        for i, what in enumerate(("wall", "cpu")):
            null, guard = (
                statistics.median(t[i] for t in times[k]) * 1e3 for k in ("null", "guard")
            )
            print(
                f"{model} / {guide} ({what}): null {null:.3f} ms, guard {guard:.3f} ms, "
                f"ratio {guard / null:.3f}"
            )
    loop.SpikeGuard = SpikeGuard


if __name__ == "__main__":
    main()
