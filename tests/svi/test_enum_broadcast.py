"""A model with enumerated discrete sites that does not broadcast over draws.

``m0 = mu.reshape(-1)[0]`` is right for one draw and, under a plate of draws,
gives every draw the first draw's likelihood. The path without discrete sites
checks a vectorized pass against one-draw evaluation; the enumerated path did
not: its ELBO came out up to 20 of its printed standard errors off, some above
``log p(y)``, and its discrete draws followed the wrong conditional. The truth:
the ELBO of the fitted Normal q(mu) by 120-point Gauss-Hermite quadrature with
the assignments summed exactly.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from scipy.special import logsumexp
from scipy.stats import norm

import vimodels
from vimodels.svi.weights import elbo_estimate

W, C = np.array([0.3, 0.7]), np.array([-2.0, 2.0])
_rng = np.random.default_rng(11)
Y = 0.5 + C[_rng.choice(2, size=12, p=W)] + _rng.normal(size=12)


def mix_first(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    m0 = mu.reshape(-1)[0]  # one draw right; under a draws plate, draw 0 for every draw
    with pyro.plate("n", y.shape[0]):
        z = pyro.sample(
            "z", dist.Categorical(torch.tensor([0.3, 0.7])), infer={"enumerate": "parallel"}
        )
        pyro.sample("y", dist.Normal(m0 + torch.tensor([-2.0, 2.0])[z], 1.0), obs=y)


def _elbo_at(loc: float, sd: float) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(120)
    mu = loc + sd * x
    lik = logsumexp(
        np.log(W) + norm.logpdf(Y[None, :, None], mu[:, None, None] + C, 1.0), axis=2
    ).sum(1)
    expected = (w * (lik + norm.logpdf(mu, 0, 3))).sum() / np.sqrt(2 * np.pi)
    return float(expected + 0.5 * np.log(2 * np.pi * np.e * sd**2))


def test_enumerated_elbo_of_a_model_that_does_not_broadcast_is_exact():
    r = vimodels.fit(
        mix_first,
        {"y": torch.tensor(Y, dtype=torch.float32)},
        guide="auto_normal",
        elbo="enum",
        num_steps=300,
        seed=0,
        progress=False,
    )
    assert r.settings["eval_vectorized"] is False
    assert "does not broadcast" in r.settings["eval_vectorized_note"]
    loc = float(r.params["AutoNormal.locs.mu"])
    sd = float(r.params["AutoNormal.scales.mu"])
    truth = _elbo_at(loc, sd)
    for seed in (1, 2):
        est, se = elbo_estimate(r.log_weights(400, seed=seed))
        assert abs(est - truth) <= 5 * se, (est, se, truth)


def test_recovered_discrete_draws_follow_each_draws_conditional():
    """The NUTS reference's discrete draws (``recover_discrete``) of the same model: under
    a plate of draws every draw's z came from draw 0's conditional. Exact conditional:
    P(z_n = k | mu, y_n) proportional to W_k N(y_n; mu + C_k, 1); checked by quartile of
    mu, each a sum of (z - p) over draws and rows against its exact sd."""
    from vimodels.svi.draws import model_info, recover_discrete

    y = torch.tensor(Y, dtype=torch.float32)
    info = model_info(mix_first, (y,), {}, 1)
    mu = np.random.default_rng(3).normal(0.5, 2.0, size=400).astype(np.float32)
    pyro.set_rng_seed(0)
    z = recover_discrete(mix_first, (y,), {}, info, {"mu": mu})["z"]
    assert z.shape == (400, 12)
    log_p = np.log(W) + norm.logpdf(Y[None, :, None], mu[:, None, None] + C, 1.0)
    p1 = np.exp(log_p[..., 1] - logsumexp(log_p, axis=-1))  # (draws, rows)
    for group in np.array_split(np.argsort(mu), 4):
        resid = (z[group] - p1[group]).sum()
        sd = np.sqrt((p1[group] * (1 - p1[group])).sum())
        assert abs(resid) <= 5 * sd, (resid, sd)
