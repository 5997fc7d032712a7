"""Digits VAE: the learned mixture prior, the decoder's bias init, network options."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyro
import pytest
import torch

from vimodels.catalog.vae import digits_split, digits_vae, latent_prior
from vimodels.catalog.vae_prior import DiagonalNormalMixture
from vimodels.errors import OptionError
from vimodels.vae import evaluate as vae_eval
from vimodels.vae.train import network_options, parse_objective, train_digits_vae

TINY = dict(batch_size=50, latent_dim=2, hidden_dim=8, num_layers=1, val_particles=4)


def _tiny_train(objective: str = "iwae-2", **kwargs):
    settings = {**TINY, "num_train": 60, "epochs": 2, "progress": False, **kwargs}
    return train_digits_vae(parse_objective(objective), **settings)


# ---------------------------------------------------------- mixture prior


def test_mixture_prior_is_a_normalised_density_matching_its_formula():
    c, d = 3, 2
    g = torch.Generator().manual_seed(1)
    pyro.param("prior.logits", torch.randn(c, generator=g))
    pyro.param("prior.loc", 2 * torch.randn(c, d, generator=g))
    pyro.param("prior.scale", 0.3 + torch.rand(c, d, generator=g),
               constraint=torch.distributions.constraints.positive)  # fmt: skip
    prior = latent_prior(d, c)
    assert isinstance(prior, DiagonalNormalMixture)
    assert prior.event_shape == (d,) and prior.batch_shape == ()
    # the closed form log sum_c pi_c N(z; m_c, s_c^2), computed independently by torch
    z = 3 * torch.randn(4, 7, d, generator=g)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=pyro.param("prior.logits")),
        torch.distributions.Independent(
            torch.distributions.Normal(pyro.param("prior.loc"), pyro.param("prior.scale")), 1
        ),
    )
    assert prior.log_prob(z).shape == (4, 7)
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), atol=1e-4, rtol=1e-5)
    # it integrates to one (midpoint rule on a grid far wider than the components)
    h = 0.04
    grid = torch.arange(-12.0, 12.0, h, dtype=torch.float64) + h / 2
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, d)
    with torch.no_grad():
        mass = float(prior.log_prob(zz.float()).double().exp().sum() * h * h)
    assert mass == pytest.approx(1.0, abs=2e-3)
    # its draws have the mixture's mean and variance
    draws = prior.sample((20000,))
    assert draws.shape == (20000, d)
    se = (prior.variance / len(draws)).sqrt()
    assert torch.all((draws.mean(0) - prior.mean).abs() <= 5 * se)
    torch.testing.assert_close(prior.mean, reference.mean)
    torch.testing.assert_close(prior.variance, reference.variance)
    # no components: the fixed standard normal
    std = latent_prior(d, 0)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(std.log_prob(z), standard)


def test_mixture_prior_parameters_belong_to_the_model_and_are_trained():
    result = _tiny_train("iwae-2-dreg", prior_components=3)  # DReG: prior is model-only
    assert {"prior.logits", "prior.loc", "prior.scale"} <= set(result.model_params)
    assert not {"prior.loc"} & set(result.guide_params)
    # the mixture weights start equal (logits 0) and are moved by training
    assert float(result.params["prior.logits"].abs().max()) > 0
    assert np.all(np.isfinite(result.val_bound))
    with result.scope():
        samples = pyro.poutine.trace(digits_vae).get_trace(
            None, num_data=5, **result.settings["static"]
        )
    assert samples.nodes["x"]["value"].shape == (5, 64)
    assert samples.nodes["z"]["value"].shape == (5, 2)
    # the evaluation's sample grid draws z from the learned prior, not from N(0, I):
    # move every component far out with a tiny scale and the samples follow
    far = {
        **result.params,
        "prior.loc": torch.full((3, 2), 20.0),
        "prior.scale": torch.full((3, 2), math.log(1e-3)),
    }  # unconstrained: log scale
    moved = dataclasses.replace(result, params=far)
    ev = vae_eval.evaluate_digits_vae(moved, ll_particles=4, gap_images=0, nuts_images=0,
                                      num_test=4)  # fmt: skip
    static = result.settings["static"]
    with moved.scope():
        at_far = vae_eval.decoder_means(
            digits_vae, {"x": None, "num_data": 64, **static}, torch.full((64, 2), 20.0)
        )
    np.testing.assert_allclose(ev.arrays["samples"], at_far, atol=1e-3)


# ------------------------------------------------------------ bias init


def test_decoder_output_bias_starts_at_the_logit_of_the_training_pixel_means():
    x = digits_split().x_train
    with pyro.poutine.trace(param_only=True) as tr:
        digits_vae(x, subsample=torch.arange(10), latent_dim=2, hidden_dim=8, num_layers=1)
    bias = tr.trace.nodes["decoder.1.bias"]["value"]
    p = x.mean(0).clamp(1e-3, 1 - 1e-3)  # the full data set's means, not the minibatch's
    torch.testing.assert_close(bias, torch.log(p) - torch.log1p(-p))
    assert float(x.mean(0).min()) == 0.0  # pixels never on are clamped, not -inf


# --------------------------------------------------------------- options


@pytest.mark.parametrize(
    "bad",
    [{"prior_components": -1}, {"prior_components": 1.5}, {"prior_components": True}],
)
def test_bad_network_options_raise(bad):
    with pytest.raises(OptionError):
        network_options(**bad)


def test_cli_exposes_the_prior_option(tmp_path):
    from vimodels.cli import vae
    from vimodels.cli.options import Parser as _Parser
    from vimodels.errors import VimodelsError

    parser = _Parser(prog="vimodels")
    vae.register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(["vae", "--out", str(tmp_path), "--prior-components", "3"])
    assert args.prior_components == 3
    assert parser.parse_args(["vae"]).prior_components is None  # the trainer's default
    # the value reaches the trainer's checks (which run before any training)
    args = parser.parse_args(["vae", "--out", str(tmp_path), "--prior-components", "-2"])
    with pytest.raises(VimodelsError, match="prior_components"):
        args.func(args)


def test_chain_diagnostics_report_a_stuck_chain_instead_of_failing():
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((2, 50, 3))
    rhat, ess = vae_eval.chain_diagnostics(draws)
    assert np.all(np.abs(rhat - 1) < 0.1) and np.all(ess > 20)
    draws[1] = draws[1, 0]  # the second chain never moves
    rhat, _ = vae_eval.chain_diagnostics(draws)
    assert np.all(rhat > 1.1)
    draws[0] = draws[0, 0]  # neither moves: R-hat is undefined, reported as non-finite
    rhat, ess = vae_eval.chain_diagnostics(draws)
    assert rhat.shape == ess.shape == (3,) and not np.any(np.isfinite(rhat))
