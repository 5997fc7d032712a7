"""Import time of the NUTS reference path, the package and the CLI, against ``import torch, pyro``.

Usage::

    python benchmarks/bench_import.py [--repeats 5] [--top 15] [--other-tree DIR] [--nuts] [--fit]

Each measurement is a fresh interpreter running ``python -X importtime -c "import X"``;
its figure is the sum of the cumulative times of the top-level imports (what the
interpreter spent importing, start-up of Python itself excluded). The targets run
interleaved, ``--repeats`` rounds, and the medians are printed with their ratio to the
baseline ``import torch, pyro`` (which every target needs anyway) measured in the same
rounds. ``--other-tree DIR`` measures the same targets on another checkout of the
project (e.g. the commit before a change) in the same rounds, for a before/after table.
``--top K`` lists the K most expensive modules (cumulative) of the last round of each
target. ``--nuts`` adds ``vimodels nuts eight_schools_noncentered`` end to end
(4 chains x 200 + 200 draws, no cache), split into import and the rest. ``--fit`` adds
a tiny ``vimodels fit eight_schools_noncentered`` (5 steps, no JIT) end to end, writing the
netcdf (1000 draws, the default) and, in this tree only, with ``--no-netcdf``, into a
temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {
    "baseline: torch, pyro": "import torch, pyro",
    "diagnostics.nuts.reference": "import diagnostics.nuts.reference",
    "vimodels": "import vimodels",
    "vimodels.cli (--help)": "import vimodels.cli.main",
    "numpy": "import numpy",
}
NUTS_ARGS = (
    "nuts eight_schools_noncentered --no-cache --quiet --chains 4 --warmup 200 --samples 200"
)
FIT_ARGS = "fit eight_schools_noncentered --steps 5 --no-jit --quiet"
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> list[tuple[int, int, int, str]]:
    """``(self_us, cumulative_us, depth, module)`` of every line of ``-X importtime``."""
    rows = []
    for line in stderr.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    return rows


def total_seconds(rows: list[tuple[int, int, int, str]]) -> float:
    """Seconds spent importing: the cumulative times of the top-level imports, summed."""
    return sum(cum for _, cum, depth, _ in rows if depth == 0) / 1e6


def measure(args: list[str], tree: Path) -> tuple[float, float, list]:
    """Run ``python -X importtime ARGS`` with ``tree`` first on the path.

    Returns (import seconds, wall seconds of the process, parsed rows).
    """
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if res.returncode not in (0, 1):  # `vimodels nuts` exits 1 on an untrusted reference
        raise RuntimeError(f"{args} failed:\n{res.stderr[-2000:]}")
    rows = parse_importtime(res.stderr)
    return total_seconds(rows), wall, rows


def top_modules(rows: list[tuple[int, int, int, str]], k: int) -> list[tuple[str, float]]:
    """The ``k`` modules with the largest cumulative import time (seconds)."""
    return [(name, cum / 1e6) for _, cum, _, name in sorted(rows, key=lambda r: -r[1])[:k]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--top", type=int, default=0, help="list the K costliest modules per target")
    p.add_argument("--other-tree", type=Path, help="another checkout, measured in the same rounds")
    p.add_argument("--nuts", action="store_true", help="add `vimodels nuts` end to end")
    p.add_argument("--fit", action="store_true", help="add a tiny `vimodels fit` end to end")
    args = p.parse_args(argv)
    out = tempfile.TemporaryDirectory()

    trees = {"this": ROOT}
    if args.other_tree is not None:
        trees["other"] = args.other_tree.resolve()
    jobs = {(label, t): ["-c", code] for label, code in TARGETS.items() for t in trees}
    if args.nuts:
        for t in trees:
            jobs[("vimodels nuts (end to end)", t)] = ["-m", "vimodels.cli", *NUTS_ARGS.split()]
    if args.fit:
        fit = ["-m", "vimodels.cli", *FIT_ARGS.split(), "--out", out.name]
        for t in trees:
            jobs[("vimodels fit, 5 steps (netcdf)", t)] = fit
        # this tree only: checkouts before the option have no --no-netcdf
        jobs[("vimodels fit, 5 steps --no-netcdf", "this")] = [*fit, "--no-netcdf"]
    times: dict = {key: [] for key in jobs}
    walls: dict = {key: [] for key in jobs}
    last_rows: dict = {}
    for r in range(args.repeats):
        for key, cmd in jobs.items():
            imp, wall, rows = measure(cmd, trees[key[1]])
            times[key].append(imp)
            walls[key].append(wall)
            last_rows[key] = rows
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"import time, median of {args.repeats} fresh processes (1-min load {load:.1f})")
    print(f"{'target':<42} {'tree':<6} {'import s':>9} {'process s':>10} {'x baseline':>11}")
    for key in jobs:
        base = statistics.median(times[("baseline: torch, pyro", key[1])])
        med = statistics.median(times[key])
        print(
            f"{key[0]:<42} {key[1]:<6} {med:>9.2f} {statistics.median(walls[key]):>10.2f} "
            f"{med / base:>11.2f}"
        )
    if args.top:
        for key, rows in last_rows.items():
            print(f"\n{key[0]} ({key[1]}): costliest modules, cumulative s (last round)")
            for name, sec in top_modules(rows, args.top):
                print(f"  {sec:7.2f}  {name}")
    out.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
