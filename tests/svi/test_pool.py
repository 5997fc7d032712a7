"""The resampling's proposal pool through the frozen potential (vimodels.svi.pool).

The frozen path must give what the trace path gives: the same draws for the
same seed (the guide draws as before), log weights to 1e-9 relative, the same
Pareto k and resampled draws; where it cannot (a masked site, float32
constants, a value read into Python) the trace path runs.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels
from vimodels.svi import pool
from vimodels.svi.draws import model_info
from vimodels.svi.resample import resampled_draws
from vimodels.svi.scope import param_scope

F64 = torch.float64


def _eight_schools_f64(sigma, y=None):
    """The catalog's non-centered eight schools with float64 constants (float64 latents)."""
    zero, five = torch.tensor(0.0, dtype=F64), torch.tensor(5.0, dtype=F64)
    mu = pyro.sample("mu", dist.Normal(zero, five))
    tau = pyro.sample("tau", dist.HalfCauchy(five))
    with pyro.plate("schools", sigma.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(zero, 1.0 + zero))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _schools_data():
    entry = vimodels.get_model("eight_schools_noncentered")
    return {k: v.to(F64) for k, v in entry.data().items()}


def _both_paths(fit, n: int, seed: int, monkeypatch, frozen: bool):
    """``resampled_draws`` (draws, pool log weights, k) by the traces and by the pool module."""
    out = []
    for enabled in (False, True):
        with monkeypatch.context() as m:
            m.setattr(pool, "ENABLED", enabled)
            if enabled and frozen:  # the frozen path must not fall back to the traces
                m.setattr(pool, "sample_guide", _no_traces)
            with param_scope(fit):
                info = model_info(fit.model, fit.args, {}, fit.max_plate_nesting)
                pyro.set_rng_seed(seed)
                out.append(resampled_draws(fit.model, fit.guide, fit.args, {}, info, n))
    return out


def _no_traces(*args, **kwargs):
    raise AssertionError("the pool was drawn through the traces")


def _assert_same(old, new) -> None:
    (d0, w0, k0), (d1, w1, k1) = old, new
    assert d0.keys() == d1.keys()
    for k in d0:
        assert np.array_equal(d0[k], d1[k]), k
    assert np.isfinite(w0).all()
    np.testing.assert_allclose(w1, w0, rtol=1e-9, atol=1e-9 * np.abs(w0).max())
    assert k1 == pytest.approx(k0, rel=1e-9)


def _prepare_check(fit) -> None:
    """Run the once-per-guide agreement check outside the compared calls (it keeps the stream)."""
    with param_scope(fit):
        info = model_info(fit.model, fit.args, {}, fit.max_plate_nesting)
        assert pool._frozen_for(fit.model, fit.guide, fit.args, {}, info, info.latent)


@pytest.mark.parametrize(
    "guide",
    [
        "auto_laplace_is",
        # Pathfinder's four paths on this funnel: 10-16 s at load 13 (its mixture is
        # covered fast by the posteriordb test below)
        pytest.param("pathfinder", marks=pytest.mark.slow),
    ],
)
def test_frozen_pool_matches_the_traces_on_eight_schools(guide, monkeypatch):
    fit = vimodels.fit(
        _eight_schools_f64, _schools_data(), guide=guide, seed=0, num_eval=200, num_threads=1
    )
    assert fit.guide.potential is not None and fit.guide.locs.dtype == F64
    _prepare_check(fit)
    old, new = _both_paths(fit, 1000, 7, monkeypatch, frozen=True)
    _assert_same(old, new)
    assert new[0]["theta_tilde"].shape == (1000, 8)


def test_frozen_pool_matches_the_traces_on_a_posteriordb_model(monkeypatch):
    fit = vimodels.fit(
        "pdb_mesquite_logvolume", guide="pathfinder", seed=0, num_eval=200, num_threads=1
    )
    _prepare_check(fit)
    old, new = _both_paths(fit, 500, 3, monkeypatch, frozen=True)
    _assert_same(old, new)
    # and FitResult.sample itself: the same draws either way
    monkeypatch.setattr(pool, "ENABLED", False)
    before = fit.sample(300, seed=4)
    monkeypatch.setattr(pool, "ENABLED", True)
    after = fit.sample(300, seed=4)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_catalog_eight_schools_keeps_the_traces(monkeypatch):
    """float32 data and constants: the guide draws float32, the potential is float64."""
    fit = vimodels.fit(
        "eight_schools_noncentered", guide="auto_laplace_is", seed=0, num_eval=50, num_threads=1
    )
    with param_scope(fit):
        info = model_info(fit.model, fit.args, {}, fit.max_plate_nesting)
        assert pool._frozen_for(fit.model, fit.guide, fit.args, {}, info, info.latent) is None
    old, new = _both_paths(fit, 300, 1, monkeypatch, frozen=False)
    _assert_same(old, new)


def _float32_constant(x, y=None):
    """float64 latents and one float32 constant (which the potential makes in float64)."""
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
    s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0))
    third = torch.tensor(1.0 / 3.0)  # the default dtype: float32 in a fit, float64 in the potential
    with pyro.plate("n", x.shape[0]):
        pyro.sample("y", dist.Normal(b * x, s * third * 3.0), obs=y)


def test_a_float32_constant_fails_the_agreement_check_and_keeps_the_traces(monkeypatch):
    """Weights differing by float32 round-off (~1e-8 relative) are not the traces': they decide."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, generator=gen, dtype=F64)
    data = {"x": x, "y": 2 * x + 0.5 * torch.randn(30, generator=gen, dtype=F64)}
    fit = vimodels.fit(
        _float32_constant, data, guide="auto_laplace_is", seed=0, num_eval=50, num_threads=1
    )
    assert fit.guide.locs.dtype == F64
    with param_scope(fit):
        info = model_info(fit.model, fit.args, {}, fit.max_plate_nesting)
        assert pool._frozen_for(fit.model, fit.guide, fit.args, {}, info, info.latent) is None
    assert fit.guide._pool_agrees is False  # the frozen graph was built, the check refused it
    old, new = _both_paths(fit, 300, 2, monkeypatch, frozen=False)
    _assert_same(old, new)


@pytest.mark.parametrize("components", [1, 3])
def test_gaussian_log_density_is_the_distributions(components):
    gen = torch.Generator().manual_seed(1)
    d = 4
    locs = torch.randn(components, d, generator=gen, dtype=F64)
    a = torch.randn(components, d, d, generator=gen, dtype=F64)
    trils = torch.linalg.cholesky(a @ a.transpose(-1, -2) + torch.eye(d, dtype=F64))
    u = 2 * torch.randn(50, d, generator=gen, dtype=F64)
    comp = dist.MultivariateNormal(locs, scale_tril=trils)
    if components == 1:
        ref = dist.MultivariateNormal(locs[0], scale_tril=trils[0]).log_prob(u)
    else:
        ref = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(3, dtype=F64)), comp)
        ref = ref.log_prob(u)
    got = pool.gaussian_log_density(locs, trils, u)
    assert got.shape == (50,)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
