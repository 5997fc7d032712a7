"""Digits VAE options: dropout, a learned mixture prior, the decoder's bias init, EMA, refit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyro
import pytest
import torch

from guides.vae import encoder_guide
from vimodels import vae_eval
from vimodels.catalog.vae import (
    TRAINING_ONLY,
    digits_split,
    digits_vae,
    evaluation_options,
    latent_prior,
    mlp,
)
from vimodels.catalog.vae_prior import DiagonalNormalMixture
from vimodels.errors import OptionError
from vimodels.train import _Average, load_checkpoint, validation_bound
from vimodels.vae_train import (
    PixelFlip,
    network_options,
    parse_objective,
    train_digits_vae,
    train_val_split,
)

TINY = dict(batch_size=50, latent_dim=2, hidden_dim=8, num_layers=1, val_particles=4)


def _tiny_train(objective: str = "iwae-2", **kwargs):
    settings = {**TINY, "num_train": 60, "epochs": 2, "progress": False, **kwargs}
    return train_digits_vae(parse_objective(objective), **settings)


# ------------------------------------------------------------------ dropout


def test_mlp_dropout_is_random_unbiased_and_off_at_zero():
    x = torch.randn(5, 4)
    sizes = [4, 50, 3]
    with torch.no_grad():
        exact = mlp("net", x, sizes)
        assert torch.equal(mlp("net", x, sizes, dropout=0.0), exact)  # deterministic at 0
        draws = torch.stack([mlp("net", x, sizes, dropout=0.5) for _ in range(4000)])
        # one hidden unit: the output is the output bias exactly when the unit is dropped
        one = torch.stack([mlp("one", x[:1], [4, 1, 1], dropout=0.3) for _ in range(4000)])
    assert (draws[0] != draws[1]).any()  # random with dropout
    # dropout sits before the linear output layer and rescales survivors by 1 / (1 - p):
    # the mean output over masks is the deterministic output
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((mean - exact).abs() <= 5 * se)
    dropped = float((one == pyro.param("one.1.bias")).double().mean())
    assert abs(dropped - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / 4000)


def test_evaluation_options_switch_off_only_the_training_regularisers():
    options = {"latent_dim": 3, "hidden_dim": 16, "num_layers": 1, "decoder_dropout": 0.3,
               "encoder_dropout": 0.2, "prior_components": 4}  # fmt: skip
    ev = evaluation_options(options)
    assert set(TRAINING_ONLY) == {"decoder_dropout", "encoder_dropout"}
    assert ev == {**options, "decoder_dropout": 0.0, "encoder_dropout": 0.0}
    # with the evaluation options the model is deterministic given z, with dropout it is not
    data = {"x": digits_split().x_test[:6], **options}
    z = torch.randn(2, 6, 3)
    with torch.no_grad():
        train_a = vae_eval.log_joint(digits_vae, data, z)
        train_b = vae_eval.log_joint(digits_vae, data, z)
        eval_a = vae_eval.log_joint(digits_vae, {**data, **ev}, z)
        eval_b = vae_eval.log_joint(digits_vae, {**data, **ev}, z)
    assert torch.equal(eval_a, eval_b)
    assert not torch.equal(train_a, train_b)


def test_validation_and_evaluation_use_the_deterministic_networks():
    result = _tiny_train(decoder_dropout=0.5, encoder_dropout=0.5, epochs=1)
    static = result.settings["static"]
    assert static["decoder_dropout"] == 0.5 and static["encoder_dropout"] == 0.5
    _, va = train_val_split()
    x_val = digits_split().x_train[va]
    seed = result.settings["seed"] + 7919  # the validation bound's own seed
    with result.scope():
        off = validation_bound(digits_vae, encoder_guide, {"x": x_val, **evaluation_options(
            static)}, num_particles=4, seed=seed)  # fmt: skip
        on = validation_bound(digits_vae, encoder_guide, {"x": x_val, **static}, 4, seed=seed)
    assert result.val_bound[0] == pytest.approx(off, abs=1e-6)
    assert abs(on - off) > 1e-3
    # the evaluation's test log-likelihood is the deterministic model's too
    ev = vae_eval.evaluate_digits_vae(
        result, ll_particles=20, gap_images=0, nuts_images=0, num_test=10, seed=3
    )
    with result.scope():
        direct = vae_eval.log_likelihood(
            digits_vae, encoder_guide,
            {"x": digits_split().x_test[:10], **evaluation_options(static)}, 20, seed=3,
        )  # fmt: skip
    assert ev.summary["test"]["log_likelihood"] == pytest.approx(direct.mean_log_p, abs=1e-9)


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
    result = _tiny_train(prior_components=3)
    assert {"prior.logits", "prior.loc", "prior.scale"} <= set(result.model_params)
    assert not {"prior.loc"} & set(result.guide_params)
    # the mixture weights start equal (logits 0) and are moved by training
    assert float(result.params["prior.logits"].abs().max()) > 0
    assert np.all(np.isfinite(result.val_bound))
    with result.scope():
        samples = pyro.poutine.trace(digits_vae).get_trace(
            None, num_data=5, **evaluation_options(result.settings["static"])
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
    static = evaluation_options(result.settings["static"])
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


# ------------------------------------------------------------------ EMA


def test_average_follows_the_bias_corrected_recursion():
    p = torch.zeros(3)
    avg = _Average([p], decay=0.9)
    expected = torch.zeros(3)
    for t in range(1, 30):
        p.add_(1.0)
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * p
    torch.testing.assert_close(avg.values[0], expected)
    state = avg.state_dict()
    other = _Average([p], decay=0.9)
    other.load_state_dict(state)
    assert other.steps == 29 and torch.equal(other.values[0], avg.values[0])


def test_ema_training_validates_the_average_and_resumes_exactly(tmp_path):
    plain = _tiny_train(epochs=3)
    full = _tiny_train(epochs=3, ema_decay=0.9, checkpoint=tmp_path / "a.pt")
    # the same optimisation path (same seed) but the average is validated and kept
    np.testing.assert_array_equal(full.train_loss, plain.train_loss)
    assert not np.allclose(full.val_bound, plain.val_bound)
    assert "averaged" in full.message
    _tiny_train(epochs=2, ema_decay=0.9, checkpoint=tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "b.pt")["ema"]["steps"] == 4  # 2 epochs x 2 batches
    resumed = _tiny_train(epochs=3, ema_decay=0.9, checkpoint=tmp_path / "b.pt", resume=True)
    np.testing.assert_array_equal(resumed.val_bound, full.val_bound)
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name


# ----------------------------------------------------------- pixel flips


def test_pixel_flip_flips_at_its_rate_and_only_the_training_images(tmp_path):
    x = digits_split().x_train
    flipped = PixelFlip(0.1)({"x": x}, np.random.default_rng(0))["x"]
    changed = (flipped != x).double().mean()
    assert abs(float(changed) - 0.1) <= 5 * math.sqrt(0.1 * 0.9 / x.numel())
    assert set(np.unique(flipped.numpy())) == {0.0, 1.0}
    again = PixelFlip(0.1)({"x": x}, np.random.default_rng(0))["x"]
    assert torch.equal(flipped, again)
    plain = _tiny_train(epochs=2)
    noisy = _tiny_train(epochs=2, pixel_flip=0.1, checkpoint=tmp_path / "a.pt")
    assert noisy.settings["augment"] == "PixelFlip(rate=0.1)"
    assert noisy.train_loss[0] != plain.train_loss[0]
    # resumable: the flips of an epoch depend on the seed and the epoch only
    _tiny_train(epochs=1, pixel_flip=0.1, checkpoint=tmp_path / "b.pt")
    resumed = _tiny_train(epochs=2, pixel_flip=0.1, checkpoint=tmp_path / "b.pt", resume=True)
    np.testing.assert_array_equal(resumed.train_loss, noisy.train_loss)
    with pytest.raises(OptionError):
        _tiny_train(pixel_flip=0.7)


# ----------------------------------------------------------------- refit


def test_refit_trains_on_train_and_validation_for_the_chosen_epochs():
    result = _tiny_train(epochs=3, refit=True, patience=1)
    sel = result.selection
    assert sel is not None and sel.settings["num_data"] == 60
    assert result.settings["num_data"] == 60 + len(train_val_split()[1])
    assert result.epochs == sel.best_epoch == result.settings["refit"]["epochs"]
    assert np.all(np.isnan(result.val_bound)) and "refit" in result.message
    # no time left after selection: the selection model is returned
    short = _tiny_train(epochs=3, refit=True, time_budget=1e-9)
    assert short.selection is None and "no time left to refit" in short.message


# --------------------------------------------------------------- options


@pytest.mark.parametrize(
    "bad",
    [
        {"decoder_dropout": 1.0},
        {"encoder_dropout": -0.1},
        {"decoder_dropout": "0.1"},
        {"prior_components": -1},
        {"prior_components": 1.5},
    ],
)
def test_bad_network_options_raise(bad):
    with pytest.raises(OptionError):
        network_options(**bad)


def test_bad_ema_decay_raises():
    with pytest.raises(OptionError):
        _tiny_train(ema_decay=1.0)


def test_cli_exposes_the_options(tmp_path):
    from vimodels.cli import _Parser
    from vimodels.commands import vae
    from vimodels.errors import VimodelsError

    parser = _Parser(prog="vimodels")
    vae.register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(["vae", "--out", str(tmp_path), "--decoder-dropout", "0.1",
                              "--encoder-dropout", "0.2", "--prior-components", "3",
                              "--ema-decay", "0.99", "--refit"])  # fmt: skip
    assert (args.decoder_dropout, args.encoder_dropout, args.prior_components) == (0.1, 0.2, 3)
    assert args.ema_decay == 0.99 and args.refit
    # the values reach the trainer's checks (which run before any training)
    for flag, value in (("--decoder-dropout", "1.0"), ("--prior-components", "-2")):
        args = parser.parse_args(["vae", "--out", str(tmp_path), flag, value])
        with pytest.raises(VimodelsError, match=flag[2:].replace("-", "_")):
            args.func(args)
