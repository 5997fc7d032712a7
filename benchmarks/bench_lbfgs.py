"""Benchmark 10b (issue 18): the mode search's optimizer, torch's LBFGS vs SciPy's L-BFGS-B.

``vimodels.mode.lbfgs._run`` drives SciPy's L-BFGS-B; ``torch_run`` below is
the previous driver (``torch.optim.LBFGS``, strong Wolfe, one ``step`` per
iteration), kept here verbatim as the baseline. Both arms run in the same
process, interleaved, on the same potential (its frozen value-and-gradient
graph built once beforehand), from the same starts. Per model and arm: the
time of ``find_mode`` (4 starts, ``fit``'s defaults), of a whole
``fit(guide="auto_laplace")`` and ``fit(guide="pathfinder")`` (the driver
swapped in for the fit), iterations and evaluations over the starts, and the
modes' agreement (max |difference| in unconstrained space, log p at each).

Usage: python benchmarks/bench_lbfgs.py [--models NAME ...] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pyro  # noqa: E402
import torch  # noqa: E402

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

MODELS = (
    "pdb_mesquite_logvolume",
    "pdb_earnings_logearn_interaction",
    "pdb_kidiq_interaction",
    "pdb_nes1972",
    "pdb_ark",
    "pdb_arma11",
    "eight_schools_noncentered",
)
SCIPY_RUN = lbfgs._run


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


ARMS = {"torch": torch_run, "scipy": SCIPY_RUN}


def _timed_fit(model: str, guide: str, seed: int) -> float:
    t0 = time.perf_counter()
    vimodels.fit(model, guide=guide, progress=False, seed=seed)
    return time.perf_counter() - t0


def run(models: tuple[str, ...], repeats: int = 2) -> dict:
    """Time and modes of both drivers per model; prints a Markdown table."""
    torch.set_num_threads(1)
    rows = []
    for name in models:
        pyro.set_rng_seed(0)
        pot = lbfgs.potential_for(name, None)
        compiled_value_and_grad(pot)  # the frozen graph, built once for both arms
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
                    lbfgs._run = SCIPY_RUN
        t, s = modes["torch"], modes["scipy"]
        row = {
            "model": name,
            "dim": pot.dim,
            "max_abs_du": float((t.u - s.u).abs().max()),
            "log_density": {"torch": t.log_density, "scipy": s.log_density},
            "iters": {a: sum(r.num_iters for r in modes[a].report.runs) for a in ARMS},
            "evals": {a: modes[a].report.num_evals for a in ARMS},
            "converged": {a: modes[a].report.converged for a in ARMS},
            "times": times,
            "load_average": os.getloadavg(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| model | dim | find_mode torch / scipy (s) | auto_laplace torch / scipy (s) "
        "| pathfinder torch / scipy (s) | iterations | evaluations | max abs du | "
        "log p torch / scipy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(r: dict, key: str) -> str:
        a = ", ".join(f"{v:.3f}" for v in r["times"]["torch"][key])
        b = ", ".join(f"{v:.3f}" for v in r["times"]["scipy"][key])
        return f"{a} / **{b}**"

    for r in rows:
        lp = r["log_density"]
        print(
            f"| {r['model']} | {r['dim']} | {cell(r, 'find_mode')} | {cell(r, 'auto_laplace')} "
            f"| {cell(r, 'pathfinder')} | {r['iters']['torch']} / {r['iters']['scipy']} "
            f"| {r['evals']['torch']} / {r['evals']['scipy']} | {r['max_abs_du']:.1e} "
            f"| {lp['torch']:.10g} / {lp['scipy']:.10g} |"
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
