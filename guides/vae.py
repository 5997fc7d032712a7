"""The amortized encoder ``q(z | x)`` of the digits VAE.

``q(z_i | x_i) = Normal(loc(x_i), scale(x_i))`` with a diagonal covariance;
``loc`` and ``scale`` come from one ``tanh`` MLP ``64 -> hidden_dim (x
num_layers) -> 2 D`` whose weights are Pyro parameters ``encoder.*``, with
``scale = softplus(.) + 1e-4``. The same network serves every image: the
amortization gap is the ELBO lost to that sharing (see :mod:`vimodels.vae.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from guides.spec import GuideSpec
from vimodels.catalog.vae import FAMILY, HIDDEN_DIM, LATENT_DIM, NUM_LAYERS, layer_sizes, mlp
from vimodels.errors import DataError

MIN_SCALE = 1e-4


def encode(
    x: torch.Tensor,
    latent_dim: int = LATENT_DIM,
    hidden_dim: int = HIDDEN_DIM,
    num_layers: int = NUM_LAYERS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and scale of ``q(z | x)``, each of shape ``(..., latent_dim)``."""
    out = mlp("encoder", x, layer_sizes(x.shape[-1], hidden_dim, num_layers, 2 * latent_dim))
    loc, raw = out[..., :latent_dim], out[..., latent_dim:]
    return loc, torch.nn.functional.softplus(raw) + MIN_SCALE


def encoder_guide(
    x: torch.Tensor | None = None,
    num_data: int | None = None,
    subsample_size: int | None = None,
    subsample: torch.Tensor | None = None,
    latent_dim: int = LATENT_DIM,
    hidden_dim: int = HIDDEN_DIM,
    num_layers: int = NUM_LAYERS,
    prior_components: int | None = None,
) -> None:
    """Sample ``z`` for each image of the (sub)sampled data plate from the encoder.

    Takes the model's arguments; ``prior_components`` (the model's prior) is not used here.
    """
    if x is None:
        raise DataError("the encoder guide needs images x (it conditions on them)")
    with pyro.plate(
        "data", x.shape[0], subsample_size=subsample_size, subsample=subsample, dim=-1
    ) as idx:
        loc, scale = encode(x[idx], latent_dim, hidden_dim, num_layers)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _encoder(model: Callable, data: dict, **_) -> Callable:
    return encoder_guide


def specs() -> tuple[GuideSpec, ...]:
    """Guides registered for the digits VAE."""
    return (
        GuideSpec(
            "encoder",
            _encoder,
            "amortized MLP encoder q(z | x): diagonal Normal from a 64-128-128-2D network",
            families=(FAMILY,),
            discrete=False,
        ),
    )
