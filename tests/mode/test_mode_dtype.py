"""Optimizer-fitted guides draw in the dtype of the model's latents.

A model whose data are float64 has float64 latents; a Laplace or Pathfinder
guide drawing float32 made ``L @ f_tilde`` fail in posteriordb's GP (found by
benchmark 4b).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels


def matmul_model(x: torch.Tensor, y: torch.Tensor) -> None:
    """A linear regression written with a matrix product of float64 data and a latent."""
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(1.0)))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal((x @ beta[..., None])[..., 0], sigma), obs=y)


@pytest.mark.parametrize("guide", ["auto_laplace", "auto_laplace_is", "pathfinder"])
def test_optimizer_guides_draw_in_the_model_dtype(guide):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + 0.3 * torch.randn(
        30, generator=gen, dtype=torch.float64
    )
    result = vimodels.fit(
        matmul_model, {"x": x, "y": y}, guide=guide, num_eval=50, guide_options={"max_iters": 200}
    )
    assert math.isfinite(result.elbo)
    draws = result.sample(5)
    assert draws["beta"].shape == (5, 2)
