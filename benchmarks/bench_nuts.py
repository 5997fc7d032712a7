"""Benchmark 3: the project's NUTS reference against plain Pyro NUTS and NumPyro NUTS.

Eight schools (non-centered), the entry's reference settings for every sampler:
4 chains x (500 warm-up + 500 draws), target acceptance 0.9, tree depth 10,
float32. Each variant runs in a fresh Python process, so that the time of a
call includes everything a first call pays: JIT compilation, worker processes
and their imports. Times (seconds):

- ``import``: importing the library (and the model) in the fresh process;
- ``run``: the sampling call, compile included (the figure compared);
- ``total``: the whole child process, as seen by the parent;
- ``cpu_run`` and ``cpu_total``: CPU seconds (user + system, worker processes
  and threads included) of the call and of the whole child. On a machine
  shared with other jobs, wall times stretch with the load; CPU time much
  less so, and ``cpu_run / cores`` bounds the wall time an idle machine needs.

Variants:

- ``vimodels``: ``diagnostics.nuts.reference.run_nuts`` with its default engine
  (the project's chains in lockstep, one batched gradient per leapfrog step of
  all four) on an empty cache folder (JIT, checks, cache write); then the
  same call again in the same process (``second``: the cache is reused);
- ``vimodels_cached``: a fresh process calling ``run_nuts`` on the warm cache;
- ``pyro``: ``MCMC(NUTS(model, target_accept_prob=0.9), num_chains=4)`` as a
  user writes it (on 2 cores Pyro draws the chains sequentially, without JIT);
- ``pyro_jit``: the same with ``jit_compile=True``;
- ``numpyro_sequential``: NumPyro, ``chain_method="sequential"``;
- ``numpyro_parallel``: NumPyro, ``numpyro.set_host_device_count(4)`` and
  ``chain_method="parallel"`` (one XLA host device per chain).

The NumPyro variants need the ``bench`` extra (``pip install -e .[bench]``);
without it they are skipped with a message. Quality is reported next to time:
divergences, min bulk ESS and max R-hat of ``mu``, ``tau`` and ``theta``.

Usage: python benchmarks/bench_nuts.py [--repeats N] [--quick] [--variants ...]

Battery (``--battery``, benchmark 3b): the project's sampler with the
diagonal, dense and auto metrics on eight schools, the radon entries,
sleepstudy and an ill-conditioned linear regression (:func:`regression_model`,
synthetic, fixed seed): min bulk ESS over the sites of interest per second
of the whole ``run_nuts`` call (tracing included, no cache), mean tree
depth, gradients per draw, divergences, E-BFMI and trust.

    python benchmarks/bench_nuts.py --battery [--models ...] [--metrics ...]

Against NumPyro (``--vs-numpyro``, benchmark 3d): min bulk ESS per second of
NumPyro's NUTS and the project's reference (``default``: ``run_nuts``'s default
engine; ``nutpie_auto``: ``sampler="auto"``; ``diag``, ``dense``, ``low_rank``,
``auto``: the project's sampler with that metric) on the battery of
:data:`VS_MODELS`, each cell a fresh process.

    python benchmarks/bench_nuts.py --vs-numpyro [--models ...] \
        [--samplers numpyro default diag auto] [--max-draws 200] [--seeds 3]

``--seeds N`` runs every cell with the seeds 0..N-1 (from ``--seed``): the
table gives the median ESS/s of each sampler and the median of the per-seed
ratios (each against NumPyro's run with the same seed), with their spread
``[min-max]``; one run per cell cannot tell 0.8x from 1.2x on a noisy model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "eight_schools_noncentered"
SETTINGS = {"num_warmup": 500, "num_samples": 500, "num_chains": 4, "target_accept_prob": 0.9}
QUICK = {"num_warmup": 100, "num_samples": 100, "num_chains": 2, "target_accept_prob": 0.9}
VARIANTS = (
    "vimodels",
    "vimodels_cached",
    "pyro",
    "pyro_jit",
    "numpyro_sequential",
    "numpyro_parallel",
)
SITES = ("mu", "tau", "theta")


def have_numpyro() -> bool:
    """Whether NumPyro and JAX are importable (the ``bench`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("numpyro", "jax"))


# ----------------------------------------------------------------------------- children


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _child_vimodels(s: dict, cache_dir: str) -> dict:
    t0 = time.perf_counter()
    from diagnostics.nuts.reference import run_nuts
    from vimodels.catalog.base import NutsSettings

    t_import = time.perf_counter() - t0
    settings = NutsSettings(**s, max_tree_depth=10, jit_compile=True)
    c0, t0 = _cpu(), time.perf_counter()
    ref = run_nuts(MODEL, settings=settings, cache_dir=cache_dir)
    t_run, cpu_run = time.perf_counter() - t0, _cpu() - c0
    t0 = time.perf_counter()
    ref2 = run_nuts(MODEL, settings=settings, cache_dir=cache_dir)
    t_second = time.perf_counter() - t0
    return {
        "import": t_import,
        "run": t_run,
        "cpu_run": cpu_run,
        "second": t_second,
        "from_cache": [ref.from_cache, ref2.from_cache],
        "workers": ref.settings["num_workers"],
        "chain_method": ref.settings.get("chain_method_used"),
        "chain_wall_time_s": ref.settings["chain_wall_time_s"],
        "divergences": ref.num_divergences,
        "draws": {k: ref.draws[k] for k in SITES},
    }


def _child_pyro(s: dict, jit: bool) -> dict:
    t0 = time.perf_counter()
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import MCMC, NUTS

    from vimodels.catalog.eight_schools import SIGMA, Y

    def model(sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", sigma.shape[-1]):
            theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            pyro.deterministic("theta", mu + tau * theta_tilde)
            pyro.sample("obs", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)

    t_import = time.perf_counter() - t0
    sigma, y = torch.tensor(SIGMA), torch.tensor(Y)
    c0, t0 = _cpu(), time.perf_counter()
    pyro.set_rng_seed(0)
    kernel = NUTS(
        model, target_accept_prob=s["target_accept_prob"], jit_compile=jit, ignore_jit_warnings=jit
    )
    mcmc = MCMC(
        kernel,
        num_samples=s["num_samples"],
        warmup_steps=s["num_warmup"],
        num_chains=s["num_chains"],
        disable_progbar=True,
    )
    mcmc.run(sigma, y)
    t_run, cpu_run = time.perf_counter() - t0, _cpu() - c0
    samples = {k: v.numpy() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    if "theta" not in samples:
        samples["theta"] = (
            samples["mu"][..., None] + samples["tau"][..., None] * samples["theta_tilde"]
        )
    div = mcmc.diagnostics()["divergences"]
    return {
        "import": t_import,
        "run": t_run,
        "cpu_run": cpu_run,
        "divergences": int(sum(len(v) for v in div.values())),
        "draws": {k: samples[k] for k in SITES},
    }


def _child_numpyro(s: dict, method: str) -> dict:
    t0 = time.perf_counter()
    import numpyro

    if method == "parallel":
        numpyro.set_host_device_count(s["num_chains"])
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    from vimodels.catalog.eight_schools import SIGMA, Y

    def model(sigma, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("schools", sigma.shape[-1]):
            theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
            numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    t_import = time.perf_counter() - t0
    sigma, y = jnp.asarray(SIGMA), jnp.asarray(Y)
    c0, t0 = _cpu(), time.perf_counter()
    mcmc = MCMC(
        NUTS(model, target_accept_prob=s["target_accept_prob"]),
        num_warmup=s["num_warmup"],
        num_samples=s["num_samples"],
        num_chains=s["num_chains"],
        chain_method=method,
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(0), sigma, y, extra_fields=("diverging",))
    samples = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(samples)
    t_run, cpu_run = time.perf_counter() - t0, _cpu() - c0
    return {
        "import": t_import,
        "run": t_run,
        "cpu_run": cpu_run,
        "devices": len(jax.devices()),
        "divergences": int(np.sum(mcmc.get_extra_fields()["diverging"])),
        "draws": {k: np.asarray(samples[k]) for k in SITES},
    }


def child(variant: str, s: dict, cache_dir: str, out: str) -> None:
    """Run one variant in this (fresh) process; write timings and draws to ``out``."""
    import numpy as np

    if variant in ("vimodels", "vimodels_cached"):
        res = _child_vimodels(s, cache_dir)
    elif variant.startswith("pyro"):
        res = _child_pyro(s, jit=variant == "pyro_jit")
    else:
        res = _child_numpyro(s, variant.split("_", 1)[1])
    draws = res.pop("draws")
    np.savez(out + ".npz", **{k: np.asarray(v, dtype=float) for k, v in draws.items()})
    Path(out + ".json").write_text(json.dumps(res))


# ----------------------------------------------------------------------------- parent


def _quality(npz: Path) -> dict:
    import numpy as np

    from diagnostics import _arviz

    with np.load(npz) as f:
        draws = {k: f[k] for k in f.files}
    ess, rhat = [], []
    for x in draws.values():
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        for j in range(flat.shape[2]):
            ess.append(_arviz.ess(flat[:, :, j], "bulk"))
            rhat.append(_arviz.rhat(flat[:, :, j]))
    means = {k: np.round(v.mean(axis=(0, 1)), 2).tolist() for k, v in draws.items()}
    return {"min_ess_bulk": min(ess), "max_rhat": max(rhat), "means": means}


def _run_child(variant: str, s: dict, cache_dir: str, work: Path, tag: str) -> dict:
    out = str(work / f"{variant}-{tag}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant]
    cmd += ["--settings", json.dumps(s), "--cache-dir", cache_dir, "--out", out]
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    total, cpu_total = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(Path(out + ".json").read_text())
    res.update(_quality(Path(out + ".npz")), total=total, cpu_total=cpu_total, variant=variant)
    return res


def nuts_benchmark(
    repeats: int = 3, quick: bool = False, variants: tuple[str, ...] | None = None
) -> dict:
    """Run the variants interleaved ``repeats`` times, each in a fresh process.

    Returns
    -------
    dict
        ``rows`` (median times and the last repeat's quality per variant), the
        ratio of ``vimodels`` to the faster NumPyro variant, and the settings.
    """
    s = QUICK if quick else SETTINGS
    variants = tuple(variants or VARIANTS)
    skipped = []
    if not have_numpyro():
        skipped = [v for v in variants if v.startswith("numpyro")]
        variants = tuple(v for v in variants if v not in skipped)
        print(
            "benchmark 3: NumPyro/JAX not installed; skipping the NumPyro variants "
            "(install the 'bench' extra: pip install -e .[bench])",
            flush=True,
        )
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-nuts-") as tmp:
        work = Path(tmp)
        for r in range(repeats):
            cache_dir = str(work / f"cache-{r}")  # empty at each repeat's first call
            for v in variants:
                res = _run_child(v, s, cache_dir, work, str(r))
                runs[v].append(res)
                print(
                    f"  [{r}] {v}: run {res['run']:.2f} s (import {res['import']:.2f} s,"
                    f" total {res['total']:.2f} s; CPU run {res['cpu_run']:.1f} s,"
                    f" total {res['cpu_total']:.1f} s)"
                    + (f", second call {res['second']:.3f} s" if "second" in res else "")
                    + f"; divergences {res['divergences']}, min ESS {res['min_ess_bulk']:.0f},"
                    f" max R-hat {res['max_rhat']:.3f}; load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    rows = {}
    for v, rs in runs.items():
        row = {
            k: statistics.median(x[k] for x in rs)
            for k in ("run", "import", "total", "second", "cpu_run", "cpu_total")
            if k in rs[0]
        }
        row.update({k: rs[-1][k] for k in ("divergences", "min_ess_bulk", "max_rhat", "means")})
        row["runs"] = [x["run"] for x in rs]
        for k in ("workers", "chain_method", "chain_wall_time_s", "from_cache", "devices"):
            if k in rs[-1]:
                row[k] = rs[-1][k]
        rows[v] = row
    out = {"name": "ground truth: NUTS wall time incl. compile", "settings": s, "rows": rows}
    out["skipped"] = skipped
    numpyro = [v for v in rows if v.startswith("numpyro")]
    if "vimodels" in rows and numpyro:
        best = min(numpyro, key=lambda v: rows[v]["run"])
        out.update(
            baseline=best,
            baseline_s=rows[best]["run"],
            ours_s=rows["vimodels"]["run"],
            ratio=rows["vimodels"]["run"] / rows[best]["run"],
            cpu_ratio=rows["vimodels"]["cpu_run"] / rows[best]["cpu_run"],
            target=1.0,
        )
    return out


# ----------------------------------------------------------------------------- battery

BATTERY_MODELS = (
    "eight_schools_noncentered",
    "radon_varying_intercept_centered",
    "radon_varying_intercept_noncentered",
    "radon_varying_slope",
    "radon_contextual",
    "sleepstudy_random_slopes",
    "regression",
)
METRICS = ("diag", "dense", "auto")
REGRESSION_SETTINGS = {"num_warmup": 500, "num_samples": 500, "num_chains": 4}


def regression_data(seed: int = 0, n: int = 5000, k: int = 24) -> dict:
    """An ill-conditioned regression: ``y = alpha + sum_j beta_j x^j + noise`` (fixed seed).

    ``x ~ U(0, 1)``, features ``x, x^2, ..., x^24`` (nearly collinear),
    ``beta_j = 0.3 * (-1)^j / j``, ``alpha = 0.5``, noise sd 0.1, float64.
    With the priors of :func:`regression_model` the posterior (26 parameters)
    has sds from about 0.001 (``sigma``) and 0.006 to 0.29, correlations
    up to 0.87 in absolute value and a covariance condition number of about
    1e5 (computed at the true ``sigma``).
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, n)
    features = np.stack([x**j for j in range(1, k + 1)], axis=1)
    beta = 0.3 * (-1.0) ** np.arange(1, k + 1) / np.arange(1, k + 1)
    y = 0.5 + features @ beta + 0.1 * rng.normal(size=n)
    return {
        "features": torch.as_tensor(features, dtype=torch.float64),
        "y": torch.as_tensor(y, dtype=torch.float64),
    }


def regression_model(features, y=None):
    """Linear regression on :func:`regression_data`'s features.

    Priors: ``alpha ~ N(0, 1)``, ``beta_j ~ N(0, 0.3)``, ``sigma ~ HalfNormal(1)``.
    """
    import pyro
    import pyro.distributions as dist
    import torch

    one = torch.ones((), dtype=features.dtype)
    alpha = pyro.sample("alpha", dist.Normal(0.0 * one, one))
    beta = pyro.sample(
        "beta", dist.Normal(torch.zeros(features.shape[1], dtype=features.dtype), 0.3).to_event(1)
    )
    sigma = pyro.sample("sigma", dist.HalfNormal(one))
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Normal(alpha + features @ beta, sigma), obs=y)


def battery_row(model: str, metric: str, seed: int = 0, settings: dict | None = None) -> dict:
    """One ``run_nuts`` call (no cache) of ``model`` with ``metric``; its ESS per second."""
    import numpy as np

    from diagnostics.nuts.reference import ebfmi, run_nuts

    overrides = dict(settings or {}, metric=metric, sampler="vimodels")  # the project's metrics
    if model == "regression":
        args: tuple = (regression_model, regression_data())
        overrides = {**REGRESSION_SETTINGS, **overrides}
    else:
        args = (model,)
    t0 = time.perf_counter()
    ref = run_nuts(*args, settings=overrides, seed=seed, cache=False, num_workers=1)
    wall = time.perf_counter() - t0
    table = ref.site_table()
    min_ess = float(table["ess_bulk"].min())
    dim = sum(int(np.prod(ref.draws[k].shape[2:])) for k in ref.latent_sites if k in ref.draws)
    st = ref.sample_stats
    return {
        "model": model,
        "metric": metric,
        "metric_used": ref.settings.get("metric_used"),
        "dim": dim,
        "num_warmup": int(ref.settings["num_warmup"]),
        "wall_s": wall,
        "min_ess_bulk": min_ess,
        "ess_per_s": min_ess / wall,
        "max_rhat": float(table["rhat"].max()),
        "tree_depth": float(np.mean(st["tree_depth"])),
        "grad_per_draw": float(np.mean(st["n_steps"])),
        "step_size": float(np.mean(st["step_size"][:, -1])),
        "divergences": ref.num_divergences,
        "min_ebfmi": float(ebfmi(st["energy"]).min()),
        "trusted": ref.trusted,
        "load": os.getloadavg()[0],
    }


def battery(
    models: tuple[str, ...] = BATTERY_MODELS,
    metrics: tuple[str, ...] = METRICS,
    settings: dict | None = None,
) -> list[dict]:
    """Run :func:`battery_row` for every model and metric, printing each row."""
    from diagnostics.nuts.kernel import resolve_metric

    rows = []
    for model in models:
        done: dict[str, dict] = {}
        for metric in sorted(metrics, key=lambda m: m == "auto"):  # auto last
            if metric == "auto" and done:
                # the same seeds and settings: auto's run is the run of the metric it picks
                first = next(iter(done.values()))
                warmup = first["num_warmup"]
                picked = resolve_metric("auto", first["dim"], warmup)
                if picked in done:
                    row = dict(done[picked], metric="auto", note=f"the {picked} run")
                    rows.append(row)
                    print(f"  {model} auto: {picked} ({first['dim']} dimensions)", flush=True)
                    continue
            row = battery_row(model, metric, settings=settings)
            done[metric] = row
            rows.append(row)
            print(
                f"  {model} {metric} ({','.join(row['metric_used'])}): "
                f"{row['ess_per_s']:.1f} ESS/s (min bulk ESS {row['min_ess_bulk']:.0f} in "
                f"{row['wall_s']:.1f} s), depth {row['tree_depth']:.2f}, "
                f"{row['grad_per_draw']:.1f} grad/draw, step {row['step_size']:.3g}, "
                f"{row['divergences']} divergent, E-BFMI {row['min_ebfmi']:.2f}, "
                f"R-hat {row['max_rhat']:.3f}, {'trusted' if row['trusted'] else 'UNTRUSTED'}; "
                f"load {row['load']:.2f}",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- battery vs NumPyro

VS_MODELS = (
    "eight_schools_noncentered",
    "radon_varying_intercept_centered",
    "radon_varying_intercept_noncentered",
    "radon_varying_slope",
    "radon_contextual",
    "sleepstudy_random_slopes",
    "pdb_kidiq_interaction",
    "pdb_mesquite_logvolume",
    "pdb_earnings_logearn_interaction",
    "pdb_nes1972",
    "pdb_ark",
    "pdb_garch11",
    "pdb_gp_pois_regr",
    "pdb_hmm_example",
    "pdb_arma11",
    "regression",
)
# "default": run_nuts with the entry's settings as they are (NutsSettings' default sampler);
# "nutpie_auto": sampler="auto" (nutpie up to 64 dimensions, else the project's sampler); the
# metric names: the project's sampler (sampler="vimodels") with that metric
VS_SAMPLERS = ("numpyro", "default", "nutpie_auto", "diag", "dense", "low_rank", "auto")
VS_MAX_DRAWS = 500  # warm-up and draws capped at this (the battery's cost)
VS_REGRESSION = {"num_warmup": 300, "num_samples": 300, "num_chains": 4}


def _vs_source(model: str) -> str:
    """The entry whose draws a user's reference of ``model`` is made from.

    An entry with ``reference_from`` (``pdb_gp_pois_regr``: its partially
    centered twin) gets its reference by sampling that entry
    (``diagnostics.references``): what a user waits for, so both samplers
    sample it.
    """
    if model == "regression":
        return model
    from vimodels.catalog.registry import get_model

    return get_model(model).reference_from or model


def _vs_settings(model: str, max_draws: int = VS_MAX_DRAWS) -> dict:
    """The NUTS settings of the entry sampled (:func:`_vs_source`), capped at ``max_draws``."""
    if model == "regression":
        s = dict(VS_REGRESSION, target_accept_prob=0.8, max_tree_depth=10)
    else:
        from vimodels.catalog.registry import get_model

        n = get_model(_vs_source(model)).nuts
        s = {
            "num_warmup": n.num_warmup,
            "num_samples": n.num_samples,
            "num_chains": n.num_chains,
            "target_accept_prob": n.target_accept_prob,
            "max_tree_depth": n.max_tree_depth,
        }
    s["num_warmup"] = min(s["num_warmup"], max_draws)
    s["num_samples"] = min(s["num_samples"], max_draws)
    return s


def _vs_model(model: str) -> tuple:
    """``(model, data)`` of a catalog entry or of the synthetic regression."""
    if model == "regression":
        return regression_model, regression_data()
    from vimodels.catalog.registry import get_model

    entry = get_model(_vs_source(model))
    return entry.model, entry.data()


def _min_ess(samples: dict) -> tuple[float, float]:
    """Min bulk ESS and max R-hat over every element of ``samples`` (site -> (C, S, ...))."""
    import numpy as np

    from diagnostics import _arviz

    ess, rhat = [], []
    for x in samples.values():
        flat = np.asarray(x, dtype=float).reshape(x.shape[0], x.shape[1], -1)
        for j in range(flat.shape[2]):
            ess.append(_arviz.ess(flat[:, :, j], "bulk"))
            rhat.append(_arviz.rhat(flat[:, :, j]))
    return float(min(ess)), float(max(rhat))


def chain_setup(fn, data: dict, seed: int, num_chains: int, jit: bool):
    """``kernel._setup`` at run_nuts's initial points (Pyro's init_to_uniform of its chain seeds).

    Every other sampler of the battery starts here, so that all start where the
    project's chains start.
    """
    from diagnostics.nuts import kernel
    from diagnostics.nuts.reference import _chain_seeds

    return kernel._setup(fn, data, _chain_seeds(seed, num_chains), None, jit)


def constrained_draws(draws, setup) -> dict:
    """Site -> constrained draws ``(chains, draws, ...)`` from flat unconstrained ``(C, S, D)``."""
    import numpy as np

    from diagnostics.nuts import kernel

    per_chain = [
        kernel._constrain(d, setup.potential, setup.transforms, setup.dtype) for d in draws
    ]
    return {k: np.stack([c[k] for c in per_chain]) for k in per_chain[0]}


def cell_record(res: dict, model: str, sampler: str, s: dict, process_s: float) -> dict:
    """A child's result with the whole-call time (imports + run) and ESS per second added."""
    timed = res["import"] + res["run"]
    res.update(
        model=model,
        sampler=sampler,
        settings=s,
        timed_s=timed,
        process_s=process_s,
        ess_per_s=res["min_ess_bulk"] / timed,
        load=os.getloadavg()[0],
    )
    return res


def _vs_child_vimodels(model: str, metric: str, s: dict, seed: int) -> dict:
    """A project cell: ``metric="default"`` is run_nuts's default engine, ``"nutpie_auto"``
    its ``sampler="auto"``, else the project's sampler with that metric."""
    import numpy as np

    t0 = time.perf_counter()
    from diagnostics.nuts.reference import run_nuts

    t_import = time.perf_counter() - t0
    args = (regression_model, regression_data()) if model == "regression" else (_vs_source(model),)
    t0 = time.perf_counter()
    if metric == "default":
        settings = s
    elif metric == "nutpie_auto":
        settings = dict(s, sampler="auto")
    else:
        settings = dict(s, metric=metric, sampler="vimodels")
    ref = run_nuts(*args, settings=settings, seed=seed, cache=False, num_workers=1)
    t_run = time.perf_counter() - t0
    latent = {k: ref.draws[k] for k in ref.latent_sites if k in ref.draws}
    ess, rhat = _min_ess(latent)
    st = ref.sample_stats
    return {
        "import": t_import,
        "run": t_run,
        "min_ess_bulk": ess,
        "max_rhat": rhat,
        "grad_per_draw": float(np.mean(st["n_steps"])),
        "tree_depth": float(np.mean(st["tree_depth"])),
        "divergences": int(ref.num_divergences),
        "metric_used": ",".join(ref.settings.get("metric_used", [])),
        "sampler_used": ref.settings.get("sampler_used", "vimodels"),
        "dim": int(sum(np.prod(v.shape[2:], dtype=int) for v in latent.values())),
    }


def numpyro_mcmc(potential_fn: Any, s: dict) -> Any:
    """NumPyro's default NUTS on ``potential_fn`` with the cell's settings, chains in sequence."""
    from numpyro.infer import MCMC, NUTS

    return MCMC(
        NUTS(
            potential_fn=potential_fn,
            target_accept_prob=s["target_accept_prob"],
            max_tree_depth=s["max_tree_depth"],
        ),
        num_warmup=s["num_warmup"],
        num_samples=s["num_samples"],
        num_chains=s["num_chains"],
        chain_method="sequential",
        progress_bar=False,
    )


def _vs_child_numpyro(model: str, s: dict, seed: int) -> dict:
    """NumPyro's default NUTS on the project's potential (benchmarks/torch_to_jax.py).

    Timed: importing JAX and NumPyro, and ``MCMC.run`` (JIT compilation
    included, results blocked on). Not timed: recording the model's torch
    potential and replaying it in JAX (a stand-in for the user's NumPyro
    model, which NumPyro would trace itself inside ``run``).
    """
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpyro

    t_import = time.perf_counter() - t0
    import numpy as np
    import torch
    import torch_to_jax

    fn, data = _vs_model(model)
    setup = chain_setup(fn, data, seed, s["num_chains"], jit=False)
    potential_fn = torch_to_jax.jax_potential(setup.potential, setup.z0[0])
    numpyro.set_platform("cpu")
    t0 = time.perf_counter()
    mcmc = numpyro_mcmc(potential_fn, s)
    init = jnp.asarray(np.stack(setup.z0)) if s["num_chains"] > 1 else jnp.asarray(setup.z0[0])
    mcmc.run(jax.random.PRNGKey(seed), init_params=init, extra_fields=("num_steps", "diverging"))
    draws = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    t_run = time.perf_counter() - t0
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 2:
        draws = draws[None]
    latent = constrained_draws(draws, setup)
    ess, rhat = _min_ess(latent)
    extra = mcmc.get_extra_fields()
    steps = np.asarray(extra["num_steps"], dtype=float)
    return {
        "import": t_import,
        "run": t_run,
        "min_ess_bulk": ess,
        "max_rhat": rhat,
        "grad_per_draw": float(steps.mean()),
        "tree_depth": float(np.log2(steps + 1).mean()),
        "divergences": int(np.sum(extra["diverging"])),
        "metric_used": "diag",
        "dim": setup.potential.dim,
        "torch_threads": torch.get_num_threads(),
    }


def vs_child(sampler: str, model: str, s: dict, seed: int, out: str) -> None:
    """One battery cell in this (fresh) process; writes its JSON to ``out``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sampler == "numpyro":
        res = _vs_child_numpyro(model, s, seed)
    else:
        res = _vs_child_vimodels(model, sampler, s, seed)
    Path(out).write_text(json.dumps(res))


def vs_battery(
    models: tuple[str, ...] = VS_MODELS,
    samplers: tuple[str, ...] = ("numpyro", "diag", "auto"),
    max_draws: int = VS_MAX_DRAWS,
    seed: int = 0,
    seeds: int = 1,
) -> list[dict]:
    """Benchmark 3: min bulk ESS per second against NumPyro, every model, interleaved.

    Each cell (model, seed, sampler) runs in a fresh Python process; its time
    is the imports plus the sampling call (compilation included). The
    samplers of one model and seed run one after the other, so that they
    meet the same load. ``seeds`` runs every cell with the seeds ``seed`` to
    ``seed + seeds - 1``; each row carries its ``seed``.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-nuts-vs-") as tmp:
        for model, sd, sampler in (
            (m, sd, x) for m in models for sd in range(seed, seed + seeds) for x in samplers
        ):
            s = _vs_settings(model, max_draws)
            if sampler == "numpyro" and not have_numpyro():
                print("  NumPyro/JAX not installed: skipped (the 'bench' extra)", flush=True)
                continue
            out = str(Path(tmp) / f"{model}-{sampler}-{sd}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--vs-child", sampler]
            cmd += ["--vs-model", model, "--settings", json.dumps(s), "--out", out]
            cmd += ["--seed", str(sd)]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            total = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"  {model} {sampler}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = cell_record(json.loads(Path(out).read_text()), model, sampler, s, total)
            res["seed"] = sd
            timed = res["timed_s"]
            rows.append(res)
            print(
                f"  {model} seed {sd} {sampler} ({res['metric_used']}): "
                f"{res['ess_per_s']:.1f} ESS/s "
                f"(min bulk ESS {res['min_ess_bulk']:.0f} in {timed:.1f} s = import "
                f"{res['import']:.1f} + run {res['run']:.1f}; process {total:.1f} s), "
                f"{res['grad_per_draw']:.1f} grad/draw, {res['divergences']} divergent, "
                f"R-hat {res['max_rhat']:.3f}; load {res['load']:.2f}",
                flush=True,
            )
    return rows


def vs_table(rows: list[dict]) -> str:
    """The battery as a Markdown table: ESS/s of each sampler and its ratio to NumPyro's.

    Each cell: ESS/s (gradients per draw; for the project's sampler, the
    metric it adapted); the last column: the 1-minute load average over the
    model's cells. With several seeds (rows carrying ``seed``), a cell is
    the median over the seeds with the spread ``[min-max]``, and a ratio is
    the median (and spread) of the per-seed ratios, each against NumPyro's
    run with the same seed.
    """
    import statistics as st

    def spread(v: list[float], fmt: str) -> str:
        mid = fmt.format(st.median(v))
        return mid if len(v) == 1 else f"{mid} [{fmt.format(min(v))}-{fmt.format(max(v))}]"

    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    ours = [x for x in samplers if x != "numpyro"]
    head = ["model", "D", "NumPyro ESS/s (grad/draw)"]
    head += [f"`{x}` ESS/s (grad/draw, metric)" for x in ours]
    head += [f"`{x}` / NumPyro" for x in ours] + ["load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[str, list[float]] = {x: [] for x in ours}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cells = {x: [r for r in mine if r["sampler"] == x] for x in samplers}
        base = {r.get("seed", 0): r for r in cells.get("numpyro", [])}
        dim = next((c["dim"] for c in mine if "dim" in c), "")
        line = [model, str(dim)]
        for x in ["numpyro"] + ours:
            c = cells.get(x)
            if not c:
                line.append("-")
                continue
            cell = spread([r["ess_per_s"] for r in c], "{:.1f}")
            grad = f"{st.median(r['grad_per_draw'] for r in c):.0f}"
            if x != "numpyro":
                grad += ", " + ",".join(dict.fromkeys(r["metric_used"] for r in c))
            line.append(f"{cell} ({grad})")
        for x in ours:
            per_seed = [
                r["ess_per_s"] / base[r.get("seed", 0)]["ess_per_s"]
                for r in cells.get(x, [])
                if r.get("seed", 0) in base
            ]
            if per_seed:
                ratio = st.median(per_seed)
                ratios[x].append(ratio)
                text = spread(per_seed, "{:.2f}x")
                line.append(f"**{text}**" if ratio < 1.0 else text)
            else:
                line.append("-")
        loads = [c["load"] for c in mine]
        line.append(f"{min(loads):.1f}-{max(loads):.1f}")
        lines.append("| " + " | ".join(line) + " |")
    summary = ["**median**", "", ""] + [""] * len(ours)
    summary += [f"{st.median(v):.2f}x" if v else "-" for v in ratios.values()] + [""]
    lines.append("| " + " | ".join(summary) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 chains x (100 + 100), 1 repeat")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--battery", action="store_true", help="ESS/s of the diag, dense and auto metrics"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(set(BATTERY_MODELS + VS_MODELS)))
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=METRICS)
    parser.add_argument(
        "--vs-numpyro",
        action="store_true",
        help="benchmark 3: min bulk ESS/s against NumPyro on every model, as a table",
    )
    parser.add_argument("--samplers", nargs="+", choices=VS_SAMPLERS)
    parser.add_argument("--max-draws", type=int, default=VS_MAX_DRAWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="--vs-numpyro: run each cell with the seeds SEED..SEED+N-1; report medians and spread",
    )
    parser.add_argument("--vs-child", choices=VS_SAMPLERS, help=argparse.SUPPRESS)
    parser.add_argument("--vs-model", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.settings), args.cache_dir, args.out)
        return
    if args.vs_child:
        vs_child(args.vs_child, args.vs_model, json.loads(args.settings), args.seed, args.out)
        return
    if args.vs_numpyro:
        models = tuple(args.models or VS_MODELS)
        samplers = tuple(args.samplers or ("numpyro", "diag", "auto"))
        rows = vs_battery(models, samplers, args.max_draws, args.seed, args.seeds)
        print(vs_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str))
        return
    if args.battery:
        quick = {"num_chains": 2, "num_warmup": 150, "num_samples": 150} if args.quick else None
        models = tuple(args.models or BATTERY_MODELS)
        res = {"name": "NUTS metrics: ESS/s", "rows": battery(models, args.metrics, quick)}
        print(json.dumps(res, indent=1, default=str))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=str))
        return
    res = nuts_benchmark(1 if args.quick else args.repeats, args.quick, args.variants)
    print(json.dumps(res, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
