"""ArviZ's own tools on every netcdf file one ``compare`` run writes.

``az.summary``, ``az.plot_trace(divergences=...)``, ``az.loo`` and ``az.compare``
run on the reference and on each method's file; ``az.bfmi`` and
``az.plot_energy`` run on the reference (NUTS records the Hamiltonian as
``sample_stats.energy``). A variational method's file has no energy (its draws
are independent draws of the guide, not a Markov chain): there both raise, as
asserted, rather than report a number that means nothing.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vimodels.runs.compare import run_compare  # noqa: E402

NAME = "eight_schools_noncentered"
GUIDES = ("mean_field", "full_rank")


@pytest.fixture(scope="module")
def compare_files(tmp_path_factory):
    """One short comparison (2 guides, 300 steps, 2 x 60 NUTS draws) and its netcdf files."""
    out = tmp_path_factory.mktemp("compare")
    run = run_compare(
        NAME,
        guides=GUIDES,
        steps=300,
        out=out,
        seed=3,
        num_draws=300,
        nuts_settings={"num_chains": 2, "num_warmup": 60, "num_samples": 60},
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
    )
    files = {k.split(":", 1)[1]: v for k, v in run.files.items() if k.startswith("netcdf:")}
    assert set(files) == {"reference", *(f"{g}/trace" for g in GUIDES)}
    assert sorted(p.name for p in out.glob("*.nc")) == sorted(p.name for p in files.values())
    return files


def _load(path):
    return az.from_netcdf(str(path), engine="h5netcdf")


@pytest.mark.slow
def test_every_file_has_a_pointwise_log_likelihood_of_the_observed_sites(compare_files):
    for method, path in compare_files.items():
        idata = _load(path)
        observed = set(idata.observed_data.data_vars)
        assert observed == {"obs"}, method
        assert set(idata.log_likelihood.data_vars) == observed, method
        ll = idata.log_likelihood["obs"]
        post = idata.posterior
        # one value per draw and per observation, on the observation's dimension
        assert ll.dims == ("chain", "draw", *idata.observed_data["obs"].dims), method
        assert ll.shape[:2] == (post.sizes["chain"], post.sizes["draw"]), method
        assert np.isfinite(ll.values).all(), method


@pytest.mark.slow
def test_arviz_tools_run_on_every_file(compare_files):
    for method, path in compare_files.items():
        idata = _load(path)
        table = az.summary(idata)
        assert {"mu", "tau"} <= {i.split("[")[0] for i in table.index}, method
        assert np.isfinite(table["mean"]).all(), method
        axes = az.plot_trace(idata, divergences="bottom")
        assert axes.size > 0
        plt.close("all")
        loo = az.loo(idata)
        assert np.isfinite(loo["elpd_loo"]) and loo["n_data_points"] == 8, method
        if method == "reference":
            bfmi = az.bfmi(idata)
            assert bfmi.shape == (2,) and np.isfinite(bfmi).all()
            assert "diverging" in idata.sample_stats
            az.plot_energy(idata)
            plt.close("all")
        else:
            # independent guide draws: no Hamiltonian, no energy diagnostics
            assert "energy" not in idata.sample_stats, method
            with pytest.raises(TypeError, match="Energy variable was not found"):
                az.bfmi(idata)
            with pytest.raises(AttributeError, match="energy"):
                az.plot_energy(idata)
            plt.close("all")


@pytest.mark.slow
def test_az_compare_ranks_the_methods_and_the_reference(compare_files):
    table = az.compare({m: _load(p) for m, p in compare_files.items()})
    assert set(table.index) == set(compare_files)
    assert np.isfinite(table["elpd_loo"]).all()
    assert table["rank"].tolist() == list(range(len(compare_files)))
