"""Child process of ``test_jit_memory.py`` and ``benchmarks/bench_memory.py --per-fit``.

Runs ``fits`` short JIT fits of eight schools (Pyro's ``JitTrace_ELBO``) and
``steps`` compiled steps (:func:`vimodels.compile.step.compile_step`, uncached)
after a warm-up, and prints one JSON line: the RSS growth per fit and per
compiled step (MB), the seconds per fit, and how many functions torch's global
compilation unit gained. ``--baseline`` turns :mod:`vimodels.compile.units` off
(torch's own behaviour: every trace kept in the global unit).

Usage: python tests/compile/jit_memory_child.py [--fits N] [--steps N] [--num-steps N] [--baseline]
"""

from __future__ import annotations

import argparse
import gc
import json
import time


def rss_mb() -> float:
    """This process's resident set size (MB, Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fits", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args(argv)

    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    import vimodels
    from vimodels.compile import units
    from vimodels.compile.step import compile_step

    units.ENABLED = not args.baseline
    torch.set_num_threads(1)
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("J", 8):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(mu + tau * theta, sigma), obs=y)

    def one_fit(seed: int) -> None:
        vimodels.fit(
            "eight_schools_noncentered",
            num_steps=args.num_steps,
            jit=True,
            seed=seed,
            num_eval=10,
            progress=False,
        )

    def one_step(seed: int) -> None:
        """Trace, freeze and check a compiled step (no cache: each call traces)."""
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoNormal(model)
        elbo = Trace_ELBO()
        elbo.loss(model, guide, y, sigma)  # creates the parameters
        step = compile_step(elbo, model, guide, (y, sigma))
        for _ in range(3):
            step.step(lambda ps: None)

    for i in range(args.warmup):
        one_fit(i)
        one_step(i)
    gc.collect()
    before, functions = rss_mb(), len(units.global_unit().get_functions())
    t0 = time.perf_counter()
    for i in range(args.fits):
        one_fit(100 + i)
        gc.collect()
    per_fit_s = (time.perf_counter() - t0) / max(args.fits, 1)
    after_fits = rss_mb()
    t0 = time.perf_counter()
    for i in range(args.steps):
        one_step(100 + i)
        gc.collect()
    per_step_s = (time.perf_counter() - t0) / max(args.steps, 1)
    after_steps = rss_mb()
    out = {
        "baseline": args.baseline,
        "fits": args.fits,
        "mb_per_fit": (after_fits - before) / max(args.fits, 1),
        "s_per_fit": per_fit_s,
        "steps": args.steps,
        "mb_per_step": (after_steps - after_fits) / max(args.steps, 1),
        "s_per_step": per_step_s,
        "global_unit_functions_added": len(units.global_unit().get_functions()) - functions,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
