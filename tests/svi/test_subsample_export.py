"""Draws and ArviZ export of a fit whose model subsamples its data: one batch of rows."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels

N, B = 60, 10


def local_model(y, batch=None):
    """A global mean and one local latent per row; the rows subsampled by the plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("n", y.shape[0], subsample_size=batch) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(1)
    y = rng.normal(rng.normal(0.7, 1.0, N), 1.0)
    r = vimodels.fit(local_model, data={"y": y, "batch": B}, seed=0, num_steps=200)
    return r, y


def _normal_logpdf(x, loc, scale):
    return -0.5 * np.log(2 * np.pi) - np.log(scale) - 0.5 * ((x - loc) / scale) ** 2


def test_every_group_of_an_export_refers_to_the_same_rows(fit):
    r, y = fit
    idata = r.to_inference_data(50, seed=5)
    rows = idata.posterior.coords["n"].values
    assert len(rows) == B and len(np.unique(rows)) == B and rows.max() < N
    # the plate's coordinates are the rows' indices in the data, in every group
    for group in ("log_likelihood", "observed_data"):
        np.testing.assert_array_equal(getattr(idata, group).coords["n"].values, rows)
    obs = idata.observed_data["y"].values
    np.testing.assert_allclose(obs, y[rows], rtol=1e-6)  # float32 data
    # log_likelihood recomputed from observed_data and the posterior's z (same rows)
    z = idata.posterior["z"].values[0]
    ll = idata.log_likelihood["y"].values[0]
    np.testing.assert_allclose(ll, _normal_logpdf(obs[None], z, 1.0), atol=1e-4)
    # rows() and sample() with the same seed: the same rows, the same draws
    np.testing.assert_array_equal(r.rows(seed=5)["n"], rows)
    np.testing.assert_array_equal(r.sample(50, seed=5, sites=("z",))["z"], z)
    assert '"batch": 10' in idata.attrs["subsample_rows"]


def test_log_weight_is_on_the_export_batch_for_every_draw(fit):
    r, y = fit
    idata = r.to_inference_data(40, seed=3)
    rows = idata.posterior.coords["n"].values
    mu = idata.posterior["mu"].values[0]
    z = idata.posterior["z"].values[0]
    p = r.params
    loc_mu, sc_mu = p["AutoNormal.locs.mu"], p["AutoNormal.scales.mu"]
    loc_z, sc_z = p["AutoNormal.locs.z"][rows], p["AutoNormal.scales.z"][rows]
    obs = y[rows].astype(np.float32).astype(float)
    scale = N / B  # Pyro's plate scales the batch by size / batch, in the model and the guide
    local = _normal_logpdf(z, mu[:, None], 1.0) + _normal_logpdf(obs, z, 1.0)
    local = local - _normal_logpdf(z, loc_z, sc_z)
    want = _normal_logpdf(mu, 0.0, 10.0) - _normal_logpdf(mu, loc_mu, sc_mu) + scale * local.sum(1)
    got = idata.sample_stats["log_weight"].values[0]
    np.testing.assert_allclose(got, want, atol=1e-3 * scale * B)
    assert "same for every draw" in idata.attrs["log_weight_note"]


def test_rows_of_a_fit_without_subsampling_are_empty():
    y = torch.randn(8)
    r = vimodels.fit(local_model, data={"y": y}, seed=0, num_steps=20)
    assert r.rows() == {}
    idata = r.to_inference_data(5)
    np.testing.assert_array_equal(idata.posterior.coords["n"].values, np.arange(8))
    assert "subsample_rows" not in idata.attrs
