"""Benchmark 10 (issue 18): L-BFGS modes, Laplace and Pathfinder vs Adam, badly conditioned.

Three linear regressions whose posteriors are known to quadrature accuracy:

- ``poly26``: N = 5000, intercept + 24 near-collinear standardized polynomial
  features of x ~ U(-1, 1), noise sd unknown: 26 parameters, posterior sds over
  more than two decades;
- ``pinned6``: N = 200, intercept + 4 features, noise sd 0.01 (unknown), prior
  sd 10: 6 parameters, coefficients pinned to sd ~0.001;
- ``conjugate_linear_regression`` (catalog; exact Gaussian posterior).

The reference of the first two: given sigma the coefficients are Gaussian in
closed form, and sigma's marginal is tabulated on a fine grid (1-D
quadrature), so means and sds are exact to ~1e-6. Methods: ``auto_normal``
with fit()'s defaults (Adam), ``auto_laplace`` (L-BFGS mode + exact Hessian),
``pathfinder``, and ``auto_multivariate_normal`` started at the Laplace
approximation (``init="laplace"``, fit()'s defaults). Reported per method:
wall time, worst |mean error| in posterior sds, and the range of sd ratios
(approximation / exact) over all parameters (coefficients and sigma).

Usage: python benchmarks/bench_mode.py [--models NAME ...] [--draws N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

import vimodels  # noqa: E402

MODELS = ("poly26", "pinned6", "conjugate_linear_regression")
METHODS = (
    ("auto_normal (Adam, defaults)", {"guide": "auto_normal"}),
    ("find_mode + Laplace", {"guide": "auto_laplace"}),
    ("pathfinder", {"guide": "pathfinder"}),
    (
        "auto_multivariate_normal, init=laplace",
        {"guide": "auto_multivariate_normal", "init": "laplace"},
    ),
)


def regression(X, y=None, prior_sd=1.0, intercept_sd=10.0, sigma_sd=1.0):
    """``y ~ N(b0 + X beta, sigma)``, ``b0 ~ N(0, intercept_sd)``, ``beta ~ N(0, prior_sd)``."""
    b0 = pyro.sample("b0", dist.Normal(0.0, intercept_sd))
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[-1]), prior_sd).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(sigma_sd))
    with pyro.plate("data", X.shape[0], dim=-1):
        # under a particle plate b0, sigma: (n, 1) and beta: (n, 1, k); X: (N, k)
        mean = b0 + (X * beta).sum(-1)
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def poly26(seed: int = 18) -> dict:
    """Intercept + 24 standardized powers of x ~ U(-1, 1), N = 5000, noise sd 0.1."""
    rng = np.random.default_rng(seed)
    n, k = 5000, 24
    x = rng.uniform(-1, 1, n)
    F = np.stack([x**p for p in range(1, k + 1)], 1)
    F = (F - F.mean(0)) / F.std(0)
    beta = rng.normal(0, 0.3, k) * np.exp(-0.3 * np.arange(k))
    y = 1.0 + F @ beta + rng.normal(0, 0.1, n)
    return {
        "X": torch.tensor(F, dtype=torch.float32),
        "y": torch.tensor(y, dtype=torch.float32),
        "prior_sd": 1.0,
        "intercept_sd": 10.0,
        "sigma_sd": 1.0,
    }


def pinned6(seed: int = 6) -> dict:
    """Intercept + 4 normal features, N = 200, noise sd 0.01; prior sd 10."""
    rng = np.random.default_rng(seed)
    n, k = 200, 4
    X = rng.normal(size=(n, k))
    y = 0.5 + X @ np.array([1.0, -2.0, 0.5, 3.0]) + rng.normal(0, 0.01, n)
    return {
        "X": torch.tensor(X, dtype=torch.float32),
        "y": torch.tensor(y, dtype=torch.float32),
        "prior_sd": 10.0,
        "intercept_sd": 10.0,
        "sigma_sd": 1.0,
    }


def reference(data: dict, grid: int = 4001) -> dict:
    """Exact posterior means and sds of (b0, beta, sigma) by 1-D quadrature over log sigma."""
    F = data["X"].double().numpy()
    y = data["y"].double().numpy()
    n, k = F.shape
    X = np.hstack([np.ones((n, 1)), F])
    prior_var = np.array([data["intercept_sd"] ** 2] + [data["prior_sd"] ** 2] * k)
    xtx, xty, yty = X.T @ X, X.T @ y, y @ y

    def conditional(log_s):
        s2 = np.exp(2 * log_s)
        A = xtx / s2 + np.diag(1 / prior_var)
        L = np.linalg.cholesky(A)
        b = xty / s2
        m = np.linalg.solve(A, b)
        logml = (
            -0.5 * n * np.log(2 * np.pi * s2)
            - 0.5 * np.log(prior_var).sum()
            - np.log(np.diag(L)).sum()
            - 0.5 * (yty / s2 - b @ m)
        )
        # HalfNormal prior on sigma, and d sigma = sigma d log sigma
        logprior = -0.5 * (np.exp(log_s) / data["sigma_sd"]) ** 2 + log_s
        return logml + logprior, m, np.linalg.inv(A)

    coarse = np.linspace(-12, 3, 600)
    lp = np.array([conditional(v)[0] for v in coarse])
    c = coarse[np.argmax(lp)]
    curv = np.sqrt(
        -1
        / (
            (lp[np.argmax(lp) + 1] - 2 * lp.max() + lp[np.argmax(lp) - 1])
            / (coarse[1] - coarse[0]) ** 2
        )
    )
    pts = np.linspace(c - 12 * curv, c + 12 * curv, grid)
    parts = [conditional(v) for v in pts]
    lw = np.array([p[0] for p in parts])
    w = np.exp(lw - lw.max())
    w /= w.sum()
    means = np.array([p[1] for p in parts])
    variances = np.array([np.diag(p[2]) for p in parts])
    mean_b = w @ means
    var_b = w @ (variances + means**2) - mean_b**2
    s = np.exp(pts)
    mean_s = w @ s
    sd_s = np.sqrt(w @ s**2 - mean_s**2)
    return {
        "mean": np.concatenate([mean_b, [mean_s]]),
        "sd": np.concatenate([np.sqrt(var_b), [sd_s]]),
    }


def _flat(draws: dict, names: tuple[str, ...]) -> np.ndarray:
    return np.hstack([draws[k].reshape(len(draws[k]), -1) for k in names])


def run(models: tuple[str, ...], draws: int = 4000) -> dict:
    """Time and accuracy of each method on each model; prints a Markdown table."""
    torch.set_num_threads(1)
    rows = []
    for name in models:
        if name == "conjugate_linear_regression":
            entry = vimodels.get_model(name)
            ex = entry.exact(entry.data())
            target, data, names = name, None, ("beta",)
            ref = {"mean": ex.mean["beta"], "sd": ex.sd["beta"]}
        else:
            data = {"poly26": poly26, "pinned6": pinned6}[name]()
            target, names = regression, ("b0", "beta", "sigma")
            ref = reference(data)
        sd_range = (float(ref["sd"].min()), float(ref["sd"].max()))
        for label, kwargs in METHODS:
            t0 = time.perf_counter()
            try:
                r = vimodels.fit(target, data, progress=False, seed=0, sites=names, **kwargs)
            except vimodels.VimodelsError as exc:
                rows.append({"model": name, "method": label, "error": str(exc)[:200]})
                print(f"{name} / {label}: {exc}", flush=True)
                continue
            wall = time.perf_counter() - t0
            d = _flat(r.sample(draws, sites=names), names)
            err = np.abs(d.mean(0) - ref["mean"]) / ref["sd"]
            ratio = d.std(0) / ref["sd"]
            row = {
                "model": name,
                "method": label,
                "wall_s": wall,
                "worst_mean_error_sd": float(err.max()),
                "sd_ratio_min": float(ratio.min()),
                "sd_ratio_max": float(ratio.max()),
                "elbo": r.elbo,
                "status": r.status,
                "posterior_sd_range": sd_range,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | method | wall s | worst mean error (sd) | sd ratio min-max | ELBO |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | failed: {r['error']} | | | |")
        else:
            print(
                f"| {r['model']} | {r['method']} | {r['wall_s']:.2f} | "
                f"{r['worst_mean_error_sd']:.3f} | {r['sd_ratio_min']:.3f}-{r['sd_ratio_max']:.3f} "
                f"| {r['elbo']:.2f} |"
            )
    return {"name": "mode (issue 18)", "rows": rows, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--draws", type=int, default=4000)
    args = parser.parse_args(argv)
    print(json.dumps({"load_average": os.getloadavg()}))
    run(tuple(args.models), args.draws)
    print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
