"""Deterministic sites keep each draw's own value, whatever the model computes.

Under a plate of n draws a deterministic value need not have the draws on its
first axis: ``torch.stack([a, b])`` has them last, ``W.T`` moves them and
``W.sum()`` sums over all of them. Laid out by element count alone such values
were scrambled across draws (``ab[0]`` a 50/50 mix of ``a`` and ``b``; ``total``
the sum over 1000 draws) in ``FitResult.sample``, the ArviZ export and the NUTS
reference alike, so ``compare`` matched scrambled against scrambled. The truth
here is exact: each deterministic value is a function of the same draw's latents.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

import vimodels
from vimodels.svi.draws import model_info, replay_model


def stacked(y1, y2):
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    W = pyro.sample("W", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
    pyro.deterministic("ab", torch.stack([a, b]))
    pyro.deterministic("total", W.sum())
    pyro.deterministic("Wt", W.transpose(-1, -2))
    with pyro.plate("n", y1.shape[0]):
        pyro.sample("y1", dist.Normal(a, 1.0), obs=y1)
        pyro.sample("y2", dist.Normal(b, 1.0), obs=y2)


DATA = {"y1": torch.full((25,), -5.0), "y2": torch.full((25,), 5.0)}


def _per_draw_truth(d):
    np.testing.assert_allclose(d["ab"][:, 0], d["a"], rtol=1e-6)
    np.testing.assert_allclose(d["ab"][:, 1], d["b"], rtol=1e-6)
    np.testing.assert_allclose(d["total"], d["W"].sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d["Wt"], np.swapaxes(d["W"], 1, 2), rtol=1e-6)


def test_fit_draws_keep_each_draws_deterministic_values():
    r = vimodels.fit(stacked, DATA, guide="auto_normal", num_steps=50, seed=0, progress=False)
    d = r.sample(200, seed=1, sites=("a", "b", "W", "ab", "total", "Wt"))
    assert d["ab"].shape == (200, 2) and d["total"].shape == (200,) and d["Wt"].shape == (200, 3, 2)
    _per_draw_truth(d)
    idata = r.to_inference_data(num_samples=200, seed=1)
    post = {
        k: idata.posterior[k].values.reshape((-1,) + idata.posterior[k].shape[2:])
        for k in ("a", "b", "W", "ab", "total", "Wt")
    }
    _per_draw_truth(post)


def test_replayed_reference_draws_keep_each_draws_deterministic_values():
    info = model_info(stacked, (), DATA, None)
    rng = np.random.default_rng(0)
    latent = {
        "a": rng.normal(-5, 0.2, 300),
        "b": rng.normal(5, 0.2, 300),
        "W": rng.normal(size=(300, 2, 3)),
    }
    rep = replay_model(stacked, (), DATA, info, latent, chunk=128)
    _per_draw_truth({**latent, **rep.deterministic})
    # pointwise log likelihood of each draw: its own a and b
    np.testing.assert_allclose(
        rep.log_likelihood["y1"][:, 0],
        -0.5 * (-5.0 - latent["a"]) ** 2 - 0.5 * np.log(2 * np.pi),
        rtol=1e-5,
    )
