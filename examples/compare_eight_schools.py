"""Compare variational families on eight schools (non-centered) against NUTS.

Runs the Python API step by step: the cached NUTS reference, a few fits,
the comparison and the report. Run it with::

    python examples/compare_eight_schools.py --steps 2000 --out runs/eight_schools_example

Small arguments (``--steps 50 --nuts-warmup 100 --nuts-samples 100``) make a
smoke test: the reference is then too short to pass its checks, and the
report says so.
"""

from __future__ import annotations

import argparse

from diagnostics import compare, get_reference, write_report
from vimodels.svi.fit import fit

MODEL = "eight_schools_noncentered"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="maximum SVI steps per fit")
    p.add_argument("--out", default="runs/eight_schools_example", help="report folder")
    p.add_argument("--guides", nargs="+", default=["mean_field", "full_rank", "structured"])
    p.add_argument("--draws", type=int, default=4000, help="guide draws per method")
    p.add_argument("--nuts-chains", type=int, default=None)
    p.add_argument("--nuts-warmup", type=int, default=None)
    p.add_argument("--nuts-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    settings = {
        "num_chains": args.nuts_chains,
        "num_warmup": args.nuts_warmup,
        "num_samples": args.nuts_samples,
    }
    reference = get_reference(MODEL, settings=settings, seed=args.seed, progress=True)
    print(reference.describe())

    results = [
        fit(MODEL, guide=g, num_steps=args.steps, seed=args.seed, progress=False)
        for g in args.guides
    ]
    comparison = compare(results, reference, num_draws=args.draws, seed=args.seed)
    print(
        comparison.summary[
            ["method", "elbo", "gap", "khat", "worst_sd_ratio", "coverage_min"]
        ].to_string(index=False)
    )
    for lesson in comparison.lessons:
        print("-", lesson)
    files = write_report(comparison, args.out)
    print("report:", files["html"])
    return 0


if __name__ == "__main__":  # guard needed: NUTS chains may run in spawned processes
    raise SystemExit(main())
