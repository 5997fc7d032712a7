"""Diagnostics run a fit's model in the fit's parameter scope, never in the global store.

A model with a ``pyro.param`` site (here the noise scale) is fitted; the caller's
global store holds an unrelated value under the same name. Building the
InferenceData or the evidence log weights must neither write into that store nor
read from it: the log-likelihood group uses the fitted scale.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch.distributions import constraints

from diagnostics.convert import fit_to_inference_data
from diagnostics.evidence import evidence_log_weights
from vimodels.svi.fit import fit

GLOBAL_SCALE = 100.0


def noise_param_model(x):
    scale = pyro.param("noise_scale", torch.tensor(1.0), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, scale), obs=x)


@pytest.fixture(scope="module")
def fitted_once():
    pyro.clear_param_store()
    x = torch.as_tensor(np.random.default_rng(0).normal(1.0, 2.0, 30), dtype=torch.float32)
    result = fit(
        noise_param_model, data={"x": x}, guide="auto_normal", num_steps=300, progress=False,
        num_eval=10, seed=0,
    )  # fmt: skip
    return result, x.numpy()


@pytest.fixture
def fitted(fitted_once):
    # the caller's own store: an unrelated value under the model's parameter name
    pyro.clear_param_store()
    pyro.param("noise_scale", torch.tensor(GLOBAL_SCALE))
    yield fitted_once
    pyro.clear_param_store()


def _global_store() -> dict[str, float]:
    store = pyro.get_param_store()
    return {k: float(store[k].detach()) for k in store.keys()}


def test_fit_learned_the_scale_in_its_own_scope(fitted):
    result, _ = fitted
    assert "noise_scale" in result.params
    assert _global_store() == {"noise_scale": GLOBAL_SCALE}


def test_to_inference_data_uses_the_fits_parameters_and_leaves_the_global_store(fitted):
    result, x = fitted
    with pyro.get_param_store().scope(result.param_state):
        scale = float(pyro.param("noise_scale").detach())
    assert abs(scale - GLOBAL_SCALE) > 10
    idata = fit_to_inference_data(result, num_samples=50)
    assert _global_store() == {"noise_scale": GLOBAL_SCALE}
    mu = idata.posterior["mu"].values[0]
    expected = stats.norm.logpdf(x[None, :], mu[:, None], scale)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], expected, rtol=1e-4)


def test_evidence_log_weights_leave_the_global_store(fitted):
    result, _ = fitted
    pyro.clear_param_store()
    lw = evidence_log_weights(result, 50, seed=1)
    assert np.isfinite(lw).all()
    assert _global_store() == {}
