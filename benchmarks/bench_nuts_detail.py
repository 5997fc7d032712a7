"""Benchmark 3d in detail: the project's NUTS and NumPyro's, seed by seed, on one model.

Why does one sampler's min bulk ESS per draw differ from the other's (issue 17,
``radon_varying_slope``)? For each seed, both samplers run as benchmark 3d's cells run
them (``bench_nuts.py --vs-numpyro``: the entry's settings capped by ``--max-draws``,
the same initial points, the same ESS function on the same constrained sites), in this
process, untimed, and the script records what the cells do not:

- the min bulk ESS, the element that has it, the ESS of every scalar site and the median
  ESS of every vector site;
- per chain, the step size after warm-up and the adapted inverse metric of every scalar
  site (of its unconstrained coordinate);
- gradients per draw in the sampling phase, per chain in warm-up, mean tree depth
  (NumPyro's: ``log2(steps + 1)``), mean acceptance statistic, divergences.

The project's chains run in lockstep as ``run_nuts``'s default engine runs them
(:func:`diagnostics.nuts.kernel.sample_chains` with the chain seeds of
``run_nuts``): the same draws as the ``default`` cell of the same seed. NumPyro's
warm-up and sampling run as two calls (``MCMC.warmup`` then ``MCMC.run``), which gives
the draws of its cell (one ``MCMC.run``) bit for bit and its warm-up gradients too.
The summary gives each figure's mean over the seeds for both samplers, their ratio
(ours / NumPyro's) with a bootstrap 95 % interval, and the median and range of the
per-seed ratio of the min bulk ESS.

    python benchmarks/bench_nuts_detail.py --model radon_varying_slope --seeds 30 \
        [--seed 0] [--max-draws 200] [--samplers ours numpyro] [--json FILE]
    python benchmarks/bench_nuts_detail.py --summarize FILE [FILE ...]

Needs the ``bench`` extra (NumPyro, JAX) for NumPyro's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_nuts  # noqa: E402  (the benchmark's settings, setup and ESS)

SAMPLERS = ("ours", "numpyro")


def _layout(setup) -> tuple[dict[str, int], dict[str, slice]]:
    """Offsets of the scalar sites and slices of the vector sites in the flat vector."""
    scalars, vectors, off = {}, {}, 0
    for name, size in zip(setup.potential.shapes, setup.potential.sizes):
        if size == 1:
            scalars[name] = off
        else:
            vectors[name] = slice(off, off + size)
        off += size
    return scalars, vectors


def _ess(latent: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Bulk ESS of every element of every site (``(chains, draws, ...)``), bench_nuts's way."""
    from diagnostics import _arviz

    out = {}
    for name, x in latent.items():
        flat = np.asarray(x, dtype=float).reshape(x.shape[0], x.shape[1], -1)
        out[name] = [float(_arviz.ess(flat[:, :, j], "bulk")) for j in range(flat.shape[2])]
    return out


def _run_ours(fn, data, setup, s: dict, seed: int, plates: int | None, metric: str) -> dict:
    import torch

    from diagnostics.nuts import kernel
    from diagnostics.nuts.reference import _chain_seeds

    torch.set_num_threads(1)  # as run_chains_lockstep
    outs = kernel.sample_chains(
        fn,
        data,
        num_warmup=s["num_warmup"],
        num_samples=s["num_samples"],
        seeds=_chain_seeds(seed, s["num_chains"]),
        target_accept_prob=s["target_accept_prob"],
        max_tree_depth=s["max_tree_depth"],
        max_plate_nesting=plates,
        jit=True,
        metric=metric,
    )
    inv_mass = [np.asarray(o["inv_mass"]) for o in outs]
    return {
        "latent": {k: np.stack([o["samples"][k] for o in outs]) for k in outs[0]["samples"]},
        "steps": np.stack([o["stats"]["n_steps"] for o in outs]).astype(float),
        "depth": np.stack([o["stats"]["tree_depth"] for o in outs]).astype(float),
        "diverging": np.stack([o["stats"]["diverging"] for o in outs]),
        "accept": np.stack([o["stats"]["acceptance_rate"] for o in outs]),
        "step_size": [float(o["step_size"]) for o in outs],
        "inv_mass_diag": np.stack([m if m.ndim == 1 else np.diag(m) for m in inv_mass]),
        "warmup_steps": [int(o["warmup_steps"]) for o in outs],
    }


def _run_numpyro(setup, s: dict, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch_to_jax

    potential_fn = torch_to_jax.jax_potential(setup.potential, setup.z0[0])
    mcmc = bench_nuts.numpyro_mcmc(potential_fn, s)
    init = jnp.asarray(np.stack(setup.z0))
    mcmc.warmup(
        jax.random.PRNGKey(seed), init_params=init, extra_fields=("num_steps",), collect_warmup=True
    )
    warm = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["num_steps"], dtype=float)
    mcmc.run(mcmc.post_warmup_state.rng_key, extra_fields=("num_steps", "diverging", "accept_prob"))
    draws = np.asarray(jax.block_until_ready(mcmc.get_samples(group_by_chain=True)), float)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    steps = np.asarray(extra["num_steps"], dtype=float)
    adapt = mcmc.last_state.adapt_state
    return {
        "latent": bench_nuts.constrained_draws(draws, setup),
        "steps": steps,
        "depth": np.log2(steps + 1),
        "diverging": np.asarray(extra["diverging"]),
        "accept": np.asarray(extra["accept_prob"], dtype=float),
        "step_size": [float(x) for x in np.asarray(adapt.step_size).reshape(-1)],
        "inv_mass_diag": np.asarray(adapt.inverse_mass_matrix).reshape(s["num_chains"], -1),
        "warmup_steps": [int(x) for x in warm.sum(axis=1)],
    }


def detail_row(model: str, sampler: str, seed: int, max_draws: int) -> dict:
    """One sampler's run of ``model`` with ``seed``, as benchmark 3d's cell runs it, in detail."""
    s = bench_nuts._vs_settings(model, max_draws)
    fn, data = bench_nuts._vs_model(model)
    if model == "regression":
        plates, metric = None, "diag"
    else:
        from vimodels.catalog.registry import get_model

        entry = get_model(bench_nuts._vs_source(model))
        plates, metric = entry.max_plate_nesting, entry.nuts.metric
    setup = bench_nuts.chain_setup(fn, data, seed, s["num_chains"], jit=sampler == "ours")
    if sampler == "ours":
        run = _run_ours(fn, data, setup, s, seed, plates, metric)
    else:
        run = _run_numpyro(setup, s, seed)
    ess = _ess(run["latent"])
    low = min((v, k, j) for k, vs in ess.items() for j, v in enumerate(vs))
    scalars, vectors = _layout(setup)
    inv = run["inv_mass_diag"]
    return {
        "model": model,
        "sampler": sampler,
        "seed": seed,
        "min_ess": low[0],
        "min_at": f"{low[1]}[{low[2]}]",
        "ess": {k: ess[k][0] for k in scalars},
        "median_ess": {k: float(np.median(ess[k])) for k in vectors},
        "step_size": run["step_size"],
        "inv_mass": {k: [float(x) for x in inv[:, i]] for k, i in scalars.items()},
        "grad_per_draw": float(run["steps"].mean()),
        "grad_per_draw_chain": [float(x) for x in run["steps"].mean(axis=1)],
        "warmup_grad_chain": run["warmup_steps"],
        "tree_depth": float(run["depth"].mean()),
        "accept": [float(x) for x in run["accept"].mean(axis=1)],
        "divergences": int(np.sum(run["diverging"])),
        "load": os.getloadavg()[0],
    }


def _figures(row: dict) -> dict[str, float]:
    out = {
        "min bulk ESS": row["min_ess"],
        "gradients per draw": row["grad_per_draw"],
        "warm-up gradients per chain": float(np.mean(row["warmup_grad_chain"])),
        "step size (mean of chains)": float(np.mean(row["step_size"])),
        "acceptance (mean)": float(np.mean(row["accept"])),
        "divergences": row["divergences"],
    }
    out.update({f"ESS {k}": v for k, v in row["ess"].items()})
    out.update({f"median ESS {k}": v for k, v in row["median_ess"].items()})
    return out


def summary(rows: list[dict], boot: int = 4000) -> str:
    """Mean of each figure over the seeds for both samplers and their ratio, as Markdown."""
    by = {x: [r for r in rows if r["sampler"] == x] for x in SAMPLERS}
    if not all(by.values()):
        return ""
    rng = np.random.default_rng(0)
    lines = [
        "| figure | ours: mean (sd) | NumPyro: mean (sd) | ours / NumPyro [bootstrap 95 %] |",
        "|---|---|---|---|",
    ]
    for name in _figures(by["ours"][0]):
        a = np.array([_figures(r)[name] for r in by["ours"]])
        b = np.array([_figures(r)[name] for r in by["numpyro"]])
        sd_a, sd_b = (x.std(ddof=1) if len(x) > 1 else 0.0 for x in (a, b))
        cell = f"| {name} | {a.mean():.3g} ({sd_a:.2g}) | {b.mean():.3g} ({sd_b:.2g}) |"
        if b.mean() > 0:
            ia = rng.integers(0, len(a), (boot, len(a)))
            ib = rng.integers(0, len(b), (boot, len(b)))
            ratios = a[ia].mean(axis=1) / b[ib].mean(axis=1)
            lo, hi = np.percentile(ratios, [2.5, 97.5])
            cell += f" {a.mean() / b.mean():.2f} [{lo:.2f}-{hi:.2f}] |"
        else:
            cell += " - |"
        lines.append(cell)
    theirs = {r["seed"]: r["min_ess"] for r in by["numpyro"]}
    per_seed = [r["min_ess"] / theirs[r["seed"]] for r in by["ours"] if r["seed"] in theirs]
    if per_seed:
        lines.append(
            f"\nper-seed ratio of the min bulk ESS (same seed): median {np.median(per_seed):.2f}"
            f" [{min(per_seed):.2f}-{max(per_seed):.2f}] over {len(per_seed)} seeds"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="radon_varying_slope")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=6, help="seeds SEED..SEED+N-1")
    parser.add_argument("--max-draws", type=int, default=200)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--summarize", type=Path, nargs="+", help="only the summary of these files")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summary([r for f in args.summarize for r in json.loads(f.read_text())]))
        return
    rows = []
    for sampler in args.samplers:
        for seed in range(args.seed, args.seed + args.seeds):
            row = detail_row(args.model, sampler, seed, args.max_draws)
            rows.append(row)
            ess = " ".join(f"{k} {v:.0f}" for k, v in row["ess"].items())
            print(
                f"{sampler} seed {seed}: min bulk ESS {row['min_ess']:.1f} at {row['min_at']}"
                f" ({ess}); {row['grad_per_draw']:.1f} grad/draw, step"
                f" {' '.join(f'{x:.3f}' for x in row['step_size'])},"
                f" {row['divergences']} divergent; load {row['load']:.2f}",
                flush=True,
            )
            if args.json:  # after every row: a crash keeps the rows done
                _write(args.json, rows)
    print(summary(rows))


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
