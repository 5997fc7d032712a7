"""The one ``log p - log q`` sum (vimodels.svi.logweight) and the one guide-drawing path.

Independent truths: with the exact posterior as guide every log weight equals the
exact log evidence (conjugate regression, and a local-latent model whose per-point
evidence is Normal(0, sqrt 2)); masked, scaled and ``pyro.factor`` sites against
densities written out by hand; and the draws of ``FitResult.sample``,
``FitResult.log_weights`` and ``to_inference_data`` are one stream.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scipy import stats

import vimodels
from vimodels.svi.draws import model_info, sample_guide
from vimodels.svi.estimators import StickingTheLanding
from vimodels.svi.iwae import IWAE
from vimodels.svi.logweight import NotVectorizable, log_weight_terms, trace_log_weights
from vimodels.svi.minibatch_eval import grouped_estimate, minibatch_log_weights
from vimodels.svi.weights import log_weights
from vimodels.vae.evaluate import datapoint_log_weights

ENTRY = vimodels.get_model("conjugate_linear_regression")


def _conjugate():
    data = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in ENTRY.data().items()}
    exact = ENTRY.exact_posterior()
    loc, cov = torch.as_tensor(exact.mean["beta"]), torch.as_tensor(exact.cov)

    def guide(X, y, noise_scale, prior_scale, subsample_size=None):
        pyro.sample("beta", dist.MultivariateNormal(loc, covariance_matrix=cov))

    return ENTRY.model, guide, data, exact.log_evidence


def test_exact_posterior_gives_constant_log_weights_equal_to_the_log_evidence():
    model, guide, data, log_z = _conjugate()
    pyro.set_rng_seed(0)
    report: dict = {}
    lw = log_weights(model, guide, data, 1000, 1, report=report)
    assert report["vectorized"] is True
    assert lw.shape == (1000,)
    np.testing.assert_allclose(lw, log_z, rtol=0, atol=1e-8)
    # one draw without a particle plate: the same number
    with torch.no_grad():
        g = poutine.trace(guide).get_trace(**data)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(**data)
    assert float(trace_log_weights(m, g, 1, None)[0]) == pytest.approx(log_z, abs=1e-8)
    # the IWAE bound and the STL loss are that constant too
    iwae = IWAE(num_particles=8, max_plate_nesting=1)
    assert -iwae.loss(model, guide, **data) == pytest.approx(log_z, abs=1e-6)
    stl = StickingTheLanding(num_particles=8, max_plate_nesting=1)
    assert -stl.loss(model, guide, **data) == pytest.approx(log_z, abs=1e-6)


def test_subsampled_log_weights_are_unbiased_for_the_log_evidence():
    model, guide, data, log_z = _conjugate()
    sub = {**data, "subsample_size": 10}
    pyro.set_rng_seed(1)
    lw, sizes = minibatch_log_weights(model, guide, sub, 4000, 1, seed=2, batches=100)
    est, se = grouped_estimate(lw, sizes)
    assert np.ptp(lw) > 1.0  # each batch's N / b scaling is an estimate, not the constant
    assert abs(est - log_z) <= 5 * se


N_LOCAL = 6
X_LOCAL = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7, -0.4], dtype=torch.float64)


def local_model(x, subsample=None):
    with pyro.plate("data", len(x), subsample=subsample, dim=-1) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(len(idx), dtype=x.dtype), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def local_guide(x, subsample=None):
    # the exact posterior: z_i | x_i ~ Normal(x_i / 2, sqrt(1 / 2))
    with pyro.plate("data", len(x), subsample=subsample, dim=-1) as idx:
        pyro.sample("z", dist.Normal(x[idx] / 2, 0.5**0.5))


def test_per_datapoint_terms_are_each_points_exact_log_evidence():
    truth = stats.norm(0, np.sqrt(2)).logpdf(X_LOCAL.numpy())
    pyro.set_rng_seed(3)
    lw = datapoint_log_weights(local_model, local_guide, {"x": X_LOCAL}, 50)  # the VAE's
    assert lw.shape == (50, N_LOCAL)
    np.testing.assert_allclose(lw.numpy(), np.broadcast_to(truth, (50, N_LOCAL)), atol=1e-10)
    # a subsampled plate: per point unscaled, the plate's N / b returned apart
    idx = torch.tensor([1, 4])
    with torch.no_grad(), pyro.plate("_p", 7, dim=-2):
        g = poutine.trace(local_guide).get_trace(X_LOCAL, subsample=idx)
        m = poutine.trace(poutine.replay(local_model, trace=g)).get_trace(X_LOCAL, subsample=idx)
    terms = log_weight_terms(m, g, 7, 2, plate="data")
    assert terms.plate_scale == N_LOCAL / 2
    assert terms.local_sites == ("z", "x") and terms.other_sites == ()
    np.testing.assert_allclose(terms.local.numpy(), np.broadcast_to(truth[[1, 4]], (7, 2)))
    full = trace_log_weights(m, g, 7, 2)  # Pyro's scaling: N / b times the batch
    np.testing.assert_allclose(full.numpy(), terms.total().numpy(), atol=1e-10)
    np.testing.assert_allclose(full.numpy(), N_LOCAL / 2 * truth[[1, 4]].sum(), atol=1e-10)
    # the IWAE bound (per-datapoint mode) under that subsample
    iwae = IWAE(num_particles=5, max_plate_nesting=1)
    bound = -iwae.loss(local_model, local_guide, X_LOCAL, subsample=idx)
    assert iwae.structure(local_model, local_guide, X_LOCAL, subsample=idx).mode == "per_datapoint"
    assert bound == pytest.approx(N_LOCAL / 2 * truth[[1, 4]].sum(), abs=1e-9)


def test_masks_scales_and_factors_count_as_written_by_hand():
    y = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
        pyro.factor("penalty", -0.5 * mu**2)
        with pyro.plate("data", 4, dim=-1), poutine.mask(mask=keep), poutine.scale(scale=3.0):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide():
        pyro.sample("mu", dist.Normal(torch.tensor(0.2, dtype=torch.float64), 0.5))

    n = 9
    with torch.no_grad(), pyro.plate("_p", n, dim=-2):
        g = poutine.trace(guide).get_trace()
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace()
    mu = g.nodes["mu"]["value"].reshape(n).numpy()
    hand = (
        stats.norm(0, 2).logpdf(mu)
        - 0.5 * mu**2
        + 3.0 * stats.norm(mu[:, None], 1.0).logpdf(y.numpy()[keep.numpy()]).sum(1)
        - stats.norm(0.2, 0.5).logpdf(mu)
    )
    np.testing.assert_allclose(trace_log_weights(m, g, n, 2).numpy(), hand, rtol=1e-12)
    # the guide-drawing path gives the same numbers for the same draws
    info = model_info(model, (), {}, 1)
    pyro.set_rng_seed(4)
    draws, lw = sample_guide(model, guide, (), {}, info, 300, sites=("mu",))
    mu = draws["mu"]
    hand = (
        stats.norm(0, 2).logpdf(mu)
        - 0.5 * mu**2
        + 3.0 * stats.norm(mu[:, None], 1.0).logpdf(y.numpy()[keep.numpy()]).sum(1)
        - stats.norm(0.2, 0.5).logpdf(mu)
    )
    np.testing.assert_allclose(lw, hand, rtol=1e-12)


def test_a_density_with_too_many_draws_is_refused():
    def guide():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu.reshape(-1)[:, None].expand(-1, 2).reshape(-1), 1.0))

    with torch.no_grad(), pyro.plate("_p", 3, dim=-1):
        g = poutine.trace(guide).get_trace()
    m = poutine.trace(poutine.replay(model, trace=g)).get_trace()
    with pytest.raises(NotVectorizable):
        trace_log_weights(m, g, 3, 1)


@pytest.mark.slow
def test_sample_log_weights_and_inference_data_share_one_stream():
    r = vimodels.fit(
        "eight_schools_noncentered", guide="full_rank", num_steps=30, num_eval=50, progress=False
    )
    draws = r.sample(400, seed=5, sites=("theta", "tau"))
    idata = r.to_inference_data(400, seed=5)
    for name in ("theta", "tau"):
        np.testing.assert_array_equal(draws[name], idata.posterior[name].values[0])
    lw = r.log_weights(400, seed=5)  # 400 draws: one pass, as the others
    np.testing.assert_allclose(lw, idata.sample_stats["log_weight"].values[0], rtol=1e-12)
    # a different seed, different draws
    assert not np.array_equal(r.sample(400, seed=6, sites=("tau",))["tau"], draws["tau"])
