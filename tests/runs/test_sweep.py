"""Sweeps: tasks, executors (process pool and a real Dask LocalCluster), resume, report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vimodels.cli.main import main
from vimodels.errors import OptionError, VimodelsError
from vimodels.runs.config import config_from_dict, load_config
from vimodels.runs.executors import LocalExecutor, SerialExecutor, make_executor
from vimodels.runs.sweep import FITS, grid, run_sweep
from vimodels.runs.tasks import (
    ReferenceTask,
    Task,
    is_done,
    load_fit,
    make_task,
    read_summary,
)

ROOT = Path(__file__).resolve().parents[2]

# Two models: one with an exact posterior (reference drawn in the driver) and one that
# needs NUTS (a reference task in a worker) and has no exact log evidence (the stored
# evidence log weights are used). auto_diagonal_normal gets an invalid option: its
# tasks raise inside the fit, in the worker, and must not stop the others.
GRID = {
    "models": ["conjugate_linear_regression", "eight_schools_noncentered"],
    "guides": ["auto_normal", "auto_multivariate_normal", "auto_diagonal_normal"],
    "elbos": ["trace"],
    "seeds": [0, 1],
    "steps": 30,
    "guide_options": {"auto_diagonal_normal": {"init_scale": -1.0}},
    # reference_seed and nuts: the conftest's tiny_nuts_eight_schools, so the suite computes
    # that reference once (the reference cache is shared by the session and its workers)
    "compare": {
        "draws": 200,
        "iwae_k": 10,
        "num_evidence": 300,
        "reports": False,
        "reference_seed": 3,
    },
    "nuts": {"num_chains": 2, "num_warmup": 60, "num_samples": 60},
}
FAILING = "auto_diagonal_normal"


def _config(tmp_path=None, **changes):
    raw = json.loads(json.dumps(GRID))
    raw.update(changes)
    return config_from_dict(raw)


# ----------------------------------------------------------------------------- tasks


def test_task_folder_names_are_deterministic_and_unique():
    a = make_task("eight_schools_noncentered", "auto_normal", seed=1, steps=30)
    assert (
        a.folder_name
        == make_task("eight_schools_noncentered", "auto_normal", seed=1, steps=30).folder_name
    )
    assert a.folder_name.startswith("eight_schools_noncentered__auto_normal__trace__seed1-")
    variants = [
        make_task("eight_schools_noncentered", "auto_normal", seed=2, steps=30),
        make_task("eight_schools_noncentered", "auto_normal", seed=1, steps=31),
        make_task(
            "eight_schools_noncentered", "auto_normal", seed=1, steps=30, options={"lr": 0.01}
        ),
        make_task("eight_schools_noncentered", "auto_normal", seed=1, steps=30, num_draws=100),
        make_task("eight_schools_noncentered", "auto_normal", "iwae", seed=1, steps=30),
    ]
    variants.append(dataclasses.replace(a, code="0" * 16))  # other code or library versions
    assert a.code and a.code != "0" * 16
    names = {a.folder_name} | {t.folder_name for t in variants}
    assert len(names) == 1 + len(variants)
    # option order does not matter; empty option tables are dropped
    x = make_task("m", "g", options={"lr": 0.1, "num_eval": 50, "guide_options": {}})
    y = make_task("m", "g", options={"num_eval": 50, "lr": 0.1})
    assert x == y and x.folder_name == y.folder_name


def test_make_task_rejects_bad_options():
    with pytest.raises(OptionError, match="unknown fit option"):
        make_task("m", "g", options={"learning_rate": 0.1})
    with pytest.raises(OptionError, match="plain values"):
        make_task("m", "g", options={"lr": object()})
    with pytest.raises(OptionError, match="seed"):
        make_task("m", "g", seed=-1)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"models": ["eight_schoolz"]},
            r"unknown model 'eight_schoolz'.*eight_schools_noncentered",
        ),
        ({"guides": ["auto_norml"]}, r"unknown guide 'auto_norml'.*auto_normal"),
        ({"elbos": ["trac"]}, r"unknown ELBO 'trac'.*trace"),
        ({"seeds": [0, -1]}, r"seed must be an integer >= 0"),
        ({"steps": 0}, r"steps must be an integer >= 1"),
        ({"stepz": 3}, r"unknown key\(s\) 'stepz'.*steps"),
        ({"fit": {"learning_rate": 1}}, r"unknown \[fit\] option.*lr"),
        ({"guide_options": {"auto_iaf_normal": {}}}, r"name\(s\) in \[guide_options\]"),
        ({"compare": {"reference": "mcmc"}}, r"reference must be one of auto, nuts, exact"),
        ({"nuts": {"chains": 2}}, r"\[nuts\] setting.*num_chains"),
        ({"compare": {"reference": "exact"}}, r"eight_schools_noncentered has no exact sampler"),
    ],
)
def test_config_errors_name_the_key_and_the_valid_values(changes, match):
    with pytest.raises(VimodelsError, match=match):
        _config(**changes)


def test_grid_leaves_out_guides_of_other_families():
    config = _config(
        guides=["auto_normal", "full_rank"],
        models=["conjugate_linear_regression"],
        guide_options={},
    )
    tasks, skipped = grid(config)
    assert {t.guide for t in tasks} == {"auto_normal", "full_rank"}
    config = _config(guides=["auto_normal", "structured"], guide_options={})
    tasks, skipped = grid(config)
    assert {(t.model, t.guide) for t in tasks if t.guide == "structured"} == {
        ("eight_schools_noncentered", "structured")
    }
    assert len(skipped) == 1 and skipped[0].startswith("conjugate_linear_regression structured")
    assert len(tasks) == 3 * 2  # two guides for eight schools, one for conjugate; two seeds


def test_load_config_and_cli_usage_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('models = ["nope"]\n')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        "bad.toml" in err and "unknown model 'nope'" in err and "conjugate_linear_regression" in err
    )
    cfg.write_text("models = [\n")
    with pytest.raises(VimodelsError, match="not valid TOML"):
        load_config(cfg)
    good = tmp_path / "good.toml"
    good.write_text('models = ["conjugate_linear_regression"]\ncache = "refs"\n')
    assert load_config(good).cache_dir == str(tmp_path / "refs")
    assert main(["sweep", str(good), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "needs the dask executor" in capsys.readouterr().err
    assert load_config(ROOT / "examples" / "sweep_small.toml").models


# ----------------------------------------------------------------------------- executors


def test_executor_names():
    assert isinstance(make_executor("serial"), SerialExecutor)
    with pytest.raises(OptionError, match="valid executors are: local, dask, serial"):
        make_executor("spark")


def test_local_executor_survives_a_dead_worker_and_a_raising_task():
    from sweep_helpers import double_or_crash

    tasks = ["a", "b", "crash", "c", "raise", "d", "e", "f"]
    with LocalExecutor(2) as ex:
        outcomes = {o.task: o for o in ex.map(double_or_crash, tasks)}
    assert set(outcomes) == set(tasks)
    for t in "abcdef":
        assert outcomes[t].ok and outcomes[t].result == t * 2
    assert outcomes["crash"].error.startswith("WorkerLost")
    assert outcomes["raise"].error == "ValueError: bad input 'raise'"
    assert "double_or_crash" in outcomes["raise"].traceback


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def local_executor():
    with LocalExecutor(2) as ex:
        yield ex


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, local_executor):
    out = tmp_path_factory.mktemp("sweep-local")
    return run_sweep(_config(), out, local_executor)


@pytest.fixture(scope="module")
def dask_run(tmp_path_factory):
    pytest.importorskip("distributed")
    from vimodels.runs.executors import DaskExecutor

    out = tmp_path_factory.mktemp("sweep-dask")
    with DaskExecutor(n_workers=2, dashboard_address=None) as ex:
        # the model with a NUTS reference task; its fits are a subset of the local grid's
        run = run_sweep(_config(models=["eight_schools_noncentered"]), out, ex)
        assert "LocalCluster (2 worker processes" in ex.describe()
    return run


def _ok_tasks(run):
    return [t for t in run.tasks if t.guide != FAILING]


@pytest.mark.slow
def test_sweep_runs_the_grid_and_reports_failures_with_inputs(local_run):
    run = local_run
    assert len(run.tasks) == 2 * 3 * 2
    assert set(run.executed) == set(run.tasks) and not run.reused
    fit_failures = [f for f in run.failures if f.stage == "fit"]
    assert len(fit_failures) == 4 and len(run.failures) == 4
    for f in fit_failures:
        assert (f.guide, f.elbo) == (FAILING, "trace")
        assert f.model in GRID["models"] and f.seed in (0, 1)
        assert f.error == "OptionError: init_scale must be > 0.0, got -1.0"
        assert "init_scale" in f.traceback
    assert {(f.model, f.seed) for f in fit_failures} == {
        (m, s) for m in GRID["models"] for s in (0, 1)
    }
    for t in _ok_tasks(run):
        assert is_done(t, run.out / FITS)
    # the NUTS reference ran in a worker with the requested settings; exact for the other
    assert run.references["eight_schools_noncentered"].kind == "nuts"
    assert run.references["eight_schools_noncentered"].num_draws == 60
    assert run.references["conjugate_linear_regression"].kind == "exact"
    # one row per model, seed and successful method; failures listed in each comparison
    assert len(run.summary) == 2 * 2 * 2
    assert set(run.summary["method"]) == {"auto_normal/trace", "auto_multivariate_normal/trace"}
    assert run.summary[["gap", "khat", "w1_mean"]].notna().all().all()
    for c in run.comparisons.values():
        assert c.skipped and c.skipped[0].startswith(f"{FAILING}/trace: OptionError")
    le = run.comparisons[("eight_schools_noncentered", 0)].log_evidence
    assert le.kind == "estimated" and le.method == "bridge sampling"  # on the reference draws
    assert run.comparisons[("conjugate_linear_regression", 1)].log_evidence.kind == "exact"
    # combined report
    for name in (
        "summary.csv",
        "sites.csv",
        "by_method.csv",
        "report.md",
        "report.html",
        "sweep.json",
    ):
        assert (run.out / name).stat().st_size > 0
    md = (run.out / "report.md").read_text()
    assert "## Failed tasks" in md and "init_scale must be > 0.0" in md
    assert "## conjugate_linear_regression" in md and "## eight_schools_noncentered" in md
    assert len(run.by_method) == 4 and (run.by_method["seeds"] == 2).all()
    payload = json.loads((run.out / "sweep.json").read_text())
    assert len(payload["failures"]) == 4 and payload["tasks"] == 12
    csv = pd.read_csv(run.out / "summary.csv")
    assert list(csv.columns[:3]) == ["model", "seed", "method"]


@pytest.mark.slow
def test_stored_fits_compare_exactly_like_fits_in_this_process(local_run):
    """The task in a worker gives the numbers of fit() + compare() here."""
    from diagnostics.comparison import compare
    from vimodels.svi.fit import fit

    run = local_run
    model, seed = "eight_schools_noncentered", 1
    ref = run.references[model]
    live = {}
    for guide in ("auto_normal", "auto_multivariate_normal"):
        live[f"{guide}/trace"] = fit(model, guide=guide, num_steps=30, seed=seed, progress=False)
        task = next(t for t in run.tasks if (t.model, t.guide, t.seed) == (model, guide, seed))
        np.testing.assert_array_equal(
            load_fit(task, run.out / FITS).losses, live[f"{guide}/trace"].losses
        )
    c = compare(live, ref, num_draws=200, iwae_k=10, num_evidence=300, seed=seed)
    stored = run.comparisons[(model, seed)]
    cols = [x for x in c.summary.columns if x != "wall_time_s"]
    pd.testing.assert_frame_equal(c.summary[cols], stored.summary[cols])
    assert c.log_evidence == stored.log_evidence


@pytest.mark.slow
def test_dask_gives_the_local_results(local_run, dask_run):
    model = "eight_schools_noncentered"
    assert set(dask_run.tasks) == {t for t in local_run.tasks if t.model == model}
    assert {f.label for f in dask_run.failures} == {
        f.label for f in local_run.failures if f.model == model
    }
    for t in _ok_tasks(dask_run):
        a, b = load_fit(t, local_run.out / FITS), load_fit(t, dask_run.out / FITS)
        assert len(a.losses) == 30
        np.testing.assert_array_equal(a.losses, b.losses)
        for site, x in a.inference_data.posterior.data_vars.items():
            np.testing.assert_array_equal(x.values, b.inference_data.posterior[site].values)
        assert a.summary["fit"]["elbo"] == b.summary["fit"]["elbo"]
    cols = [c for c in local_run.summary.columns if c != "wall_time_s"]
    local = local_run.summary[local_run.summary["model"] == model].reset_index(drop=True)
    pd.testing.assert_frame_equal(local[cols], dask_run.summary[cols])
    assert len(dask_run.summary) == 4
    # the NUTS reference computed in a dask worker equals the one from the pool
    for site, x in local_run.references["eight_schools_noncentered"].draws.items():
        np.testing.assert_array_equal(
            x, dask_run.references["eight_schools_noncentered"].draws[site]
        )


@pytest.mark.slow
def test_rerun_skips_finished_tasks_and_redoes_broken_ones(local_run, local_executor):
    run = local_run
    ok = _ok_tasks(run)
    failed = [t for t in run.tasks if t.guide == FAILING]
    # one folder lost its done marker, another has a truncated draws file
    lost, truncated = ok[0], ok[5]
    (run.out / FITS / lost.folder_name / "summary.json").unlink()
    draws = run.out / FITS / truncated.folder_name / "draws.nc"
    draws.write_bytes(draws.read_bytes()[:100])
    assert read_summary(truncated, run.out / FITS) is None
    again = run_sweep(run.config, run.out, local_executor)
    assert set(again.executed) == set(failed) | {lost, truncated}
    assert set(again.reused) == set(ok) - {lost, truncated}
    cols = [c for c in run.summary.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(run.summary[cols], again.summary[cols])


@pytest.mark.slow
def test_compare_through_an_executor_matches_the_in_process_path(tmp_path):
    from vimodels.runs.compare import run_compare

    kwargs = dict(
        guides=["auto_normal", "mean_field"],
        steps=30,
        seed=2,
        num_draws=200,
        iwae_k=10,
        reference="exact",
        progress=False,
    )
    here = run_compare("conjugate_linear_regression", **kwargs)
    tasks = run_compare("conjugate_linear_regression", executor="serial", out=tmp_path, **kwargs)
    cols = [c for c in here.comparison.summary.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(here.comparison.summary[cols], tasks.comparison.summary[cols])
    assert len(list((tmp_path / FITS).iterdir())) == 2
    with pytest.raises(OptionError, match="catalog models by name"):
        run_compare(
            lambda: None, executor="serial", **{**kwargs, "reference": here.comparison.reference}
        )


@pytest.mark.slow
def test_cli_sweep_and_compare_with_executor(tmp_path, capsys):
    cfg = tmp_path / "one.toml"
    cfg.write_text(
        'models = ["conjugate_linear_regression"]\nguides = ["auto_normal"]\nsteps = 20\n'
        "[compare]\ndraws = 100\niwae_k = 10\nreports = true\n"
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(cfg), "--executor", "serial", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "1 fit(s): 1 run, 0 reused, 0 failed" in text and (out / "report.html").exists()
    assert (out / "reports" / "conjugate_linear_regression" / "seed0" / "report.html").exists()
    assert main(["sweep", str(cfg), "--executor", "serial", "--out", str(out), "--quiet"]) == 0
    assert "1 fit(s): 0 run, 1 reused, 0 failed" in capsys.readouterr().out
    code = main(
        [
            "compare",
            "conjugate_linear_regression",
            "--guides",
            "auto_normal",
            "--steps",
            "20",
            "--draws",
            "100",
            "--iwae-k",
            "10",
            "--executor",
            "serial",
            "--quiet",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "cmp" / FITS).iterdir())) == 1
    assert (tmp_path / "cmp" / "report.html").exists()


def test_reference_task_is_plain_data():
    t = ReferenceTask("eight_schools_noncentered", '{"num_chains":2}', 3)
    assert t == ReferenceTask("eight_schools_noncentered", '{"num_chains":2}', 3)
    assert "seed=3" in t.label and isinstance(hash(t), int)
    assert not isinstance(t, Task)


def test_grid_without_elbos_takes_each_models_default():
    """No ``elbos`` key: ``enum`` for a mixture (under ``trace`` every pair is skipped)."""
    raw = json.loads(json.dumps(GRID))
    del raw["elbos"]
    raw.update(
        models=["galaxies_gaussian_mixture", "conjugate_linear_regression"],
        guides=["auto_normal"],
        guide_options={},
    )
    tasks, _ = grid(config_from_dict(raw))
    by_model = {(t.model, t.elbo) for t in tasks}
    assert by_model == {
        ("galaxies_gaussian_mixture", "enum"),
        ("conjugate_linear_regression", "trace"),
    }
