"""Guides that cannot follow a subsampled plate's rows are refused before fitting.

A model with a latent per row in a plate that subsamples 20 of 200 rows: Pyro's
``AutoContinuous`` guides and ``AutoStructured`` size their parameters from one
trace, so ``theta`` got 20 parameter sets shared by whichever rows a step drew
(``auto_diagonal_normal`` ELBO -783 against ``auto_normal``'s -562, draws of 20
thetas for 200 rows); L-BFGS methods (``auto_laplace``, ``auto_delta``,
``pathfinder``, ``find_mode``) optimised a log density that drew new rows at
every evaluation. Each is now an ``IncompatibleError`` naming the fix.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels
from guides.auto import BATCH_SHAPED_GUIDES, OPTIMIZER_GUIDES
from vimodels.errors import IncompatibleError

_rng = np.random.default_rng(0)
Y = torch.tensor(_rng.normal(3.0, 1.2, size=200), dtype=torch.float32)
X = torch.tensor(_rng.normal(size=(200, 2)), dtype=torch.float32)


def local_per_row(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("n", y.shape[0], subsample_size=20) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 0.5), obs=y[idx])


def global_only(X, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("n", y.shape[0], subsample_size=20) as idx:
        pyro.sample("y", dist.Normal((X[idx] * beta).sum(-1), 1.0), obs=y[idx])


@pytest.mark.parametrize("guide", sorted(BATCH_SHAPED_GUIDES))
def test_batch_shaped_guides_refuse_local_sites_of_a_subsampled_plate(guide):
    with pytest.raises(IncompatibleError, match="auto_normal"):
        vimodels.fit(local_per_row, {"y": Y}, guide=guide, num_steps=5, progress=False)


@pytest.mark.parametrize("guide", sorted(OPTIMIZER_GUIDES))
def test_lbfgs_methods_refuse_a_subsampled_model(guide):
    with pytest.raises(IncompatibleError, match="same log density at every evaluation"):
        vimodels.fit(global_only, {"X": X, "y": Y}, guide=guide, progress=False)


def test_find_mode_refuses_a_subsampled_model():
    with pytest.raises(IncompatibleError, match="subsamples plate 'n'"):
        vimodels.find_mode(local_per_row, {"y": Y})


def test_guides_that_follow_the_rows_still_fit():
    r = vimodels.fit(local_per_row, {"y": Y}, guide="auto_normal", num_steps=20, progress=False)
    assert tuple(r.params["AutoNormal.locs.theta"].shape) == (200,)
    # global sites only: a batch-shaped guide is right
    r = vimodels.fit(
        global_only, {"X": X, "y": Y}, guide="auto_multivariate_normal", num_steps=20,
        progress=False,
    )  # fmt: skip
    assert np.isfinite(r.elbo)
