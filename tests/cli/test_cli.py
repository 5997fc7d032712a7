"""The command line: one line and exit 2 for user mistakes, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_runner import ROOT, run_cli

from vimodels.catalog.registry import MODELS
from vimodels.cli.main import main


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out
    assert "auto_iaf_normal" in out and "iwae" in out and "structured" in out


@pytest.mark.parametrize("model", list(MODELS))
def test_check_passes_on_catalog(model, capsys):
    assert main(["check", model]) == 0
    out = capsys.readouterr().out
    assert "[ok] log density" in out and "FAIL" not in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["fit", "no_such_model"], "valid models are"),
        (["fit", "eight_schools_noncentered", "--guide", "nope"], "valid guides are"),
        (["fit", "eight_schools_noncentered", "--elbo", "nope"], "valid ELBOs are"),
        (["fit", "eight_schools_noncentered", "--steps", "-5"], "num_steps must be >= 1"),
        (["fit", "eight_schools_noncentered", "--lr", "0"], "lr must be > 0"),
        (["fit", "eight_schools_noncentered", "--particles", "0"], "num_particles must be"),
        (["fit", "eight_schools_noncentered", "--steps", "ten"], "invalid int value"),
        (["fit", "eight_schools_noncentered", "--guide-opt", "init_scale"], "KEY=VALUE"),
        (["fit", "conjugate_linear_regression", "--guide", "structured"], "hand-written for"),
        (["check", "nope"], "valid models are"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_output_folder_that_is_a_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    proc = run_cli("fit", "eight_schools_noncentered", "--steps", "5", "--out", str(target))
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_fit_writes_netcdf_and_json(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "fit",
        "eight_schools_noncentered",
        "--guide",
        "mean_field",
        "--steps",
        "200",
        "--draws",
        "100",
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    stem = "eight_schools_noncentered__mean_field__trace__seed0"
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["num_steps"] == 200 and summary["netcdf"] == f"{stem}.nc"
    import arviz as az

    idata = az.from_netcdf(out / f"{stem}.nc")
    assert idata.posterior["theta"].shape[-1] == 8
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_fit_no_netcdf_writes_only_the_summary(tmp_path, capsys):
    args = ["fit", "eight_schools_noncentered", "--steps", "5", "--no-jit", "--quiet"]
    assert main([*args, "--no-netcdf", "--out", str(tmp_path)]) == 0
    stem = "eight_schools_noncentered__auto_normal__trace__seed0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json"]
    summary = json.loads((tmp_path / f"{stem}.json").read_text())
    assert summary["num_steps"] == 5 and "netcdf" not in summary
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / stem}.json"


@pytest.mark.slow
def test_ctrl_c_keeps_partial_fit(tmp_path, no_leftover_processes):
    """Ctrl-C at step 20: the fit pauses there (a test hook) until the signal comes."""
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "pause_at_step"), str(ROOT)]),
        "VIMODELS_TEST_PAUSE_DIR": str(marks),
        "VIMODELS_TEST_PAUSE_STEP": "20",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vimodels.cli",
            "fit",
            "eight_schools_noncentered",
            "--steps",
            "1000",
            "--no-jit",
            "--no-early-stop",
            "--out",
            str(out),
            "--quiet",
            "--draws",
            "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    marker = marks / "auto_normal.paused"
    while not marker.exists():  # polled, not timed: the fit waits there for the signal
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    stem = "eight_schools_noncentered__auto_normal__trace__seed0"
    summary = json.loads((out / f"{stem}.json").read_text())
    assert summary["status"] == "interrupted" and summary["num_steps"] == 20
    assert "interrupted at step 20" in stdout
