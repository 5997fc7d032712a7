"""`vimodels compare` with its defaults on every catalog entry: no failed method, ArviZ files.

Each entry's default grid (its default guides plus an autoregressive flow, under
the entry's default ELBO: :func:`vimodels.runs.config.default_guides` and
``default_elbos``) is fitted and compared with the entry's default reference
(NUTS with the entry's settings, or exact draws), in the run's reference cache
(the conftest's ``reference_cache``, shared with the catalog's reference tests),
so a full run samples each entry once. To stay affordable the fits run
``STEPS`` steps instead of 2000 (``--steps``; every default guide/ELBO pair is
still fitted, through the compiled step as by default) and compare draws
``DRAWS`` guide draws instead of 4000 (``--draws``).

Every netcdf file the run writes must hold a pointwise log likelihood of the
observed sites, so that ``az.loo`` and ``az.compare`` work on them.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pandas as pd
import pytest

from guides.auto import IAF_LR_SCALE
from vimodels import fit
from vimodels.catalog.registry import get_model, list_models
from vimodels.cli.main import main
from vimodels.runs.config import default_elbos, default_guides

STEPS = 1000
DRAWS = 1000


def _cases() -> list:
    cases = []
    for name in list_models():
        entry = get_model(name)
        if entry.amortized:
            reason = (
                f"{name} is amortized (a latent per image): compare refuses it with an "
                "IncompatibleError and points to `vimodels vae`"
            )
            cases.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)))
        else:
            cases.append(name)
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("name", _cases())
def test_default_compare_has_no_failed_method(name, reference_cache, tmp_path):
    """``vimodels compare NAME``: every default pair fitted, reports and netcdf files written.

    Through the command line with ``--executor serial`` (the executor path of a
    catalog name, in this process: no worker start-up per entry). This test also
    covers what tests/catalog/test_catalog.py once checked with a separate
    5-step ``vimodels compare`` on every entry: the four report files, not empty.
    """
    argv = ["compare", name, "--steps", str(STEPS), "--draws", str(DRAWS), "--quiet"]
    argv += ["--executor", "serial", "--cache", str(reference_cache), "--out", str(tmp_path)]
    assert main(argv) == 0
    for filename in ("report.md", "report.html", "summary.csv", "diagnostics.json"):
        assert (tmp_path / filename).stat().st_size > 0, filename
    assert name in (tmp_path / "report.md").read_text()
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    summary = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False)
    entry = get_model(name)
    expected = {f"{g}/{e}" for g in default_guides(entry) for e in default_elbos(entry)}
    assert not diag["skipped"], diag["skipped"]
    assert set(summary["method"]) == expected
    bad = summary[summary["failed"].astype(str) == "True"]
    assert bad.empty, bad[["method", "status", "failure"]].to_string()
    assert set(summary["status"]) <= {"converged", "max_steps"}, summary["status"].tolist()
    assert np.isfinite(summary["elbo"].astype(float)).all()

    # every netcdf file: a pointwise log likelihood of the observed sites, az.loo, az.compare
    files = sorted(tmp_path.glob("*.nc"))
    assert len(files) == len(expected) + 1
    reference = az.from_netcdf(str(tmp_path / "reference.nc"), engine="h5netcdf")
    has_data = "observed_data" in set(reference.groups())
    loaded = {}
    for path in files:
        idata = az.from_netcdf(str(path), engine="h5netcdf")
        groups = set(idata.groups())
        if not has_data:  # neals_funnel: no data, no likelihood, no az.loo
            assert not {"observed_data", "log_likelihood"} & groups, path.name
            continue
        observed = set(idata.observed_data.data_vars)
        assert observed and set(idata.log_likelihood.data_vars) == observed, path.name
        for site in observed:  # one value per observation: the site's batch dims
            ll = idata.log_likelihood[site]
            batch = idata.observed_data[site].dims[: ll.ndim - 2]
            assert ll.dims[:2] == ("chain", "draw") and ll.dims[2:] == batch, (path.name, site)
        if len(observed) == 1:
            assert np.isfinite(az.loo(idata)["elpd_loo"]), path.name
        loaded[path.stem] = idata
    if loaded and all(len(set(i.observed_data.data_vars)) == 1 for i in loaded.values()):
        assert set(az.compare(loaded).index) == set(loaded)


def test_default_elbo_sums_out_discrete_sites():
    assert default_elbos(get_model("galaxies_gaussian_mixture")) == ("enum",)
    assert default_elbos(get_model("eight_schools_noncentered")) == ("trace",)
    assert default_elbos(None) == ("trace",)
    assert default_elbos(None, discrete=True) == ("enum",)


def test_flow_guide_learns_at_a_fraction_of_lr():
    r = fit("eight_schools_noncentered", guide="auto_iaf_normal", num_steps=3, lr=0.02)
    assert r.settings["lr_scale"] == IAF_LR_SCALE == 0.25
    assert r.settings["lr"] == pytest.approx(0.02 * IAF_LR_SCALE)
    r = fit("eight_schools_noncentered", guide="auto_normal", num_steps=3, lr=0.02)
    assert r.settings["lr_scale"] == 1.0 and r.settings["lr"] == pytest.approx(0.02)
