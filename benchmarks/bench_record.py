"""Benchmark 7: the project's graph recorder vs ``make_fx`` + ``torch.jit.freeze``.

The NUTS reference evaluates the potential's value and gradient through one
frozen TorchScript graph. Two ways to get that graph:

- ``ours``: :func:`vimodels.compile.record.record` then
  :func:`vimodels.compile.record.simplify_graph` (constants folded, autograd's
  bookkeeping removed), then ``torch.jit.trace`` + ``torch.jit.freeze``;
- ``make_fx``: ``torch.fx.experimental.proxy_tensor.make_fx`` of the same
  value-and-gradient function, then ``torch.jit.trace`` + ``torch.jit.freeze``.

For each model it prints the build time, the operation count, and the time of
one call (median of interleaved batches, so both sides see the same machine
load), and the ratio make_fx / ours. A NUTS reference makes 10^5 to 10^6 such
calls. The first ``make_fx`` of a process also imports torch's dynamo stack:
``first_make_fx_s`` is that one-off cost, measured in a fresh process.

Usage: python benchmarks/bench_record.py [--calls N] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diagnostics.nuts import kernel  # noqa: E402
from vimodels.catalog.registry import get_model  # noqa: E402
from vimodels.compile.record import count_ops  # noqa: E402

MODELS = ("eight_schools_noncentered", "radon_contextual", "sleepstudy_random_slopes")


def _potential(name: str) -> tuple[kernel.FlatPotential, torch.Tensor]:
    entry = get_model(name)
    setup = kernel._setup(entry.model, entry.data(), [0], entry.max_plate_nesting, jit=False)
    z0 = torch.as_tensor(setup.z0[0], dtype=setup.dtype)
    return setup.potential, z0


def _build(tracer, fn, z0, simplify: bool):
    t = time.perf_counter()
    with warnings.catch_warnings(), kernel._validation_off():
        warnings.simplefilter("ignore")
        graph = tracer(kernel._value_and_grad_fn(fn), z0)
    if simplify:
        graph = kernel._simplified(graph, z0)
    compiled = kernel._freeze(graph, z0)
    return compiled, count_ops(graph), time.perf_counter() - t


def _per_call(fns: dict, z: torch.Tensor, calls: int, rounds: int = 7) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():  # interleaved: the same load for both
            t = time.perf_counter()
            for _ in range(calls):
                f(z)
            times[k].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def first_make_fx_cost() -> float:
    code = (
        "import time, torch; t=time.perf_counter();"
        "from torch.fx.experimental.proxy_tensor import make_fx;"
        "make_fx(lambda x: (x * 2).sin())(torch.ones(3)); print(time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(models=MODELS, calls: int = 2000) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for name in models:
        potential, z0 = _potential(name)
        fn = potential.python_potential
        ours, ops_ours, t_ours = _build(kernel._record, fn, z0, simplify=True)
        theirs, ops_theirs, t_theirs = _build(kernel._make_fx, fn, z0, simplify=False)
        z = z0 + 0.05
        g1, u1 = ours(z)
        g2, u2 = theirs(z)
        assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-8) and torch.allclose(u1, u2)
        per = _per_call({"ours": ours, "make_fx": theirs}, z, calls)
        rows.append(
            {
                "model": name,
                "dim": int(z0.numel()),
                "ops_ours": ops_ours,
                "ops_make_fx": ops_theirs,
                "build_ours_s": round(t_ours, 3),
                "build_make_fx_s": round(t_theirs, 3),
                "call_ours_us": round(per["ours"] * 1e6, 1),
                "call_make_fx_us": round(per["make_fx"] * 1e6, 1),
                "ratio_make_fx_over_ours": round(per["make_fx"] / per["ours"], 2),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    rows = run(args.models, args.calls)
    print(f"first make_fx in a fresh process: {first_make_fx_cost():.2f} s")
    ratios = [r["ratio_make_fx_over_ours"] for r in rows]
    print(
        f"per-call ratio make_fx / ours: {', '.join(map(str, ratios))}; "
        f"geometric mean {float(np.exp(np.mean(np.log(ratios)))):.2f}"
    )


if __name__ == "__main__":
    main()
