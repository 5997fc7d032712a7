"""Train the digits VAE with one objective, evaluate it and write an HTML report.

    python examples/train_digits_vae.py --objective iwae-8-dreg --epochs 300

Smoke test: ``--epochs 1 --num-train 100 --eval-particles 20``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vimodels.vae.evaluate import evaluate_digits_vae
from vimodels.vae.report import write_report
from vimodels.vae.train import parse_objective, train_digits_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="iwae-8", help="trace, trace-stl, iwae-8-dreg...")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--eval-particles", type=int, default=5000)
    parser.add_argument("--out", default="runs/example_digits_vae")
    args = parser.parse_args()

    objective = parse_objective(args.objective)
    result = train_digits_vae(
        objective, epochs=args.epochs, lr=3e-3, num_train=args.num_train, progress=False
    )
    print(f"{objective.tag}: {result.message} ({result.seconds_per_epoch:.3f} s per epoch)")
    evaluation = evaluate_digits_vae(
        result,
        ll_particles=args.eval_particles,
        gap_images=2,
        gap_steps=50,
        gap_particles=args.eval_particles,
        nuts_images=0,
    )
    test = evaluation.summary["test"]
    print(
        f"test log-likelihood {test['log_likelihood']:.3f} +- {test['log_likelihood_mcse']:.3f} "
        f"nats per image (K={test['num_particles']}); test ELBO {test['elbo']:.3f}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "objective": objective.tag,
        "training": result.summary(),
        "evaluation": evaluation.summary,
    }
    arrays = {
        objective.tag: {
            **evaluation.arrays,
            "train_loss": result.train_loss,
            "val_bound": result.val_bound,
        }
    }
    path = write_report(out / "report.html", [summary], arrays)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
