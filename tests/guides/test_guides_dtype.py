"""Every generic guide fits a float64 model in float64 (the posteriordb entries are float64)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from guides.registry import GENERIC
from vimodels import fit
from vimodels.svi.scope import param_scope


def _hierarchy64(y):
    # two dependent latent sites, so that auto_structured builds a linear dependency
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 5.0))
    theta = pyro.sample("theta", dist.Normal(mu.expand(3), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)


Y = torch.tensor([0.5, -0.2, 1.1], dtype=torch.float64)


@pytest.mark.parametrize("guide", sorted(GENERIC))
def test_a_generic_guide_fits_a_float64_model_in_float64(guide):
    # auto_iaf_normal's networks and auto_structured's linear dependencies were float32
    # whatever the model: "expected m1 and m2 to have the same dtype" at the first step
    # nested_laplace needs a site for its grid: mu (theta given mu is Gaussian)
    opts = {"guide_options": {"hyper_sites": ["mu"]}} if guide == "nested_laplace" else {}
    r = fit(
        _hierarchy64, {"y": Y}, guide=guide, num_steps=5, num_eval=4, progress=False, seed=0, **opts
    )
    assert np.isfinite(r.losses).all() and r.status in ("converged", "max_steps")
    # the guide's own draws, as the fit made them (FitResult.sample returns float64 NumPy
    # arrays whatever the guide drew); parameters, where the guide has any, float64 too
    with poutine.block(), param_scope(r):
        tr = poutine.trace(r.guide).get_trace(Y)
    latent = [s for s in tr.nodes.values() if s["type"] == "sample"]
    assert latent and {s["value"].dtype for s in latent} == {torch.float64}
    assert {p.dtype for p in r.guide.parameters()} <= {torch.float64}
