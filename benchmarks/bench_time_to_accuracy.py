"""Benchmark 4b (issue 18): time to accuracy of every method, as a fraction of the NUTS time.

Models: every hierarchical catalog entry of benchmark 4 (``bench_accuracy.ENTRIES``)
and the nine posteriordb posteriors of ``vimodels.validation``. Methods: the
entry's default guides with ``fit()``'s defaults, ``auto_laplace`` (L-BFGS mode
+ exact Hessian), ``auto_laplace_is`` (the same, PSIS-resampled), ``pathfinder``
(4 paths, PSIS-resampled), and ``auto_normal`` /
``auto_multivariate_normal`` started at the Laplace approximation or at
Pathfinder's Gaussian (``init="laplace"`` / ``"pathfinder"``; ``--all-inits``
adds ``auto_normal`` started either way).

Accuracy, over every element of the reference's sites: all means within
``0.2`` reference sd and all sds within 20 % of the reference sd. The
reference is the NUTS reference for a catalog entry (its sites of interest;
eight schools centered takes the non-centered one's, as ``compare`` does) and
posteriordb's summary over its 10 000 Stan draws for a ``pdb_*`` posterior.

Time: for an SVI fit, the first checkpoint (every ``--every`` steps, guide
draws at the current parameters, as the fit would return them) from which
every later checkpoint and the returned fit are accurate ("settled"); the
wall time since ``fit()`` was called (L-BFGS start, model checks and JIT
included) minus the checkpoints' own time. For Laplace and Pathfinder, the
wall time of the call, if its result is accurate; for the methods that
importance-resample (``pathfinder``, ``auto_laplace_is``) the time of drawing
the checked draws is added (their resampling evaluates ``log p`` on four times
as many proposal draws: part of the method). The NUTS time is the
project's reference (``diagnostics.get_reference`` with the entry's settings,
4 chains) as recorded when it was computed, less its unvisited-mode search
(``settings["mode_search_s"]``, 0.1-3 s, added to the reference after this
benchmark's earlier runs: counting it would lower the ratios without any
method getting faster); run with an empty cache so that it is measured in
the same run, under the same load. Ratio: the fastest
accurate method's time / NUTS time (target <= 0.1).

Monte Carlo error of the check: ``--draws`` guide draws (default 2000) give a
mean to 0.022 sd and an sd to 1.6 % (one standard error); the NUTS reference's
means to <= 0.05 sd (ESS >= 400). A method at the threshold can flip; the
table gives the worst errors so the margin shows.

Usage: python benchmarks/bench_time_to_accuracy.py [--models ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_accuracy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vimodels.validation import list_posteriors  # noqa: E402

VALIDATION = tuple(list_posteriors())
MODELS = tuple(bench_accuracy.ENTRIES) + VALIDATION
MEAN_TOL = 0.2  # posterior sd
SD_TOL = 0.2  # relative
#: (label, guide, init) after the entry's default guides
EXTRA_METHODS = (
    ("auto_laplace", "auto_laplace", None),
    ("auto_laplace_is", "auto_laplace_is", None),
    ("pathfinder", "pathfinder", None),
    ("nested_laplace", "nested_laplace", None),
    ("auto_multivariate_normal, init=laplace", "auto_multivariate_normal", "laplace"),
    ("auto_multivariate_normal, init=pathfinder", "auto_multivariate_normal", "pathfinder"),
)
#: ``--all-inits`` adds these (left out by default to keep the run within an hour on 2 cores)
MEAN_FIELD_INITS = (
    ("auto_normal, init=laplace", "auto_normal", "laplace"),
    ("auto_normal, init=pathfinder", "auto_normal", "pathfinder"),
)
#: ``--decenter`` adds these: the same methods on the decentered model (``reparam="decenter"``,
#: for the models with a site to decenter; the hand-written guides cannot apply)
DECENTERED_METHODS = (
    ("pathfinder, decenter", "pathfinder", None),
    ("auto_laplace_is, decenter", "auto_laplace_is", None),
    ("auto_laplace, decenter", "auto_laplace", None),
    ("auto_normal, decenter", "auto_normal", None),
    ("auto_multivariate_normal, decenter", "auto_multivariate_normal", None),
    ("auto_multivariate_normal, init=laplace, decenter", "auto_multivariate_normal", "laplace"),
    (
        "auto_multivariate_normal, init=pathfinder, decenter",
        "auto_multivariate_normal",
        "pathfinder",
    ),
)
ONE_SHOT = ("auto_laplace", "auto_laplace_is", "pathfinder", "auto_delta", "nested_laplace")


def uptime() -> str:
    """``uptime``'s line (the load average) or ``unknown``."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def sampling_time(ref) -> float:
    """The reference's wall time less its unvisited-mode search, seconds."""
    return float(ref.wall_time) - float(ref.settings.get("mode_search_s", 0.0))


def reference(name: str, cache_dir: str | None = None) -> dict:
    """Reference means and sds per element, the sites, and the NUTS reference's wall time."""
    from diagnostics import get_reference
    from vimodels.catalog.registry import get_model

    if name.startswith("pdb_"):
        from vimodels.validation import parse_stan_name, reference_table

        nuts = get_reference(name, seed=0, cache_dir=cache_dir)
        table = reference_table(name)
        index = [(row.site, parse_stan_name(row.parameter)[1]) for row in table.itertuples()]
        return {
            "sites": tuple(dict.fromkeys(s for s, _ in index)),
            "index": index,
            "labels": list(table["element"]),
            "mean": table["mean_full"].to_numpy(float),
            "sd": table["sd_full"].to_numpy(float),
            "nuts_s": sampling_time(nuts),
            "nuts_trusted": nuts.trusted,
            "source": "posteriordb (10 000 Stan draws)",
        }
    source = get_model(name).reference_from or name
    ref = get_reference(name, seed=0, cache_dir=cache_dir)
    index, labels, means, sds = [], [], [], []
    for site in ref.sites:
        d = np.asarray(ref.draws[site], dtype=float)
        flat = d.reshape(d.shape[0] * d.shape[1], -1)
        shape = d.shape[2:]
        for j in range(flat.shape[1]):
            idx = np.unravel_index(j, shape) if shape else ()
            index.append((site, tuple(int(i) for i in idx)))
            labels.append(site + (f"[{','.join(map(str, idx))}]" if shape else ""))
            means.append(flat[:, j].mean())
            sds.append(flat[:, j].std(ddof=1))
    return {
        "sites": tuple(ref.sites),
        "index": index,
        "labels": labels,
        "mean": np.array(means),
        "sd": np.array(sds),
        "nuts_s": sampling_time(ref),
        "nuts_trusted": ref.trusted,
        "source": f"NUTS ({source})",
    }


def errors(draws: dict, ref: dict) -> tuple[float, float, int]:
    """Worst |mean error| (sd), worst |sd ratio - 1|, and the element of the worse of the two."""
    cols = []
    for site, idx in ref["index"]:
        x = np.asarray(draws[site], dtype=float)
        cols.append(x[(slice(None),) + idx])
    x = np.stack(cols, 1)
    z = np.abs(x.mean(0) - ref["mean"]) / ref["sd"]
    r = np.abs(x.std(0, ddof=1) / ref["sd"] - 1.0)
    worst = int(np.argmax(np.maximum(z / MEAN_TOL, r / SD_TOL)))
    return float(z.max()), float(r.max()), worst


def accurate(z: float, r: float) -> bool:
    """All means within MEAN_TOL sd and all sds within SD_TOL (non-finite: no)."""
    return bool(np.isfinite(z) and np.isfinite(r) and z <= MEAN_TOL and r <= SD_TOL)


def label_decenters(label: str) -> bool:
    """Whether a method's label asks for the decentered model."""
    return label.endswith(", decenter")


def time_method(
    name: str,
    guide: str,
    init: str | None,
    ref: dict,
    every: int,
    draws: int,
    seed: int,
    label: str = "",
) -> dict:
    """One fit with fit()'s defaults; its settled time to accuracy (None: never)."""
    import vimodels

    trail: list[tuple[int, float, bool]] = []
    spent = [0.0]

    def callback(progress) -> None:
        if progress.step % every and progress.step != 1:
            return
        t_in = time.perf_counter()
        z, r, _ = errors(progress.sample(draws, seed=seed + 10), ref)
        trail.append((progress.step, t_in - t_call - spent[0], accurate(z, r)))
        spent[0] += time.perf_counter() - t_in

    kwargs = {"init": init} if init else {}
    if label_decenters(label):
        kwargs["reparam"] = "decenter"
    if guide not in ONE_SHOT:
        kwargs["callback"] = callback
    t_call = time.perf_counter()
    try:
        result = vimodels.fit(
            name,
            guide=guide,
            seed=seed,
            progress=False,
            sites=ref["sites"],
            num_eval=100,
            **kwargs,
        )
    except vimodels.VimodelsError as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    total = time.perf_counter() - t_call - spent[0]
    t_draw = time.perf_counter()
    z, r, worst = errors(result.sample(draws, seed=seed + 10), ref)
    draw_s = time.perf_counter() - t_draw
    resample = result.settings.get("resample")
    if resample:  # the importance resampling is part of the method: its log p evaluations count
        total += draw_s
    ok_final = accurate(z, r)
    if guide in ONE_SHOT:
        settled_s = total if ok_final else None
    else:
        oks = [ok for _, _, ok in trail]
        i = next((i for i in range(len(oks)) if all(oks[i:])), None)
        settled_s = trail[i][1] if (i is not None and ok_final) else None
    return {
        "settled_s": settled_s,
        "fit_s": total,
        "steps": result.num_steps,
        "status": result.status,
        "mean_err": z,
        "sd_err": r,
        "worst": ref["labels"][worst],
        "k_hat": resample["k_hat"] if resample else None,
        "draw_s": draw_s,
    }


def run(
    models: tuple[str, ...],
    every: int,
    draws: int,
    seed: int,
    cache_dir: str | None = None,
    all_inits: bool = False,
    decenter: bool = False,
    only: tuple[str, ...] | None = None,
) -> dict:
    """Every method on every model (``only``: these labels); prints one JSON line per fit."""
    import vimodels

    torch.set_num_threads(1)
    # one-time costs of a process (lazy imports, first JIT of the session) are not VI's
    vimodels.fit("eight_schools_noncentered", num_steps=5, num_eval=2, progress=False)
    rows = []
    for name in models:
        load0 = os.getloadavg()[0]
        ref = reference(name, cache_dir)
        print(
            f"{name}: reference {ref['source']}, NUTS {ref['nuts_s']:.1f} s, trusted "
            f"{ref['nuts_trusted']}, load {load0:.1f}",
            flush=True,
        )
        entry = vimodels.get_model(name)
        methods = [(g, g, None) for g in entry.default_guides]
        extra = (
            EXTRA_METHODS
            + (MEAN_FIELD_INITS if all_inits else ())
            + (DECENTERED_METHODS if decenter else ())
        )
        methods += [m for m in extra if m[0] not in {x[0] for x in methods}]
        if only:
            methods = [m for m in methods if m[0] in only]
        results = []
        for label, guide, init in methods:
            timed = time_method(name, guide, init, ref, every, draws, seed, label)
            res = {"method": label, **timed}
            res["load"] = os.getloadavg()[0]
            results.append(res)
            print(json.dumps({"model": name, **res}, default=float), flush=True)
        ok = [r for r in results if r.get("settled_s") is not None]
        best = min(ok, key=lambda r: r["settled_s"]) if ok else None
        rows.append(
            {
                "model": name,
                "reference": ref["source"],
                "dim_checked": len(ref["mean"]),
                "nuts_s": ref["nuts_s"],
                "nuts_trusted": ref["nuts_trusted"],
                "best": best["method"] if best else None,
                "best_s": best["settled_s"] if best else None,
                "ratio": best["settled_s"] / ref["nuts_s"] if best else None,
                "methods": results,
                "load": (load0, os.getloadavg()[0]),
            }
        )
    return {"rows": rows}


def _cell(r: dict, nuts_s: float) -> str:
    if "error" in r:
        return f"failed ({r['error'].split(':')[0]})"
    acc = f"{r['mean_err']:.2f} / {100 * r['sd_err']:.0f} %"
    if r["settled_s"] is None:
        return f"never ({acc})"
    return f"{r['settled_s']:.1f} s = {r['settled_s'] / nuts_s:.3f} ({acc})"


def render(res: dict, start: str, end: str) -> str:
    """Markdown: the summary table, then every method per model."""
    lines = [
        f"Load (`uptime`) at the start: `{start}`; at the end: `{end}`.",
        "",
        "| model | NUTS s | fastest accurate method | its time | / NUTS | target 0.1 | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        trust = {True: "", False: " (not trusted)"}.get(
            row["nuts_trusted"], " (trust not recorded)"
        )
        if row["best"] is None:
            cells = "none | | | missed"
        else:
            verdict = "met" if row["ratio"] <= 0.1 else "missed"
            cells = f"{row['best']} | {row['best_s']:.2f} s | {row['ratio']:.3f} | {verdict}"
        lines.append(
            f"| `{row['model']}` | {row['nuts_s']:.1f}{trust} | {cells} "
            f"| {row['load'][0]:.1f}-{row['load'][1]:.1f} |"
        )
    labels = list(dict.fromkeys(m["method"] for row in res["rows"] for m in row["methods"]))
    lines += [
        "",
        "Every method: settled time, fraction of the NUTS time, and (worst |mean error| in "
        "sd / worst |sd ratio - 1|) of the returned fit; `never`: not accurate at the end.",
        "",
        "| model | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in res["rows"]:
        by = {m["method"]: m for m in row["methods"]}
        cells = [_cell(by[x], row["nuts_s"]) if x in by else "not run" for x in labels]
        lines.append(f"| `{row['model']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: ``--resample-pool``'s default models: the posteriordb regressions and arK of section 4b
POOL_MODELS = (
    "pdb_mesquite_logvolume",
    "pdb_earnings_logearn_interaction",
    "pdb_nes1972",
    "pdb_kidiq_interaction",
    "pdb_ark",
)


def resample_pool_timing(models: tuple[str, ...], draws: int, seed: int, reps: int) -> str:
    """``fit(...).sample(draws)`` of the resampling methods, pool by traces vs frozen potential.

    One fit per model and method; then, in the same process, ``reps`` rounds of
    one call with the pool drawn through Pyro's traces (``vimodels.svi.pool.ENABLED``
    False, the old path) and one through the frozen potential (the first of
    those builds the graph and runs the agreement check: shown apart). Every
    pair must give the same draws.
    """
    import vimodels
    from vimodels.svi import pool

    lines = [
        f"start: {uptime()}; torch threads {torch.get_num_threads()}",
        "",
        "| model | method | rows | traces (old) | frozen, 1st call | frozen, later | same draws |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        for guide in ("auto_laplace_is", "pathfinder"):
            fit = vimodels.fit(name, guide=guide, seed=seed, progress=False, num_eval=100)
            old, new, same, ref = [], [], True, {}
            for _ in range(reps):
                for enabled in (False, True):
                    pool.ENABLED = enabled
                    t0 = time.perf_counter()
                    got = fit.sample(draws, seed=seed + 10)
                    (new if enabled else old).append(time.perf_counter() - t0)
                    if enabled:
                        same &= all(np.array_equal(got[k], ref[k]) for k in ref)
                    else:
                        ref = got
            pool.ENABLED = True
            potential = fit.guide.potential
            rows = [n for n, f in getattr(potential, "_compiled_batch", {}).items() if f]
            frozen = getattr(fit.guide, "_pool_agrees", None)
            later = ", ".join(f"{t:.2f}" for t in new[1:])
            lines.append(
                f"| `{name}` | {guide} | {rows if frozen else 'traces'} | "
                f"{', '.join(f'{t:.2f}' for t in old)} | {new[0]:.2f} | {later} | {same} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"end: {uptime()}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--every", type=int, default=25, help="steps between checkpoints")
    parser.add_argument("--draws", type=int, default=2000, help="guide draws per check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here")
    parser.add_argument(
        "--cache-dir",
        help="NUTS reference cache (default: a fresh temporary folder, so that NUTS runs "
        "in this process under the same load)",
    )
    parser.add_argument("--all-inits", action="store_true", help="auto_normal's inits too")
    parser.add_argument(
        "--resample-pool",
        action="store_true",
        help="instead: time sample(--draws) of auto_laplace_is and pathfinder with the "
        "resampling pool drawn through Pyro's traces vs the frozen potential, interleaved "
        "(--models default: five posteriordb posteriors)",
    )
    parser.add_argument("--reps", type=int, default=3, help="rounds for --resample-pool")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--decenter",
        action="store_true",
        help='the autoguide methods on the decentered model too (fit(reparam="decenter"))',
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only the methods with these labels"
    )
    args = parser.parse_args(argv)
    labels = [m[0] for m in EXTRA_METHODS + MEAN_FIELD_INITS + DECENTERED_METHODS]
    unknown = set(args.methods or ()) - set(labels) - {"mean_field", "full_rank", "structured"}
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; valid: {labels} and default guides")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resample_pool:
        models = POOL_MODELS if args.models == list(MODELS) else tuple(args.models)
        text = resample_pool_timing(models, args.draws, args.seed, args.reps)
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    start = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(
            tuple(args.models),
            args.every,
            args.draws,
            args.seed,
            args.cache_dir or tmp,
            args.all_inits,
            args.decenter,
            tuple(args.methods) if args.methods else None,
        )
    text = render(res, start, uptime())
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
