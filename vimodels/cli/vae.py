"""``vimodels vae``: train and evaluate the digits VAE under one objective.

Each run writes ``<out>/<objective>/checkpoint.pt`` (resumable with
``--resume``), ``result.json`` and ``arrays.npz``, then rebuilds
``<out>/report.html`` from every objective found in ``<out>``, so running the
command once per objective gives one comparison report. Runs made with other
settings than their objective (``--latent-dim``, ``--num-train`` ...) are
reported with a column for each setting that differs, and a line says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vimodels.errors import check_option
from vimodels.io import atomic_write, atomic_write_json, output_folder, safe_name

DEFAULT_OUT = Path("runs") / "digits_vae"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``vae`` subcommand."""
    p = sub.add_parser("vae", help="train and evaluate the digits VAE (one objective per run)")
    p.add_argument("--elbo", default="trace", help="trace, meanfield, iwae or weighted_kl")
    p.add_argument("--particles", type=int, default=None, help="particles per step (K of iwae)")
    p.add_argument("--estimator", default="standard", help="standard; stl (trace) or dreg (iwae)")
    p.add_argument("--beta", type=float, default=None, help="KL weight of weighted_kl")
    p.add_argument("--epochs", type=int, default=500, help="maximum epochs (in total)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--patience", type=int, default=30, help="early-stopping patience (epochs)")
    p.add_argument(
        "--lr-patience", type=int, default=None, help="reduce the lr after N flat epochs"
    )
    p.add_argument("--lr-factor", type=float, default=0.3, help="lr reduction factor")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam L2 penalty")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument(
        "--prior-components",
        type=int,
        help="components of the learned Gaussian-mixture prior (default 30; 0: N(0, I))",
    )
    p.add_argument("--num-train", type=int, default=None, help="use only N training images")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--eval-particles", type=int, default=5000, help="K for the test log-lik.")
    p.add_argument("--num-test", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--gap-images", type=int, default=20, help="test images for the gaps")
    p.add_argument("--gap-steps", type=int, default=500, help="optimisation steps of q*")
    p.add_argument("--nuts-images", type=int, default=3, help="test images run with NUTS")
    p.add_argument("--nuts-warmup", type=int, default=300)
    p.add_argument("--nuts-samples", type=int, default=300)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_vae)


def cmd_vae(args: argparse.Namespace) -> int:
    """Train, evaluate, save and report."""
    from vimodels.vae.train import Objective

    for name in ("eval_particles", "gap_steps"):
        check_option(f"--{name.replace('_', '-')}", getattr(args, name), kind=int, low=2)
    for name in ("gap_images", "nuts_images"):
        check_option(f"--{name.replace('_', '-')}", getattr(args, name), kind=int, low=0)
    objective = Objective(args.elbo, args.particles, args.estimator, args.beta)
    # the folders are removed again if the run fails before writing anything
    with (
        output_folder(args.out or DEFAULT_OUT) as out,
        output_folder(out / safe_name(objective.tag)) as run_dir,
    ):
        return _train_evaluate_report(args, objective, out, run_dir)


def _train_evaluate_report(args: argparse.Namespace, objective, out: Path, run_dir: Path) -> int:
    from vimodels.vae.evaluate import evaluate_digits_vae
    from vimodels.vae.report import differing_settings, write_report
    from vimodels.vae.train import train_digits_vae

    result = train_digits_vae(
        objective,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        lr_patience=args.lr_patience,
        lr_factor=args.lr_factor,
        seed=args.seed,
        time_budget=args.time_budget,
        checkpoint=run_dir / "checkpoint.pt",
        resume=args.resume,
        progress=False if args.quiet else None,
        num_train=args.num_train,
        latent_dim=args.latent_dim,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        # None: the trainer's default
        **({} if args.prior_components is None else {"prior_components": args.prior_components}),
    )
    print(f"{objective.tag}: {result.message}")
    print(f"{result.epochs} epochs, {result.seconds_per_epoch:.3f} s per epoch")
    evaluation = evaluate_digits_vae(
        result,
        ll_particles=args.eval_particles,
        gap_images=args.gap_images,
        gap_steps=args.gap_steps,
        gap_particles=args.eval_particles,
        nuts_images=args.nuts_images,
        nuts_warmup=args.nuts_warmup,
        nuts_samples=args.nuts_samples,
        num_test=args.num_test,
        seed=args.seed,
    )
    summary = {
        "objective": objective.tag,
        "training": result.summary(),
        "evaluation": evaluation.summary,
        # what the report shows where runs in one folder differ (besides the training's)
        "evaluation_settings": {
            name: getattr(args, name)
            for name in ("gap_images", "gap_steps", "nuts_images", "nuts_warmup", "nuts_samples")
        },
    }
    atomic_write_json(run_dir / "result.json", summary)
    arrays = {
        **evaluation.arrays,
        "train_loss": result.train_loss,
        "val_bound": result.val_bound,
    }
    atomic_write(run_dir / "arrays.npz", lambda tmp: _save_npz(tmp, arrays))
    test = evaluation.summary["test"]
    flag = (
        f"; k-hat >= 0.7 for {test['khat_bad']} images: not to be trusted"
        if test.get("khat_bad")
        else ""
    )
    print(
        f"test log-likelihood {test['log_likelihood']:.3f} +- {test['log_likelihood_mcse']:.3f} "
        f"nats per image (K={test['num_particles']}{flag}), test ELBO {test['elbo']:.3f}"
    )
    gap = evaluation.summary["gap"]
    if gap:
        print(
            f"approximation gap {gap['approximation_gap']:.3f}, amortization gap "
            f"{gap['amortization_gap']:.3f} nats ({gap['num_data']} images)"
        )
    summaries, all_arrays = collect_runs(out)
    differing = differing_settings(summaries)
    if differing:
        print(
            f"the runs in {out} differ in more than their objective: {', '.join(differing)} "
            "(the report shows them as columns)"
        )
    report = write_report(out / "report.html", summaries, all_arrays)
    print(f"wrote {run_dir} and {report}")
    return 0


def _save_npz(path: str, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def collect_runs(out: Path) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """Read every ``<out>/*/result.json`` and ``arrays.npz`` (no pickles), sorted by name."""
    summaries, arrays = [], {}
    for run in sorted(p for p in Path(out).iterdir() if (p / "result.json").is_file()):
        summary = json.loads((run / "result.json").read_text(encoding="utf-8"))
        summaries.append(summary)
        if (run / "arrays.npz").is_file():
            with np.load(run / "arrays.npz", allow_pickle=False) as npz:
                arrays[summary.get("objective", run.name)] = {k: npz[k] for k in npz.files}
    return summaries, arrays
