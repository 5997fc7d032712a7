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
