"""Bring your own Pyro model: a Beta-Binomial with an exact posterior to check against.

Any function ``model(**data)`` works with ``vimodels.svi.fit``; autoguides (``auto_*``)
apply to every model. Here 7 successes in 20 trials under a Beta(2, 2) prior give a
Beta(9, 15) posterior, so the approximation can be checked exactly.

Usage: python examples/user_model.py [--steps 2000]
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from scipy import stats

import vimodels


def coin_model(trials: torch.Tensor, successes: torch.Tensor | None = None) -> None:
    """``p ~ Beta(2, 2)``, ``successes ~ Binomial(trials, p)`` for each experiment."""
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("experiments", trials.shape[0]):
        pyro.sample("successes", dist.Binomial(trials, p), obs=successes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=10_000)
    args = parser.parse_args()

    data = {"trials": [20.0], "successes": [7.0]}
    exact = stats.beta(2 + 7, 2 + 13)
    for guide in ("auto_normal", "auto_iaf_normal", "auto_laplace"):
        result = vimodels.fit(
            coin_model,
            data=data,
            guide=guide,
            num_steps=args.steps,
            lr=0.02,
            num_particles=8,
            progress=False,
        )
        p = result.sample(args.draws)["p"]
        print(
            f"{guide:16s} mean {p.mean():.4f} (exact {exact.mean():.4f})  "
            f"sd {p.std():.4f} (exact {exact.std():.4f})  ELBO {result.elbo:.3f}  "
            f"{result.status}"
        )


if __name__ == "__main__":
    main()
