"""Nested Laplace (``guide="nested_laplace"``): its pieces against closed forms, its draws
against quadrature and posteriordb, and its errors.

The hierarchical normal model here is not a catalog entry (12 groups, its own data
and priors): given the group scale ``tau``, ``(mu, theta)`` is exactly Gaussian, so
``log p~(log tau)`` must be the exact log marginal up to one constant, and the
posterior moments follow from a one-dimensional quadrature over ``tau``.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import integrate, stats

import vimodels
from vimodels.errors import CurvatureError, IncompatibleError, OptionError
from vimodels.mode import nested
from vimodels.mode.guides import FixedGaussianGuide
from vimodels.mode.nested import (
    _Batch,
    _newton_direction,
    conditional_modes,
    default_hyper_sites,
    nested_laplace,
    split_index,
)
from vimodels.mode.potential import make_potential
from vimodels.mode.psis import psis
from vimodels.svi.pool import gaussian_log_density

Y = torch.tensor([3.1, -4.2, 11.5, 0.4, 7.7, -1.9, 5.0, 14.2, -6.3, 2.8, 9.1, 1.2])
SIG = torch.tensor([4.0, 6.0, 9.0, 5.0, 7.0, 3.0, 8.0, 10.0, 6.0, 4.0, 7.0, 5.0])
MU0, MU_SD, TAU_SD = 1.0, 4.0, 3.0


def hier(y, sig):
    mu = pyro.sample("mu", dist.Normal(MU0, MU_SD))
    tau = pyro.sample("tau", dist.HalfNormal(TAU_SD))
    with pyro.plate("g", y.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sig), obs=y)


DATA = {"y": Y, "sig": SIG}
y64, s64 = Y.double().numpy(), SIG.double().numpy()


def log_marginal_tau(tau: float) -> float:
    """log p(y | tau) + log p(tau): mu and theta integrated out (y ~ MVN), nats."""
    cov = np.diag(s64**2 + tau**2) + MU_SD**2
    lik = stats.multivariate_normal(np.full(len(y64), MU0), cov).logpdf(y64)
    return lik + stats.halfnorm(scale=TAU_SD).logpdf(tau)


def exact_moments() -> dict[str, tuple[float, float]]:
    """Posterior mean and sd of tau, mu and theta[2] by quadrature over tau."""
    top = max(log_marginal_tau(t) for t in np.linspace(0.01, 30, 300))

    def w(t):
        return math.exp(log_marginal_tau(t) - top)

    def cond(t):  # mu | tau, y and theta[2] | tau, y: means and variances
        v = s64**2 + t**2
        prec = 1 / MU_SD**2 + (1 / v).sum()
        m_mu = (MU0 / MU_SD**2 + (y64 / v).sum()) / prec
        v_mu = 1 / prec
        vj = 1 / (1 / s64[2] ** 2 + 1 / t**2)
        m_th = vj * (y64[2] / s64[2] ** 2 + m_mu / t**2)
        # theta_j = vj (y_j / s_j^2 + mu / t^2): linear in mu
        v_th = vj + (vj / t**2) ** 2 * v_mu
        return m_mu, v_mu, m_th, v_th

    def quad(f):
        return integrate.quad(lambda t: w(t) * f(t), 0, 60, limit=200, epsabs=1e-12)[0]

    z = quad(lambda t: 1.0)
    out = {}
    m1, m2 = quad(lambda t: t) / z, quad(lambda t: t * t) / z
    out["tau"] = (m1, math.sqrt(m2 - m1**2))
    for key, (mi, vi) in {"mu": (0, 1), "theta2": (2, 3)}.items():
        m1 = quad(lambda t, mi=mi: cond(t)[mi]) / z
        m2 = quad(lambda t, mi=mi, vi=vi: cond(t)[vi] + cond(t)[mi] ** 2) / z
        out[key] = (m1, math.sqrt(m2 - m1**2))
    return out


@pytest.fixture(scope="module")
def potential():
    return make_potential(hier, DATA)


def test_default_hyper_sites_are_the_constrained_ones(potential):
    assert default_hyper_sites(potential) == ("tau",)
    names, hi, li = split_index(potential, None)
    assert names == ("tau",) and hi.tolist() == [1] and li.tolist() == [0] + list(range(2, 14))


def test_log_marginal_is_exact_where_the_conditional_is_gaussian(potential):
    """log p~(u) at several u = log tau equals log p(y | tau) + log p(tau) + u plus a constant.

    Laplace is exact for the Gaussian (mu, theta) | tau: any error in the
    conditional mode, the Hessian or its log determinant shows as a non-constant
    difference.
    """
    names, hi, li = split_index(potential, None)
    u = torch.linspace(-2.0, 2.5, 7, dtype=torch.float64)[:, None]
    x0 = torch.zeros(7, len(li), dtype=torch.float64)
    _, lm, _, _ = conditional_modes(_Batch(potential), u, x0, hi, li)
    exact = np.array([log_marginal_tau(math.exp(v)) + v for v in u[:, 0].tolist()])
    diff = lm.numpy() - exact
    np.testing.assert_allclose(diff, diff[0], atol=1e-8)
    # and the constant is the normalizing 0 of both: p~ integrates like the exact marginal
    np.testing.assert_allclose(diff[0], 0.0, atol=1e-8)


def test_newton_direction_ascends_where_the_curvature_is_negative():
    a = torch.tensor([[[2.0, 0.0], [0.0, -3.0]], [[4.0, 1.0], [1.0, 3.0]]], dtype=torch.float64)
    g = torch.tensor([[1.0, 1.0], [1.0, -2.0]], dtype=torch.float64)
    d, pd = _newton_direction(a, g)
    assert pd.tolist() == [False, True]
    assert float((g[0] * d[0]).sum()) > 0  # an ascent direction, not a step to the minimum
    torch.testing.assert_close(d[0], torch.tensor([0.5, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(d[1], torch.linalg.solve(a[1], g[1]))


def test_weighted_mixture_guide_density_matches_the_pool_formula():
    gen = torch.Generator().manual_seed(0)
    locs = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[:, None, None]
    trils = torch.linalg.cholesky(torch.eye(2, dtype=torch.float64) * scales)
    logits = torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64)
    guide = FixedGaussianGuide(lambda: None, locs, trils, logits=logits)
    u = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    q = guide.get_posterior().log_prob(u)
    w = torch.softmax(logits, 0)
    mvn = torch.distributions.MultivariateNormal
    manual = torch.log(
        sum(w[k] * mvn(locs[k], scale_tril=trils[k]).log_prob(u).exp() for k in range(3))
    )
    torch.testing.assert_close(q, manual)
    torch.testing.assert_close(gaussian_log_density(locs, trils, u, guide.logits), manual)
    with pytest.raises(OptionError, match="logits must be 3 finite"):
        FixedGaussianGuide(lambda: None, locs, trils, logits=torch.zeros(2))


def test_draws_match_the_quadrature():
    """Resampled draws: means of tau, mu, theta[2] within 5 Monte Carlo se of quadrature,
    sds within 5 se (se of an sd: sd / sqrt(2 n_eff))."""
    truth = exact_moments()
    r = vimodels.fit(hier, DATA, guide="nested_laplace", seed=2, num_eval=1000)
    assert r.status == "converged" and r.settings["resample"]["k_hat"] < 0.5
    assert r.settings["nested_laplace"]["hyper_sites"] == ["tau"]
    n = 4000
    d = r.sample(n, seed=7)
    lw = r.log_weights(4 * n, seed=8)
    p = np.exp(psis(lw)[0])
    n_eff = 1.0 / (1.0 / (1.0 / float((p**2).sum())) + 1.0 / n)
    got = {"tau": d["tau"], "mu": d["mu"], "theta2": d["theta"][:, 2]}
    for key, (mean, sd) in truth.items():
        se = sd / math.sqrt(n_eff)
        assert abs(got[key].mean() - mean) <= 5 * se, (key, got[key].mean(), mean, se)
        assert abs(got[key].std() - sd) <= 5 * sd / math.sqrt(2 * n_eff), key


def test_grid_covers_the_marginal(potential):
    """The grid's mode and sd of u = log tau against the exact marginal's, by quadrature."""
    res = nested_laplace(potential)
    us = np.linspace(-6, 4, 4001)
    lm = np.array([log_marginal_tau(math.exp(v)) + v for v in us])
    mode = us[np.argmax(lm)]
    assert abs(float(res.mode[0]) - mode) < 5e-3
    # every kept point within grid_drop of the top, the top within the kept ones
    assert float(res.log_marginal.max() - res.log_marginal.min()) <= 6.0
    assert float(res.grid.min()) < mode < float(res.grid.max())
    torch.testing.assert_close(res.logits.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.slow
def test_gp_against_posteriordb():
    """The GP's posterior (no Gaussian method gets rho's and alpha's sds): nested Laplace's
    resampled draws against posteriordb's 10 000 Stan draws, every element within 5 se.
    """
    from vimodels.validation import reference_table

    table = reference_table("pdb_gp_pois_regr").set_index("element")
    r = vimodels.fit("pdb_gp_pois_regr", guide="nested_laplace", seed=0, num_eval=1000)
    assert r.settings["nested_laplace"]["hyper_sites"] == ["rho", "alpha"]
    assert r.settings["resample"]["k_hat"] < 0.5
    n = 4000
    d = r.sample(n, seed=1)
    lw = r.log_weights(4 * n, seed=2)
    p = np.exp(psis(lw)[0])
    n_eff = 1.0 / (1.0 / (1.0 / float((p**2).sum())) + 1.0 / n)
    for element, row in table.iterrows():
        site, _, idx = element.partition("[")
        x = d[site] if not idx else d[site][:, int(idx.rstrip("]"))]
        se = math.hypot(row["sd_full"] / math.sqrt(n_eff), row["mcse_mean"])
        assert abs(x.mean() - row["mean_full"]) <= 5 * se, element


def test_errors(potential):
    with pytest.raises(OptionError, match="hyper_sites must name latent sites.*mu, tau, theta"):
        nested_laplace(potential, hyper_sites=["sigma"])
    with pytest.raises(IncompatibleError, match="13 unconstrained dimensions.*at most 3"):
        nested_laplace(potential, hyper_sites=["tau", "theta"])
    with pytest.raises(OptionError, match="grid_step"):
        nested_laplace(potential, grid_step=0)
    with pytest.raises(OptionError, match="does not take option.*grid_stepz"):
        vimodels.fit(hier, DATA, guide="nested_laplace", guide_options={"grid_stepz": 1})

    def flat(y):
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("y", dist.Normal(b.sum(), 1.0), obs=y)

    with pytest.raises(IncompatibleError, match="found no hyperparameter.*hyper_sites"):
        vimodels.fit(flat, {"y": torch.tensor(0.3)}, guide="nested_laplace")
    # mu on the grid leaves the funnel of (tau, theta) to the Gaussian part: no mode there
    with pytest.raises(CurvatureError, match="a scale of theirs left off the grid"):
        vimodels.fit(hier, DATA, guide="nested_laplace", guide_options={"hyper_sites": "mu"})
    r = vimodels.fit(hier, DATA, guide="nested_laplace", guide_options={"hyper_sites": ["tau"]})
    assert r.settings["nested_laplace"]["hyper_sites"] == ["tau"]


Y5 = torch.tensor([1.0, 0.0, 3.0, 5.0, 2.0])
Y3 = torch.tensor([0.3, -0.8, 1.1])


def pois(y, y2, c):
    """A latent site first, a size-2 hyper site between two latent ones, Poisson counts."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([5]).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(1.0).expand([2]).to_event(1))
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    mu = mu[..., None]  # batches: a plate of draws outside adds a dimension on the left
    pyro.sample("y", dist.Poisson((mu + tau[..., :1] * z).exp()).to_event(1), obs=y)
    pyro.sample("y2", dist.Normal(mu, tau[..., 1:]).to_event(1), obs=y2)
    pyro.factor("c", c)


def test_grid_does_not_depend_on_a_constant_in_the_density():
    """A constant added to log p (large data make |log p| large) leaves the posterior as it
    is: the same mode and curvature of log p~, to 1e-6 (Newton's tolerance was relative to
    |log p|: at |log p| = 1e6 the sds came out 0.375 and 0.259 for 0.532 and 0.387)."""
    out = []
    for c in (0.0, -1e6):
        pot = make_potential(pois, {"y": Y5, "y2": Y3, "c": torch.tensor(c)})
        res = nested_laplace(pot)
        assert res.hyper_sites == ("tau",) and res.hyper_index.tolist() == [5, 6]
        out.append(res)
    torch.testing.assert_close(out[0].mode, out[1].mode, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0].hyper_cov, out[1].hyper_cov, atol=1e-6, rtol=1e-5)
    assert len(out[0].grid) == len(out[1].grid)


def test_a_model_that_reads_one_particle_is_evaluated_row_by_row():
    """``s[0]`` of a one-element site reads the first particle's value in every batched row:
    the batch check compares more than the first row, so the potential goes row by row."""

    def reads_first(y):
        s = pyro.sample("s", dist.HalfNormal(torch.ones(1, dtype=y.dtype)).to_event(1))
        x = pyro.sample("x", dist.Normal(0.0, s[0]).expand([5]).to_event(1))
        pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)

    y = torch.tensor([0.9, -1.7, 2.5, 0.3, -0.4], dtype=torch.float64)
    pot = make_potential(reads_first, {"y": y})
    u = torch.randn(3, pot.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = pot.log_density_batch(u)
    assert pot._batch_ok is False
    torch.testing.assert_close(got, torch.stack([pot.log_density(r) for r in u]))
    res = nested_laplace(make_potential(reads_first, {"y": y}))
    assert "grid cut at 12 sd along -axis 1" in res.message  # log s's long left tail


def test_a_model_undefined_on_part_of_the_grid():
    """The model's covariance is not positive definite for s >= 1.2: the grid and draws
    that land there get no density (weight 0) instead of a crash; E[s] against quadrature."""
    n = 5
    y = torch.tensor([0.5, -0.3, 1.2, 0.8, -1.0], dtype=torch.float64)

    def model(y):
        s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=y.dtype), 0.1))
        cov = torch.eye(n, dtype=y.dtype) + (1 - s) * torch.ones(n, n, dtype=y.dtype)
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(n, dtype=y.dtype), cov))
        pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)

    yn = y.numpy()

    def log_m(s):
        cov = 2 * np.eye(n) + (1 - s) * np.ones((n, n))
        return stats.multivariate_normal(np.zeros(n), cov).logpdf(yn) + stats.lognorm(0.1).logpdf(s)

    top = log_m(1.0)
    z = integrate.quad(lambda s: math.exp(log_m(s) - top), 0.5, 1.2)[0]
    m1 = integrate.quad(lambda s: s * math.exp(log_m(s) - top), 0.5, 1.2)[0] / z
    m2 = integrate.quad(lambda s: s * s * math.exp(log_m(s) - top), 0.5, 1.2)[0] / z
    sd = math.sqrt(m2 - m1**2)
    r = vimodels.fit(model, {"y": y}, guide="nested_laplace", seed=0, num_eval=200)
    lw = r.log_weights(2000, seed=2)
    assert np.isneginf(lw).any() and np.isfinite(lw).mean() > 0.5
    s = r.sample(1000, seed=1)["s"]
    assert s.max() < 1.2
    p = np.exp(psis(np.where(np.isfinite(lw), lw, lw[np.isfinite(lw)].min() - 1e3))[0])
    n_eff = 1.0 / (1.0 / (1.0 / float((p**2).sum())) + 1.0 / 1000)
    assert abs(s.mean() - m1) <= 5 * sd / math.sqrt(n_eff)
    # the draws of weight 0 do not make k infinite (it was, by fiat); the message counts them
    rs = r.settings["resample"]
    assert rs["zero_weight"] > 0 and math.isfinite(rs["k_hat"]) and rs["k_hat"] < 0.7
    assert "of weight 0 where log p = -inf" in r.message and rs["reliable"]


def test_grid_size_is_capped(potential):
    with pytest.raises(IncompatibleError, match="grid would have .* points.*raise grid_step"):
        nested_laplace(
            make_potential(pois, {"y": Y5, "y2": Y3, "c": torch.tensor(0.0)}), grid_step=0.02
        )


@pytest.mark.parametrize("noise, seed", [(0.0, 0), (3e-4, 0), (3e-4, 1), (1e-3, 0), (1e-3, 1)])
def test_hyper_mode_stops_at_the_noise_of_log_p(monkeypatch, noise, seed):
    """log p~ carries the inner solves' noise; the search stepped and halved on it up to
    its 100-iteration cap (radon_contextual: 32 s, now 8 s; here 25-48 iterations)."""
    prec = torch.tensor([[4.0, 1.5], [1.5, 2.0]], dtype=torch.float64)
    centre = torch.tensor([0.3, -1.2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)

    def fake(batch, pts, xs, hi, li):
        d = pts - centre
        f = -0.5 * ((d @ prec) * d).sum(-1) - 1000.0
        f = f + noise * torch.randn(len(pts), generator=gen, dtype=torch.float64)
        return xs, f, None, None

    monkeypatch.setattr(nested, "conditional_modes", fake)
    h0 = torch.tensor([3.0, 2.0], dtype=torch.float64)
    mode, cov, _, converged, iters = nested.hyper_mode(
        None, h0, torch.zeros(3, dtype=torch.float64), None, None
    )
    assert converged and iters <= 10
    err = mode - centre
    assert float(err @ prec @ err) < 1e-3  # within 0.03 sd of the mode
    if noise == 0.0:
        torch.testing.assert_close(cov, torch.linalg.inv(prec), rtol=1e-3, atol=0.0)
