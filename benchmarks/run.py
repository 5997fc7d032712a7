"""Run the benchmarks and print each ratio against its baseline, measured in the same run.

Usage: python benchmarks/run.py [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_fit  # noqa: E402

BENCHMARKS = {
    "overhead": bench_fit.overhead,
    "default_speed": bench_fit.default_speed,
    "default_speed_1": bench_fit.default_speed_one_particle,
}


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_1min": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()
    print(json.dumps(machine()))
    results = []
    for name in args.only or BENCHMARKS:
        kwargs = {"num_steps": 300, "repeats": 1} if args.quick else {}
        res = BENCHMARKS[name](**kwargs)
        ok = "meets" if res["ratio"] <= res["target"] else "MISSES"
        print(
            f"{res['name']}: ours {res['ours_s']:.4g} s vs baseline {res['baseline_s']:.4g} s"
            f" -> ratio {res['ratio']:.3f} ({ok} target {res['target']})",
            flush=True,
        )
        results.append(res)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
