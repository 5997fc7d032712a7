"""Benchmark 3c: nutpie on the project's potential, against the project's NUTS.

nutpie (a Rust NUTS with its own mass-matrix adaptation: a diagonal from the
draws' and gradients' variances, optionally a low-rank modification for
correlations) samples the same flat unconstrained potential the project's
sampler does (:class:`diagnostics.nuts.kernel.FlatPotential`, Pyro's
potential traced into one TorchScript graph), through
``nutpie.compiled_pyfunc.from_pyfunc``. Reported: min bulk ESS over the
sites of interest per second of the whole call (the trace of the potential
included), as in ``bench_nuts.py --battery``.

nutpie is not a dependency of the project: run this in an environment of its
own (see benchmarks/README.md, benchmark 3c):

    python -m venv nutpie-venv
    nutpie-venv/bin/pip install torch==2.13.0      # the CPU wheel first
    nutpie-venv/bin/pip install pyro-ppl nutpie "arviz<0.24" pandas filelock scipy ...
    PYTHONPATH=. nutpie-venv/bin/python benchmarks/bench_nutpie.py --models regression
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = (
    "eight_schools_noncentered",
    "radon_varying_intercept_noncentered",
    "sleepstudy_random_slopes",
    "regression",
)


def _model(name: str) -> tuple:
    """``(model, data, sites, settings)`` of a catalog entry or the battery's regression."""
    import bench_nuts

    if name == "regression":
        data = bench_nuts.regression_data()
        return bench_nuts.regression_model, data, ("alpha", "beta", "sigma"), None
    from vimodels.catalog.registry import get_model

    entry = get_model(name)
    return entry.model, entry.data(), entry.sites, entry.nuts


def run_nutpie(name: str, low_rank: bool, chains: int, tune: int, draws: int, seed: int) -> dict:
    """Sample ``name`` with nutpie on the project's traced potential; ESS per second."""
    import nutpie
    import torch
    from nutpie.compiled_pyfunc import from_pyfunc

    from diagnostics import _arviz
    from diagnostics.nuts.kernel import _inference, _setup

    model, data, sites, _ = _model(name)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    setup = _setup(model, data, [seed + c for c in range(chains)], None, True)
    potential = setup.potential
    dim = potential.dim

    def make_logp_fn():
        def logp(x, **unused):
            with _inference(potential.mode == "fx"):
                u, g = potential(np.asarray(x, dtype=np.float64))
            if not np.isfinite(u):
                return -np.inf, np.zeros(dim)
            return -u, -g

        return logp

    names = list(potential.shapes)
    shapes = [tuple(potential.shapes[k]) for k in names]

    def make_expand_fn(seed1, seed2, chain):
        def expand(x, **unused):
            z = torch.as_tensor(np.asarray(x), dtype=setup.dtype)
            out = {}
            with torch.no_grad():
                for k, v in potential.unflatten(z).items():
                    t = setup.transforms.get(k)
                    out[k] = (t.inv(v) if t is not None else v).double().numpy()
            return out

        return expand

    def make_initial_point_fn(seed):
        return np.random.default_rng(seed).uniform(-2.0, 2.0, dim)

    compiled = from_pyfunc(
        dim,
        make_logp_fn,
        make_expand_fn,
        [np.dtype("float64")] * len(names),
        shapes,
        names,
        make_initial_point_fn=make_initial_point_fn,
    )
    trace = nutpie.sample(
        compiled,
        draws=draws,
        tune=tune,
        chains=chains,
        cores=1,
        seed=seed,
        progress_bar=False,
        low_rank_modified_mass_matrix=low_rank,
    )
    wall = time.perf_counter() - t0
    ess, rhat = [], []
    for site in sites:
        if site not in trace.posterior:
            continue
        x = np.asarray(trace.posterior[site].values, dtype=float)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        for j in range(flat.shape[2]):
            ess.append(_arviz.ess(flat[:, :, j], "bulk"))
            rhat.append(_arviz.rhat(flat[:, :, j]))
    st = trace.sample_stats
    return {
        "model": name,
        "sampler": "nutpie" + (" low-rank" if low_rank else " diag"),
        "wall_s": wall,
        "min_ess_bulk": float(min(ess)),
        "ess_per_s": float(min(ess)) / wall,
        "max_rhat": float(max(rhat)),
        "grad_per_draw": float(np.mean(st["n_steps"].values)),
        "tree_depth": float(np.mean(st["depth"].values)) if "depth" in st else float("nan"),
        "divergences": int(np.sum(st["diverging"].values)),
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--tune", type=int, default=500)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for low_rank in (False, True):
            row = run_nutpie(name, low_rank, args.chains, args.tune, args.draws, args.seed)
            rows.append(row)
            print(
                f"  {name} {row['sampler']}: {row['ess_per_s']:.1f} ESS/s (min bulk ESS "
                f"{row['min_ess_bulk']:.0f} in {row['wall_s']:.1f} s), "
                f"{row['grad_per_draw']:.1f} grad/draw, {row['divergences']} divergent, "
                f"R-hat {row['max_rhat']:.3f}; load {row['load']:.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
