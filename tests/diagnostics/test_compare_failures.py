"""One failing fit must not lose a comparison or a sweep (issue: no silently wrong number).

Repro: ``vimodels compare eight_schools_noncentered --guides mean_field full_rank
--steps 200 --lr 50`` ended in a traceback (cannot reshape array of size 0) and
wrote nothing; a sweep with ``[fit] lr = 50.0`` likewise. Here the exact
reference of the conjugate regression keeps the tests free of NUTS.
"""

from __future__ import annotations

import numpy as np
import pytest

from diagnostics.comparison import compare
from diagnostics.nuts.reference import exact_reference
from diagnostics.report import write_report
from vimodels.cli.main import main
from vimodels.svi.fit import fit

CONJ = "conjugate_linear_regression"


@pytest.fixture(scope="module")
def mixed():
    ref = exact_reference(CONJ, num_chains=2, num_draws=500, seed=0)
    good = fit(CONJ, guide="mean_field", num_steps=400, num_eval=200)
    bad = fit(CONJ, guide="full_rank", num_steps=100, lr=50.0, num_eval=200)
    assert bad.status in ("nonfinite", "diverged")
    return ref, good, bad


@pytest.mark.slow
def test_failed_method_gets_a_row_and_the_others_are_compared(mixed, tmp_path):
    ref, good, bad = mixed
    c = compare([good, bad], ref, num_draws=300, iwae_k=10, num_evidence=300, seed=1)
    s = c.summary.set_index("method")
    ok, failed = s.loc["mean_field/trace"], s.loc["full_rank/trace"]
    assert not ok["failed"] and failed["failed"]
    assert failed["status"] == bad.status and failed["failure"] == bad.message
    assert np.isnan(failed["elbo"]) and np.isnan(failed["w1_mean"]) and not failed["reliable"]
    assert np.isfinite(ok["elbo"]) and np.isfinite(ok["w1_mean"]) and np.isfinite(ok["w2"])
    assert any(f.startswith("full_rank/trace: FAILED") for f in c.flags)
    assert set(c.draws) == {"mean_field/trace"}
    files = write_report(c, tmp_path)
    assert "FAILED" in files["markdown"].read_text()
    assert "failed" in files["summary_csv"].read_text().splitlines()[0]


@pytest.mark.slow
def test_cli_compare_writes_the_report_and_exits_1(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        CONJ,
        "--guides",
        "mean_field",
        "full_rank",
        "--steps",
        "100",
        "--lr",
        "50",
        "--reference",
        "exact",
        "--draws",
        "100",
        "--iwae-k",
        "10",
        "--quiet",
        "--no-netcdf",
        "--out",
        str(out),
    ]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    lines = [x for x in err.splitlines() if x.startswith("vimodels:")]
    assert len(lines) == 1 and "failed" in lines[0] and "Traceback" not in err
    assert (out / "report.html").exists() and (out / "summary.csv").exists()


@pytest.mark.slow
def test_cli_sweep_with_a_runaway_lr_writes_the_report_and_exits_1(tmp_path, capsys):
    cfg = tmp_path / "lr50.toml"
    cfg.write_text(
        f'models = ["{CONJ}"]\nguides = ["mean_field", "full_rank"]\nsteps = 100\n'
        "[fit]\nlr = 50.0\n[compare]\ndraws = 100\niwae_k = 10\nreports = true\n"
    )
    out = tmp_path / "sweep"
    code = main(["sweep", str(cfg), "--executor", "serial", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len([x for x in err.splitlines() if x.startswith("vimodels: sweep:")]) == 1
    assert (out / "report.html").exists()
    assert "FAILED" in (out / "report.md").read_text()
