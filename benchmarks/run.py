"""Run the benchmarks and print each ratio against its baseline, measured in the same run.

Usage: python benchmarks/run.py [--only NAME ...] [--quick] [--json FILE]

Benchmarks (issue #6), in the order they run:

  overhead         1. fit() vs a hand-written SVI loop doing the same work
  first_call       1. the same, each the first call in a fresh process
  default_speed    2. fit() defaults vs a user's default loop, 8 particles
  default_speed_1  2. the same with 1 particle
  nuts             3. NUTS reference vs plain Pyro and NumPyro (bench extra), compile included
  accuracy         4. time until VI means are within 0.2 NUTS sd, vs the NUTS time
  time_to_accuracy 4b. every method (L-BFGS starts too) to means 0.2 sd, sds 20 %, 16 models
  vae              5. digits VAE: trace vs IWAE-8 (runs benchmarks/vae.py)
  memory           6. peak memory of `vimodels compare eight_schools_noncentered`
  mode            10. L-BFGS mode + Laplace, Pathfinder, init="laplace" vs Adam (issue 18)
  calibrate        9. calibration throughput: serial vs local pool vs Dask (2 workers)

All of them take about an hour and a half on a 2-core machine; ``--quick``
shortens each (fewer steps, draws, entries or epochs: indicative only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_accuracy  # noqa: E402
import bench_calibrate  # noqa: E402
import bench_fit  # noqa: E402
import bench_memory  # noqa: E402
import bench_mode  # noqa: E402
import bench_nuts  # noqa: E402
import bench_time_to_accuracy  # noqa: E402


def _overhead(quick: bool) -> dict:
    return bench_fit.overhead(**({"num_steps": 300, "repeats": 1} if quick else {}))


def _first_call(quick: bool) -> dict:
    return bench_fit.first_call(**({"num_steps": 300, "repeats": 1} if quick else {}))


def _default_speed(quick: bool) -> dict:
    return bench_fit.default_speed(**({"num_steps": 300, "repeats": 1} if quick else {}))


def _default_speed_1(quick: bool) -> dict:
    return bench_fit.default_speed_one_particle(
        **({"num_steps": 300, "repeats": 1} if quick else {})
    )


def _nuts(quick: bool) -> dict:
    return bench_nuts.nuts_benchmark(repeats=1 if quick else 3, quick=quick)


def _accuracy(quick: bool) -> dict:
    entries = ("eight_schools_noncentered",) if quick else bench_accuracy.ENTRIES
    return bench_accuracy.accuracy_benchmark(entries, quick=quick)


def _time_to_accuracy(quick: bool) -> dict:
    models = ("eight_schools_noncentered", "pdb_mesquite_logvolume") if quick else None
    with tempfile.TemporaryDirectory() as tmp:  # NUTS measured in this run, same load
        return bench_time_to_accuracy.run(
            models or bench_time_to_accuracy.MODELS, every=25, draws=2000, seed=0, cache_dir=tmp
        )


def _vae(quick: bool) -> dict:
    cmd = [sys.executable, str(HERE / "vae.py")]
    if quick:
        cmd += ["--timing-only", "--rounds", "2", "--timing-epochs", "2"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    rc = subprocess.run(cmd, env=env).returncode
    return {"name": "vae (see the table above)", "returncode": rc}


def _memory(quick: bool) -> dict:
    return bench_memory.memory_benchmark(steps=300 if quick else None)


def _mode(quick: bool) -> dict:
    models = ("pinned6", "conjugate_linear_regression") if quick else bench_mode.MODELS
    return bench_mode.run(models, draws=1000 if quick else 4000)


def _calibrate(quick: bool) -> dict:
    # the README's figure: 200 simulations x 3 methods of short fits on each executor
    kw = {"steps": 100, "num_eval": 100, "jit": False}
    return bench_calibrate.calibrate_benchmark(**({**kw, "sims": 10} if quick else kw))


BENCHMARKS: dict[str, Callable[[bool], dict]] = {
    "overhead": _overhead,
    "first_call": _first_call,
    "default_speed": _default_speed,
    "default_speed_1": _default_speed_1,
    "nuts": _nuts,
    "accuracy": _accuracy,
    "time_to_accuracy": _time_to_accuracy,
    "vae": _vae,
    "memory": _memory,
    "mode": _mode,
    "calibrate": _calibrate,
}


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "numpyro": bench_nuts.have_numpyro(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(
            x for x in __doc__.splitlines() if x.startswith("Benchmarks") or x.startswith("  ")
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="shorter runs (indicative only)")
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args(argv)
    print(json.dumps(machine()), flush=True)
    results = []
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        res = BENCHMARKS[name](args.quick)
        if res.get("ratio") is not None:
            ok = "meets" if res["ratio"] <= res["target"] else "MISSES"
            print(
                f"{res['name']}: ours {res['ours_s']:.4g} s vs baseline {res['baseline_s']:.4g} s"
                f" -> ratio {res['ratio']:.3f} ({ok} target {res['target']})"
                + (
                    f"; CPU {res['ours_cpu_s']:.4g} s vs {res['baseline_cpu_s']:.4g} s"
                    f" -> ratio {res['cpu_ratio']:.3f}"
                    if "cpu_ratio" in res
                    else ""
                ),
                flush=True,
            )
        results.append(res)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "results": results}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
