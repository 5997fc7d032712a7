"""compare(), the report files, the CLI commands and the example script."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diagnostics import metrics
from diagnostics.comparison import compare
from diagnostics.convert import group_arrays, group_names, load_netcdf
from diagnostics.nuts.reference import exact_reference
from diagnostics.report import _SE_OF, fmt, md_table, write_report
from vimodels.catalog.registry import MODELS
from vimodels.cli.main import main
from vimodels.errors import IncompatibleError, OptionError
from vimodels.svi.fit import fit

ROOT = Path(__file__).resolve().parents[2]
CONJ = "conjugate_linear_regression"


@pytest.fixture(scope="session")
def conj_run(tmp_path_factory):
    ref = exact_reference(CONJ, num_chains=2, num_draws=1000, seed=0)
    fits = [
        fit(CONJ, guide="mean_field", num_steps=600, progress=False, num_eval=200),
        # the posterior is Gaussian: the Laplace approximation at the mode is exact
        fit(CONJ, guide="auto_laplace", num_steps=1000, lr=0.05, progress=False, num_eval=200),
    ]
    comparison = compare(fits, ref, num_draws=1000, iwae_k=20, num_evidence=2000, seed=1)
    out = tmp_path_factory.mktemp("conj_report")
    files = write_report(comparison, out)
    return comparison, files, out


def test_compare_summary_against_exact_answers(conj_run):
    c, _, _ = conj_run
    s = c.summary
    assert list(s["method"]) == ["mean_field/trace", "auto_laplace/trace"]
    exact = MODELS[CONJ].exact_posterior()
    assert c.log_evidence.kind == "exact"
    assert c.log_evidence.value == pytest.approx(exact.log_evidence)
    f32 = 1e-4  # the model's log density is summed in float32 (about 1e-6 relative)
    for row in s.itertuples():
        # the ELBO is a lower bound (within Monte Carlo error) and the IWAE bound is tighter
        assert row.elbo <= exact.log_evidence + 5 * row.elbo_se + f32
        assert row.iwae >= row.elbo - 5 * row.elbo_se - f32
        assert row.gap == pytest.approx(exact.log_evidence - row.elbo)
        assert row.joint_dim == 3
    # the exact q: no gap, well-behaved weights, right marginals within Monte Carlo error
    exact_q = s.set_index("method").loc["auto_laplace/trace"]
    assert abs(exact_q["gap"]) < 5 * exact_q["gap_se"] + f32
    assert exact_q["khat"] < 0.5 and exact_q["khat_verdict"] == "good"
    sites = c.sites[c.sites["method"] == "auto_laplace/trace"]
    n_q, n_ref = c.settings["num_draws"], c.reference.num_chains * c.reference.num_draws
    se_std_mean = np.sqrt(1 / n_q + 1 / n_ref)
    se_sd_ratio = np.sqrt(1 / (2 * n_q) + 1 / (2 * n_ref))
    assert (sites["std_mean_error"].abs() < 5 * se_std_mean).all()
    assert ((sites["sd_ratio"] - 1).abs() < 5 * se_sd_ratio).all()
    assert (sites["coverage90"] - 0.9).abs().max() < 5 * np.sqrt(0.09 / n_ref) + 0.03
    assert c.reference.trusted and not any(f.startswith("UNTRUSTED") for f in c.flags)
    assert any("lower bound" in lesson for lesson in c.lessons)


def test_site_metrics_are_computed_from_the_exported_draws(conj_run):
    c, _, _ = conj_run
    for method, idata in c.inference_data.items():
        post = {k: v[0] for k, v in group_arrays(idata, "posterior").items()}
        expected = metrics.marginal_table(post, c.reference.draws, ["beta"])
        got = c.sites[c.sites["method"] == method].drop(columns="method").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
        lw = idata.sample_stats["log_weight"].values.ravel()
        row = c.summary.set_index("method").loc[method]
        assert row["elbo"] == pytest.approx(lw.mean())
        assert row["khat"] == pytest.approx(metrics.psis_khat(lw))


class _Tables(HTMLParser):
    """Collect <table id=...> cells (text and data-value) and <img src=...>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._table, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"text": "", "value": a.get("data-value"), "tag": tag}
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def test_html_report_embeds_images_and_holds_the_numbers(conj_run):
    c, files, out = conj_run
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = _Tables()
    parser.feed(page)
    assert len(parser.images) == 4  # marginals, forest, pair, losses
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    from diagnostics.report import SITE_COLUMNS, SUMMARY_COLUMNS

    for table_id, frame, columns in (
        ("summary", c.summary, SUMMARY_COLUMNS),
        ("sites", c.sites, SITE_COLUMNS),
    ):
        rows = parser.tables[table_id]
        header = [cell["text"] for cell in rows[0]]
        keys = [k for k, _ in columns if k in frame]
        assert header == [dict(columns)[k] for k in keys]
        assert len(rows) - 1 == len(frame)
        for html_row, (_, row) in zip(rows[1:], frame.iterrows()):
            for cell, key in zip(html_row, keys):
                value = row[key]
                se = row.get(_SE_OF.get(key, ""), None) if table_id == "summary" else None
                assert cell["text"] == fmt(value, se), (table_id, key)
                if isinstance(value, float):
                    assert float(cell["value"]) == value or (
                        np.isnan(value) and cell["value"] == "nan"
                    )


def test_markdown_csv_and_json(conj_run):
    c, files, out = conj_run
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| method |" in md and "figures/marginals.png" in md
    for name in ("marginals", "forest", "pair", "losses"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    csv = pd.read_csv(out / "summary.csv")
    np.testing.assert_allclose(csv["elbo"], c.summary["elbo"], rtol=1e-12)
    np.testing.assert_allclose(csv["khat"], c.summary["khat"], rtol=1e-12)
    sites = pd.read_csv(out / "sites.csv")
    np.testing.assert_allclose(sites["w1"], c.sites["w1"], rtol=1e-12)
    payload = json.loads((out / "diagnostics.json").read_text())
    assert payload["reference"]["trusted"] is True
    assert payload["log_evidence"]["kind"] == "exact"
    assert [r["method"] for r in payload["summary"]] == list(c.summary["method"])
    assert payload["summary"][1]["gap"] == pytest.approx(c.summary["gap"].iloc[1])
    assert set(payload["files"]) | {"json"} == set(files)  # the JSON cannot list itself


def test_every_netcdf_round_trips(conj_run):
    c, files, out = conj_run
    ncs = sorted(out.glob("*.nc"))
    assert {p.name for p in ncs} == {
        "mean_field__trace.nc",
        "auto_laplace__trace.nc",
        "reference.nc",
    }
    for method, idata in c.inference_data.items():
        back = load_netcdf(files[f"netcdf:{method}"])
        assert sorted(group_names(back)) == sorted(group_names(idata))
        for group in group_names(idata):
            a, b = group_arrays(idata, group), group_arrays(back, group)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    ref = load_netcdf(out / "reference.nc")
    np.testing.assert_array_equal(ref.posterior["beta"].values, c.reference.draws["beta"])
    assert ref.attrs["method"] == "exact"


def test_untrusted_reference_is_flagged_everywhere(tiny_nuts_eight_schools, tmp_path):
    ref = tiny_nuts_eight_schools
    r = fit(
        "eight_schools_noncentered", guide="mean_field", num_steps=100, progress=False, num_eval=200
    )
    c = compare([r], ref, num_draws=500, iwae_k=10, num_evidence=1000)
    assert not c.reference.trusted
    assert c.flags[0].startswith("UNTRUSTED REFERENCE")
    assert not c.summary["reliable"].any()
    assert c.log_evidence.kind == "estimated" and np.isfinite(c.log_evidence.se)
    assert not c.summary["converged"].iloc[0]  # 100 steps: flagged as not converged
    assert any("not converged" in f for f in c.flags)
    files = write_report(c, tmp_path, netcdf=False)
    assert "UNTRUSTED REFERENCE" in files["html"].read_text()
    assert "UNTRUSTED REFERENCE" in files["markdown"].read_text()
    payload = json.loads(files["json"].read_text())
    assert payload["reference"]["trusted"] is False
    assert payload["flags"][0].startswith("UNTRUSTED")
    assert not list(tmp_path.glob("*.nc"))


def test_compare_refuses_fits_of_another_model(tiny_nuts_eight_schools):
    r = fit(CONJ, guide="mean_field", num_steps=5, progress=False, num_eval=20)
    with pytest.raises(IncompatibleError):
        compare([r], tiny_nuts_eight_schools, num_draws=50)


def test_a_named_site_is_compared_or_refused_never_dropped():
    """A typo in sites= was dropped without a word (the table silently shorter)."""
    ref = exact_reference(CONJ, num_chains=2, num_draws=200, seed=0)
    r = fit(CONJ, guide="mean_field", num_steps=5, progress=False, num_eval=20)
    with pytest.raises(OptionError, match=r"unknown site\(s\) \['betta'\].*reference has draws of"):
        compare([r], ref, num_draws=50, sites=("beta", "betta"))
    c = compare([r], ref, num_draws=50, sites=("beta",))
    assert set(c.sites["site"]) == {"beta"}
    # the table itself refuses a site missing on one side or laid out differently
    draws = {"w": np.zeros((10, 2, 3))}
    refd = {"w": np.zeros((2, 5, 2, 3)), "v": np.zeros((2, 5, 2))}
    with pytest.raises(ValueError, match="'v' has no draws in the approximation"):
        metrics.marginal_table(draws, refd, ("w", "v"))
    with pytest.raises(ValueError, match=r"per-draw shape \(3, 2\)"):
        metrics.marginal_table({"w": np.zeros((10, 3, 2))}, refd, ("w",))


def test_cli_compare_and_nuts(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            CONJ,
            "--guides",
            "mean_field",
            "auto_normal",
            "--steps",
            "100",
            "--draws",
            "300",
            "--iwae-k",
            "10",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean_field/trace" in printed and "auto_normal/trace" in printed
    for name in (
        "report.html",
        "report.md",
        "summary.csv",
        "diagnostics.json",
        "reference.nc",
        "mean_field__trace.nc",
        "auto_normal__trace.nc",
    ):
        assert (out / name).is_file(), name
    code = main(
        [
            "nuts",
            CONJ,
            "--chains",
            "2",
            "--warmup",
            "20",
            "--samples",
            "20",
            "--quiet",
            "--cache",
            str(tmp_path / "cache"),
            "--workers",
            "1",
            "--out",
            str(tmp_path / "ref"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1 and "UNTRUSTED" in printed  # 40 draws cannot pass ESS >= 400
    assert (tmp_path / "ref" / "reference.nc").is_file()
    assert json.loads((tmp_path / "ref" / "reference.json").read_text())["trusted"] is False
    assert main(["compare", "no_such_model", "--out", str(tmp_path / "x")]) == 2
    assert (
        main(
            [
                "compare",
                CONJ,
                "--guides",
                "no_such_guide",
                "--steps",
                "5",
                "--quiet",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )


# smoke-test arguments of this module's examples; the NUTS settings and seed match the
# session fixture, so the reference comes from the test cache
EXAMPLES = {
    "compare_eight_schools.py": [
        "--steps",
        "30",
        "--draws",
        "200",
        "--nuts-chains",
        "2",
        "--nuts-warmup",
        "60",
        "--nuts-samples",
        "60",
        "--seed",
        "3",
    ],
}


def test_every_compare_example_is_smoke_tested():
    present = {p.name for p in (ROOT / "examples").glob("compare_*.py")}
    assert present == set(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_script_runs(script, tiny_nuts_eight_schools, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            *EXAMPLES[script],
            "--out",
            str(tmp_path / "example"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNTRUSTED" in proc.stdout
    assert (tmp_path / "example" / "report.html").is_file()


def test_w1_summary_is_in_reference_sds(conj_run):
    # the elements compared have different units and scales: the summary's mean and max
    # W1 are of W1 / reference sd (a raw mean would be dominated by the widest site)
    c, _, _ = conj_run
    sites = c.sites
    np.testing.assert_allclose(sites["std_w1"], sites["w1"] / sites["ref_sd"], rtol=1e-12)
    assert (sites["ref_sd"] < 0.5).all()  # so a raw mean of W1 differs by 2x or more
    for row in c.summary.itertuples():
        mine = sites[sites["method"] == row.method]
        assert row.w1_mean == pytest.approx((mine["w1"] / mine["ref_sd"]).mean(), rel=1e-12)
        assert row.w1_max == pytest.approx((mine["w1"] / mine["ref_sd"]).max(), rel=1e-12)


def test_numbers_with_a_standard_error_are_printed_to_its_precision():
    """ELBO -70.3218 +- 0.0043, IWAE -70.3172 and log p(x) -70.3189 all read "-70.32"
    at 4 significant digits; each is printed to its se's second digit."""
    df = pd.DataFrame(
        {
            "method": ["a/trace"],
            "ELBO": [-70.3218],
            "ELBO se": [0.0043],
            "big": [-12345.678],
            "big se": [0.05],
            "plain": [-70.3218],
        }
    )
    md = md_table(df)
    assert "| a/trace | -70.3218 | 0.0043 | -12345.678 | 0.05 | -70.32 |" in md, md
    df.attrs["se"] = {"plain": np.array([0.0004])}
    assert "| -70.32180 |" in md_table(df)
    assert fmt(0.5, 10.0) == "0.5000" and fmt(float("nan"), 0.1) == "nan"
    assert fmt(-70.3218, float("nan")) == "-70.32" and fmt(3.0, 0.0) == "3"
