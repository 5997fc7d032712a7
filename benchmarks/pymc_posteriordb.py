"""Benchmark 4b for PyMC: ADVI and pymc-extras' Pathfinder on the posteriordb posteriors.

PyMC translations of posteriordb's Stan programs (the same ones that
``vimodels/validation/models.py`` translates to Pyro; data from
``vimodels/validation/posteriordb/<posterior>/data.json``), run with the
``bench`` extra's PyMC and pymc-extras in an environment without vimodels
(this script imports neither torch nor vimodels). Accuracy and time as in
``bench_time_to_accuracy.py``: all means within 0.2 sd and all sds within
20 % of posteriordb's summary (10 000 Stan draws); for ADVI (mean-field and
full-rank) the first checkpoint (every ``--every`` iterations, up to ``--max-iters``)
from which every later one is accurate, its wall time since the start
(compilation included) minus the checkpoints' own time; for Pathfinder the
wall time of ``pymc_extras.fit(method="pathfinder")`` (4 paths, its defaults,
one process) if its draws are accurate.

Usage: python benchmarks/pymc_posteriordb.py [--models NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt

DATA = Path(__file__).resolve().parent.parent / "vimodels" / "validation" / "posteriordb"
MEAN_TOL = 0.2
SD_TOL = 0.2
POSTERIORS = {
    "pdb_kidiq_interaction": "kidiq-kidscore_interaction",
    "pdb_mesquite_logvolume": "mesquite-logmesquite_logvolume",
    "pdb_earnings_logearn_interaction": "earnings-logearn_interaction",
    "pdb_nes1972": "nes1972-nes",
    "pdb_ark": "arK-arK",
    "pdb_arma11": "arma-arma11",
    "pdb_garch11": "garch-garch11",
    "pdb_gp_pois_regr": "gp_pois_regr-gp_pois_regr",
    "pdb_hmm_example": "hmm_example-hmm_example",
}


def _json(posterior: str, name: str) -> dict:
    with open(DATA / posterior / name, encoding="utf-8") as f:
        return json.load(f)


def _regression(X: np.ndarray, y: np.ndarray, sigma_cauchy: float | None) -> pm.Model:
    """``y ~ normal(X beta, sigma)``, flat ``beta``; ``sigma`` half-Cauchy or flat on > 0."""
    X1 = np.column_stack([np.ones(len(y)), X])
    with pm.Model() as m:
        beta = pm.Flat("beta", shape=X1.shape[1])
        if sigma_cauchy:
            sigma = pm.HalfCauchy("sigma", sigma_cauchy)
        else:
            sigma = pm.HalfFlat("sigma")
        pm.Normal("y", X1 @ beta, sigma, observed=y)
    return m


def kidiq() -> pm.Model:
    d = _json("kidiq-kidscore_interaction", "data.json")
    hs, iq = np.asarray(d["mom_hs"], float), np.asarray(d["mom_iq"], float)
    return _regression(np.column_stack([hs, iq, hs * iq]), np.asarray(d["kid_score"], float), 2.5)


def mesquite() -> pm.Model:
    d = _json("mesquite-logmesquite_logvolume", "data.json")
    v = np.asarray(d["diam1"], float) * np.asarray(d["diam2"], float)
    v = v * np.asarray(d["canopy_height"], float)
    return _regression(np.log(v)[:, None], np.log(np.asarray(d["weight"], float)), None)


def earnings() -> pm.Model:
    d = _json("earnings-logearn_interaction", "data.json")
    h, male = np.asarray(d["height"], float), np.asarray(d["male"], float)
    X = np.column_stack([h, male, h * male])
    return _regression(X, np.log(np.asarray(d["earn"], float)), None)


def nes() -> pm.Model:
    d = _json("nes1972-nes", "data.json")
    age = np.asarray(d["age_discrete"])
    cols = [d["real_ideo"], d["race_adj"], age == 2, age == 3, age == 4]
    cols += [d["educ1"], d["gender"], d["income"]]
    X = np.column_stack([np.asarray(c, float) for c in cols])
    return _regression(X, np.asarray(d["partyid7"], float), None)


def ark() -> pm.Model:
    d = _json("arK-arK", "data.json")
    y, K = np.asarray(d["y"], float), int(d["K"])
    T = len(y)
    lags = np.column_stack([y[K - k : T - k] for k in range(1, K + 1)])
    with pm.Model() as m:
        alpha = pm.Normal("alpha", 0, 10)
        beta = pm.Normal("beta", 0, 10, shape=K)
        sigma = pm.HalfCauchy("sigma", 2.5)
        pm.Normal("y", alpha + lags @ beta, sigma, observed=y[K:])
    return m


def arma() -> pm.Model:
    y = np.asarray(_json("arma-arma11", "data.json")["y"], float)
    prev = np.concatenate([[0.0], y[:-1]])
    # the likelihood is on err, a function of the parameters: a Potential, as Stan's target +=
    with pm.Model() as m:
        mu = pm.Normal("mu", 0, 10)
        phi = pm.Normal("phi", 0, 2)
        theta = pm.Normal("theta", 0, 2)
        sigma = pm.HalfCauchy("sigma", 2.5)
        d = pt.set_subtensor((y - mu - phi * prev)[0], y[0] - mu - phi * mu)
        err, _ = pytensor.scan(
            lambda d_t, e_prev, th: d_t - th * e_prev,
            sequences=[d],
            outputs_info=[pt.zeros(())],
            non_sequences=[theta],
        )
        pm.Potential("lik", pm.logp(pm.Normal.dist(0, sigma), err).sum())
    return m


def garch() -> pm.Model:
    d = _json("garch-garch11", "data.json")
    y, sigma1 = np.asarray(d["y"], float), float(d["sigma1"])
    prev = np.concatenate([[0.0], y[:-1]])
    with pm.Model() as m:
        mu = pm.Flat("mu")
        alpha0 = pm.HalfFlat("alpha0")
        alpha1 = pm.Uniform("alpha1", 0, 1)
        raw = pm.Uniform("beta1_raw", 0, 1)
        # Stan: beta1 flat on (0, 1 - alpha1), unnormalised: the Jacobian log(1 - alpha1)
        pm.Potential("beta1_jacobian", pt.log1p(-alpha1))
        beta1 = pm.Deterministic("beta1", (1 - alpha1) * raw)
        c = pt.set_subtensor((alpha0 + alpha1 * (prev - mu) ** 2)[0], sigma1**2)
        var, _ = pytensor.scan(
            lambda c_t, v_prev, b: c_t + b * v_prev,
            sequences=[c],
            outputs_info=[pt.zeros(())],
            non_sequences=[beta1],
        )
        pm.Potential("lik", pm.logp(pm.Normal.dist(mu, pt.sqrt(var)), y).sum())
    return m


def gp() -> pm.Model:
    d = _json("gp_pois_regr-gp_pois_regr", "data.json")
    x, k = np.asarray(d["x"], float), np.asarray(d["k"], int)
    n = len(x)
    d2 = (x[:, None] - x[None, :]) ** 2
    with pm.Model() as m:
        rho = pm.Gamma("rho", 25, 4)
        alpha = pm.HalfNormal("alpha", 2)
        f_tilde = pm.Normal("f_tilde", 0, 1, shape=n)
        cov = alpha**2 * pt.exp(-0.5 * d2 / rho**2) + 1e-10 * np.eye(n)
        L = pt.linalg.cholesky(cov)
        f = pm.Deterministic("f", L @ f_tilde)
        pm.Poisson("k", pt.exp(f), observed=k)
    return m


def hmm() -> pm.Model:
    y = np.asarray(_json("hmm_example-hmm_example", "data.json")["y"], float)
    with pm.Model() as m:
        theta1 = pm.Dirichlet("theta1", np.ones(2))
        theta2 = pm.Dirichlet("theta2", np.ones(2))
        # positive_ordered: mu[0] > 0, mu[1] > mu[0] (log of the first, log of the gap)
        lmu0 = pm.Flat("log_mu0")
        lgap = pm.Flat("log_gap")
        mu = pm.Deterministic("mu", pt.stack([pt.exp(lmu0), pt.exp(lmu0) + pt.exp(lgap)]))
        pm.Potential("mu_jacobian", lmu0 + lgap)
        pm.Potential("mu_prior", pm.logp(pm.Normal.dist([3.0, 10.0], 1.0), mu).sum())
        log_theta = pt.log(pt.stack([theta1, theta2]))  # [j, k]: from j to k
        emit = pm.logp(pm.Normal.dist(mu[None, :], 1.0), y[:, None])  # (T, 2)

        def step(e_t, gamma_prev, lt):
            return pt.logsumexp(gamma_prev[:, None] + lt, axis=0) + e_t

        gamma, _ = pytensor.scan(
            step, sequences=[emit[1:]], outputs_info=[emit[0]], non_sequences=[log_theta]
        )
        pm.Potential("lik", pt.logsumexp(gamma[-1]))
    return m


MODELS = {
    "pdb_kidiq_interaction": kidiq,
    "pdb_mesquite_logvolume": mesquite,
    "pdb_earnings_logearn_interaction": earnings,
    "pdb_nes1972": nes,
    "pdb_ark": ark,
    "pdb_arma11": arma,
    "pdb_garch11": garch,
    "pdb_gp_pois_regr": gp,
    "pdb_hmm_example": hmm,
}


def reference(name: str) -> list[tuple[str, tuple[int, ...], float, float]]:
    """(variable, index, mean, sd) per parameter of posteriordb's summary (0-based index)."""
    out = []
    for param, stats in _json(POSTERIORS[name], "reference.json")["summary"].items():
        m = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", param)
        idx = tuple(int(i) - 1 for i in m.group(2).split(",")) if m.group(2) else ()
        out.append((m.group(1), idx, float(stats["mean"]), float(stats["sd"])))
    return out


def errors(draws: dict[str, np.ndarray], ref: list) -> tuple[float, float]:
    """Worst |mean error| (sd) and worst |sd ratio - 1|; draws ``{var: (n, *shape)}``."""
    z, r = [], []
    for var, idx, mean, sd in ref:
        x = np.asarray(draws[var], float)[(slice(None),) + idx]
        z.append(abs(x.mean() - mean) / sd)
        r.append(abs(x.std(ddof=1) / sd - 1.0))
    return float(np.max(z)), float(np.max(r))


def ok(z: float, r: float) -> bool:
    return bool(np.isfinite(z) and np.isfinite(r) and z <= MEAN_TOL and r <= SD_TOL)


def run_advi(model: pm.Model, method: str, ref: list, every: int, max_iters: int, draws: int):
    """Time to settled accuracy of PyMC's ADVI (``advi`` or ``fullrank_advi``).

    One ``fit(max_iters)`` call; a callback draws from the approximation every
    ``every`` iterations through one compiled sampling function (the
    approximation's parameters are shared variables, so it sees the current ones).
    """
    try:
        from pymc.pytensorf import compile as compile_fn
    except ImportError:  # older PyMC
        from pymc.pytensorf import compile_pymc as compile_fn

    names = sorted({v for v, *_ in ref})
    t0 = time.perf_counter()
    spent = [0.0]
    trail = []
    with model:
        inference = pm.ADVI(random_seed=0) if method == "advi" else pm.FullRankADVI(random_seed=0)
        nodes = [inference.approx.sample_node(model[v], size=draws) for v in names]
        sample = compile_fn([], nodes, random_seed=1)

        def callback(approx, losses, i):
            if (i + 1) % every:
                return
            t_in = time.perf_counter()
            z, r = errors(dict(zip(names, sample(), strict=True)), ref)
            trail.append((i + 1, t_in - t0 - spent[0], ok(z, r), z, r))
            spent[0] += time.perf_counter() - t_in

        inference.fit(max_iters, callbacks=[callback], progressbar=False)
    oks = [t[2] for t in trail]
    i = next((i for i in range(len(oks)) if all(oks[i:])), None)
    return {
        "settled_s": trail[i][1] if i is not None else None,
        "settled_iter": trail[i][0] if i is not None else None,
        "total_s": trail[-1][1],
        "mean_err": trail[-1][3],
        "sd_err": trail[-1][4],
        "best_mean_err": min(t[3] for t in trail),
    }


def run_pathfinder(model: pm.Model, ref: list, draws: int):
    """Wall time and accuracy of pymc-extras' multi-path Pathfinder (its defaults, 4 paths)."""
    import pymc_extras as pmx

    names = sorted({v for v, *_ in ref})
    t0 = time.perf_counter()
    with model:
        idata = pmx.fit(
            method="pathfinder",
            num_paths=4,
            num_draws=draws,
            random_seed=0,
            progressbar=False,
            concurrent=None,
            display_summary=False,
        )
    wall = time.perf_counter() - t0
    post = idata.posterior
    d = {v: post[v].values.reshape((-1,) + post[v].values.shape[2:]) for v in names}
    z, r = errors(d, ref)
    return {"settled_s": wall if ok(z, r) else None, "total_s": wall, "mean_err": z, "sd_err": r}


def render(rows: list[dict], nuts_s: dict[str, float] | None = None) -> str:
    """Markdown: per posterior and method, settled time (and / NUTS), final errors."""
    nuts_s = nuts_s or {}
    out = [
        "| posterior | method | settled time | / NUTS | final worst mean err (sd) "
        "| final worst sd err | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            why = " ".join(r["error"].split())[:90]
            out.append(f"| `{r['model']}` | {r['method']} | failed: {why} | | | | |")
            continue
        t = r["settled_s"]
        n = nuts_s.get(r["model"])
        ratio = f"{t / n:.3f}" if (t is not None and n) else ""
        time_cell = "never" if t is None else f"{t:.1f} s"
        if r["method"] != "pathfinder" and t is not None:
            time_cell += f" ({r['settled_iter']} it.)"
        out.append(
            f"| `{r['model']}` | {r['method']} | {time_cell} | {ratio} | {r['mean_err']:.2f} "
            f"| {100 * r['sd_err']:.0f} % | {r['load']:.1f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=["advi", "fullrank_advi", "pathfinder"])
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--max-iters", type=int, default=10000)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"uptime": load, "pymc": pm.__version__}), flush=True)
    rows = []
    for name in args.models:
        ref = reference(name)
        for method in args.methods:
            model = MODELS[name]()
            t = time.perf_counter()
            try:
                if method == "pathfinder":
                    res = run_pathfinder(model, ref, args.draws)
                else:
                    res = run_advi(model, method, ref, args.every, args.max_iters, args.draws)
            except Exception as exc:  # noqa: BLE001 - a failed method is a row, not a crash
                res = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            res.update(model=name, method=method, load=os.getloadavg()[0])
            res["wall_s"] = time.perf_counter() - t
            rows.append(res)
            print(json.dumps(res, default=float), flush=True)
    end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load at the start: `{load}`; at the end: `{end}`")
    print(render(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"uptime_start": load, "uptime_end": end, "rows": rows}, default=float)
        )


if __name__ == "__main__":
    main()
