"""Benchmark 3c: nutpie on the project's potential, against the project's NUTS.

nutpie (a Rust NUTS with its own mass-matrix adaptation: a diagonal from the
draws' and gradients' variances, optionally a low-rank modification for
correlations) samples the same flat unconstrained potential the project's
sampler does (:class:`diagnostics.nuts.kernel.FlatPotential`, Pyro's
potential traced into one graph), through
``nutpie.compiled_pyfunc.from_pyfunc``, one chain at a time on one core
(``cores=1``, one torch thread), from the project's initial points
(``init_to_uniform`` of the seeds ``seed + chain``).

The battery is benchmark 3d's (``bench_nuts.py --vs-numpyro``: its model
list, settings capped at ``--max-draws``, ESS function and table layout are
imported from there): eight schools, every radon entry, sleepstudy, the nine
posteriordb posteriors and the ill-conditioned regression. Each cell (model,
sampler) is a fresh Python process timed as imports plus the sampling call
(tracing included, no cache); the samplers of one model run back to back so
that they meet the same load:

- ``diag`` / ``auto``: the project's ``run_nuts`` with that metric, exactly
  as ``bench_nuts.py --vs-child`` runs it (where ``auto`` resolves to the
  diagonal metric, its cell *is* the ``diag`` cell: same seeds, same draws);
- ``nutpie_diag`` / ``nutpie_low_rank``: ``nutpie.sample`` with the entry's
  target acceptance and tree depth, ``low_rank_modified_mass_matrix`` off/on.

Reported per cell: min bulk ESS over every element of the latent sites
(constrained) per second, gradients per draw, divergences, max R-hat; and a
check of the draws: the largest ``|mean - reference| / MCSE`` over the
elements (MCSEs of both combined), against posteriordb's reference draws
for the ``pdb_*`` entries and against the project's ``diag`` cell of the
same run for the others (``ok`` when at most 5).

nutpie is a dependency of the project since it became the reference's engine
up to 64 dimensions (:mod:`diagnostics.nuts.nutpie_engine`; this script
drives it directly, to compare its diagonal and low-rank metrics):

    PYTHONPATH=. python benchmarks/bench_nutpie.py [--models ...] \
        [--samplers diag auto nutpie_diag nutpie_low_rank] [--max-draws 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_nuts  # noqa: E402  (the battery's models, settings and ESS function)

SAMPLERS = ("diag", "auto", "nutpie_diag", "nutpie_low_rank")
NUTPIE = ("nutpie_diag", "nutpie_low_rank")
CHECK_Z = 5.0  # |mean - reference| within this many (combined) MCSEs


# ----------------------------------------------------------------------------- children


def _save_draws(out: str, latent: dict) -> None:
    import numpy as np

    np.savez(out + ".npz", **{k: np.asarray(v, dtype=float) for k, v in latent.items()})


def child_project(model: str, metric: str, s: dict, seed: int, out: str) -> dict:
    """The project's cell, run by ``bench_nuts._vs_child_vimodels``; its latent draws kept."""
    t0 = time.perf_counter()
    import diagnostics.nuts.reference as reference

    t_import = time.perf_counter() - t0
    run_nuts, captured = reference.run_nuts, []

    def keep(*args, **kwargs):
        ref = run_nuts(*args, **kwargs)
        captured.append(ref)
        return ref

    reference.run_nuts = keep  # bench_nuts imports it from the module at call time
    res = bench_nuts._vs_child_vimodels(model, metric, s, seed)
    res["import"] += t_import
    ref = captured[0]
    _save_draws(out, {k: ref.draws[k] for k in ref.latent_sites if k in ref.draws})
    return res


def child_nutpie(model: str, low_rank: bool, s: dict, seed: int, out: str) -> dict:
    """nutpie on the project's traced potential, one core; ESS of the constrained draws."""
    t0 = time.perf_counter()
    import numpy as np
    import nutpie
    import torch
    from nutpie.compiled_pyfunc import from_pyfunc

    from diagnostics.nuts import kernel

    t_import = time.perf_counter() - t0
    fn, data = bench_nuts._vs_model(bench_nuts._vs_source(model))  # what run_nuts samples
    chains = s["num_chains"]
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # one core, as the project's chains and NumPyro's
    setup = bench_nuts.chain_setup(fn, data, seed, chains, jit=True)  # run_nuts's points
    potential = setup.potential
    dim = potential.dim
    frozen = potential.mode == "fx"

    local = threading.local()

    def make_logp_fn():
        def logp(x, **unused):
            if not getattr(local, "one_thread", False):
                # nutpie calls this from its own sampler thread, and OpenMP's thread count
                # is per thread: without this, torch runs each small op on every core
                # (22 ms against 0.9 ms a gradient on radon, 89 dimensions, under load)
                torch.set_num_threads(1)
                local.one_thread = True
            with kernel._inference(frozen):
                u, g = potential(np.asarray(x, dtype=np.float64))
            if not np.isfinite(u):
                return -np.inf, np.zeros(dim)
            return -u, -g

        return logp

    def make_expand_fn(seed1, seed2, chain):
        def expand(x, **unused):
            return {"z": np.array(x, dtype=np.float64)}

        return expand

    starts = list(setup.z0)  # the project's initial points, one per chain, in order

    def make_initial_point_fn(rng_seed):
        if starts:
            return np.asarray(starts.pop(0), dtype=np.float64)
        return np.random.default_rng(rng_seed).uniform(-2.0, 2.0, dim)  # a retry

    compiled = from_pyfunc(
        dim,
        make_logp_fn,
        make_expand_fn,
        [np.dtype("float64")],  # dtype instances, not np.float64
        [(dim,)],
        ["z"],
        make_initial_point_fn=make_initial_point_fn,
    )
    trace = nutpie.sample(
        compiled,
        draws=s["num_samples"],
        tune=s["num_warmup"],
        chains=chains,
        cores=1,
        seed=seed,
        progress_bar=False,
        low_rank_modified_mass_matrix=low_rank,
        target_accept=s["target_accept_prob"],
        maxdepth=s["max_tree_depth"],
    )
    z = np.asarray(trace.posterior["z"].values, dtype=np.float64)  # (chains, draws, D)
    latent = bench_nuts.constrained_draws(z, setup)
    t_run = time.perf_counter() - t0
    ess, rhat = bench_nuts._min_ess(latent)
    st = trace.sample_stats
    steps = np.asarray(st["n_steps"].values, dtype=float)
    _save_draws(out, latent)
    return {
        "import": t_import,
        "run": t_run,
        "min_ess_bulk": ess,
        "max_rhat": rhat,
        "grad_per_draw": float(steps.mean()),
        "tree_depth": float(np.asarray(st["depth"].values, dtype=float).mean()),
        "divergences": int(np.sum(st["diverging"].values)),
        "metric_used": "nutpie low-rank" if low_rank else "nutpie diag",
        "dim": dim,
        "torch_threads": torch.get_num_threads(),
    }


def child(sampler: str, model: str, s: dict, seed: int, out: str) -> None:
    """One cell in this (fresh) process; writes ``out.json`` and the draws to ``out.npz``."""
    if sampler in NUTPIE:
        res = child_nutpie(model, sampler == "nutpie_low_rank", s, seed, out)
    else:
        res = child_project(model, sampler, s, seed, out)
    Path(out + ".json").write_text(json.dumps(res))


# ----------------------------------------------------------------------------- checks


def _mean_mcse(draws: dict) -> dict:
    """``{(site, index): (mean, mcse of the mean)}`` of draws ``{site: (C, S, *shape)}``."""
    from vimodels.arviz_import import import_arviz

    az = import_arviz()
    import numpy as np

    out = {}
    for site, x in draws.items():
        x = np.asarray(x, dtype=float)
        for idx in np.ndindex(*x.shape[2:]):
            y = x[(slice(None), slice(None)) + idx]
            out[(site, idx)] = (float(y.mean()), float(az.mcse(y, method="mean")))
    return out


def _reference_stats(model: str, project_npz: Path | None) -> tuple[str, dict] | None:
    """The means and MCSEs a cell's draws are checked against, and where they come from."""
    import numpy as np

    if model.startswith("pdb_"):
        from vimodels.validation import reference_draws

        return "posteriordb", _mean_mcse(reference_draws(model))
    if project_npz is None or not project_npz.exists():
        return None
    with np.load(project_npz) as f:
        return "project diag", _mean_mcse({k: f[k] for k in f.files})


def check(npz: Path, ref: tuple[str, dict] | None) -> dict:
    """Largest ``|mean - reference| / sqrt(mcse^2 + mcse_ref^2)`` over the shared elements."""
    import numpy as np

    if ref is None:
        return {"check_against": "-", "max_z": math.nan, "checked": 0, "check_ok": None}
    source, stats = ref
    with np.load(npz) as f:
        mine = _mean_mcse({k: f[k] for k in f.files})
    zs = []
    for key, (m, e) in mine.items():
        if key in stats and math.isfinite(stats[key][0]):
            mr, er = stats[key]
            zs.append(abs(m - mr) / max(math.hypot(e, er), 1e-300))
    if not zs:
        return {"check_against": source, "max_z": math.nan, "checked": 0, "check_ok": None}
    z = max(zs)
    return {
        "check_against": source,
        "max_z": z,
        "checked": len(zs),
        "over_5": sum(v > CHECK_Z for v in zs),
        "check_ok": bool(z <= CHECK_Z),
    }


# ----------------------------------------------------------------------------- parent


def _run_cell(sampler, model, s, seed, work: Path, timeout: float) -> dict | None:
    out = str(work / f"{model}-{sampler}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", sampler]
    cmd += ["--model", model, "--settings", json.dumps(s), "--seed", str(seed), "--out", out]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        print(f"  {model} {sampler}: not done in {timeout:.0f} s", flush=True)
        return {"model": model, "sampler": sampler, "timeout_s": timeout, "load": _load()}
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"  {model} {sampler}: FAILED\n{proc.stderr[-2000:]}", flush=True)
        return None
    res = bench_nuts.cell_record(
        json.loads(Path(out + ".json").read_text()), model, sampler, s, total
    )
    res["npz"] = out + ".npz"
    return res


def _load() -> float:
    return os.getloadavg()[0]


def battery(
    models: tuple[str, ...] = bench_nuts.VS_MODELS,
    samplers: tuple[str, ...] = SAMPLERS,
    max_draws: int = bench_nuts.VS_MAX_DRAWS,
    seed: int = 0,
    timeout: float = 900.0,
    json_path: Path | None = None,
) -> list[dict]:
    """Every (model, sampler) cell in a fresh process, the samplers of a model back to back.

    The rows so far are written to ``json_path`` after each model.
    """
    from diagnostics.nuts.kernel import resolve_metric

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-nutpie-") as tmp:
        work = Path(tmp)
        for model in models:
            s = bench_nuts._vs_settings(model, max_draws)
            done: dict[str, dict] = {}
            order = sorted(samplers, key=lambda x: (x == "auto", x in NUTPIE))  # diag first
            for sampler in order:
                if sampler == "auto" and "dim" in done.get("diag", {}):
                    if resolve_metric("auto", done["diag"]["dim"], s["num_warmup"]) == "diag":
                        row = dict(done["diag"], sampler="auto", note="the diag cell")
                        done["auto"] = row
                        rows.append(row)
                        print(f"  {model} auto: the diag cell (diagonal metric)", flush=True)
                        continue
                row = _run_cell(sampler, model, s, seed, work, timeout)
                if row is None:
                    continue
                done[sampler] = row
                rows.append(row)
                if "npz" in row:
                    print(
                        f"  {model} {sampler} ({row['metric_used']}): {row['ess_per_s']:.2f} "
                        f"ESS/s (min bulk ESS {row['min_ess_bulk']:.0f} in {row['timed_s']:.1f}"
                        f" s = import {row['import']:.1f} + run {row['run']:.1f}), "
                        f"{row['grad_per_draw']:.1f} grad/draw, {row['divergences']} divergent,"
                        f" R-hat {row['max_rhat']:.3f}; load {row['load']:.2f}",
                        flush=True,
                    )
            # the means: against posteriordb, else the project's diag cell (its auto cell
            # where the diag one did not finish)
            base = next((done[x] for x in ("diag", "auto") if "npz" in done.get(x, {})), None)
            for sampler, row in done.items():
                if "npz" not in row or row.get("note"):
                    continue
                own = base is not None and base["sampler"] == sampler
                if model.startswith("pdb_"):
                    ref = _reference_stats(model, None)
                elif base is None or own:
                    continue  # nothing to check against
                else:
                    ref = (
                        f"project {base['sampler']}",
                        _reference_stats(model, Path(base["npz"]))[1],
                    )
                row.update(check(Path(row["npz"]), ref))
                print(
                    f"  {model} {sampler}: means vs {row['check_against']}: max "
                    f"{row['max_z']:.1f} MCSE over {row['checked']} elements",
                    flush=True,
                )
            if json_path is not None:
                json_path.write_text(json.dumps(rows, indent=2, default=str))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: ESS/s (grad/draw) per sampler, nutpie's ratios to the project's, load."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    ours = [x for x in ("diag", "auto") if x in samplers]
    theirs = [x for x in NUTPIE if x in samplers]
    pairs = [(t, o) for t in theirs for o in ours]
    head = ["model", "D"] + [f"`{x}` ESS/s (grad/draw)" for x in ours + theirs]
    head += [f"`{t}` / `{o}`" for t, o in pairs] + ["nutpie means (max z)", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[tuple, list[float]] = {p: [] for p in pairs}
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = {r["sampler"]: r for r in rows if r["model"] == model}
        dim = next((c["dim"] for c in cells.values() if "dim" in c), "")
        line = [model, str(dim)]
        for x in ours + theirs:
            c = cells.get(x)
            if c is None:
                line.append("-")
            elif "timeout_s" in c:
                line.append(f"> {c['timeout_s']:.0f} s")
            else:
                metric = f", {c['metric_used']}" if x == "auto" else ""
                line.append(f"{c['ess_per_s']:.2f} ({c['grad_per_draw']:.0f}{metric})")
        for t, o in pairs:
            a, b = cells.get(t), cells.get(o)
            if a and b and "ess_per_s" in a and "ess_per_s" in b:
                r = a["ess_per_s"] / b["ess_per_s"]
                ratios[(t, o)].append(r)
                line.append(f"**{r:.2f}x**" if r > 1.0 else f"{r:.2f}x")
            elif a and b and "timeout_s" in a and "ess_per_s" in b:
                line.append("not done")
                ratios[(t, o)].append(0.0)  # counts as a loss in the median
            elif a and b and "ess_per_s" in a and "timeout_s" in b:
                line.append("**ours not done**")
                ratios[(t, o)].append(math.inf)  # counts as a win in the median
            else:
                line.append("-")
        checks = []
        for t in theirs:
            c = cells.get(t, {})
            if c.get("checked"):
                mark = "ok" if c["check_ok"] else "**FAIL**"
                checks.append(f"{c['max_z']:.1f} {mark}")
            else:
                checks.append("-")
        ref = next((c["check_against"] for c in cells.values() if c.get("checked")), "")
        line.append(" / ".join(checks) + (f" vs {ref}" if ref else ""))
        loads = [c["load"] for c in cells.values()]
        line.append(f"{min(loads):.1f}-{max(loads):.1f}")
        lines.append("| " + " | ".join(line) + " |")
    summary = ["**median**", ""] + [""] * len(ours + theirs)
    summary += [f"{statistics.median(v):.2f}x" if v else "-" for v in ratios.values()]
    lines.append("| " + " | ".join(summary + ["", ""]) + " |")
    # the same ratio with the sampling call only (imports left out), where both finished
    run_only = ["median, sampling call only", ""] + [""] * len(ours + theirs)
    for t, o in pairs:
        v = [
            (a["min_ess_bulk"] / a["run"]) / (b["min_ess_bulk"] / b["run"])
            for m in dict.fromkeys(r["model"] for r in rows)
            for a in rows
            for b in rows
            if a["model"] == m == b["model"] and a["sampler"] == t and b["sampler"] == o
            if "run" in a and "run" in b
        ]
        run_only.append(f"{statistics.median(v):.2f}x" if v else "-")
    lines.append("| " + " | ".join(run_only + ["", ""]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=bench_nuts.VS_MODELS)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=SAMPLERS)
    parser.add_argument("--max-draws", type=int, default=bench_nuts.VS_MAX_DRAWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--table", type=Path, help="print the table of rows written by --json")
    parser.add_argument("--child", choices=SAMPLERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, json.loads(args.settings), args.seed, args.out)
        return
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    models = tuple(args.models or bench_nuts.VS_MODELS)
    rows = battery(models, tuple(args.samplers), args.max_draws, args.seed, args.timeout, args.json)
    print(table(rows))


if __name__ == "__main__":
    main()
