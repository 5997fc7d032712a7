"""Log weights under a particle plate agree with one draw at a time, or are not used.

Issue: a model computing ``(X * beta.unsqueeze(-2)).sum(-1)`` inside a data
plate trained fine (one particle) but reported an ELBO of -10621 where its
``X @ beta`` twin reported -29.6: the vectorized evaluation summed cross terms
of all draws. Truth here is the twin's ELBO, evaluated one draw at a time.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from vimodels.svi.draws import model_info, sample_guide
from vimodels.svi.fit import fit
from vimodels.svi.particles import NotVectorizable, check_particles, trace_log_weights

N, D, SIGMA = 40, 3, 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + SIGMA * torch.randn(N, generator=g)
    return {"X": X, "y": y}


def _beta():
    return pyro.sample("beta", dist.Normal(0.0, 1.0).expand([D]).to_event(1))


def safe_matmul(X, y):
    """``X @ beta``: fails under a particle plate (so is evaluated one draw at a time)."""
    beta = _beta()
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ beta, SIGMA), obs=y)


def unsafe_unsqueeze(X, y):
    """Mean of shape (K, 1, N) under K particles: the plate expands it to (K, K, N)."""
    beta = _beta()
    mu = (X * beta.unsqueeze(-2)).sum(-1)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)


def unsafe_first_draw(X, y):
    """Right shapes, wrong values for K > 1: every particle uses the first draw's beta."""
    beta = _beta()
    b = beta.reshape(-1)[:D]
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ b, SIGMA), obs=y)


def safe_vectorized(X, y):
    """Broadcasts correctly over particles: evaluated vectorized."""
    beta = _beta()
    mu = (X * beta.unsqueeze(-2)).sum(-1)
    pyro.sample("y", dist.Normal(mu, SIGMA).to_event(1), obs=y)


@pytest.fixture(scope="module")
def fits():
    data = _data()
    out = {}
    for m in (safe_matmul, unsafe_unsqueeze, unsafe_first_draw, safe_vectorized):
        out[m.__name__] = fit(m, data, num_steps=400, lr=0.05, seed=1, progress=False)
    return out


def _agree(a, b):
    return abs(a.elbo - b.elbo) <= 5 * np.hypot(a.elbo_se, b.elbo_se)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unsafe_unsqueeze", "unsafe_first_draw", "safe_vectorized"])
def test_elbo_matches_the_safe_twin(fits, name):
    twin, r = fits["safe_matmul"], fits[name]
    # same model and data, same guide family: the ELBOs agree within Monte Carlo error
    assert _agree(r, twin), (r.elbo, r.elbo_se, twin.elbo, twin.elbo_se)
    assert -60 < r.elbo < -20


@pytest.mark.slow
def test_settings_say_how_the_elbo_was_evaluated(fits):
    assert fits["safe_vectorized"].settings["eval_vectorized"] is True
    assert fits["safe_vectorized"].settings["eval_vectorized_note"] is None
    for name in ("unsafe_unsqueeze", "unsafe_first_draw", "safe_matmul"):
        s = fits[name].settings
        assert s["eval_vectorized"] is False
        assert s["eval_vectorized_note"]
    assert "broadcast" in fits["unsafe_unsqueeze"].settings["eval_vectorized_note"]
    assert "on its own" in fits["unsafe_first_draw"].settings["eval_vectorized_note"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unsafe_unsqueeze", "unsafe_first_draw"])
def test_result_log_weights_and_diagnostic_draws_use_the_check(fits, name):
    r, twin = fits[name], fits["safe_matmul"]
    lw = r.log_weights(400, seed=5)
    se = lw.std(ddof=1) / np.sqrt(len(lw))
    assert abs(lw.mean() - twin.elbo) <= 5 * np.hypot(se, twin.elbo_se)
    info = model_info(r.model, r.args)
    report = {}
    with pyro.get_param_store().scope(r.param_state):
        pyro.set_rng_seed(6)
        draws, lw2 = sample_guide(r.model, r.guide, r.args, {}, info, 400, report=report)
    assert report["vectorized"] is False and report["reason"]
    assert draws["beta"].shape == (400, D)
    se2 = lw2.std(ddof=1) / np.sqrt(len(lw2))
    assert abs(lw2.mean() - twin.elbo) <= 5 * np.hypot(se2, twin.elbo_se)


def test_check_particles_raises_only_where_the_numbers_differ():
    data = _data()

    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(D))
        pyro.sample("beta", dist.Normal(loc, 0.3).to_event(1))

    for model, bad in (
        (safe_vectorized, False),
        (unsafe_unsqueeze, True),
        (unsafe_first_draw, True),
    ):
        with pyro.get_param_store().scope(), torch.no_grad():
            pyro.set_rng_seed(0)
            n = 8
            with pyro.plate("_p", n, dim=-2):
                g_tr = poutine.trace(guide).get_trace(**data)
                m_tr = poutine.trace(poutine.replay(model, trace=g_tr)).get_trace(**data)
            try:
                lw = trace_log_weights(m_tr, g_tr, n, 2)
            except NotVectorizable:
                assert bad
                continue
            if bad:
                with pytest.raises(NotVectorizable):
                    check_particles(model, guide, (), data, m_tr, g_tr, lw)
            else:
                check_particles(model, guide, (), data, m_tr, g_tr, lw)


def test_masked_sites_count_as_masked_under_the_particle_plate():
    # poutine.mask: the vectorized sum used to ignore the mask (a silently wrong ELBO)
    from vimodels.svi.weights import log_weights

    data = _data()
    keep = torch.arange(N) < N // 2

    def masked(X, y):
        beta = _beta()
        with pyro.plate("data", X.shape[0]), poutine.mask(mask=keep):
            # (X * beta).sum(-1): (K, N) under K particles, broadcasts correctly
            pyro.sample("y", dist.Normal((X * beta).sum(-1), SIGMA), obs=y)

    def guide(X, y):
        pyro.sample("beta", dist.Normal(torch.tensor([1.0, -2.0, 0.5]), 0.1).to_event(1))

    def first_half(X, y):
        return safe_matmul(X[: N // 2], y[: N // 2])

    report: dict = {}
    pyro.set_rng_seed(0)
    lw = log_weights(masked, guide, data, 2000, 1, report=report)
    pyro.set_rng_seed(1)
    ref = log_weights(first_half, guide, data, 2000, 1)
    se = np.hypot(lw.std(ddof=1), ref.std(ddof=1)) / np.sqrt(2000)
    assert report["vectorized"] is True
    assert abs(lw.mean() - ref.mean()) <= 5 * se


def _no_broadcast_blr(X, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 2.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal((X * beta.unsqueeze(-2)).sum(-1), 1.0), obs=y)


def test_training_particles_of_a_model_that_does_not_broadcast_are_drawn_one_at_a_time():
    """Vectorized particles on this model trained P copies of the likelihood (P x P cross
    terms): q's sds came out 1/sqrt(P) of the optimum, called converged. The truth: the
    optimal mean-field sds of a Gaussian posterior, 1 / sqrt(diag(precision))."""
    import vimodels
    from vimodels.errors import IncompatibleError

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    y = X @ (2 * rng.normal(size=3)) + rng.normal(size=20)
    precision = X.T @ X + np.eye(3) / 4.0
    mf_sd = 1 / np.sqrt(np.diag(precision))
    data = {"X": torch.tensor(X, dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32)}
    r = vimodels.fit(
        _no_broadcast_blr, data, guide="auto_normal", num_particles=4, num_steps=1500, seed=0,
        progress=False,
    )  # fmt: skip
    assert "one at a time" in r.settings["particles_note"]
    assert r.settings["vectorize_particles"] is False
    sd = r.sample(4000, seed=1)["beta"].std(0)
    np.testing.assert_allclose(sd / mf_sd, 1.0, atol=0.15)  # was 0.49-0.50
    with pytest.raises(IncompatibleError, match="does not broadcast"):
        vimodels.fit(_no_broadcast_blr, data, elbo="iwae", num_steps=5, progress=False)


def _no_broadcast_blr_subsampled(X, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 2.0).to_event(1))
    with pyro.plate("n", X.shape[0], subsample_size=25) as idx:
        mean = (X[idx] * beta.unsqueeze(-2)).sum(-1)
        pyro.sample("y", dist.Normal(mean, 1.0), obs=y[idx])


def test_subsampled_model_that_does_not_broadcast_over_particles_is_caught():
    """The same model with a subsampled plate was not checked (each pass draws its own
    rows); the check now runs with every plate on all its rows. iwae, which only
    vectorizes, stops; trace draws its particles one at a time."""
    import vimodels
    from vimodels.errors import IncompatibleError

    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3))
    y = X @ (2 * rng.normal(size=3)) + rng.normal(size=100)
    data = {"X": torch.tensor(X, dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32)}
    with pytest.raises(IncompatibleError, match="does not broadcast"):
        vimodels.fit(_no_broadcast_blr_subsampled, data, elbo="iwae", num_steps=5, progress=False)
    r = vimodels.fit(
        _no_broadcast_blr_subsampled, data, guide="auto_normal", num_particles=4,
        num_steps=20, seed=0, progress=False,
    )  # fmt: skip
    assert "one at a time" in r.settings["particles_note"]
    assert r.settings["vectorize_particles"] is False
