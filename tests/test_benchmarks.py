"""Smoke test of the benchmark runner: every benchmark is listed, documented and parses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner():
    return _load("run")


def test_help_lists_every_benchmark(runner, capsys):
    with pytest.raises(SystemExit) as exc:
        runner.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in runner.BENCHMARKS:
        assert f"  {name} " in out, name


def test_every_benchmark_is_documented(runner):
    readme = (BENCH / "README.md").read_text()
    for name in runner.BENCHMARKS:
        assert f"--only {name}" in readme, name


def test_unknown_benchmark_is_refused(runner, capsys):
    with pytest.raises(SystemExit) as exc:
        runner.main(["--only", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_nuts_benchmark_skips_numpyro_variants_when_absent(runner, monkeypatch, capsys):
    bench_nuts = _load("bench_nuts")
    monkeypatch.setattr(bench_nuts, "have_numpyro", lambda: False)
    res = bench_nuts.nuts_benchmark(repeats=0, variants=("numpyro_sequential",))
    assert res["skipped"] == ["numpyro_sequential"]
    assert res["rows"] == {}
    assert "skipping the NumPyro variants" in capsys.readouterr().out


def _vs_row(sampler: str, seed: int, ess_per_s: float) -> dict:
    return {
        "model": "m",
        "sampler": sampler,
        "seed": seed,
        "ess_per_s": ess_per_s,
        "grad_per_draw": 7.0,
        "metric_used": "dense",
        "dim": 3,
        "load": 1.0,
    }


def test_vs_table_one_seed_keeps_the_single_run_cells():
    bench_nuts = _load("bench_nuts")
    table = bench_nuts.vs_table([_vs_row("numpyro", 0, 20.0), _vs_row("auto", 0, 10.0)])
    assert "| m | 3 | 20.0 (7) | 10.0 (7, dense) | **0.50x** | 1.0-1.0 |" in table


def test_vs_table_several_seeds_gives_medians_of_per_seed_ratios():
    """``--seeds``: the median ESS/s and the median of the per-seed ratios (each against
    NumPyro's run with the same seed: 10/20, 30/15, 12/10), not the ratio of medians."""
    bench_nuts = _load("bench_nuts")
    rows = [
        _vs_row("numpyro", 0, 20.0),
        _vs_row("auto", 0, 10.0),
        _vs_row("numpyro", 1, 15.0),
        _vs_row("auto", 1, 30.0),
        _vs_row("numpyro", 2, 10.0),
        _vs_row("auto", 2, 12.0),
    ]
    table = bench_nuts.vs_table(rows)
    line = next(x for x in table.splitlines() if x.startswith("| m |"))
    assert "15.0 [10.0-20.0] (7)" in line
    assert "12.0 [10.0-30.0] (7, dense)" in line
    assert "1.20x [0.50x-2.00x]" in line
    assert table.splitlines()[-1].endswith("| 1.20x |  |")


def _detail_row(sampler: str, seed: int, min_ess: float) -> dict:
    return {
        "sampler": sampler,
        "seed": seed,
        "min_ess": min_ess,
        "grad_per_draw": 20.0,
        "warmup_grad_chain": [100, 300],
        "step_size": [0.1, 0.3],
        "accept": [0.9, 0.9],
        "divergences": 0,
        "ess": {"tau": min_ess},
        "median_ess": {"theta": 2 * min_ess},
    }


def test_nuts_detail_summary_gives_ratio_of_means_and_per_seed_ratios():
    """bench_nuts_detail: each figure's mean over the seeds (ours 100, 300; NumPyro 200,
    200: ratio of means 1.00) and the per-seed ratios of the min ESS (0.5 and 1.5)."""
    detail = _load("bench_nuts_detail")
    rows = [
        _detail_row("ours", 0, 100.0),
        _detail_row("ours", 1, 300.0),
        _detail_row("numpyro", 0, 200.0),
        _detail_row("numpyro", 1, 200.0),
    ]
    table = detail.summary(rows, boot=10)
    line = next(x for x in table.splitlines() if x.startswith("| min bulk ESS |"))
    assert line.startswith("| min bulk ESS | 200 (1.4e+02) | 200 (0) | 1.00 [")
    assert "| median ESS theta | 400 (2.8e+02) | 400 (0) | 1.00 [" in table
    assert "| warm-up gradients per chain | 200 (0) | 200 (0) | 1.00 [1.00-1.00] |" in table
    assert "| divergences | 0 (0) | 0 (0) | - |" in table
    assert table.endswith("median 1.00 [0.50-1.50] over 2 seeds")


def _first_party_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every first-party ``from ... import`` in ``path``, nested ones too."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in ("vimodels", "diagnostics", "guides"):
                out += [(node.module, a.name) for a in node.names]
    return out


_SCRIPTS = sorted(
    p
    for folder in ("benchmarks", "examples")
    for p in (Path(__file__).resolve().parents[1] / folder).glob("*.py")
)


@pytest.mark.parametrize("path", _SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_import_only_what_exists(path):
    """A module moved in the re-layout must not leave a script importing its old name
    (``benchmarks/posteriordb.py`` imported ``vimodels.fit`` inside a function, which
    only failed after its 10-minute NUTS part)."""
    import importlib

    for module, name in _first_party_imports(path):
        assert importlib.util.find_spec(module) is not None, f"{path.name}: no module {module}"
        mod = importlib.import_module(module)
        assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{path.name}: {module} has no {name}"
        )


def test_bench_potential_counts_the_frozen_graph_and_times_it():
    """Benchmark 3f's row without Inductor: the frozen batched graph's operations are
    counted from the graph the reference runs, and its call is timed."""
    bench = _load("bench_potential")
    row = bench.bench("eight_schools_noncentered", calls=10, inductor=False)
    assert row["mode"] == "vmap" and row["dim"] == 10
    assert 10 < row["ops"] < 200 and row["frozen_us"] > 0
    assert "inductor_us" not in row
