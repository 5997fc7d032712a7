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

With ``--before REV`` it instead compares the recorder of git revision
``REV`` (``vimodels/compile/record.py`` as committed there, loaded from git)
with the working tree's, on the graphs the fits build: the value-and-gradient
potentials of the L-BFGS mode search (``vimodels.mode.fast``) on two
posteriordb models, the NUTS kernel's potential on a radon model, and the
compiled SVI step of eight schools. For each it checks that both give the
same simplified graph (the same op count, and outputs equal bit for bit at
two random points, frozen and not) and prints the build time (record +
simplify + freeze, interleaved, best of ``--rounds``) and the time of one
call of each frozen graph (median of interleaved batches).

Usage: python benchmarks/bench_record.py [--calls N] [--models NAME ...] [--before REV]
"""

from __future__ import annotations

import argparse
import contextlib
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


# ----------------------------------------------------------------------------- before/after


def _recorder_at(rev: str):
    """``vimodels/compile/record.py`` as committed at ``rev``, as a module of its own."""
    import types

    src = subprocess.run(
        ["git", "show", f"{rev}:vimodels/compile/record.py"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"record_at_{rev}")
    exec(compile(src, f"record.py@{rev}", "exec"), module.__dict__)  # noqa: S102
    return module


def _mode_case(name: str):
    """The L-BFGS potential's value-and-gradient function and start (as mode/fast.py records)."""
    from vimodels.mode.fast import _eager_value_and_grad
    from vimodels.mode.lbfgs import potential_for

    potential = potential_for(name, None)
    u0 = potential.init_values.detach().clone().to(potential.dtype)
    return (lambda u: _eager_value_and_grad(potential, u)), (u0,), True


def _nuts_case(name: str):
    """The NUTS kernel's ``z -> (grad, value)`` and start."""
    potential, z0 = _potential(name)
    return kernel._value_and_grad_fn(potential.python_potential), (z0,), True


def _step_case(name: str, guide: str = "mean_field"):
    """The compiled SVI step's function of the parameters (recorded, then frozen: no simplify)."""
    import pyro
    from pyro.infer import Trace_ELBO

    import vimodels
    from vimodels.compile import step as step_module

    fit = vimodels.fit(name, guide=guide, num_steps=3, num_eval=10, progress=False)
    seen: dict = {}
    original = step_module.record

    def capture(fn, *example):
        seen["fn"], seen["example"] = fn, example
        return original(fn, *example)

    step_module.record = capture
    try:
        with pyro.get_param_store().scope(fit.param_state):
            step_module.compile_step(
                Trace_ELBO(max_plate_nesting=fit.max_plate_nesting), fit.model, fit.guide, fit.args
            )
    finally:
        step_module.record = original
    state = fit.param_state
    return seen["fn"], seen["example"], False, state


CASES = {
    "mode:pdb_mesquite_logvolume": lambda: _mode_case("pdb_mesquite_logvolume"),
    "mode:pdb_earnings_logearn_interaction": lambda: _mode_case("pdb_earnings_logearn_interaction"),
    "nuts:radon_contextual": lambda: _nuts_case("radon_contextual"),
    "step:eight_schools_noncentered": lambda: _step_case("eight_schools_noncentered"),
}


def _built(rec, fn, example, simplify: bool):
    t = time.perf_counter()
    with warnings.catch_warnings(), kernel._validation_off():
        warnings.simplefilter("ignore")
        graph = rec.record(fn, *example)
        if simplify:
            graph = rec.simplify_graph(graph, *example)
        frozen = rec.freeze(graph, *example)
    return graph, frozen, time.perf_counter() - t


def _same_bits(a, b) -> bool:
    """Equal element by element (NaN equal to NaN, -0.0 to 0.0) with the same dtype and shape."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all())
        for x, y in zip(a, b)
    )


def before_after(rev: str, cases=tuple(CASES), calls: int = 300, rounds: int = 5) -> list[dict]:
    """Build time and per-call time of the recorder at ``rev`` against the working tree's."""
    import pyro

    from vimodels.compile import record as after

    torch.set_num_threads(1)
    before = _recorder_at(rev)
    sides = {"before": before, "after": after}
    rows = []
    for name in cases:
        fn, example, simplify, *state = CASES[name]()
        scope = pyro.get_param_store().scope(state[0]) if state else contextlib.nullcontext()
        with scope:
            builds: dict[str, list[float]] = {k: [] for k in sides}
            out: dict = {}
            for _ in range(rounds):
                for k, rec in sides.items():  # interleaved
                    out[k] = _built(rec, fn, example, simplify)
                    builds[k].append(out[k][2])
            (g0, f0, _), (g1, f1, _) = out["before"], out["after"]
            ops = (before.count_ops(g0), after.count_ops(g1))
            gen = torch.Generator().manual_seed(0)
            same = ops[1] <= ops[0] and g0.code == g1.code
            # and TorchScript froze the same operations
            same &= [n.kind() for n in f0.graph.nodes()] == [n.kind() for n in f1.graph.nodes()]
            for _ in range(2):
                z = tuple(
                    e + 0.3 * torch.randn(e.shape, generator=gen, dtype=e.dtype) for e in example
                )
                got = []
                for g in (g0, g1, f0, f1):
                    torch.manual_seed(1)  # the step draws: the same for each
                    with torch.no_grad():
                        got.append(g(*z))
                same &= _same_bits(got[0], got[1]) and _same_bits(got[2], got[3])
            if not same:
                raise AssertionError(f"{name}: the graphs before and after differ")
            per = _per_call_many({"before": f0, "after": f1}, example, calls)
        row = {
            "graph": name,
            "ops": ops[1],
            "same_bits": same,
            "build_before_ms": round(min(builds["before"]) * 1e3, 1),
            "build_after_ms": round(min(builds["after"]) * 1e3, 1),
            "build_ratio": round(min(builds["after"]) / min(builds["before"]), 2),
            "call_before_us": round(per["before"] * 1e6, 1),
            "call_after_us": round(per["after"] * 1e6, 1),
            "call_ratio": round(per["after"] / per["before"], 3),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def _per_call_many(fns: dict, example: tuple, calls: int, rounds: int = 7) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # the profiling executor optimizes after a few calls
            for _ in range(5):
                f(*example)
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.perf_counter()
                for _ in range(calls):
                    f(*example)
                times[k].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--before", help="git revision whose recorder to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.before:
        rows = before_after(args.before, calls=args.calls, rounds=args.rounds)
        for key in ("build_ratio", "call_ratio"):
            values = [r[key] for r in rows]
            print(f"{key} after / before: geometric mean {np.exp(np.mean(np.log(values))):.3f}")
        return
    rows = run(args.models, args.calls)
    print(f"first make_fx in a fresh process: {first_make_fx_cost():.2f} s")
    ratios = [r["ratio_make_fx_over_ours"] for r in rows]
    print(
        f"per-call ratio make_fx / ours: {', '.join(map(str, ratios))}; "
        f"geometric mean {float(np.exp(np.mean(np.log(ratios)))):.2f}"
    )


if __name__ == "__main__":
    main()
