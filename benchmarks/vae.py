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

Not a test: run it by hand and record the numbers (and the machine load it
prints) in benchmarks/README.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from vimodels.vae_eval import evaluate_digits_vae
from vimodels.vae_train import parse_objective, train_digits_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["trace", "iwae-8", "iwae-8-dreg"])
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds each")
    parser.add_argument("--epochs", type=int, default=100_000, help="epoch cap")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--lr-patience", type=int, default=None)
    parser.add_argument("--eval-particles", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--timing-epochs", type=int, default=4)
    parser.add_argument("--timing-only", action="store_true", help="only time the epochs")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, 1 torch thread")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    runs = {}
    for tag in [] if args.timing_only else args.objectives:
        objective = parse_objective(tag)
        t0 = time.perf_counter()
        result = train_digits_vae(
            objective,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            patience=args.patience,
            lr_patience=args.lr_patience,
            time_budget=args.budget,
            seed=args.seed,
            progress=False,
        )
        train_s = time.perf_counter() - t0
        ev = evaluate_digits_vae(
            result, ll_particles=args.eval_particles, gap_images=0, nuts_images=0, seed=args.seed
        )
        test = ev.summary["test"]
        runs[objective.tag] = (result, test)
        print(
            f"{objective.tag:14s} {result.status:13s} epochs {result.epochs:5d} "
            f"(best {result.best_epoch:5d})  {result.seconds_per_epoch:.3f} s/epoch  "
            f"test LL {test['log_likelihood']:8.3f} +- {test['log_likelihood_mcse']:.3f} "
            f"(K={test['num_particles']})  test ELBO {test['elbo']:8.3f}  "
            f"[{train_s:.0f} s training incl. validation, {test['seconds']:.0f} s LL]",
            flush=True,
        )
    timing = epoch_times(args.objectives, args.rounds, args.timing_epochs, args.batch_size)
    base = timing.get("trace")
    print()
    print(
        "| objective | epochs (best) | test log-lik. (K) | test ELBO | s / epoch in the run "
        "| s / epoch, timed | x trace |"
    )
    print("|---|---|---|---|---|---|---|")
    for tag in args.objectives:
        ratio = timing[tag] / base if base else float("nan")
        if tag in runs:
            result, test = runs[tag]
            cells = (
                f"{result.epochs} ({result.best_epoch}) "
                f"| {test['log_likelihood']:.2f} +- {test['log_likelihood_mcse']:.2f} "
                f"({test['num_particles']}) | {test['elbo']:.2f} | {result.seconds_per_epoch:.3f}"
            )
        else:
            cells = "- | - | - | -"
        print(f"| {tag} | {cells} | {timing[tag]:.3f} | {ratio:.2f} |")
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def epoch_times(tags: list[str], rounds: int, epochs: int, batch_size: int) -> dict[str, float]:
    """Fastest (over interleaved rounds) median optimisation time of one epoch, seconds."""
    best = {tag: float("inf") for tag in tags}
    for r in range(rounds):
        for tag in tags:
            result = train_digits_vae(
                parse_objective(tag), epochs=epochs, batch_size=batch_size, seed=r, progress=False
            )
            best[tag] = min(best[tag], result.seconds_per_epoch)
    return best


if __name__ == "__main__":
    main()
