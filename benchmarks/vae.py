"""Digits VAE: test log-likelihood at a fixed wall-clock budget, and time per epoch.

For each objective (default: trace, iwae-8, iwae-8-dreg) train for at most
``--budget`` seconds (optimisation and validation; early stopping on the
validation bound may end sooner), keep the best epoch, and estimate the test
log-likelihood by importance sampling with K = ``--eval-particles`` (default
5000) draws per image.

Time per epoch is measured separately, robustly to other processes on a shared
machine: ``--rounds`` rounds of ``--timing-epochs`` epochs of each objective,
interleaved, keeping each objective's fastest round (median epoch within it).

    python benchmarks/vae.py                      # 3 minutes per objective
    python benchmarks/vae.py --budget 30 --objectives trace iwae-8
    python benchmarks/vae.py --prior-components 0 # the standard-normal prior
    python benchmarks/vae.py --seeds 0 1          # two training seeds per objective

The model and training options default to the trainer's defaults
(:func:`vimodels.vae.train.train_digits_vae`); each run prints the settings it
used and the load average of the machine before and after it.

Not a test: run it by hand and record the numbers (and the machine load it
prints) in benchmarks/README.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from vimodels.vae.evaluate import evaluate_digits_vae
from vimodels.vae.train import parse_objective, train_digits_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["trace", "iwae-8", "iwae-8-dreg"])
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds each")
    parser.add_argument("--epochs", type=int, default=100_000, help="epoch cap")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--lr-patience", type=int, default=None)
    parser.add_argument("--val-particles", type=int, default=64)
    parser.add_argument("--eval-particles", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--prior-components", type=int, default=None, help="0: N(0, I)")
    parser.add_argument("--latent-dim", type=int, default=None)
    parser.add_argument("--hidden-dim", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--timing-epochs", type=int, default=4)
    parser.add_argument("--timing-only", action="store_true", help="only time the epochs")
    args = parser.parse_args()

    network = {
        name: getattr(args, name)
        for name in ("prior_components", "latent_dim", "hidden_dim")
        if getattr(args, name) is not None
    }
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, 1 torch thread")
    print(f"load average before: {_load()}")
    runs: dict[str, list] = {}
    for tag in [] if args.timing_only else args.objectives:
        objective = parse_objective(tag)
        for seed in args.seeds:
            load_before = _load()
            t0 = time.perf_counter()
            result = train_digits_vae(
                objective,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                patience=args.patience,
                lr_patience=args.lr_patience,
                val_particles=args.val_particles,
                time_budget=args.budget,
                seed=seed,
                progress=False,
                **network,
            )
            train_s = time.perf_counter() - t0
            ev = evaluate_digits_vae(
                result, ll_particles=args.eval_particles, gap_images=0, nuts_images=0, seed=seed
            )
            test = ev.summary["test"]
            runs.setdefault(objective.tag, []).append((result, test))
            print(
                f"{objective.tag:14s} seed {seed}  {result.status:13s} epochs "
                f"{result.epochs:5d} (best {result.best_epoch:5d})  "
                f"{result.seconds_per_epoch:.3f} s/epoch  "
                f"test LL {test['log_likelihood']:8.3f} +- {test['log_likelihood_mcse']:.3f} "
                f"(K={test['num_particles']})  test ELBO {test['elbo']:8.3f}  "
                f"[{train_s:.0f} s training incl. validation, {test['seconds']:.0f} s LL; "
                f"load {load_before} -> {_load()}]",
                flush=True,
            )
            print(f"  {result.message}", flush=True)
    if runs:
        first = next(iter(runs.values()))[0][0]
        print(f"settings: {first.settings}")
    timing = epoch_times(args.objectives, args.rounds, args.timing_epochs, args.batch_size, network)
    base = timing.get("trace")
    print()
    print(
        "| objective | seed | epochs (best) | stopped by | test log-lik. (K) | test ELBO "
        "| s / epoch in the run | s / epoch, timed | x trace |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for tag in args.objectives:
        ratio = timing[tag] / base if base else float("nan")
        timed = f"{timing[tag]:.3f} | {ratio:.2f}"
        for result, test in runs.get(tag, [(None, None)]):
            if result is None:
                print(f"| {tag} | - | - | - | - | - | - | {timed} |")
                continue
            stop = {"early_stopped": "early stopping", "time_budget": "budget"}.get(
                result.status, result.status
            )
            print(
                f"| {tag} | {result.settings['seed']} | {result.epochs} ({result.best_epoch}) "
                f"| {stop}, {result.elapsed:.0f} s "
                f"| {test['log_likelihood']:.2f} +- {test['log_likelihood_mcse']:.2f} "
                f"({test['num_particles']}) | {test['elbo']:.2f} "
                f"| {result.seconds_per_epoch:.3f} | {timed} |"
            )
    print(f"\nload average after: {_load()}")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def epoch_times(
    tags: list[str], rounds: int, epochs: int, batch_size: int, network: dict
) -> dict[str, float]:
    """Fastest (over interleaved rounds) median optimisation time of one epoch, seconds."""
    best = {tag: float("inf") for tag in tags}
    for r in range(rounds):
        for tag in tags:
            result = train_digits_vae(
                parse_objective(tag), epochs=epochs, batch_size=batch_size, seed=r,
                progress=False, **network,
            )  # fmt: skip
            best[tag] = min(best[tag], result.seconds_per_epoch)
    return best


if __name__ == "__main__":
    main()
