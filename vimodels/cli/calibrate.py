"""``vimodels calibrate MODEL``: simulation-based calibration of VI methods."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vimodels.cli.basic import add_fit_arguments, fit_kwargs
from vimodels.cli.sweep import add_executor_arguments, make_cli_executor


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` subcommand."""
    p = sub.add_parser(
        "calibrate",
        help="simulation-based calibration (SBC, VSBC) of guides x ELBOs on data simulated "
        "from the model; resumable; runs on a process pool or Dask",
    )
    p.add_argument("model", help="catalog model (see vimodels list models)")
    p.add_argument(
        "--guides",
        nargs="+",
        default=None,
        help="guides to calibrate (default: the model's default guides); 'exact' draws from "
        "the closed-form posterior where the catalog has one",
    )
    p.add_argument("--elbos", nargs="+", default=["trace"], help="ELBOs (default trace)")
    p.add_argument("--sims", type=int, default=200, help="simulated data sets (default 200)")
    p.add_argument(
        "--draws", type=int, default=100, help="approximation draws per simulation, L (ranks 0..L)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.05, help="family-wise level of the tests (default 0.05)"
    )
    p.add_argument(
        "--sites", nargs="+", default=None, help="sites to rank (default: sites of interest)"
    )
    add_fit_arguments(p)
    add_executor_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default runs/calibrate/<model>)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run the calibration; print the tables; exit 1 when a simulation failed, 130 on Ctrl-C."""
    from diagnostics.report import fmt
    from vimodels.runs.calibrate import calibrate, default_out

    options = fit_kwargs(args)
    steps = options.pop("num_steps")
    seed = options.pop("seed")
    options.pop("progress")
    options = {k: v for k, v in options.items() if v not in (None, {})}
    out = Path(args.out) if args.out else default_out(args.model)
    try:
        with make_cli_executor(args) as executor:
            cal = calibrate(
                args.model,
                guides=args.guides,
                elbos=args.elbos,
                sims=args.sims,
                steps=steps,
                num_draws=args.draws,
                seed=seed,
                sites=args.sites,
                fit_options=options,
                alpha=args.alpha,
                executor=executor,
                out=out,
                progress=not args.quiet,
            )
    except KeyboardInterrupt:
        print(
            f"vimodels: calibrate interrupted; finished simulations stay in {out / 'sims'} "
            "and are reused by a rerun",
            file=sys.stderr,
        )
        return 130
    cols = ["method", "ranked", "failed", "not_converged", "verdict", "median_fit_s"]
    print(cal.summary[cols].to_string(index=False, float_format=fmt))
    if not cal.sites.empty:
        print(cal.sites[["method", "site", "verdict", "failing", "vsbc"]].to_string(index=False))
    for row in cal.failures.itertuples(index=False):
        print(
            f"{'FAILED' if row.status == 'failed' else 'not converged'}: sim {row.sim} "
            f"(seed {row.sim_seed}) {row.method} (fit seed {row.fit_seed}): {row.error}",
            file=sys.stderr,
        )
    print(f"wrote {cal.files.get('html')} (and report.md, summary.csv, calibration.json)")
    if cal.partial:
        print("PARTIAL RESULT: interrupted; the report covers the finished simulations")
        return 130
    return 1 if (cal.failures["method"] == "(simulation)").any() else 0
