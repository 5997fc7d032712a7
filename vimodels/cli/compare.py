"""``vimodels nuts`` and ``vimodels compare``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from vimodels.cli.basic import (
    USER_MODEL_NOTE,
    add_fit_arguments,
    add_init_argument,
    add_model_arguments,
    add_reparam_argument,
    cli_model,
    fit_kwargs,
)
from vimodels.cli.sweep import add_executor_arguments, make_cli_executor
from vimodels.errors import check_option
from vimodels.io import atomic_write_json, ensure_dir, output_folder, safe_name


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``nuts`` and ``compare`` subcommands."""
    p = sub.add_parser(
        "nuts",
        help="NUTS reference draws of a model (cached, checked)",
        description="NUTS reference draws of a model, checked and cached. " + USER_MODEL_NOTE,
    )
    add_model_arguments(p)
    _add_nuts_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    p.add_argument(
        "--out", default=None, help="also write reference.nc and reference.json into this folder"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_nuts)

    p = sub.add_parser(
        "compare",
        help="fit guides x ELBOs, compare with the reference, report",
        description="Fit guides x ELBOs, compare with the reference, write the report. "
        + USER_MODEL_NOTE,
    )
    add_model_arguments(p)
    p.add_argument(
        "--guides",
        nargs="+",
        default=None,
        help="guide names (default: the model's default guides + auto_iaf_normal)",
    )
    p.add_argument(
        "--elbos",
        nargs="+",
        default=None,
        help="ELBO names (default trace; enum for a model with discrete latent sites)",
    )
    add_fit_arguments(p)
    add_init_argument(p)
    add_reparam_argument(p)
    p.add_argument("--out", default=None, help="output folder (default runs/<model>/compare)")
    p.add_argument(
        "--reference",
        choices=["auto", "nuts", "exact", "external"],
        default="auto",
        help="auto: exact draws where the catalog has a sampler, else NUTS; external: "
        "posteriordb's draws (pdb_* models)",
    )
    p.add_argument("--draws", type=int, default=4000, help="guide draws per method")
    p.add_argument("--iwae-k", type=int, default=50, help="K of the IWAE bound")
    p.add_argument("--no-netcdf", action="store_true", help="do not write netcdf files")
    _add_nuts_arguments(p)
    add_executor_arguments(p)
    p.set_defaults(func=cmd_compare)


def _add_nuts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chains", type=int, default=None, help="NUTS chains (default: the model's)")
    p.add_argument("--warmup", type=int, default=None, help="NUTS warm-up draws per chain")
    p.add_argument("--samples", type=int, default=None, help="NUTS kept draws per chain")
    p.add_argument(
        "--target-accept", type=float, default=None, help="NUTS target acceptance probability"
    )
    p.add_argument("--max-tree-depth", type=int, default=None)
    p.add_argument("--no-nuts-jit", action="store_true", help="do not JIT-compile the potential")
    p.add_argument(
        "--sampler",
        choices=("auto", "nutpie", "vimodels", "pyro"),
        default=None,
        help="NUTS implementation: the project's (default), auto (nutpie up to 64 "
        "dimensions, else the project's), nutpie or pyro.infer.NUTS",
    )
    p.add_argument(
        "--chain-method",
        choices=("lockstep", "independent"),
        default=None,
        help="run the chains together with one batched gradient per leapfrog step "
        "(default, faster) or each on its own",
    )
    p.add_argument(
        "--metric",
        choices=("diag", "dense", "low_rank", "auto"),
        default=None,
        help="the project's NUTS metric: diagonal, dense or low_rank (for correlated "
        "posteriors) or auto (up to 64 dimensions dense given enough warm-up, else "
        "low_rank; diagonal above) (default: the model's)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes running chains (default: 1 in lockstep, else one per chain up to "
        "the cores)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="reference cache folder (default $VIMODELS_CACHE or the user cache)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")


def _nuts_settings(args: argparse.Namespace) -> dict:
    out = {
        "num_chains": args.chains,
        "num_warmup": args.warmup,
        "num_samples": args.samples,
        "target_accept_prob": args.target_accept,
        "max_tree_depth": args.max_tree_depth,
        "sampler": args.sampler,
        "chain_method": args.chain_method,
        "metric": args.metric,
    }
    if args.no_nuts_jit:
        out["jit_compile"] = False
    return {k: v for k, v in out.items() if v is not None}


def cmd_nuts(args: argparse.Namespace) -> int:
    """Run (or load) the NUTS reference; print its checks; exit 1 when it is untrusted."""
    from diagnostics.nuts.reference import run_nuts
    from diagnostics.reparam import retry_reparameterized

    model, data, _ = cli_model(args)
    options = {
        "sites": tuple(args.sites) if args.sites else None,
        "settings": _nuts_settings(args),
        "seed": args.seed,
        "cache": not args.no_cache,
        "cache_dir": args.cache,
        "force": args.force,
        "num_workers": args.workers,
        "progress": not args.quiet,
    }
    try:
        ref = run_nuts(model, data, **options)
        # failing its checks on a funnel: retried with the centered sites decentered
        ref = retry_reparameterized(model, data, ref, **options)
    except KeyboardInterrupt:  # the cache entry is written only after every chain finished
        print("vimodels: NUTS interrupted; no reference was cached or written", file=sys.stderr)
        return 130
    print(ref.describe())
    for check in ref.checks:
        print(f"[{'ok' if check.ok else 'FAIL'}] {check.detail}")
    for note in ref.notes:
        print(f"note: {note}")
    print(format_rows(ref.site_rows()))
    if ref.from_cache:
        print(f"loaded from cache {ref.cache_path}")
    else:
        print(
            f"computed in {ref.wall_time:.1f} s"
            + (f"; cached at {ref.cache_path}" if ref.cache_path else "")
        )
    if args.out:
        from diagnostics.convert import reference_to_inference_data, save_netcdf  # ArviZ

        out = ensure_dir(args.out)
        save_netcdf(reference_to_inference_data(ref), out / "reference.nc")
        atomic_write_json(out / "reference.json", ref.summary())
        print(f"wrote {out / 'reference.nc'} and {out / 'reference.json'}")
    return 0 if ref.trusted else 1


def format_rows(rows: list[dict]) -> str:
    """Rows as a text table, columns right-aligned, floats to 4 significant digits.

    What ``DataFrame.to_string(index=False)`` printed, without importing pandas
    (a second of start-up; benchmarks/README.md, "Import time").
    """
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = [" ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [" ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


_NO_REPORT = "no report was written; fits finished so far stay in {} and a rerun reuses them"


def cmd_compare(args: argparse.Namespace) -> int:
    """Fit the grid, compare with the reference and write the report."""
    from vimodels.runs.compare import run_compare
    from vimodels.runs.config import check_grid_names, default_elbos, default_guides

    model, data, name = cli_model(args)
    check_option("--draws", args.draws, kind=int, low=10)
    entry = model if not callable(model) else None
    # a typo in --guides/--elbos: exit 2 before any work (run_compare checks too)
    check_grid_names(
        args.guides or default_guides(entry), args.elbos or default_elbos(entry), entry
    )
    out = Path(args.out) if args.out else Path("runs") / safe_name(name) / "compare"
    kwargs = fit_kwargs(args)
    kwargs.pop("num_steps")
    seed = kwargs.pop("seed")
    # the executors run catalog models by name; a user's model or data fits in this process
    by_name = data is None and not callable(model)
    try:
        executor_context = make_cli_executor(args) if by_name else contextlib.nullcontext()
        with output_folder(out), executor_context as executor:
            run = run_compare(
                model,
                data=data,
                sites=tuple(args.sites) if args.sites else None,
                guides=args.guides,
                elbos=args.elbos,
                steps=args.steps,
                out=out,
                reference=args.reference,
                seed=seed,
                num_draws=args.draws,
                iwae_k=args.iwae_k,
                cache=not args.no_cache,
                cache_dir=args.cache,
                nuts_settings=_nuts_settings(args),
                num_workers=args.workers,
                fit_options=kwargs,
                progress=not args.quiet,
                netcdf=not args.no_netcdf,
                executor=executor,
            )
    except KeyboardInterrupt as exc:  # before the report: say what is kept
        print(
            f"vimodels: compare interrupted: {str(exc) or _NO_REPORT.format(out / 'fits')}",
            file=sys.stderr,
        )
        return 130
    c = run.comparison
    for line in c.skipped:  # pairs that could not run: visible, whatever --quiet says
        print(f"vimodels: warning: skipped {line}", file=sys.stderr)
    cols = [
        "method",
        "elbo",
        "gap",
        "khat",
        "khat_verdict",
        "w1_mean",
        "worst_sd_ratio",
        "coverage_min",
        "converged",
        "wall_time_s",
    ]
    cols = [x for x in cols if x in c.summary]
    print(c.summary[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if not c.reference.trusted:
        print("WARNING: the reference is UNTRUSTED (fails its checks): see the report")
    for flag in c.flags:
        print(f"flag: {flag}")
    print(
        f"wrote {run.files['html']} (and report.md, summary.csv, diagnostics.json, "
        f"netcdf files) in {out}"
    )
    if c.partial:
        print(f"PARTIAL RESULT: {c.interrupted_line()}")
        return 130
    if "failed" in c.summary and c.summary["failed"].any():
        bad = c.summary[c.summary["failed"]]
        print(
            "vimodels: compare: "
            + "; ".join(f"{r.method} failed ({r.status})" for r in bad.itertuples())
            + f"; the others are compared in {run.files['html']}",
            file=sys.stderr,
        )
        return 1
    return 0
