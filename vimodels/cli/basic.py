"""``vimodels list``, ``fit`` and ``check``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from guides.registry import GENERIC, HANDWRITTEN
from vimodels.catalog.registry import MODELS, get_model
from vimodels.cli.options import parse_options
from vimodels.data import load_arrays
from vimodels.errors import OptionError, check_option
from vimodels.io import atomic_write_json, output_folder, safe_name
from vimodels.svi.by_optimizer import INIT_METHODS
from vimodels.svi.check import check_model
from vimodels.svi.convergence import ConvergenceRule
from vimodels.svi.elbos import ELBOS
from vimodels.svi.fit import fit
from vimodels.svi.reparam import REPARAM_METHODS
from vimodels.usermodel import is_model_spec, load_data, load_model_spec, read_data_map


def register(sub: argparse._SubParsersAction) -> None:
    """Add the basic subcommands."""
    p = sub.add_parser("list", help="list models, guides and ELBOs")
    p.add_argument("what", nargs="?", choices=["models", "guides", "elbos", "all"], default="all")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (README)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "fit",
        help="fit a catalog model or your own (FILE.py:FUNCTION) with SVI",
        description="Fit a model with SVI. " + USER_MODEL_NOTE,
    )
    add_model_arguments(p)
    add_fit_arguments(p)
    add_init_argument(p)
    add_reparam_argument(p)
    p.add_argument("--guide", default="auto_normal")
    p.add_argument("--elbo", default="trace")
    p.add_argument("--draws", type=int, default=1000, help="guide draws written to netcdf")
    p.add_argument(
        "--no-netcdf",
        action="store_true",
        help="write only the JSON summary: no draws, and ArviZ is never imported",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<model>)")
    p.add_argument(
        "--mmap",
        action="append",
        metavar="FILE.npz|KEY=FILE.npy",
        help="data arrays (added to --data's), memory-mapped and read a batch at a time "
        "by plates with subsample_size: data larger than memory (repeatable)",
    )
    p.add_argument(
        "--subsample",
        default="epoch",
        choices=["epoch", "independent", "pyro"],
        help="how subsampled plates draw their rows (default: epoch)",
    )
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("check", help="check a model: log density, gradients, transforms")
    p.add_argument("model")
    p.set_defaults(func=cmd_check)


USER_MODEL_NOTE = (
    "MODEL is a catalog name (vimodels list) or FILE.py:FUNCTION, your own Pyro model: "
    "the file is imported and its code runs, with your rights, as if you ran it yourself "
    "(only give files you trust). Its arguments come from --data FILE (.json object of "
    "name -> number or list, .npz arrays, or .csv columns), renamed with --data-map or --arg."
)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its data and the sites to report (``fit``, ``nuts``, ``compare``)."""
    p.add_argument("model", help="catalog name, or FILE.py:FUNCTION (runs that file's code)")
    p.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="arguments of the model: .json, .npz or .csv (one argument per column)",
    )
    p.add_argument(
        "--data-map",
        default=None,
        metavar="FILE",
        help="TOML or JSON file mapping argument names to data columns",
    )
    p.add_argument(
        "--arg",
        action="append",
        metavar="ARGUMENT=COLUMN",
        help="pass data column COLUMN as the model's argument ARGUMENT (repeatable)",
    )
    p.add_argument(
        "--sites", nargs="+", default=None, help="sites to report (default: the model's)"
    )


def cli_model(args: argparse.Namespace) -> tuple:
    """``(model, data, name)`` for the API from the CLI's model, --data and renames.

    ``model`` is a catalog entry or the user's function; ``data`` is None for a
    catalog entry without --data.
    """
    data_map = read_data_map(args.data_map, args.arg)
    if is_model_spec(args.model):
        fn = load_model_spec(args.model)
        return fn, load_data(args.data, data_map, fn), getattr(fn, "__name__", "user_model")
    entry = get_model(args.model)
    data = load_data(args.data, data_map, entry.model) if args.data is not None else None
    if data is None and data_map:
        raise OptionError("--data-map and --arg rename columns of --data FILE; give one")
    return entry, data, entry.name


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``fit`` and ``compare``."""
    p.add_argument("--steps", type=int, default=2000, help="maximum SVI steps")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument(
        "--lr-decay",
        type=float,
        default=0.1,
        help="final learning rate as a fraction of --lr (1 = constant)",
    )
    p.add_argument("--particles", type=int, default=None, help="particles per step (K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guide-opt",
        action="append",
        metavar="KEY=VALUE",
        help="guide option, e.g. init_scale=0.05 (repeatable)",
    )
    p.add_argument(
        "--elbo-opt",
        action="append",
        metavar="KEY=VALUE",
        help="ELBO option, e.g. alpha=0.5 (repeatable)",
    )
    p.add_argument("--no-jit", action="store_true", help="do not JIT-compile the ELBO")
    p.add_argument(
        "--no-early-stop",
        action="store_true",
        help="run all --steps even once the loss stops improving",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_init_argument(p: argparse.ArgumentParser) -> None:
    """``--init`` of ``fit`` and ``compare``: ``fit(init=...)``, ``none`` for None."""
    p.add_argument(
        "--init",
        default="none",
        choices=("none", *INIT_METHODS),
        help="start the Gaussian autoguides (auto_normal, auto_multivariate_normal, "
        "auto_lowrank_multivariate_normal) at the Laplace approximation or at Pathfinder's "
        "Gaussian; compare starts its other guides as usual (default: none)",
    )


def add_reparam_argument(p: argparse.ArgumentParser) -> None:
    """``--reparam`` of ``fit`` and ``compare``: ``fit(reparam=...)``, ``none`` for None."""
    p.add_argument(
        "--reparam",
        default="none",
        choices=("none", *REPARAM_METHODS),
        help="decenter: fit the model with Pyro's LocScaleReparam(centered=0) on each "
        "latent location-scale site whose location or scale depends on another latent "
        "site (a centered hierarchical model's funnel); results report the model's own "
        "sites. Autoguides only: compare skips hand-written guides (default: none)",
    )


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registries."""
    if args.markdown:
        print(markdown_tables(args.what))
        return 0
    if args.what in ("models", "all"):
        print("models:")
        for name, entry in MODELS.items():
            print(f"  {name:34s} {entry.description}")
    if args.what in ("guides", "all"):
        print("guides (any model):")
        for name, spec in GENERIC.items():
            print(f"  {name:34s} {spec.description}")
        print("guides (hand-written, per model family):")
        for family, specs in HANDWRITTEN.items():
            print(f"  {family}: {', '.join(specs)}")
    if args.what in ("elbos", "all"):
        print("elbos:")
        for name, spec in ELBOS.items():
            print(f"  {name:34s} {spec.description}")
    return 0


def fit_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`vimodels.svi.fit` from parsed CLI options."""
    extra = {"convergence": ConvergenceRule(early_stop=False)} if args.no_early_stop else {}
    return dict(
        **extra,
        num_steps=args.steps,
        lr=args.lr,
        lr_decay=None if args.lr_decay == 1.0 else args.lr_decay,
        num_particles=args.particles,
        seed=args.seed,
        guide_options=parse_options(args.guide_opt, "guide"),
        elbo_options=parse_options(args.elbo_opt, "ELBO"),
        jit=False if args.no_jit else None,
        progress=False if args.quiet else None,
        **({} if getattr(args, "init", "none") == "none" else {"init": args.init}),
        **({} if getattr(args, "reparam", "none") == "none" else {"reparam": args.reparam}),
    )


def fit_file_stem(model: str, guide: str, elbo: str, seed: int) -> str:
    """``<model>__<guide>__<elbo>__seed<k>``: fits of other seeds never replace each other."""
    return safe_name(f"{model}__{guide}__{elbo}__seed{seed}")


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit one model/guide/ELBO; write draws (netcdf, unless ``--no-netcdf``) and a summary.

    ArviZ (seconds to import, benchmarks/README.md 3e) is imported only to write the
    netcdf, after the fit. Exit status: 0, 130 after Ctrl-C (the partial fit is written),
    1 when the fit ended non-finite or diverged (loss, gradient or ELBO estimate; what it
    had is written).
    """
    model, data, name = cli_model(args)
    check_option("--draws", args.draws, kind=int, low=1)
    mapped = data_files(args.mmap)
    if mapped:
        data = {**(data or {}), **mapped}
    sites = tuple(args.sites) if args.sites else None
    kwargs = fit_kwargs(args)
    with output_folder(args.out or Path("runs") / safe_name(name)) as out:
        result = fit(
            model,
            data,
            guide=args.guide,
            elbo=args.elbo,
            sites=sites,
            subsample=args.subsample,
            **kwargs,
        )
        # a decentered fit's files do not replace those of the model as written
        decenter = "+decenter" if result.settings.get("reparam") else ""
        stem = fit_file_stem(name, result.guide_name + decenter, args.elbo, result.seed)
        if result.status == "diverged":  # a failure: the summary says why, no draws
            atomic_write_json(out / f"{stem}.json", result.summary())
            print(
                f"vimodels: error: {result.model_name} / {result.guide_name}: {result.message}",
                file=sys.stderr,
            )
            return 1
        nc = None
        if not args.no_netcdf:
            from diagnostics.convert import save_netcdf  # ArviZ: only for the netcdf

            nc = save_netcdf(result.to_inference_data(args.draws), out / f"{stem}.nc")
        summary = result.summary()
        if nc is not None:
            summary["netcdf"] = nc.name
        atomic_write_json(out / f"{stem}.json", summary)
    print(f"{result.model_name} / {result.guide_name} / {args.elbo}: {result.message}")
    print(
        f"ELBO {result.elbo:.3f} +- {result.elbo_se:.3f} nats, {result.num_steps} steps, "
        f"{result.wall_time:.1f} s"
    )
    written = ([] if nc is None else [str(nc)]) + [str(out / f"{stem}.json")]
    print("wrote " + " and ".join(written))
    if result.status == "interrupted":
        return 130
    if result.status == "nonfinite" or not math.isfinite(result.elbo):
        what = result.message if result.status == "nonfinite" else f"the ELBO is {result.elbo}"
        print(
            f"vimodels: fit failed: {what}; the result is not usable. Lower --lr "
            f"(it was {args.lr:g}) or check the model's support",
            file=sys.stderr,
        )
        return 1
    return 0


def data_files(specs: list[str] | None) -> dict | None:
    """``--mmap`` values as a data dict of memory-mapped arrays (None when there are none)."""
    if not specs:
        return None
    data: dict = {}
    for spec in specs:
        key, sep, path = spec.rpartition("=")
        data.update(load_arrays(path, key if sep else None))
    return data


def cmd_check(args: argparse.Namespace) -> int:
    """Run the model checks and print one line per check; exit 1 if any fails."""
    report = check_model(args.model)
    for item in report:
        print(f"[{'ok' if item.ok else 'FAIL'}] {item.name}: {item.detail}")
    return 0 if all(item.ok for item in report) else 1


def markdown_tables(what: str = "all") -> str:
    """Markdown tables of the registries, as embedded in README.md."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    parts = []
    if what in ("models", "all"):
        rows = [
            "<!-- models -->",
            "| model | sites of interest | guides | description |",
            "|---|---|---|---|",
        ]
        for name, e in MODELS.items():
            flags = " (discrete: `enum` ELBO)" if e.discrete else ""
            rows.append(
                f"| `{name}` | {', '.join(e.sites)} | {', '.join(e.default_guides)} "
                f"| {cell(e.description)}{flags} |"
            )
        parts.append("\n".join(rows + ["<!-- /models -->"]))
    if what in ("guides", "all"):
        rows = [
            "<!-- guides -->",
            "| guide | applies to | options | description |",
            "|---|---|---|---|",
        ]
        for name, spec in GENERIC.items():
            rows.append(
                f"| `{name}` | any model | {', '.join(spec.options)} | {cell(spec.description)} |"
            )
        by_name: dict[str, list[str]] = {}
        desc: dict[str, str] = {}
        for family, specs in HANDWRITTEN.items():
            for name, spec in specs.items():
                by_name.setdefault(name, []).append(family)
                desc.setdefault(name, spec.description)
        for name, families in by_name.items():
            rows.append(
                f"| `{name}` | {', '.join(families)} | init_scale | "
                f"hand-written; e.g. {cell(desc[name])} |"
            )
        parts.append("\n".join(rows + ["<!-- /guides -->"]))
    if what in ("elbos", "all"):
        rows = [
            "<!-- elbos -->",
            "| ELBO | default particles | JIT | options | description |",
            "|---|---|---|---|---|",
        ]
        for name, spec in ELBOS.items():
            rows.append(
                f"| `{name}` | {spec.default_particles} | {'yes' if spec.jit else 'no'} "
                f"| {', '.join(spec.options)} | {cell(spec.description)} |"
            )
        parts.append("\n".join(rows + ["<!-- /elbos -->"]))
    return "\n\n".join(parts)
