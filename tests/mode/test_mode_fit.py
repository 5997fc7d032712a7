"""Optimizer methods through ``vimodels.fit`` by name, and SVI started from them."""

from __future__ import annotations

import numpy as np
import pytest

import guides
import vimodels
from diagnostics.comparison import compare
from diagnostics.nuts.reference import exact_reference
from vimodels.errors import IncompatibleError, OptionError

CONJ = "conjugate_linear_regression"


@pytest.fixture(scope="module")
def exact():
    entry = vimodels.get_model(CONJ)
    return entry.exact(entry.data())


def _errors(result, exact, n=4000):
    draws = result.sample(n)["beta"]
    mean_err = np.abs(draws.mean(0) - exact.mean["beta"]) / exact.sd["beta"]
    return mean_err.max(), draws.std(0) / exact.sd["beta"]


def test_auto_laplace_is_the_exact_gaussian_and_every_draw_weighs_log_z(exact):
    r = vimodels.fit(CONJ, guide="auto_laplace", num_eval=200)
    assert r.guide_name == "auto_laplace" and r.status == "converged" and r.converged
    assert r.message.startswith("Laplace at the L-BFGS mode: converged")
    # exact posterior: log p(x, z) - log q(z) = log p(x) for every draw (float32 model)
    assert abs(r.elbo - exact.log_evidence) < 1e-3
    assert r.log_weights(100).std() < 1e-3
    mean_err, sd_ratio = _errors(r, exact)
    assert mean_err < 4 / np.sqrt(4000) * 1.5
    assert np.abs(sd_ratio - 1).max() < 5 * np.sqrt(1 / 8000)
    assert r.settings["mode"]["converged"] and len(r.settings["mode"]["runs"]) == 4


def test_auto_delta_is_the_map(exact):
    r = vimodels.fit(CONJ, guide="auto_delta", num_eval=10)
    draws = r.sample(5)["beta"]
    assert np.allclose(draws, exact.mean["beta"], rtol=1e-4, atol=1e-5)  # Gaussian: mode = mean
    assert r.message.startswith("MAP by L-BFGS")


def test_pathfinder_by_name_is_a_fit_result_like_any_other(exact, tmp_path):
    r = vimodels.fit(CONJ, guide="pathfinder", num_eval=1000)
    assert isinstance(r, vimodels.FitResult) and r.guide_name == "pathfinder"
    assert r.settings["pathfinder"]["num_components"] == 4
    assert exact.log_evidence - r.elbo < 0.05 + 3 * r.elbo_se
    mean_err, sd_ratio = _errors(r, exact)
    assert mean_err < 0.32 and (sd_ratio > 0.75).all() and (sd_ratio < 1.35).all()
    idata = r.to_inference_data(200)
    assert idata.posterior["beta"].shape == (1, 200, 3)
    ref = exact_reference(CONJ, num_chains=2, num_draws=500, seed=0)
    c = compare([r], ref, num_draws=500, iwae_k=10, num_evidence=500, seed=1)
    row = c.summary.iloc[0]
    assert row["method"] == "pathfinder/trace" and row["khat"] < 0.7
    mix = vimodels.fit(CONJ, guide="pathfinder", guide_options={"mixture": True}, num_eval=200)
    assert mix.params["locs"].shape == (4, 3)


def test_init_from_laplace_starts_svi_at_the_posterior(exact):
    """100 Adam steps from the Laplace start keep the exact answer; from scratch they are far."""
    warm = vimodels.fit(
        CONJ, guide="auto_multivariate_normal", init="laplace", num_steps=100, progress=False
    )
    cold = vimodels.fit(CONJ, guide="auto_multivariate_normal", num_steps=100, progress=False)
    warm_err, warm_sd = _errors(warm, exact)
    cold_err, _ = _errors(cold, exact)
    assert warm.settings["init"].startswith("laplace: converged")
    # 100 one-particle steps at lr 0.02 wander by about lr per step around the optimum
    assert warm_err < 0.2 and np.abs(warm_sd - 1).max() < 0.2
    assert cold_err > 1.0
    for guide in ("auto_normal", "auto_lowrank_multivariate_normal"):
        r = vimodels.fit(CONJ, guide=guide, init="pathfinder", num_steps=20, progress=False)
        assert _errors(r, exact)[0] < 0.5


def test_option_mistakes_name_the_fix():
    with pytest.raises(IncompatibleError, match="Gaussian autoguide"):
        vimodels.fit(CONJ, guide="auto_iaf_normal", init="laplace")
    with pytest.raises(OptionError, match="init must be None, 'laplace' or 'pathfinder'"):
        vimodels.fit(CONJ, guide="auto_normal", init="mode")
    with pytest.raises(OptionError, match="does not take option.*num_pathz"):
        vimodels.fit(CONJ, guide="pathfinder", guide_options={"num_pathz": 2})
    with pytest.raises(IncompatibleError, match="continuous latents"):
        vimodels.fit("galaxies_gaussian_mixture", guide="pathfinder", elbo="enum")
    for name in ("pathfinder", "nested_laplace"):
        with pytest.raises(IncompatibleError, match=f"guide '{name}' is fitted by its own"):
            guides.make_guide(name, lambda: None, {})
    assert "pathfinder" in guides.guide_names()
