"""Shared fixtures of the diagnostics tests."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest

from vimodels.svi.fit import fit


def _mmap_model(x, batch=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("n", x.shape[0], subsample_size=batch) as idx:
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])


@pytest.fixture
def mmap_subsampled_fit(tmp_path):
    """A 5-step fit of a normal mean on 200 memory-mapped rows, batches of 20.

    Returns
    -------
    (ndarray, FitResult)
        The full data, shape (200,), and the fit.
    """
    full = np.random.default_rng(0).normal(size=200)
    np.save(tmp_path / "x.npy", full)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    r = fit(
        _mmap_model, data={"x": x, "batch": 20}, seed=0, num_steps=5, progress=False, num_eval=20
    )
    return full, r
