"""Metrics against distributions with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from diagnostics import metrics

N = 4000


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def test_shifted_gaussians_mean_error_w1_and_coverage(rng):
    # approx N(0, 1) vs reference N(1, 1): W1 = 1, standardized mean error = -1,
    # coverage of the approx 90% interval by the reference = P(|Z + 1| <= 1.645)
    approx = rng.normal(0.0, 1.0, N)
    ref = rng.normal(1.0, 1.0, (4, N // 4))
    m = metrics.marginal_metrics(approx, ref)
    se_w1 = 2.0 / np.sqrt(N)  # generous: sd of the mean difference is sqrt(2/N) ~ 0.022
    assert abs(m["w1"] - 1.0) < 5 * se_w1
    assert abs(m["std_mean_error"] + 1.0) < 5 * np.sqrt(2.0 / N)
    assert abs(m["sd_ratio"] - 1.0) < 5 * np.sqrt(1.0 / N)
    cover = stats.norm.cdf(1.645 - 1.0) - stats.norm.cdf(-1.645 - 1.0)
    assert abs(m["coverage90"] - cover) < 5 * np.sqrt(cover * (1 - cover) / N) + 0.02
    # the reference MCSE of independent draws is sd / sqrt(n)
    assert m["ref_mcse"] == pytest.approx(1.0 / np.sqrt(N), rel=0.2)
    assert m["std_mcse"] == pytest.approx(m["ref_mcse"] / m["ref_sd"])


def test_scaled_gaussians_w1_sd_ratio_and_coverage(rng):
    # same mean, sd 0.5 vs 1: W1 = |s1 - s2| sqrt(2 / pi); coverage = 2 Phi(0.8224) - 1
    approx = rng.normal(0.0, 0.5, N)
    ref = rng.normal(0.0, 1.0, (2, N // 2))
    m = metrics.marginal_metrics(approx, ref)
    assert m["w1"] == pytest.approx(0.5 * np.sqrt(2 / np.pi), abs=0.04)
    assert m["sd_ratio"] == pytest.approx(0.5, abs=5 * 0.5 / np.sqrt(N))
    cover = 2 * stats.norm.cdf(1.6449 * 0.5) - 1
    assert abs(m["coverage90"] - cover) < 0.03


def test_identical_marginals_are_close(rng):
    m = metrics.marginal_metrics(rng.normal(size=N), rng.normal(size=(4, N // 4)))
    assert abs(m["std_mean_error"]) < 5 * np.sqrt(2.0 / N)
    assert abs(m["coverage90"] - 0.9) < 0.03
    assert m["w1"] < 0.1


def test_marginal_table_labels_and_rows(rng):
    approx = {"a": rng.normal(size=(500,)), "b": rng.normal(size=(500, 2, 3))}
    ref = {"a": rng.normal(size=(2, 250)), "b": rng.normal(size=(2, 250, 2, 3))}
    table = metrics.marginal_table(approx, ref, ["a", "b"])
    assert list(table["element"]) == ["a"] + [f"b[{i},{j}]" for i in range(2) for j in range(3)]
    assert set(table["site"]) == {"a", "b"}


def test_wasserstein2_matches_sorted_matching_in_1d(rng):
    # in one dimension the optimal plan matches sorted samples
    x, y = rng.normal(size=300), rng.gamma(2.0, size=300)
    exact = np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
    assert metrics.wasserstein2(x[:, None], y[:, None]) == pytest.approx(exact, rel=1e-6)


def test_sliced_wasserstein_of_shifted_gaussians(rng):
    # SW2 of N(0, I) and N(delta, I) in D dims is |delta| / sqrt(D)
    d, delta = 4, np.array([2.0, 0.0, 0.0, 0.0])
    x = rng.normal(size=(N, d))
    y = rng.normal(size=(N, d)) + delta
    sw = metrics.sliced_wasserstein(x, y, num_projections=500, seed=1)
    assert sw == pytest.approx(np.linalg.norm(delta) / np.sqrt(d), abs=0.08)


def test_energy_distance_matches_scipy_in_1d(rng):
    x, y = rng.normal(size=800), rng.normal(0.5, 1.0, size=800)
    ours = metrics.energy_distance(x[:, None], y[:, None], max_points=1000)
    assert ours == pytest.approx(stats.energy_distance(x, y), rel=1e-6)


def test_joint_metrics_see_a_shift_and_lost_correlation(rng):
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])
    ref = rng.multivariate_normal([0, 0], cov, size=2000)
    same = rng.multivariate_normal([0, 0], cov, size=2000)
    independent = rng.normal(size=(2000, 2))
    floor = metrics.joint_metrics(same, ref, seed=0)
    lost = metrics.joint_metrics(independent, ref, seed=0)
    assert lost["corr_max_error"] == pytest.approx(0.8, abs=0.06)
    assert floor["corr_max_error"] < 0.06
    for key in ("w2", "sliced_w2", "energy"):
        assert lost[key] > floor[key]


def test_khat_exact_proposal_is_good_and_narrow_proposal_is_bad(rng):
    # target N(0, 1); log w = log p(z) - log q(z) for z ~ q
    def log_w(scale):
        z = rng.normal(0.0, scale, N)
        return stats.norm.logpdf(z) - stats.norm.logpdf(z, scale=scale)

    assert metrics.psis_khat(log_w(1.0)) < 0.5  # exact: constant weights
    assert metrics.psis_khat(log_w(1.2)) < 0.5  # wider: bounded weights
    # q = N(0, s) narrower than the target: weight tail index gives k = 1 - s^2 = 0.91
    k_bad = metrics.psis_khat(log_w(0.3))
    assert k_bad > 0.7
    assert metrics.khat_verdict(k_bad) == "bad"
    assert metrics.khat_verdict(0.3) == "good"
    assert metrics.khat_verdict(0.6) == "ok"
    assert metrics.khat_verdict(float("nan")) == "n/a"


def test_khat_of_very_heavy_tailed_weights_is_a_number_not_a_warning():
    # A barely fitted guide gives log weights spread over hundreds of nats; with
    # 20000 of them ArviZ's Pareto fit overflows in exp (weight 0, harmless).
    # Under the suite's warnings-as-errors this used to fail `compare` in CI.
    lw = np.random.default_rng(0).normal(0.0, 60.0, 20000)
    k = metrics.psis_khat(lw)
    assert np.isfinite(k) and k > 0.7


def test_elbo_iwae_and_log_evidence_from_known_weights(rng):
    # q = N(0, 1.5), p(x, z) = Z N(z; 0, 1) with log Z = -2: ELBO = log Z - KL(q || p)
    z = rng.normal(0.0, 1.5, 20000)
    lw = -2.0 + stats.norm.logpdf(z) - stats.norm.logpdf(z, scale=1.5)
    kl = np.log(1 / 1.5) + (1.5**2) / 2 - 0.5
    value, se = metrics.elbo(lw)
    assert abs(value - (-2.0 - kl)) < 5 * se
    iwae, iwae_se = metrics.iwae_bound(lw, 50)
    assert value < iwae < -2.0 + 5 * iwae_se
    est, est_se = metrics.log_evidence_is(lw)
    assert abs(est + 2.0) < 5 * est_se


def test_central_interval_and_coverage_are_consistent(rng):
    x = rng.normal(size=N)
    lo, hi = metrics.central_interval(x, 0.9)
    assert metrics.coverage(x, x, 0.9) == pytest.approx(0.9, abs=0.002)
    assert lo < 0 < hi
