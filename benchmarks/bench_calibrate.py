"""Benchmark 9: calibration throughput on the serial executor, the local pool and Dask.

Runs ``vimodels.calibrate`` on ``eight_schools_noncentered`` with three methods
(mean_field, full_rank, structured; ``trace``) on each executor in turn, each
into a fresh folder, and reports the wall time, the fits per second and the
scaling ratio against the serial executor (start-up of the pool or the
cluster included). It also checks that every executor wrote the same
records (ranks, seeds, statuses), bit for bit.

Usage: python benchmarks/bench_calibrate.py [--sims 200] [--steps 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODEL = "eight_schools_noncentered"
GUIDES = ("mean_field", "full_rank", "structured")
_CPU_FIELDS = ("user", "system", "children_user", "children_system")


def _records(folder: Path) -> dict:
    out = {}
    for path in sorted((folder / "sims").glob("*.json")):
        rec = json.loads(path.read_text())
        rec.pop("wall_time_s")
        for m in rec["methods"].values():
            m.pop("wall_time_s")
        out[path.name] = rec
    return out


def calibrate_benchmark(
    sims: int = 200,
    steps: int = 2000,
    workers: int = 2,
    executors: tuple[str, ...] = ("serial", "local", "dask"),
    num_draws: int = 100,
) -> dict:
    """Time the same calibration on each executor; return the rows and the scaling ratios."""
    import vimodels

    rows = {}
    records = {}
    with tempfile.TemporaryDirectory(prefix="bench-calibrate-") as tmp:
        for name in executors:
            out = Path(tmp) / name
            cpu0 = os.times()
            t0 = time.perf_counter()
            cal = vimodels.calibrate(
                MODEL,
                guides=list(GUIDES),
                sims=sims,
                steps=steps,
                num_draws=num_draws,
                executor=name,
                workers=None if name == "serial" else workers,
                out=out,
                report=False,
            )
            wall = time.perf_counter() - t0
            cpu1 = os.times()
            fits = sims * len(GUIDES)
            rows[name] = {
                "wall_s": wall,
                "fits": fits,
                "fits_per_s": fits / wall,
                "driver_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                # with the worker processes reaped when the pool or cluster closed
                "cpu_s": sum(getattr(cpu1, f) - getattr(cpu0, f) for f in _CPU_FIELDS),
                "failed": int(cal.summary["failed"].sum()),
                "not_converged": int(cal.summary["not_converged"].sum()),
                "verdicts": {m: v for m, v in zip(cal.summary["method"], cal.summary["verdict"])},
            }
            records[name] = _records(out)
            print(
                f"{name:7s} {fits} fits in {wall:7.1f} s: {fits / wall:.3f} fits/s "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    base = rows.get("serial", {}).get("fits_per_s")
    for r in rows.values():
        r["scaling_vs_serial"] = r["fits_per_s"] / base if base else None
    first = next(iter(records.values()))
    same = {name: recs == first for name, recs in records.items()}
    print(
        "scaling vs serial: "
        + ", ".join(f"{k} {v['scaling_vs_serial']:.2f}x" for k, v in rows.items())
        + f"; identical records: {same}",
        flush=True,
    )
    return {
        "name": f"calibrate {MODEL} x {len(GUIDES)} methods, {sims} sims, {workers} workers",
        "rows": rows,
        "identical_records": same,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument(
        "--executors",
        nargs="+",
        default=["serial", "local", "dask"],
        choices=["serial", "local", "dask"],
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    res = calibrate_benchmark(
        args.sims, args.steps, args.workers, tuple(args.executors), args.draws
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
