"""``vimodels sweep CONFIG.toml``, and the executor options it shares with ``compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vimodels.io import output_folder

EXECUTOR_CHOICES = ("local", "dask", "serial")


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor``, ``--scheduler`` and ``--jobs``."""
    p.add_argument(
        "--executor",
        choices=EXECUTOR_CHOICES,
        default="local",
        help="where the fits run: local (process pool, default), dask (a LocalCluster, or "
        "--scheduler), serial (this process)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="address of a running dask scheduler, e.g. tcp://10.0.0.5:8786 (with --executor dask)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes of the local pool or the dask LocalCluster (default: the cores)",
    )


def make_cli_executor(args: argparse.Namespace):
    """The executor the options ask for (checked; nothing starts until it is used)."""
    from vimodels.runs.executors import make_executor

    return make_executor(args.executor, scheduler=args.scheduler, workers=args.jobs)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of models x guides x ELBOs x seeds (TOML) on a process pool or "
        "Dask; resumable; one combined report",
    )
    p.add_argument("config", help="sweep configuration (TOML; see examples/sweep_small.toml)")
    add_executor_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default runs/sweep/<config name>)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the sweep; print the table per model; exit 1 when a task failed, 130 on Ctrl-C."""
    from diagnostics.report import fmt
    from vimodels.runs.config import load_config
    from vimodels.runs.report import partial_line
    from vimodels.runs.sweep import default_out, run_sweep

    config = load_config(args.config)
    out = Path(args.out) if args.out else default_out(args.config)
    try:
        with output_folder(out), make_cli_executor(args) as executor:
            run = run_sweep(config, out, executor, progress=not args.quiet)
    except KeyboardInterrupt as exc:  # before the report: say what is kept
        kept = f"no report was written; fits finished so far stay in {out / 'fits'}"
        print(
            f"vimodels: sweep interrupted: {str(exc) or kept + ', reused by a rerun'}",
            file=sys.stderr,
        )
        return 130
    if not run.by_method.empty:
        cols = [
            c
            for c in (
                "model",
                "method",
                "seeds",
                "elbo_mean",
                "elbo_sd",
                "gap_mean",
                "khat_mean",
                "w1_mean_mean",
                "converged",
            )
            if c in run.by_method
        ]
        print(run.by_method[cols].to_string(index=False, float_format=fmt))
    print(
        f"{len(run.tasks)} fit(s): {len(run.executed)} run, {len(run.reused)} reused, "
        f"{sum(f.stage == 'fit' for f in run.failures)} failed"
    )
    for failure in run.failures:
        print(f"FAILED {failure.label}", file=sys.stderr)
    print(f"wrote {run.files['html']} (and report.md, summary.csv, sweep.json) in {run.out}")
    if run.partial:
        print(f"PARTIAL RESULT: {partial_line(run)}")
        return 130
    summary = run.summary
    if "failed" in summary and summary["failed"].fillna(False).astype(bool).any():
        bad = summary[summary["failed"].fillna(False).astype(bool)]
        print(
            f"vimodels: sweep: {len(bad)} fit(s) failed (diverged or non-finite): "
            + ", ".join(f"{r.model}/{r.method}/seed{r.seed} ({r.status})" for r in bad.itertuples())
            + "; the others are in the report",
            file=sys.stderr,
        )
        return 1
    return 1 if run.failures else 0
