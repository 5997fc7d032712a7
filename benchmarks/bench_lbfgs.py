"""Benchmark 10b (issue 18): the mode search's L-BFGS driver, three ways.

- ``before``: the driver as it was (``torch.optim.LBFGS``, strong Wolfe, one
  ``step`` per iteration, the closure evaluated afresh at each step's start),
  kept here verbatim as the baseline (``torch_run``);
- ``cached``: today's ``vimodels.mode.lbfgs._run`` (the same, with the
  evaluation at each step's start served from the previous line search);
- ``scipy``: the experiment ``scipy_run`` below, SciPy's L-BFGS-B without
  bounds driven by the same potential, stopping rules checked in its callback
  (one BLAS thread). Not adopted: see benchmarks/README.md, section 10b.

All arms run in the same process, interleaved, on the same potential (its
frozen value-and-gradient graph built once beforehand), from the same starts.
Per model and arm: the time of ``find_mode`` (4 starts, ``fit``'s defaults),
of a whole ``fit(guide="auto_laplace")`` and ``fit(guide="pathfinder")`` (the
driver swapped in for the fit), iterations and evaluations over the starts,
and the modes' agreement with ``before`` (max |difference| in unconstrained
space, log p at each; ``cached`` must agree bit for bit).

Usage: python benchmarks/bench_lbfgs.py [--models NAME ...] [--repeats N]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import scipy.optimize  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import ThreadpoolController  # noqa: E402

import vimodels  # noqa: E402
import vimodels.mode.lbfgs as lbfgs  # noqa: E402
from vimodels.mode.fast import compiled_value_and_grad  # noqa: E402
from vimodels.mode.lbfgs import (  # noqa: E402
    GRADIENT,
    MAX_EVALS,
    MAX_ITERS,
    NO_PROGRESS,
    NONFINITE,
    OBJECTIVE,
    UNBOUNDED,
    Potential,
    _unbounded,
)
from vimodels.mode.lbfgs import _run as cached_run  # noqa: E402

MODELS = (
    "pdb_mesquite_logvolume",
    "pdb_earnings_logearn_interaction",
    "pdb_kidiq_interaction",
    "pdb_nes1972",
    "pdb_ark",
    "pdb_arma11",
    "eight_schools_noncentered",
)
MAX_LINE_SEARCH = 25


def torch_run(
    potential: Potential,
    u0: torch.Tensor,
    scale: torch.Tensor,
    max_iters: int,
    history_size: int,
    gtol: float,
    ftol: float,
    patience: int,
    positions: list[torch.Tensor],
    lps: list[torch.Tensor],
    grads: list[torch.Tensor],
    max_evals: int,
) -> tuple[str, int]:
    """The previous driver: torch.optim.LBFGS, one ``step`` per iteration (baseline)."""
    z = (u0 / scale).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=1,
        max_eval=25,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    evals = 0
    last: list[tuple[torch.Tensor, torch.Tensor]] = []
    fast = compiled_value_and_grad(potential)

    def closure() -> torch.Tensor:
        nonlocal evals
        evals += 1
        opt.zero_grad()
        if fast is not None:  # the frozen graph of value and gradient (vimodels.mode.fast)
            lp, g = fast(z.detach() * scale)
            if not torch.isfinite(lp):
                z.grad = torch.zeros_like(z)
                last.append((torch.tensor(math.inf, dtype=z.dtype), z.grad.clone()))
                return torch.tensor(1e300, dtype=z.dtype)
            z.grad = -g * scale
            last.append((lp, z.grad.clone()))
            return -lp
        lp = potential.log_density(z * scale)
        if not torch.isfinite(lp):
            # a finite, very poor value lets the line search back off
            z.grad = torch.zeros_like(z)
            last.append((torch.tensor(math.inf, dtype=z.dtype), z.grad.clone()))
            return torch.tensor(1e300, dtype=z.dtype)
        loss = -lp
        loss.backward()
        last.append((lp.detach(), z.grad.detach().clone()))
        return loss.detach()

    reason = MAX_ITERS
    flat = 0
    taken = 0
    first = len(lps)
    g_low = math.inf
    while True:
        last.clear()
        before = z.detach().clone()
        opt.step(closure)
        lp, gz = last[0]  # the first evaluation of a step is at its starting point
        if not math.isfinite(float(lp)):
            reason = NONFINITE
            break
        g = -gz / scale  # closure stored d(-log p)/dz; d log p / du = (d log p / dz) / scale
        positions.append(before * scale)
        lps.append(lp)
        grads.append(g)
        g_max = float(g.abs().max())
        if g_max <= gtol:
            reason = GRADIENT
            break
        g_low = min(g_low, max(g_max, 1.0))
        if _unbounded(positions, lps, first, g_max, g_low):
            reason = UNBOUNDED
            break
        if len(lps) > 1:
            change = abs(float(lps[-1] - lps[-2]))
            flat = flat + 1 if change <= ftol * max(1.0, abs(float(lp))) else 0
            if flat >= patience:
                reason = OBJECTIVE
                break
        if taken >= max_iters:
            break
        if evals >= max_evals:
            reason = MAX_EVALS
            break
        taken += 1
        if torch.equal(z.detach(), before):
            reason = NO_PROGRESS
            break
    return reason, evals


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's BLAS libraries (found once, after SciPy's optimizer is loaded)."""
    return ThreadpoolController()


class _Stop(Exception):
    """Raised inside the objective to end the run (never escapes :func:`_run`)."""


def _eager_value_and_grad(potential: Potential) -> Callable:
    """``u -> (log p, d log p / du)`` through the potential itself (no frozen graph)."""

    def value_and_grad(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = u.detach().clone().requires_grad_(True)
            lp = potential.log_density(x)
            if not torch.isfinite(lp):
                return lp.detach(), torch.zeros_like(x)
            (g,) = torch.autograd.grad(lp, x, allow_unused=True)
        return lp.detach(), torch.zeros_like(x) if g is None else g.detach()

    return value_and_grad


def scipy_run(
    potential: Potential,
    u0: torch.Tensor,
    scale: torch.Tensor,
    max_iters: int,
    history_size: int,
    gtol: float,
    ftol: float,
    patience: int,
    positions: list[torch.Tensor],
    lps: list[torch.Tensor],
    grads: list[torch.Tensor],
    max_evals: int,
) -> tuple[str, int]:
    """The experiment: SciPy's L-BFGS-B without bounds (``maxcor = history_size``, a Moré-Thuente
    line search of at most :data:`MAX_LINE_SEARCH` evaluations) minimises
    ``-log p`` in float64; its own stopping rules are switched off (``gtol =
    ftol = 0``) and every accepted iterate is checked here, in the callback,
    against this module's rules. The values and gradients of the accepted
    iterates come from this run's evaluations (kept per line search, keyed on
    the point), so nothing is evaluated twice.
    """
    dtype = potential.dtype
    value_and_grad = compiled_value_and_grad(potential) or _eager_value_and_grad(potential)
    scale_np = scale.detach().double().cpu().numpy()
    evals = 0
    # this line search's evaluations: bytes of z -> (u, log p, d log p / du)
    seen: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def evaluate(z: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal evals
        key = z.tobytes()
        if key not in seen:
            evals += 1
            u = torch.from_numpy(z * scale_np).to(dtype)
            lp, g = value_and_grad(u)
            seen[key] = (u, lp, g)
        return seen[key]

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        _, lp, g = evaluate(z)
        value = float(lp)
        if not (math.isfinite(value) and bool(torch.isfinite(g).all())):
            # a finite, very poor value lets the line search back off
            return 1e300, np.zeros_like(z)
        return -value, -(g.double().cpu().numpy() * scale_np)

    state = {"reason": None, "flat": 0, "taken": 0, "g_low": math.inf}
    first = len(lps)

    def accept(z: np.ndarray) -> None:
        """Record the iterate at ``z`` and raise :class:`_Stop` where a rule says stop."""
        u, lp, g = evaluate(z)
        seen.clear()
        if not (math.isfinite(float(lp)) and bool(torch.isfinite(g).all())):
            state["reason"] = NONFINITE
            raise _Stop
        positions.append(u)
        lps.append(lp)
        grads.append(g)
        g_max = float(g.abs().max())
        if g_max <= gtol:
            state["reason"] = GRADIENT
            raise _Stop
        state["g_low"] = min(state["g_low"], max(g_max, 1.0))
        if _unbounded(positions, lps, first, g_max, state["g_low"]):
            state["reason"] = UNBOUNDED
            raise _Stop
        if len(lps) > first + 1:
            change = abs(float(lps[-1] - lps[-2]))
            state["flat"] = state["flat"] + 1 if change <= ftol * max(1.0, abs(float(lp))) else 0
            if state["flat"] >= patience:
                state["reason"] = OBJECTIVE
                raise _Stop
        if state["taken"] >= max_iters:
            state["reason"] = MAX_ITERS
            raise _Stop
        if evals >= max_evals:
            state["reason"] = MAX_EVALS
            raise _Stop
        state["taken"] += 1

    def callback(intermediate_result: Any) -> None:
        try:
            accept(intermediate_result.x)
        except _Stop:
            raise StopIteration from None

    z0 = (u0.detach().double().cpu() / scale.detach().double().cpu()).numpy()
    try:
        accept(z0)
    except _Stop:
        return state["reason"], evals
    # L-BFGS-B's small dense algebra (2m x 2m) on one BLAS thread: on a busy 2-core
    # machine OpenBLAS's threads made each iteration ~100 times slower (~15 ms)
    with _blas().limit(limits=1, user_api="blas"):
        result = scipy.optimize.minimize(
            objective,
            z0,
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options={
                "maxcor": history_size,
                "gtol": 0.0,
                "ftol": 0.0,
                "maxiter": max_iters + 1,
                "maxfun": max_evals + MAX_LINE_SEARCH + 1,
                "maxls": MAX_LINE_SEARCH,
            },
        )
    if state["reason"] is not None:  # the callback stopped it
        return state["reason"], evals
    # SciPy stopped on its own: a line search that found no lower point (or, with
    # ftol = 0, a step that lowered nothing), or its evaluation/iteration cap
    if result.status == 1:
        return (MAX_EVALS if evals >= max_evals else MAX_ITERS), evals
    return NO_PROGRESS, evals


ARMS = {"before": torch_run, "cached": cached_run, "scipy": scipy_run}


def _timed_fit(model: str, guide: str, seed: int) -> float:
    t0 = time.perf_counter()
    vimodels.fit(model, guide=guide, progress=False, seed=seed)
    return time.perf_counter() - t0


def run(models: tuple[str, ...], repeats: int = 2) -> dict:
    """Time and modes of the three drivers per model; prints a Markdown table."""
    torch.set_num_threads(1)
    rows = []
    for name in models:
        pyro.set_rng_seed(0)
        pot = lbfgs.potential_for(name, None)
        compiled_value_and_grad(pot)  # the frozen graph, built once for all arms
        for fn in ARMS.values():  # warm-up, not timed
            lbfgs._run = fn
            lbfgs.find_mode(name, potential=pot, seed=0)
        lbfgs._run = cached_run
        times: dict[str, dict[str, list[float]]] = {a: {} for a in ARMS}
        modes = {}
        for _ in range(repeats):
            for arm, fn in ARMS.items():  # interleaved
                lbfgs._run = fn
                try:
                    t0 = time.perf_counter()
                    m = lbfgs.find_mode(name, potential=pot, seed=0)
                    times[arm].setdefault("find_mode", []).append(time.perf_counter() - t0)
                    modes[arm] = m
                    for guide in ("auto_laplace", "pathfinder"):
                        times[arm].setdefault(guide, []).append(_timed_fit(name, guide, 0))
                finally:
                    lbfgs._run = cached_run
        ref = modes["before"]
        row = {
            "model": name,
            "dim": pot.dim,
            "max_abs_du": {a: float((modes[a].u - ref.u).abs().max()) for a in ARMS},
            "same_paths": all(
                torch.equal(p.positions, q.positions)
                for p, q in zip(ref.paths, modes["cached"].paths, strict=True)
            ),
            "log_density": {a: modes[a].log_density for a in ARMS},
            "iters": {a: sum(r.num_iters for r in modes[a].report.runs) for a in ARMS},
            "evals": {a: modes[a].report.num_evals for a in ARMS},
            "converged": {a: modes[a].report.converged for a in ARMS},
            "times": times,
            "load_average": os.getloadavg(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| model | dim | find_mode s (before / cached / scipy) | auto_laplace s "
        "| pathfinder s | iterations | evaluations | cached: same paths | scipy: max abs du "
        "| log p before / scipy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(r: dict, key: str) -> str:
        return " / ".join(", ".join(f"{v:.3f}" for v in r["times"][a][key]) for a in ARMS)

    for r in rows:
        lp = r["log_density"]
        print(
            f"| {r['model']} | {r['dim']} | {cell(r, 'find_mode')} | {cell(r, 'auto_laplace')} "
            f"| {cell(r, 'pathfinder')} | {' / '.join(str(r['iters'][a]) for a in ARMS)} "
            f"| {' / '.join(str(r['evals'][a]) for a in ARMS)} | {r['same_paths']} "
            f"| {r['max_abs_du']['scipy']:.1e} | {lp['before']:.10g} / {lp['scipy']:.10g} |"
        )
    return {"name": "lbfgs driver (issue 18)", "rows": rows, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps({"load_average": os.getloadavg()}))
    run(tuple(args.models), args.repeats)
    print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
