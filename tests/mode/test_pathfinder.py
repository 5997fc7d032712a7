"""Pathfinder: its low-rank algebra exactly, its Gaussians against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from vimodels.catalog.registry import get_model
from vimodels.mode.pathfinder import (
    gaussian_draws,
    inverse_hessian_factors,
    pair_update,
    pathfinder,
)


def _pairs(dim: int, m: int, seed: int = 0):
    """Secant pairs of a quadratic with Hessian A: z = A s."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    A = q @ q.T + dim * torch.eye(dim, dtype=torch.float64)
    S = torch.randn(dim, m, generator=gen, dtype=torch.float64)
    return A, S, A @ S


def test_low_rank_draws_have_the_dense_gaussians_density():
    """gaussian_draws' log q equals MultivariateNormal(loc, dense Sigma).log_prob, to rounding."""
    A, S, Z = _pairs(12, 4)
    alpha = torch.ones(12, dtype=torch.float64)
    for i in range(4):
        alpha = pair_update(alpha, S[:, i], Z[:, i])
    ih = inverse_hessian_factors(alpha, S, Z)
    loc = torch.linspace(-1, 1, 12, dtype=torch.float64)
    u = torch.randn(500, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    draws, log_q = gaussian_draws(loc, ih, u)
    dense = torch.distributions.MultivariateNormal(loc, covariance_matrix=ih.dense())
    torch.testing.assert_close(log_q, dense.log_prob(draws), rtol=1e-9, atol=1e-9)
    # and their covariance is Sigma (Monte Carlo: 4 se of a covariance entry)
    many = gaussian_draws(
        loc,
        ih,
        torch.randn(40000, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
    )[0]
    emp = torch.cov(many.T)
    sigma = ih.dense()
    se = torch.sqrt((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma**2) / 40000)
    assert bool(((emp - sigma).abs() <= 4.5 * se).all())


def test_the_bfgs_estimate_satisfies_the_last_secant_equation():
    """Sigma z = s for the newest pair (the defining property of a BFGS update)."""
    A, S, Z = _pairs(20, 5, seed=1)
    alpha = torch.ones(20, dtype=torch.float64)
    for i in range(5):
        alpha = pair_update(alpha, S[:, i], Z[:, i])
    sigma = inverse_hessian_factors(alpha, S, Z).dense()
    torch.testing.assert_close(sigma @ Z[:, -1], S[:, -1], rtol=1e-8, atol=1e-10)
    assert bool((torch.linalg.eigvalsh(0.5 * (sigma + sigma.T)) > 0).all())


def _kl(m1, s1, m0, s0) -> float:
    """KL(N(m1, s1) || N(m0, s0)), nats."""
    p0 = np.linalg.inv(s0)
    d = len(m0)
    return 0.5 * (
        np.trace(p0 @ s1)
        - d
        + (m0 - m1) @ p0 @ (m0 - m1)
        + np.linalg.slogdet(s0)[1]
        - np.linalg.slogdet(s1)[1]
    )


def test_pathfinder_recovers_the_conjugate_posterior():
    """Mean and covariance of the chosen Gaussian against the exact posterior.

    Pathfinder's covariance is an L-BFGS estimate from 5 secant pairs chosen by a
    25-draw ELBO, not an exact Hessian: it is not accurate to 1e-3 (measured:
    0.5-11 % of the largest entry over seeds 0-3 with J = 5 or 10; the mean at
    the mode to 1e-7-0.013 sd; see the module docstring). What it
    promises is a small KL. We require KL(q || p) <= 0.05 nats (closed form,
    both Gaussian; measured 0.0001-0.009 for the chosen component over seeds
    0-3). That bound implies, for any direction, an sd ratio within
    [0.75, 1.35] (0.5 (r^2 - 1 - 2 log r) <= 0.05) and a mean error within
    sqrt(2 * 0.05) = 0.32 posterior sd, which are checked as well, with the
    mixture ELBO within 0.05 nats + 3 se of the exact log evidence.
    """
    entry = get_model("conjugate_linear_regression")
    exact = entry.exact(entry.data())
    r = pathfinder(entry, seed=0, num_draws=4000)
    best = r.components[r.best]
    mean, cov = best.loc.numpy(), best.cov.numpy()
    assert _kl(mean, cov, exact.mean["beta"], exact.cov) <= 0.05
    sd_ratio = np.sqrt(np.diag(cov)) / exact.sd["beta"]
    assert (sd_ratio > 0.75).all() and (sd_ratio < 1.35).all()
    assert (np.abs(mean - exact.mean["beta"]) / exact.sd["beta"]).max() < 0.32
    assert r.elbo <= exact.log_evidence + 1e-6 or math.isclose(r.elbo, exact.log_evidence)
    assert exact.log_evidence - r.elbo < 0.05 + 3 * 0.01
    assert r.k_hat < 0.5
    # the resampled draws: the posterior mean within 4 Monte Carlo se (resampling
    # with replacement of near-equal weights: se ~ sd / sqrt(num_draws))
    draws = r.constrained_draws()["beta"]
    se = exact.sd["beta"] / math.sqrt(len(draws))
    assert (np.abs(draws.mean(0) - exact.mean["beta"]) < 4 * se + 0.05 * exact.sd["beta"]).all()


@pytest.mark.slow
def test_pathfinder_elbo_on_eight_schools_against_laplace_and_full_rank_svi():
    """Eight schools: Pathfinder's Gaussian is far better than Laplace's, short of the best.

    Measured (4000 draws): Pathfinder -33.4 to -38.8 depending on the seed and
    on which 25-draw ELBO estimates win along the paths; a 5000-step
    auto_multivariate_normal fit (the best Gaussian SVI finds) -31.63 +- 0.04;
    Laplace at the mode -57.8. The posterior is funnel-shaped in (log tau,
    theta): the Gaussians Pathfinder builds from local curvature along its paths
    do not include the best global Gaussian (seed 0: the best candidate of each
    of the 4 paths has a 4000-draw ELBO of -38.8 to -42.8; built with the exact
    Hessian at every iterate instead of the L-BFGS estimate, -56.4 at best), so
    "within one standard error of it" (0.04 nats) cannot hold. Tested instead
    what it promises: Pathfinder beats Laplace by more than 10 nats (3 se on
    top) and stays within 8 nats of the full-rank SVI fit.
    """
    import vimodels

    # the best single Gaussian (the resampling fit's guide is the 4 paths' mixture, whose
    # ELBO is lower: -41.5 +- 0.7 measured; its draws are what resampling corrects)
    pf = vimodels.fit(
        "eight_schools_noncentered",
        guide="pathfinder",
        seed=0,
        num_eval=4000,
        guide_options={"resample": False},
    )
    lap = vimodels.fit("eight_schools_noncentered", guide="auto_laplace", num_eval=4000)
    mvn = vimodels.fit(
        "eight_schools_noncentered",
        guide="auto_multivariate_normal",
        num_steps=5000,
        num_eval=4000,
        progress=False,
    )
    assert pf.elbo - lap.elbo > 10 + 3 * math.hypot(pf.elbo_se, lap.elbo_se)
    assert mvn.elbo - pf.elbo < 8.0


def _truncated():
    # N(0, 1) truncated below at -2: a Gaussian approximation puts ~2 % of its draws outside
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
    pyro.factor("trunc", torch.where(theta > -2.0, 0.0, -math.inf))


def test_pooled_draws_outside_the_support_make_the_mixture_elbo_minus_inf():
    # before: the mixture ELBO was the mean over the finite log weights only
    res = pathfinder(_truncated, {}, seed=0)
    assert res.elbo == -math.inf
    assert "pooled draws where log p is -inf" in res.message
    assert bool((res.draws[:, 0] > -2.0).all())  # resampling never returns such a draw
