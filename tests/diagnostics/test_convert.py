"""The one Pyro -> ArviZ path: groups, dims, numbers, and netcdf round trips."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from diagnostics.convert import (
    fit_to_inference_data,
    group_arrays,
    group_names,
    load_netcdf,
    reference_to_inference_data,
    save_netcdf,
)
from diagnostics.nuts.reference import exact_reference
from vimodels.catalog.registry import MODELS
from vimodels.errors import DataError, OptionError
from vimodels.svi.draws import model_info
from vimodels.svi.fit import fit


def _quick_fit(entry, steps=30, **kw):
    guide = kw.pop("guide", entry.default_guides[0])
    elbo = "enum" if entry.discrete else "trace"
    return fit(entry, guide=guide, elbo=elbo, num_steps=steps, progress=False, num_eval=200, **kw)


def assert_round_trip(idata, path):
    saved = save_netcdf(idata, path)
    back = load_netcdf(saved)
    assert sorted(group_names(back)) == sorted(group_names(idata))
    for group in group_names(idata):
        a, b = group_arrays(idata, group), group_arrays(back, group)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype, (group, name)
            np.testing.assert_array_equal(a[name], b[name])
        # the group's dimensions keep their names, sizes and coordinate values
        assert dict(back[group].sizes) == dict(idata[group].sizes), group
        assert set(back[group].coords) == set(idata[group].coords), group
        for coord in idata[group].coords:
            np.testing.assert_array_equal(back[group][coord].values, idata[group][coord].values)
        for name in a:
            assert idata[group][name].dims == back[group][name].dims
    return back


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_to_inference_data_layout(name, tmp_path):
    entry = MODELS[name]
    result = _quick_fit(entry)
    idata = fit_to_inference_data(result, num_samples=200, seed=5)
    info = model_info(result.model, result.args, {}, result.max_plate_nesting)
    groups = group_names(idata)
    post = group_arrays(idata, "posterior")
    # every latent and deterministic site, in its shape, with one chain
    assert set(post) == set(info.latent) | set(info.deterministic)
    for site, values in post.items():
        assert values.shape == (1, 200, *info.sites[site].shape), site
        assert idata.posterior[site].dims[2:] == info.sites[site].dims
    # log likelihood and observed data hold observed sites only (no deterministic ones)
    if info.observed:
        assert set(group_arrays(idata, "log_likelihood")) == set(info.observed)
        obs = group_arrays(idata, "observed_data")
        for site in info.observed:
            np.testing.assert_allclose(obs[site], info.observed_values[site])
    else:
        assert "log_likelihood" not in groups
    lw = group_arrays(idata, "sample_stats")["log_weight"]
    assert lw.shape == (1, 200) and np.isfinite(lw).all()
    assert "posterior_predictive" not in groups
    # the attributes (model, guide, versions ...) on every group, as documented: a group
    # taken out on its own (idata.posterior) still says where it came from
    for group in groups:
        assert idata[group].attrs.get("model") == idata.attrs["model"], group
    back = assert_round_trip(idata, tmp_path / f"{name}.nc")
    assert back.posterior.attrs.get("model") == idata.attrs["model"]


def test_log_weights_are_the_elbo_and_loglik_is_pointwise():
    entry = MODELS["eight_schools_noncentered"]
    result = _quick_fit(entry, steps=300, guide="mean_field")
    idata = fit_to_inference_data(result, num_samples=4000)
    lw = idata.sample_stats["log_weight"].values.ravel()
    se = np.hypot(lw.std() / np.sqrt(len(lw)), result.elbo_se)
    assert abs(lw.mean() - result.elbo) < 5 * se
    data = entry.data()
    theta = idata.posterior["theta"].values[0]
    # theta is deterministic: mu + tau * theta_tilde, recomputed for every draw
    recomputed = (
        idata.posterior["mu"].values[0][:, None]
        + idata.posterior["tau"].values[0][:, None] * idata.posterior["theta_tilde"].values[0]
    )
    np.testing.assert_allclose(theta, recomputed, rtol=1e-5, atol=1e-4)
    expected = stats.norm.logpdf(data["y"].numpy()[None], theta, data["sigma"].numpy()[None])
    np.testing.assert_allclose(
        idata.log_likelihood["obs"].values[0], expected, rtol=1e-4, atol=1e-4
    )
    assert idata.posterior["theta"].dims == ("chain", "draw", "schools")
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "schools")


def test_posterior_predictive_on_request(tmp_path):
    entry = MODELS["eight_schools_noncentered"]
    result = _quick_fit(entry, steps=50, guide="mean_field")
    idata = fit_to_inference_data(result, num_samples=2000, posterior_predictive=True)
    pp = idata.posterior_predictive["obs"].values[0]
    assert pp.shape == (2000, 8)
    # y_rep | theta ~ Normal(theta, sigma): residuals have the known sd
    resid = (pp - idata.posterior["theta"].values[0]) / entry.data()["sigma"].numpy()
    assert abs(resid.std() - 1.0) < 5 * np.sqrt(1 / (2 * resid.size)) + 0.01
    assert_round_trip(idata, tmp_path / "pp.nc")


def test_reference_to_inference_data_exact(tmp_path):
    # iid draws: split R-hat < 1.01 needs a few thousand of them to hold reliably
    ref = exact_reference("conjugate_linear_regression", num_chains=2, num_draws=2000, seed=1)
    idata = reference_to_inference_data(ref)
    assert set(group_names(idata)) == {"posterior", "log_likelihood", "observed_data"}
    assert idata.posterior["beta"].shape == (2, 2000, 3)
    assert idata.attrs["method"] == "exact"
    assert int(idata.attrs["trusted"]) == 1
    back = assert_round_trip(idata, tmp_path / "ref.nc")
    assert back.attrs["cache_key"] == ref.cache_key


def test_reference_to_inference_data_nuts_stats(tiny_nuts_eight_schools, tmp_path):
    ref = tiny_nuts_eight_schools
    idata = reference_to_inference_data(ref, posterior_predictive=True)
    stats_ = group_arrays(idata, "sample_stats")
    nutpie = ref.settings["sampler_used"] == "nutpie"  # records no max_energy_error
    assert set(stats_) == {
        "diverging",
        "step_size",
        "tree_depth",
        "n_steps",
        "lp",
        "acceptance_rate",
        "energy",
        "energy_error",
    } | (set() if nutpie else {"max_energy_error"})
    for value in stats_.values():
        assert value.shape == (2, 60)
    assert stats_["diverging"].dtype == bool
    assert (stats_["tree_depth"] >= 1).all()
    assert ((stats_["acceptance_rate"] >= 0) & (stats_["acceptance_rate"] <= 1 + 1e-9)).all()
    assert idata.posterior_predictive["obs"].shape == (2, 60, 8)
    assert set(group_arrays(idata, "posterior")) == {"mu", "tau", "theta_tilde", "theta"}
    assert int(idata.attrs["trusted"]) == 0  # 60 draws cannot pass ESS >= 400
    assert_round_trip(idata, tmp_path / "nuts.nc")


def test_netcdf_errors(tmp_path):
    ref = exact_reference("neals_funnel", num_chains=1, num_draws=20)
    with pytest.raises(OptionError):
        save_netcdf(reference_to_inference_data(ref), tmp_path / "x.json")
    with pytest.raises(DataError):
        load_netcdf(tmp_path / "missing.nc")
    (tmp_path / "bad.nc").write_bytes(b"not a netcdf file")
    with pytest.raises(DataError):
        load_netcdf(tmp_path / "bad.nc")


def test_fit_result_method_uses_this_path():
    result = _quick_fit(MODELS["conjugate_linear_regression"], steps=20)
    a = result.to_inference_data(100, seed=3)
    b = fit_to_inference_data(result, 100, seed=3)
    np.testing.assert_array_equal(a.posterior["beta"].values, b.posterior["beta"].values)


def two_component(x):
    """loc ~ N(0, 3); z_i ~ Bernoulli(0.3); x_i ~ N(loc + 4 z_i, 1)."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(loc + 4.0 * z, 1.0), obs=x)


def test_enumerated_model_log_weights_are_exact_per_draw():
    x = torch.tensor([-1.0, 0.5, 2.0, 4.5, 5.0, 0.0])
    result = fit(
        two_component,
        {"x": x},
        guide="auto_normal",
        elbo="enum",
        num_steps=100,
        progress=False,
        num_eval=200,
    )
    idata = fit_to_inference_data(result, num_samples=1000)
    loc = idata.posterior["loc"].values[0]
    assert idata.posterior["z"].shape == (1, 1000, 6)
    assert idata.posterior["z"].dims == ("chain", "draw", "data")
    with pyro.get_param_store().scope(result.param_state):
        q_loc = pyro.param("AutoNormal.locs.loc").item()
        q_scale = pyro.param("AutoNormal.scales.loc").item()
    xs = x.numpy()[None]
    log_p = stats.norm.logpdf(loc, 0, 3) + np.log(
        0.7 * stats.norm.pdf(xs, loc[:, None], 1) + 0.3 * stats.norm.pdf(xs, loc[:, None] + 4, 1)
    ).sum(1)
    expected = log_p - stats.norm.logpdf(loc, q_loc, q_scale)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], expected, atol=1e-4)
