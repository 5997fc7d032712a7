"""Benchmark 6: peak memory of ``vimodels compare eight_schools_noncentered``.

The command runs in a subprocess, twice: on an empty reference cache (NUTS
runs in worker processes, then the fits run in a process pool) and on the
warm cache (fits only). Three figures per run:

- ``maxrss_children``: ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after
  the subprocess ends. This is the peak RSS of the *largest single* process
  among the descendants, not of the whole tree: worker processes running
  side by side are not added up.
- ``tree_rss_peak``: the largest sum of RSS over the live process tree,
  sampled from ``/proc`` every ``--interval`` seconds (Linux). RSS counts
  shared library pages (torch's ~200 MB of code) once per process, so this
  overstates physical memory.
- ``tree_pss_peak``: the same with PSS (``/proc/<pid>/smaps_rollup``), which
  splits shared pages among the processes sharing them: the physical memory
  the tree holds.

The per-process peaks and the number of live processes at the peak say what
dominates.

``--per-fit``: instead, the memory a long-lived process gains per JIT fit (RSS
growth over repeated short fits of eight schools with Pyro's ``JitTrace_ELBO``,
and over repeated uncached compiled steps), with TorchScript traces in
compilation units of their own (:mod:`vimodels.compile.units`, the default)
against the baseline (torch's global unit, where nothing is ever freed), each
in a fresh process, interleaved.

Usage: python benchmarks/bench_memory.py [--steps N] [--interval S] [--model NAME]
       [--cache-dir DIR] [compare options, e.g. --jobs 1 or --executor serial]
       python benchmarks/bench_memory.py --per-fit [--fits N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children_of(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _kib(path: str, key: str) -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"
    if "spawn_main" in raw or "forkserver" in raw:
        return "multiprocessing worker"
    return raw.strip()[:80]


# A fresh wrapper process per run, so that its RUSAGE_CHILDREN covers that run only.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[2:]).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def measure(cmd: list[str], interval: float, env: dict, maxrss_file: Path) -> dict:
    """Run ``cmd`` and sample the memory of its process tree until it ends."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, str(maxrss_file), *cmd],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_rss, peak_pss, peak_n = 0, 0, 0
    per_process: dict[int, dict] = {}
    at_peak: list[dict] = []
    while proc.poll() is None:
        rss_sum = pss_sum = 0
        live = []
        for pid in _descendants(proc.pid)[1:]:  # not the wrapper
            rss = _kib(f"/proc/{pid}/status", "VmRSS:")
            pss = _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
            if rss is None:
                continue
            rss_sum += rss
            pss_sum += pss or 0
            rec = per_process.setdefault(pid, {"what": _cmdline(pid), "rss_peak_kib": 0})
            rec["rss_peak_kib"] = max(rec["rss_peak_kib"], rss)
            live.append({"pid": pid, "what": rec["what"], "rss_kib": rss, "pss_kib": pss})
        if pss_sum > peak_pss:
            peak_pss, at_peak = pss_sum, live
        peak_rss = max(peak_rss, rss_sum)
        peak_n = max(peak_n, len(live))
        time.sleep(interval)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {
        "wall_s": wall,
        "maxrss_children_mib": int(maxrss_file.read_text()) / 1024,  # KiB on Linux
        "tree_rss_peak_mib": peak_rss / 1024,
        "tree_pss_peak_mib": peak_pss / 1024,
        "max_live_processes": peak_n,
        "processes": sorted(
            (
                {"what": v["what"], "rss_peak_mib": v["rss_peak_kib"] / 1024}
                for v in per_process.values()
            ),
            key=lambda r: -r["rss_peak_mib"],
        ),
        "at_pss_peak": [
            {
                "what": r["what"],
                "rss_mib": r["rss_kib"] / 1024,
                "pss_mib": (r["pss_kib"] or 0) / 1024,
            }
            for r in at_peak
        ],
    }


def memory_benchmark(
    model: str = "eight_schools_noncentered",
    steps: int | None = None,
    interval: float = 0.1,
    extra: tuple[str, ...] = (),
    cache_dir: str | None = None,
) -> dict:
    """Cold-cache and warm-cache runs of ``vimodels compare``; see the module docstring.

    With ``cache_dir`` (a reference cache that already holds the model's reference),
    only the warm-cache run.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        base = [sys.executable, "-m", "vimodels.cli", "compare", model, "--quiet"]
        base += ["--cache", cache_dir or str(Path(tmp) / "cache")]
        if steps:
            base += ["--steps", str(steps)]
        base += list(extra)
        for label in ("warm cache",) if cache_dir else ("cold cache", "warm cache"):
            cmd = base + ["--out", str(Path(tmp) / label.replace(" ", "_"))]
            res = measure(cmd, interval, env, Path(tmp) / f"maxrss-{len(rows)}")
            rows[label] = res
            print(
                f"{label}: {res['wall_s']:.1f} s; ru_maxrss (largest process) "
                f"{res['maxrss_children_mib']:.0f} MiB; process tree peak: "
                f"RSS {res['tree_rss_peak_mib']:.0f} MiB, PSS {res['tree_pss_peak_mib']:.0f} MiB,"
                f" up to {res['max_live_processes']} processes",
                flush=True,
            )
            for r in res["at_pss_peak"]:
                print(
                    f"    at the PSS peak: {r['what']}: RSS {r['rss_mib']:.0f} MiB,"
                    f" PSS {r['pss_mib']:.0f} MiB",
                    flush=True,
                )
    return {"name": f"memory: vimodels compare {model}", "rows": rows}


PER_FIT_CHILD = ROOT / "tests" / "compile" / "jit_memory_child.py"


def per_fit_benchmark(fits: int = 30, compiled_steps: int = 10, repeats: int = 2) -> dict:
    """MB gained per JIT fit and per compiled step: private units vs torch's global unit.

    Each run is a fresh process (``tests/compile/jit_memory_child.py``); the
    two variants alternate, ``repeats`` times each.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows: dict[str, list[dict]] = {"baseline (global unit)": [], "private units": []}
    for _ in range(repeats):
        for label, flag in (("baseline (global unit)", ["--baseline"]), ("private units", [])):
            cmd = [sys.executable, str(PER_FIT_CHILD), "--fits", str(fits)]
            cmd += ["--steps", str(compiled_steps), *flag]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[label].append(res)
            print(
                f"{label}: {res['mb_per_fit']:.2f} MB/fit ({fits} JIT fits of 10 steps, "
                f"{res['s_per_fit']:.2f} s/fit), {res['mb_per_step']:.2f} MB per compiled "
                f"step ({compiled_steps}, {res['s_per_step']:.2f} s each); functions left in "
                f"torch's global unit: {res['global_unit_functions_added']}",
                flush=True,
            )
    return {"name": "memory per JIT fit: private compilation units vs global", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="eight_schools_noncentered")
    parser.add_argument("--steps", type=int, help="SVI steps per fit (default: compare's)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--cache-dir", help="a warm reference cache: run only the warm case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--per-fit", action="store_true", help="MB per JIT fit (see above)")
    parser.add_argument("--fits", type=int, default=30, help="--per-fit: fits per process")
    parser.add_argument("--repeats", type=int, default=2, help="--per-fit: processes per variant")
    args, extra = parser.parse_known_args(argv)
    if args.per_fit:
        res = per_fit_benchmark(args.fits, repeats=args.repeats)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    res = memory_benchmark(args.model, args.steps, args.interval, tuple(extra), args.cache_dir)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
