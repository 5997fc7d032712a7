"""A latent whose support moves with another latent is refused before anything runs.

Guides, NUTS (Pyro's ``initialize_model``) and the mode search fix each site's
unconstrained transform at one initial value: ``b ~ Uniform(0, a)`` with ``a``
latent was confined to ``(0, a_0)``, a wrong posterior without an error (and
NUTS's later chains raised "the potential is not finite at the initial point").
Supports that are fixed (bounds from the data, a subsampled plate's rows) pass.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import vimodels
from diagnostics.references import get_reference
from vimodels.catalog.base import NutsSettings
from vimodels.data import trace_check
from vimodels.errors import ModelError

Y = torch.tensor(np.random.default_rng(0).normal(0.5, 1.0, size=20))
FAST = dict(num_steps=5, num_eval=10, progress=False)


def dependent(y):
    a = pyro.sample("a", dist.Exponential(1.0))
    b = pyro.sample("b", dist.Uniform(0.0, a))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def rewritten(y):
    """The same posterior, with b a transform of a variable on a fixed support."""
    a = pyro.sample("a", dist.Exponential(1.0))
    b_unit = pyro.sample("b_unit", dist.Uniform(0.0, 1.0))
    b = pyro.deterministic("b", a * b_unit)
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def data_bounds(y, upper):
    """Tensor bounds that come from the data: fixed."""
    b = pyro.sample("b", dist.Uniform(torch.zeros(()), upper))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def local_data_bounds(y, upper):
    """Per-row bounds from the data under a subsampled plate: fixed for each row."""
    with pyro.plate("n", y.shape[0], subsample_size=5) as idx:
        z = pyro.sample("z", dist.Uniform(torch.zeros(5), upper[idx]))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])


def test_dependent_support_is_refused_by_fit():
    with pytest.raises(ModelError, match="support that depends on other latent values") as info:
        vimodels.fit(dependent, data={"y": Y}, guide="auto_normal", **FAST)
    assert "'b'" in str(info.value) and "b_unit ~ Uniform(0, 1)" in str(info.value)


def test_dependent_support_is_refused_by_the_reference(tmp_path):
    settings = NutsSettings(num_warmup=20, num_samples=20, num_chains=2)
    with pytest.raises(ModelError, match="support that depends on other latent values"):
        get_reference(dependent, {"y": Y}, settings=settings, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (rewritten, {"y": Y}),
        (data_bounds, {"y": Y, "upper": torch.tensor(3.0, dtype=Y.dtype)}),
        (local_data_bounds, {"y": Y, "upper": torch.linspace(1.0, 3.0, 20, dtype=Y.dtype)}),
    ],
)
def test_fixed_supports_pass(model, data):
    trace_check(model, data, model.__name__)


def test_the_check_leaves_the_random_stream_as_it_was():
    data = {"y": Y, "upper": torch.tensor(3.0, dtype=Y.dtype)}
    pyro.set_rng_seed(3)
    trace_check(data_bounds, data, "data_bounds")  # runs the model a second time
    after_check = torch.rand(3)
    pyro.set_rng_seed(3)
    poutine.trace(data_bounds).get_trace(**data)  # one run only
    after_one = torch.rand(3)
    assert torch.equal(after_check, after_one)
