"""Benchmark 8 (issue 20): minibatch SVI whose cost per step does not grow with the data.

A logistic regression (``D`` features, ``auto_normal``) with
``pyro.plate("n", N, subsample_size=batch)`` is fitted for ``--steps`` steps
(early stopping off) at each ``N``; every fit runs in its own subprocess, so
each peak memory is its own. Rows up to ``--mmap-from`` are in memory, larger
ones in a memory-mapped ``.npy`` written under a temporary folder (float32;
removed afterwards; the free disk space is checked first) and passed as
``np.load(path, mmap_mode="r")``, read a batch at a time.

Per ``N``:

- ``step_ms``: the loop's wall time per step (first, validated step included);
- ``fit_s``: ``fit()`` end to end; ``fixed_s = fit_s - loop``: data checks, the
  model and guide checks, set-up and the final ELBO (1000 draws on 100
  batches), and ``fixed_share = fixed_s / fit_s`` (target: under 0.2);
- ``pyro_step_ms``: the same model with Pyro's own index draws
  (``subsample="pyro"``: ``torch.randperm(N)`` per step), ``--pyro-steps`` steps;
- ``cpu_s``: CPU time of the fit, ``step_cpu_ms`` per step (steps 2 to the last) and
  ``fixed_cpu_s`` the rest; the process's one-off import of ``torch._dynamo`` (by the
  first ``torch.optim.Adam``), ``warmup_cpu_s``, is timed before the fit, apart;
- ``peak_rss_mb`` (``VmHWM``) and, at the end, ``anon_mb`` (``RssAnon``: memory the
  process owns) and ``file_mb`` (``RssFile``: mapped file pages the kernel can drop);
- ``rows_read``: rows copied out of a memory-mapped file, against ``N``.

The target: ``step_ms`` at the largest ``N`` within 1.5x of the smallest, and
``fixed_share`` under 0.2 at every ``N``.

Usage: python benchmarks/bench_minibatch.py [--sizes 1e4 1e5 1e6 1e7] [--batch 1000]
       [--steps 2000] [--dim 20] [--mmap-from 1e7] [--pyro-steps 50] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def logreg(x, y, batch=None):
    """Bayesian logistic regression whose rows are subsampled by the plate."""
    import pyro
    import pyro.distributions as dist

    n, d = x.shape
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("n", n, subsample_size=batch) as idx:
        logits = (x[idx] * w).sum(-1) + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])


def make_data(n: int, d: int, folder: Path | None, seed: int = 0) -> dict:
    """``x`` (n, d) and ``y`` (n,), float32; written in chunks to .npy files in ``folder``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d) * 0.5
    if folder is None:
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w)))).astype(np.float32)
        return {"x": x, "y": y}
    xf = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(n, d))
    yf = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.float32, shape=(n,))
    step = 1_000_000
    for a in range(0, n, step):
        b = min(n, a + step)
        x = rng.normal(size=(b - a, d)).astype(np.float32)
        xf[a:b] = x
        yf[a:b] = rng.random(b - a) < 1 / (1 + np.exp(-(x @ w)))
    xf.flush()
    yf.flush()
    del xf, yf
    return {"x": folder / "x.npy", "y": folder / "y.npy"}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def worker(args: argparse.Namespace) -> dict:
    """One size, in this process: the fit, Pyro's draws for comparison, memory."""
    import vimodels
    from vimodels.data import RowArray, load_arrays

    n = int(float(args.worker))
    # A process's first torch.optim.Adam imports torch._dynamo (about 1.5 s of CPU on the
    # development machine): a one-off per process, whatever N, timed apart here.
    c = time.process_time()
    import torch._dynamo  # noqa: F401

    warmup_cpu_s = time.process_time() - c
    folder = Path(args.folder) if args.folder else None
    t0 = time.perf_counter()
    raw = make_data(n, args.dim, folder)
    make_s = time.perf_counter() - t0
    if folder is not None:
        x, y = load_arrays(raw["x"])["x"], load_arrays(raw["y"])["y"]
        data = {"x": RowArray("x", x), "y": RowArray("y", y)}
    else:
        data = dict(raw)
    rule = vimodels.ConvergenceRule(early_stop=False)
    marks: dict[int, float] = {}

    def cpu_mark(progress) -> None:
        if progress.step in (1, args.steps):
            marks[progress.step] = time.process_time()

    cpu0 = time.process_time()
    t = time.perf_counter()
    r = vimodels.fit(
        logreg,
        data={**data, "batch": args.batch},
        num_steps=args.steps,
        convergence=rule,
        progress=False,
        callback=cpu_mark,
    )
    fit_s = time.perf_counter() - t
    cpu_s = time.process_time() - cpu0
    rows_read = data["x"].rows_read if folder is not None else None
    mem = _status()
    t = time.perf_counter()
    p = vimodels.fit(
        logreg,
        data={**data, "batch": args.batch},
        num_steps=args.pyro_steps,
        convergence=rule,
        progress=False,
        subsample="pyro",
        num_eval=2,
    )
    return {
        "N": n,
        "batch": args.batch,
        "memory_mapped": folder is not None,
        "steps": r.num_steps,
        "step_ms": 1e3 * r.wall_time / r.num_steps,
        "fit_s": fit_s,
        "loop_s": r.wall_time,
        "fixed_s": fit_s - r.wall_time,
        "fixed_share": (fit_s - r.wall_time) / fit_s,
        "cpu_s": cpu_s,
        "step_cpu_ms": 1e3 * (marks[args.steps] - marks[1]) / (args.steps - 1),
        "fixed_cpu_s": cpu_s - (marks[args.steps] - marks[1]),
        "elbo": r.elbo,
        "elbo_se": r.elbo_se,
        "pyro_step_ms": 1e3 * p.wall_time / p.num_steps,
        "pyro_steps": p.num_steps,
        "pyro_fit_s": time.perf_counter() - t,
        "peak_rss_mb": mem.get("VmHWM"),
        "anon_mb": mem.get("RssAnon"),
        "file_mb": mem.get("RssFile"),
        "rows_read": rows_read,
        "data_s": make_s,
        "warmup_cpu_s": warmup_cpu_s,
        "subsample": r.settings["subsample"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every size in a subprocess and print a table (and JSON with ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1e4", "1e5", "1e6", "1e7"])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=20)
    ap.add_argument("--mmap-from", default="1e7", help="memory-map data of this many rows or more")
    ap.add_argument("--pyro-steps", type=int, default=50, help="steps with Pyro's randperm")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for size in args.sizes:
        n = int(float(size))
        folder = None
        cmd = [sys.executable, __file__, "--worker", str(n)]
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--dim", str(args.dim)]
        cmd += ["--pyro-steps", str(args.pyro_steps)]
        if n >= int(float(args.mmap_from)):
            folder = Path(tempfile.mkdtemp(prefix="bench_minibatch_"))
            need = n * (args.dim + 1) * 4
            free = shutil.disk_usage(folder).free
            if free < 2 * need:
                print(f"N={n}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free; skipped")
                continue
            cmd += ["--folder", str(folder)]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        print(
            f"N={n:>9} mmap={row['memory_mapped']!s:5} step {row['step_ms']:.2f} ms "
            f"(cpu {row['step_cpu_ms']:.2f}; pyro {row['pyro_step_ms']:.2f}) "
            f"fit {row['fit_s']:.2f} s fixed {row['fixed_s']:.2f} s "
            f"({100 * row['fixed_share']:.0f}%) cpu {row['cpu_s']:.1f} s, fixed "
            f"{row['fixed_cpu_s']:.2f} s ({100 * row['fixed_cpu_s'] / row['cpu_s']:.0f}%) "
            f"warmup {row['warmup_cpu_s']:.2f} s "
            f"peak {row['peak_rss_mb']:.0f} MB anon {row['anon_mb']:.0f} MB "
            f"rows_read {row['rows_read']} elbo {row['elbo']:.1f}+-{row['elbo_se']:.1f} "
            f"load {row['load']:.1f}",
            flush=True,
        )
    if rows:
        ratio = rows[-1]["step_ms"] / rows[0]["step_ms"]
        ratio_cpu = rows[-1]["step_cpu_ms"] / rows[0]["step_cpu_ms"]
        worst = max(r["fixed_share"] for r in rows)
        worst_cpu = max(r["fixed_cpu_s"] / r["cpu_s"] for r in rows)
        print(
            f"step time N={rows[-1]['N']} / N={rows[0]['N']}: wall {ratio:.2f}, CPU "
            f"{ratio_cpu:.2f} (target 1.5); largest fixed share: wall {100 * worst:.0f}%, "
            f"CPU {100 * worst_cpu:.0f}% (target 20%); "
            f"self maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
