"""A latent site whose support torch cannot unconstrain gets a named error, not a traceback."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import vimodels
from vimodels.errors import ModelError


class _Halfline(constraints.Constraint):
    """A support with no biject_to transform registered."""

    def check(self, value):
        return value > 0


class _Custom(dist.Exponential):
    @property
    def support(self):
        return _Halfline()


def custom_support(y):
    rate = pyro.sample("rate", _Custom(torch.tensor(1.0)))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Exponential(rate), obs=y)


@pytest.mark.parametrize("guide", ["auto_normal", "auto_laplace"])
def test_a_support_without_a_transform_is_a_model_error_naming_the_site(guide):
    with pytest.raises(ModelError, match="latent site 'rate'.*_Halfline"):
        vimodels.fit(custom_support, {"y": torch.ones(5)}, guide=guide, num_steps=2)


def test_the_reference_refuses_it_the_same_way():
    from diagnostics.references import get_reference

    with pytest.raises(ModelError, match="biject_to"):
        get_reference(custom_support, {"y": torch.ones(5)}, cache=False)
