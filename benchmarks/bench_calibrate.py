"""Benchmark 9: calibration throughput on the serial executor, the local pool and Dask.

Runs ``vimodels.calibrate`` on ``eight_schools_noncentered`` with three methods
(mean_field, full_rank, structured; ``trace``) on each executor in turn, each
into a fresh folder, and reports the wall time, the fits per second and the
scaling ratio against the serial executor (start-up of the pool or the
cluster included). It also checks that every executor wrote the same
records (ranks, seeds, statuses), bit for bit.

CPU time (user + system of this process and of the reaped worker
processes) is reported per fit next to the wall time: on a shared machine
the ideal scaling ratio is limited by the CPU the workers get, not by their
number, and the CPU time per fit shows what each executor adds to the work.

Usage: python benchmarks/bench_calibrate.py [--sims 200] [--steps 2000] [--workers 2]
           [--num-eval 1000]

The full-size figure of benchmarks/README.md (200 simulations x 3 methods
per executor) is ``--sims 200 --steps 100 --num-eval 100 --no-jit``: short fits
(about half a CPU-second each) so the three runs fit in an hour on a busy
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODEL = "eight_schools_noncentered"
GUIDES = ("mean_field", "full_rank", "structured")


class TreeCPU:
    """CPU time (user + system) of this process and every process it starts, meanwhile.

    A thread polls the descendants (``psutil``) every ``interval`` seconds and
    keeps each one's last reading, so worker processes count whether or not
    this process reaps them (a Dask nanny's worker is its grandchild); what a
    worker spends in its last ``interval`` before it exits is missed.
    """

    def __init__(self, interval: float = 0.25):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._start = self._own()

    def _own(self) -> float:
        t = self._me.cpu_times()
        return t.user + t.system

    def _poll(self, interval: float) -> None:
        while not self._stop.is_set():
            for child in self._me.children(recursive=True):
                try:
                    with child.oneshot():
                        t = child.cpu_times()
                        self._seen[(child.pid, child.create_time())] = t.user + t.system
                except self._psutil.Error:
                    continue  # gone meanwhile: its last reading stays
            self._stop.wait(interval)

    def __enter__(self) -> TreeCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.own = self._own() - self._start
        self.children = sum(self._seen.values())
        self.total = self.own + self.children


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
    num_eval: int | None = None,
    jit: bool | None = None,
) -> dict:
    """Time the same calibration on each executor; return the rows and the scaling ratios."""
    import vimodels

    rows = {}
    records = {}
    fit_options: dict = {} if num_eval is None else {"num_eval": num_eval}
    if jit is not None:
        fit_options["jit"] = jit
    with tempfile.TemporaryDirectory(prefix="bench-calibrate-") as tmp:
        for name in executors:
            out = Path(tmp) / name
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            with TreeCPU() as tree:
                cal = vimodels.calibrate(
                    MODEL,
                    guides=list(GUIDES),
                    sims=sims,
                    steps=steps,
                    num_draws=num_draws,
                    executor=name,
                    workers=None if name == "serial" else workers,
                    fit_options=fit_options,
                    out=out,
                    report=False,
                )
            wall = time.perf_counter() - t0
            fits = sims * len(GUIDES)
            cpu = tree.total
            rows[name] = {
                "wall_s": wall,
                "fits": fits,
                "fits_per_s": fits / wall,
                "driver_cpu_s": tree.own,
                # this process and every process it started (pool workers, Dask's
                # scheduler-side threads are in driver_cpu_s, its nannies and workers here)
                "cpu_s": cpu,
                "cpu_s_per_fit": cpu / fits,
                "fit_wall_s_median": float(cal.summary["median_fit_s"].median()),
                "load_before": load0,
                "load_after": os.getloadavg(),
                "failed": int(cal.summary["failed"].sum()),
                "not_converged": int(cal.summary["not_converged"].sum()),
                "verdicts": {m: v for m, v in zip(cal.summary["method"], cal.summary["verdict"])},
            }
            records[name] = _records(out)
            print(
                f"{name:7s} {fits} fits in {wall:7.1f} s: {fits / wall:.3f} fits/s, "
                f"{cpu / fits:.3f} CPU-s per fit "
                f"(load {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after)",
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
        "settings": {
            "sims": sims,
            "steps": steps,
            "num_draws": num_draws,
            "num_eval": num_eval,
            "jit": jit,
            "workers": workers,
        },
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
        "--num-eval", type=int, default=None, help="draws of each fit's final ELBO estimate"
    )
    parser.add_argument(
        "--executors",
        nargs="+",
        default=["serial", "local", "dask"],
        choices=["serial", "local", "dask"],
    )
    parser.add_argument(
        "--no-jit",
        action="store_true",
        help="fit without the JIT ELBO (each JIT fit leaves its traced graph in torch's "
        "global compilation unit: 16-19 MB per short fit, which adds up over hundreds of fits)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    res = calibrate_benchmark(
        args.sims,
        args.steps,
        args.workers,
        tuple(args.executors),
        args.draws,
        args.num_eval,
        False if args.no_jit else None,
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
