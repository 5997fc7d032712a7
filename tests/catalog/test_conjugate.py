"""Exact answers: the conjugate regression's posterior and log evidence are closed-form."""

from __future__ import annotations

import numpy as np
import pytest

import vimodels
from vimodels.svi.weights import iwae_estimate

pytestmark = pytest.mark.slow  # SVI training to tight tolerances

ENTRY = vimodels.get_model("conjugate_linear_regression")
NUM_DRAWS = 20_000
FIT = dict(
    elbo="trace",
    num_steps=1000,
    lr=0.2,
    lr_decay=0.001,
    num_particles=16,
    num_eval=20_000,
    progress=False,
    convergence=vimodels.ConvergenceRule(early_stop=False),
)


@pytest.fixture(scope="module")
def exact():
    return ENTRY.exact_posterior()


@pytest.fixture(scope="module")
def fits():
    return {
        guide: vimodels.fit(ENTRY, guide=guide, seed=1, **FIT)
        for guide in ("full_rank", "auto_multivariate_normal", "mean_field", "auto_normal")
    }


def test_exact_posterior_matches_numpy_lstsq(exact):
    # independent check of the closed form: a flat-prior limit is least squares
    data = ENTRY.data()
    X, y = data["X"].double().numpy(), data["y"].double().numpy()
    precision = X.T @ X + np.eye(3) / data["prior_scale"] ** 2
    np.testing.assert_allclose(np.linalg.solve(precision, X.T @ y), exact.mean["beta"], rtol=1e-10)


@pytest.mark.parametrize("guide", ["full_rank", "auto_multivariate_normal"])
def test_full_rank_recovers_exact_posterior(fits, exact, guide):
    draws = fits[guide].sample(NUM_DRAWS, seed=5)["beta"]
    mean, cov = exact.mean["beta"], exact.cov
    sd = np.sqrt(np.diag(cov))
    # MCSE of a mean from n independent draws: sd / sqrt(n)
    assert np.all(np.abs(draws.mean(0) - mean) <= 5 * sd / np.sqrt(NUM_DRAWS))
    # MCSE of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / NUM_DRAWS)
    assert np.all(np.abs(np.cov(draws.T) - cov) <= 5 * se_cov)


@pytest.mark.parametrize(
    "guide", ["full_rank", "auto_multivariate_normal", "mean_field", "auto_normal"]
)
def test_elbo_is_a_bound(fits, exact, guide):
    r = fits[guide]
    assert r.elbo <= exact.log_evidence + 3 * r.elbo_se


@pytest.mark.parametrize("guide", ["full_rank", "auto_multivariate_normal"])
def test_full_rank_elbo_within_005_nats(fits, exact, guide):
    assert exact.log_evidence - fits[guide].elbo <= 0.05


def test_mean_field_loses_to_full_rank(fits, exact):
    mf, fr = fits["mean_field"], fits["full_rank"]
    se = np.hypot(mf.elbo_se, fr.elbo_se)
    assert mf.elbo < fr.elbo - 5 * se
    # and by the amount theory predicts: KL(q_mf* || p) = (log det S + sum log P_ii) / 2
    precision = np.linalg.inv(exact.cov)
    gap = 0.5 * (np.linalg.slogdet(exact.cov)[1] + np.log(np.diag(precision)).sum())
    assert abs((exact.log_evidence - mf.elbo) - gap) <= 0.05 * gap + 5 * mf.elbo_se


def test_mean_field_underestimates_sd(fits, exact):
    draws = fits["mean_field"].sample(NUM_DRAWS, seed=6)["beta"]
    # optimal mean-field sd is 1 / sqrt(precision_ii), below the marginal sd
    precision = np.linalg.inv(exact.cov)
    expected = 1 / np.sqrt(np.diag(precision))
    se = expected / np.sqrt(2 * NUM_DRAWS)
    assert np.all(np.abs(draws.std(0) - expected) <= 5 * se + 0.02 * expected)
    assert np.all(draws.std(0) < np.sqrt(np.diag(exact.cov)))


def test_iwae_between_elbo_and_evidence_and_rises_with_k(fits, exact):
    log_w = fits["mean_field"].log_weights(60_000, seed=7)
    bounds = [iwae_estimate(log_w, k) for k in (1, 10, 100)]
    values = [b[0] for b in bounds]
    ses = [b[1] for b in bounds]
    for (lo, lo_se), (hi, hi_se) in zip(bounds, bounds[1:]):
        assert hi > lo + 3 * np.hypot(lo_se, hi_se)
    assert values[-1] <= exact.log_evidence + 3 * ses[-1]
    assert values[0] <= values[-1]


@pytest.mark.parametrize("guide", ["full_rank", "mean_field"])
def test_iwae_objective_fit_is_a_bound(exact, guide):
    r = vimodels.fit(
        ENTRY,
        guide=guide,
        elbo="iwae",
        num_particles=8,
        num_steps=600,
        lr=0.02,
        num_eval=20_000,
        progress=False,
        seed=2,
    )
    log_w = r.log_weights(40_000, seed=3)
    value, se = iwae_estimate(log_w, 8)
    assert value <= exact.log_evidence + 3 * se
    assert value >= r.elbo - 3 * np.hypot(se, r.elbo_se)
