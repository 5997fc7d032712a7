"""Benchmark 3f (issue 17): what one lockstep round's potential costs, and what would cut it.

For each model: the NUTS reference's batched potential (value and gradient of
4 chains at once, the frozen TorchScript graph that ``diagnostics.nuts.kernel``
builds) against ``torch.compile`` (Inductor, C++ codegen) of the same vmapped
graph, which fuses the pointwise operations. Prints per call: microseconds,
the number of ATen operations in the frozen graph, Inductor's compile time,
the ratio, and the break-even number of rounds (compile time over the saving
per round). The NNC fuser of TorchScript is reported as available or not
(CPU wheels are built without LLVM).

Usage: python benchmarks/bench_potential.py [--models NAME ...] [--calls N] [--no-inductor]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diagnostics.nuts import kernel  # noqa: E402
from vimodels.catalog.registry import get_model  # noqa: E402

DEFAULT_MODELS = ("pdb_gp_pois_regr_pc", "eight_schools_noncentered", "pdb_kidiq_interaction")


def per_call_us(fn, x, calls: int) -> float:
    """Median over 5 blocks of ``calls // 5`` calls, microseconds per call."""
    for _ in range(100):
        fn(x)
    block = max(1, calls // 5)
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(block):
            fn(x)
        out.append((time.perf_counter() - t) / block * 1e6)
    return float(np.median(out))


def bench(name: str, calls: int, inductor: bool) -> dict:
    """One model's row."""
    if name == "regression":  # benchmark 3's badly conditioned regression (N = 5000, 26 params)
        import bench_nuts

        model, data, nesting = bench_nuts.regression_model, bench_nuts.regression_data(), None
    else:
        entry = get_model(name)
        model, data, nesting = entry.model, entry.data(), entry.max_plate_nesting
    setup = kernel._setup(model, data, [0, 1, 2, 3], nesting, True)
    example = np.stack(setup.z0)
    batched = kernel.BatchedPotential(setup.potential, example)
    row = {"model": name, "dim": setup.potential.dim, "mode": batched.mode}
    if batched.mode != "vmap":
        return row
    graph = batched._batched.graph
    row["ops"] = sum(1 for n in graph.nodes() if n.kind().startswith("aten::"))
    row["frozen_us"] = per_call_us(batched, example, calls)
    if inductor:
        x = torch.as_tensor(example, dtype=setup.potential.dtype)
        vg = torch.func.vmap(setup.potential.graph)
        t = time.perf_counter()
        compiled = torch.compile(vg, dynamic=False)
        ref_g, ref_u = batched._forward(x)
        g, u = compiled(x)
        row["compile_s"] = time.perf_counter() - t
        row["max_rel_diff"] = float(((g - ref_g).abs() / ref_g.abs().clamp_min(1e-12)).max())
        row["inductor_us"] = per_call_us(compiled, x, calls)
        saving = row["frozen_us"] - row["inductor_us"]
        row["break_even_rounds"] = (row["compile_s"] * 1e6 / saving) if saving > 0 else None
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--no-inductor", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # measure a cold compile: no kernels reused from an earlier run's cache
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    print(f"NNC fuser with LLVM available: {torch._C._llvm_enabled()}")
    print(
        "| model | D | frozen graph ops | frozen us/call | Inductor compile s | Inductor us/call "
        "| Inductor / frozen | break-even rounds | gradient max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.calls, not args.no_inductor)
        if "frozen_us" not in r:
            print(f"| {name} | {r['dim']} | batched mode {r['mode']} | | | | | | |")
            continue
        ind = r.get("inductor_us")
        print(
            f"| {name} | {r['dim']} | {r['ops']} | {r['frozen_us']:.0f} | "
            + (
                f"{r['compile_s']:.1f} | {ind:.0f} | {ind / r['frozen_us']:.2f} | "
                f"{r['break_even_rounds'] or float('inf'):.0f} | {r['max_rel_diff']:.1e} |"
                if ind is not None
                else "- | - | - | - | - |"
            )
        )


if __name__ == "__main__":
    main()
