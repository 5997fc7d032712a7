"""``--init`` of ``vimodels fit`` and ``vimodels compare``: fit(init=...) from the command line."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli

from vimodels.cli.main import main
from vimodels.svi.by_optimizer import INIT_GUIDES, options_for_guide


@pytest.mark.parametrize("command", ["fit", "compare"])
def test_a_bad_init_exits_2_listing_the_choices(command):
    proc = run_cli(command, "conjugate_linear_regression", "--init", "lapalce")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "lapalce" in lines[0]
    for choice in ("none", "laplace", "pathfinder"):
        assert repr(choice) in lines[0]


def test_fit_init_laplace_starts_the_gaussian_at_the_mode(tmp_path, capsys):
    """The summary records the start; the fit's ELBO is that of the exact posterior.

    The conjugate model's posterior is Gaussian, so the Laplace start is exact:
    the ELBO after 50 steps is log p(y) within 5 of its standard errors (plus the
    small loss of 50 Adam steps at the capped rate, 0.05 nats).
    """
    from vimodels.catalog.registry import get_model

    code = main(
        [
            "fit",
            "conjugate_linear_regression",
            "--guide",
            "auto_multivariate_normal",
            "--init",
            "laplace",
            "--steps",
            "50",
            "--draws",
            "20",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert summary["settings"]["init"].startswith("laplace:")
    entry = get_model("conjugate_linear_regression")
    log_z = entry.exact(entry.data()).log_evidence
    assert abs(summary["elbo"] - log_z) <= 5 * summary["elbo_se"] + 0.05


def test_fit_without_init_records_none(tmp_path, capsys):
    code = main(
        [
            "fit",
            "conjugate_linear_regression",
            "--steps",
            "5",
            "--draws",
            "10",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert "init" not in summary["settings"]


def test_compare_passes_init_to_the_gaussian_autoguides_only(monkeypatch, tmp_path):
    """compare hands ``init`` to run_compare; the grid drops it for other guides."""
    import vimodels.runs.compare as runs_compare

    seen = {}

    class Stop(Exception):
        pass

    def fake_run_compare(model, **kwargs):
        seen.update(kwargs["fit_options"])
        raise Stop

    monkeypatch.setattr(runs_compare, "run_compare", fake_run_compare)
    with pytest.raises(Stop):
        main(
            [
                "compare",
                "eight_schools_noncentered",
                "--init",
                "pathfinder",
                "--executor",
                "serial",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
    assert seen["init"] == "pathfinder"
    for guide in INIT_GUIDES:
        assert options_for_guide(seen, guide)["init"] == "pathfinder"
    for guide in ("structured", "auto_iaf_normal", "pathfinder", "auto_laplace", len):
        assert "init" not in options_for_guide(seen, guide)
    assert options_for_guide({"lr": 0.1}, "structured") == {"lr": 0.1}
