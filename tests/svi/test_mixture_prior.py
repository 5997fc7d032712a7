"""A latent site with a ``MixtureSameFamily`` prior (torch's support class had no transform).

``pyro.sample("x", dist.MixtureSameFamily(...))`` raised ``NotImplementedError:
Cannot transform MixtureSameFamilyConstraint constraints`` in every autoguide, in
NUTS and in the mode search. The truth: prior 0.3 N(-1, 1) + 0.7 N(2, 1.5^2), one
observation y = 0.5 ~ N(x, 1); the posterior is a two-component Gaussian mixture
in closed form.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import optimize, stats

import vimodels

W, MU, SD, Y = np.array([0.3, 0.7]), np.array([-1.0, 2.0]), np.array([1.0, 1.5]), 0.5


def mixture_prior(y):
    mix = dist.MixtureSameFamily(
        dist.Categorical(torch.tensor(W, dtype=torch.float32)),
        dist.Normal(torch.tensor(MU, dtype=torch.float32), torch.tensor(SD, dtype=torch.float32)),
    )
    x = pyro.sample("x", mix)
    pyro.sample("y", dist.Normal(x, 1.0), obs=y)


def _log_post(x: float) -> float:
    return float(np.log((W * stats.norm.pdf(x, MU, SD)).sum()) + stats.norm.logpdf(Y, x, 1.0))


def _posterior_mean() -> float:
    weights = W * stats.norm.pdf(Y, MU, np.sqrt(SD**2 + 1))
    means = (MU / SD**2 + Y) / (1 / SD**2 + 1)
    return float((weights * means).sum() / weights.sum())


DATA = {"y": torch.tensor(Y, dtype=torch.float32)}


def test_mode_and_autoguide_of_a_mixture_prior():
    mode = vimodels.find_mode(mixture_prior, DATA)
    truth = optimize.minimize_scalar(lambda x: -_log_post(x), bounds=(-5, 5), method="bounded")
    assert float(mode.values["x"]) == pytest.approx(truth.x, abs=1e-4)
    r = vimodels.fit(mixture_prior, DATA, guide="auto_normal", num_steps=50, progress=False)
    assert np.isfinite(r.elbo)


@pytest.mark.slow
def test_nuts_reference_of_a_mixture_prior_matches_the_closed_form(tmp_path):
    from diagnostics.references import get_reference

    ref = get_reference(mixture_prior, DATA, seed=0, cache_dir=tmp_path)
    assert ref.trusted
    x = ref.draws["x"]
    mcse = float(ref.site_table().set_index("element").loc["x", "mcse_mean"])
    assert abs(x.mean() - _posterior_mean()) <= 5 * mcse
