"""The digits VAE: data, bounds, gradient estimators, training, checkpoints, evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO

from guides.registry import get_guide_spec
from guides.vae import encoder_guide
from vimodels.catalog.registry import MODELS
from vimodels.catalog.vae import digits_split, digits_vae
from vimodels.errors import DataError, IncompatibleError, OptionError
from vimodels.svi.elbos import make_elbo
from vimodels.svi.estimators import detach_distribution
from vimodels.svi.iwae import IWAE
from vimodels.vae import evaluate as vae_eval
from vimodels.vae.train import Objective, parse_objective, train_digits_vae
from vimodels.vae.trainer import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


# --------------------------------------------------------------------------- data


def test_digits_binarized_stratified_split():
    from sklearn.datasets import load_digits

    split = digits_split()
    raw = load_digits()
    assert split.x_train.shape == (1437, 64) and split.x_test.shape == (360, 64)
    assert split.x_train.dtype == torch.float32
    # binarization at >= 8, rows traced back to the original data
    expected = (raw.data >= 8).astype(np.float32)
    assert np.array_equal(split.x_train.numpy(), expected[split.train_index])
    assert np.array_equal(split.x_test.numpy(), expected[split.test_index])
    assert set(np.unique(split.x_train.numpy())) == {0.0, 1.0}
    # disjoint and complete
    assert not set(split.train_index) & set(split.test_index)
    assert len(split.train_index) + len(split.test_index) == len(raw.data)
    # stratified: each class's test share is 20 % up to rounding
    for digit in range(10):
        total = int((raw.target == digit).sum())
        assert abs(int((split.y_test == digit).sum()) - 0.2 * total) <= 1
    assert np.array_equal(split.y_train, raw.target[split.train_index])
    # fixed seed: the same split again
    digits_split.cache_clear()
    again = digits_split()
    assert np.array_equal(again.test_index, split.test_index)


def test_entry_and_guide_registered():
    entry = MODELS["digits_vae"]
    assert entry.amortized and entry.family == "digits_vae"
    assert entry.default_guides == ("encoder",)
    spec = get_guide_spec("encoder", "digits_vae")
    assert spec.families == ("digits_vae",)
    with pytest.raises(IncompatibleError):
        get_guide_spec("encoder", "eight_schools_centered")


def test_model_subsample_scale_and_shapes():
    x = digits_split().x_train
    idx = torch.arange(10)
    with pyro.poutine.trace() as tr:
        digits_vae(x, subsample=idx, latent_dim=3, hidden_dim=16, num_layers=1)
    site = tr.trace.nodes["x"]
    assert site["value"].shape == (10, 64)
    assert tr.trace.nodes["z"]["value"].shape == (10, 3)
    assert site["scale"] == pytest.approx(x.shape[0] / 10)
    with pyro.poutine.trace() as tr:
        digits_vae(None, num_data=5, latent_dim=3, hidden_dim=16, num_layers=1)
    assert tr.trace.nodes["x"]["value"].shape == (5, 64)
    with pytest.raises(DataError):
        encoder_guide(None)


# ----------------------------------------------------- a linear-Gaussian VAE


def linear_gaussian(x, subsample_size=None, subsample=None, w=None, b=None, sigma=0.5):
    """z ~ N(0, I_d), x ~ N(W z + b, sigma^2 I): log p(x) = log N(x; b, W W' + sigma^2 I)."""
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, subsample=subsample) as i:
        z = pyro.sample("z", dist.Normal(torch.zeros(w.shape[1]), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w.T + b, sigma).to_event(1), obs=x[i])


def linear_encoder(x, subsample_size=None, subsample=None, w=None, b=None, sigma=0.5):
    """An amortized linear encoder: the exact posterior's, deliberately shrunk and widened."""
    cov = torch.linalg.inv(torch.eye(w.shape[1]) + w.T @ w / sigma**2)
    a = 0.8 * cov @ w.T / sigma**2
    scale = 1.3 * cov.diagonal().sqrt()
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, subsample=subsample) as i:
        pyro.sample("z", dist.Normal((x[i] - b) @ a.T, scale).to_event(1))


def linear_gaussian_data(n=20, dx=3, dz=2, sigma=0.5, seed=0, repeat=False):
    """Data of the linear-Gaussian VAE and its exact log-likelihood (nats).

    ``repeat``: all ``n`` points equal, so that minibatches differ only by Monte Carlo noise.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dx, dz, generator=g)
    b = torch.randn(dx, generator=g)
    z = torch.randn(1 if repeat else n, dz, generator=g)
    x = z @ w.T + b + sigma * torch.randn(z.shape[0], dx, generator=g)
    x = x.expand(n, dx).contiguous()
    cov = (w @ w.T + sigma**2 * torch.eye(dx)).double()
    log_p = dist.MultivariateNormal(b.double(), cov).log_prob(x.double()).sum()
    return {"x": x, "w": w, "b": b, "sigma": sigma}, float(log_p)


def test_iwae_per_datapoint_is_a_bound_under_subsampling_renyi_is_not():
    data, log_p = linear_gaussian_data(repeat=True)
    reps, k, b = 400, 16, 2
    iwae = IWAE(num_particles=k, max_plate_nesting=1)
    renyi = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), pyro.validation_enabled(False):
        ours = np.array(
            [-iwae.loss(linear_gaussian, linear_encoder, subsample_size=b, **data)
             for _ in range(reps)]
        )  # fmt: skip
        pyros = np.array(
            [-renyi.loss(linear_gaussian, linear_encoder, subsample_size=b, **data)
             for _ in range(reps)]
        )  # fmt: skip
    se_ours = ours.std(ddof=1) / math.sqrt(reps)
    se_pyro = pyros.std(ddof=1) / math.sqrt(reps)
    structure = iwae.structure(linear_gaussian, linear_encoder, subsample_size=b, **data)
    assert structure.mode == "per_datapoint"
    # a valid bound: not significantly above the exact log-likelihood ...
    assert ours.mean() <= log_p + 5 * se_ours
    # ... and a tight one with this encoder (20 points; ~0.1 nat below log p per point)
    assert ours.mean() > log_p - 3.0
    # the subsample scale inside the log-sum-exp overestimates log p(x) (by ~12 nats here)
    assert pyros.mean() - 5 * se_pyro > log_p


# --------------------------------------------------- gradient estimators


def _replicates_model(x, theta=None, sigma=0.7):
    """N replicate data points with their own decoder weight: per-replicate gradients."""
    n = x.shape[0]
    theta = pyro.param("theta", lambda: torch.full((n,), 1.5))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(theta * z, sigma), obs=x)


def _replicates_guide(x, theta=None, sigma=0.7, loc0=0.5, scale0=0.5):
    n = x.shape[0]
    loc = pyro.param("loc", lambda: torch.full((n,), loc0))
    log_scale = pyro.param("log_scale", lambda: torch.full((n,), math.log(scale0)))
    with pyro.plate("data", n):
        pyro.sample("z", dist.Normal(loc, log_scale.exp()))


def _per_replicate_grads(elbo, n=4000, x0=1.2, **guide_kw):
    pyro.clear_param_store()
    x = torch.full((n,), x0)

    def guide(x):
        _replicates_guide(x, **guide_kw)

    elbo.loss_and_grads(_replicates_model, guide, x)
    store = pyro.get_param_store()
    # gradients of the objective (the loss is its negative), one per replicate
    return {name: -store[name].unconstrained().grad.double().numpy().copy()
            for name in ("theta", "loc", "log_scale")}  # fmt: skip


def _exact_elbo_grads(x0=1.2, theta=1.5, sigma=0.7, loc0=0.5, scale0=0.5):
    """Gradient of the closed-form ELBO of one data point of the replicates model."""
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(loc0, dtype=torch.float64, requires_grad=True)
    ls = torch.tensor(math.log(scale0), dtype=torch.float64, requires_grad=True)
    s2 = torch.exp(2 * ls)
    lik = -0.5 * math.log(2 * math.pi * sigma**2) - ((x0 - t * m) ** 2 + t**2 * s2) / (2 * sigma**2)
    prior = -0.5 * math.log(2 * math.pi) - (m**2 + s2) / 2
    entropy = 0.5 * math.log(2 * math.pi * math.e) + ls
    (lik + prior + entropy).backward()
    return {"theta": t.grad.item(), "loc": m.grad.item(), "log_scale": ls.grad.item()}


def _z(a: np.ndarray, b: np.ndarray) -> float:
    return abs(a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


def test_stl_unbiased_against_exact_gradient_and_lower_variance_near_optimum():
    exact = _exact_elbo_grads()
    std = _per_replicate_grads(make_elbo("trace", max_plate_nesting=1))
    stl = _per_replicate_grads(make_elbo("trace", max_plate_nesting=1, estimator="stl"))
    for name, g in exact.items():
        for draws in (std, stl):
            se = draws[name].std(ddof=1) / math.sqrt(len(draws[name]))
            assert abs(draws[name].mean() - g) <= 5 * se, name
    # near the exact posterior (loc 0.657, scale 0.423 here) STL's noise nearly vanishes
    near = {"loc0": 0.68, "scale0": 0.43}
    std = _per_replicate_grads(make_elbo("trace", max_plate_nesting=1), **near)
    stl = _per_replicate_grads(make_elbo("trace", max_plate_nesting=1, estimator="stl"), **near)
    for name in ("loc", "log_scale"):
        assert stl[name].var() < 0.1 * std[name].var(), name


def test_dreg_unbiased_and_lower_variance_for_the_encoder():
    k = 8
    # many replicates of the standard estimator: a high-precision expected gradient
    far = {"loc0": 0.2, "scale0": 0.8}  # posterior: loc 0.657, scale 0.423
    std = _per_replicate_grads(
        make_elbo("iwae", num_particles=k, max_plate_nesting=1), n=100_000, **far
    )
    dreg = _per_replicate_grads(
        make_elbo("iwae", num_particles=k, max_plate_nesting=1, estimator="dreg"), n=10_000, **far
    )
    # the test has power: the encoder's expected gradient is many standard errors from zero
    for name in ("loc", "log_scale"):
        assert abs(std[name].mean()) > 10 * std[name].std() / math.sqrt(len(std[name]))
    for name in ("theta", "loc", "log_scale"):
        assert _z(std[name], dreg[name]) <= 5.0, name
        assert np.all(np.isfinite(dreg[name]))
    for name in ("loc", "log_scale"):
        assert dreg[name].var() < 0.5 * std[name].var(), name
    # the decoder's gradient has the same estimator in both: same variance up to noise
    ratio = dreg["theta"].var() / std["theta"].var()
    assert 0.8 < ratio < 1.25


def test_dreg_and_stl_keep_the_loss_value():
    x = torch.full((50,), 1.2)
    for name, k, estimator in (("iwae", 8, "dreg"), ("trace", 3, "stl")):
        values = []
        for est in ("standard", estimator):
            pyro.clear_param_store()
            elbo = make_elbo(name, num_particles=k, max_plate_nesting=1, estimator=est)
            elbo.loss(_replicates_model, _replicates_guide, x)  # first call: set-up traces
            pyro.set_rng_seed(3)
            values.append(elbo.loss(_replicates_model, _replicates_guide, x))
        assert values[0] == pytest.approx(values[1], rel=1e-6), name


def test_estimator_options_are_checked():
    with pytest.raises(OptionError):
        make_elbo("trace", estimator="dreg")
    with pytest.raises(OptionError):
        make_elbo("iwae", estimator="stl")
    with pytest.raises(OptionError):
        Objective("meanfield", estimator="stl")
    assert parse_objective("iwae-8-dreg") == Objective("iwae", 8, "dreg")
    assert parse_objective("weighted_kl-beta0.5").beta == 0.5
    assert Objective("trace", estimator="stl").tag == "trace-stl"

    # DReG needs every latent local to the data plate: a global latent is refused
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=2):
            pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(mu, 1.0), obs=torch.zeros(2))

    def guide(x):
        m = pyro.param("m", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(m, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=2):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    elbo = make_elbo("iwae", num_particles=4, max_plate_nesting=1, estimator="dreg")
    with pytest.raises(IncompatibleError):
        elbo.loss_and_grads(model, guide, torch.zeros(10))


def test_detach_distribution_cuts_gradients_only_to_parameters():
    loc = torch.tensor([0.3, -0.2], requires_grad=True)
    scale = torch.tensor([1.5, 0.5], requires_grad=True)
    fn = dist.Normal(loc, scale).to_event(1)
    z = fn.rsample()
    lp = detach_distribution(fn).log_prob(z)
    assert lp.item() == pytest.approx(fn.log_prob(z).item())
    (g_loc,) = torch.autograd.grad(lp, loc)
    # the path derivative only: d/dloc log q(loc + scale * eps; stop(loc), stop(scale))
    expected = -(z.detach() - loc.detach()) / scale.detach() ** 2
    assert torch.allclose(g_loc, expected)


# ------------------------------------------------------------- NUTS on z


@pytest.mark.slow
def test_nuts_latent_posterior_matches_exact_gaussian_posterior():
    data, _ = linear_gaussian_data(n=1)
    w, sigma = data["w"].double(), data["sigma"]
    precision = torch.eye(w.shape[1], dtype=torch.float64) + w.T @ w / sigma**2
    cov = torch.linalg.inv(precision)
    mean = cov @ w.T @ (data["x"][0].double() - data["b"].double()) / sigma**2
    nuts = vae_eval.nuts_latent_posterior(
        linear_gaussian, data, num_warmup=200, num_samples=300, num_chains=2, seed=1
    )
    assert nuts.draws.shape == (2, 300, 2)
    assert np.all(nuts.rhat < 1.05)
    mcse = np.sqrt(np.diag(cov.numpy())) / np.sqrt(nuts.ess)
    assert np.all(np.abs(nuts.flat.mean(0) - mean.numpy()) <= 5 * mcse)
    # the comparison metrics: exact draws against NUTS draws are close
    exact = np.random.default_rng(0).multivariate_normal(mean.numpy(), cov.numpy(), size=600)
    metrics = vae_eval.compare_draws(exact, nuts.draws)
    assert metrics["mean_error_sd"] < 0.3
    assert 0.8 < metrics["sd_ratio_min"] <= metrics["sd_ratio_max"] < 1.25
    assert metrics["coverage90_min"] > 0.8
    # a wrong approximation is told apart: shifted by one posterior sd in each coordinate
    shifted = vae_eval.compare_draws(exact + np.sqrt(np.diag(cov.numpy())), nuts.draws)
    assert shifted["mean_error_sd"] > 0.7 and shifted["w2"] > metrics["w2"] + 0.5


# ------------------------------------------------- training and evaluation


@pytest.fixture(scope="module")
def trained():
    pyro.set_rng_seed(0)
    return train_digits_vae(parse_objective("iwae-8"), epochs=25, lr=3e-3, patience=10, seed=0)


def _independent_bernoulli_test_loglik() -> float:
    split = digits_split()
    x_train, x_test = split.x_train.double(), split.x_test.double()
    p = (x_train.sum(0) + 1) / (x_train.shape[0] + 2)  # Laplace-smoothed pixel frequencies
    ll = x_test * p.log() + (1 - x_test) * (1 - p).log()
    return float(ll.sum(1).mean())


@pytest.mark.slow
def test_short_training_beats_independent_bernoulli(trained):
    baseline = _independent_bernoulli_test_loglik()
    test = {"x": digits_split().x_test, **trained.settings["static"]}
    with trained.scope():
        est = vae_eval.log_likelihood(digits_vae, encoder_guide, test, num_particles=200)
    # even the ELBO, a lower bound, beats the baseline by a margin far beyond MC error
    assert est.mean_elbo - 5 * est.mean_elbo_se > baseline + 1.0
    assert est.mean_log_p >= est.mean_elbo
    assert trained.val_bound[-1] > trained.val_bound[0]
    assert np.all(np.diff(trained.train_loss[:5]) < 0)


@pytest.mark.slow
def test_amortization_gap_ordered(trained):
    test = {"x": digits_split().x_test, **trained.settings["static"]}
    with trained.scope():
        gap = vae_eval.amortization_gap(
            digits_vae, encoder_guide, test, np.arange(4), steps=150, num_particles=2000
        )
    tol_a = 5 * np.hypot(gap.log_p_se, gap.elbo_star_se)
    tol_b = 5 * np.hypot(gap.elbo_star_se, gap.elbo_amortized_se)
    assert np.all(gap.log_p >= gap.elbo_star - tol_a)
    assert np.all(gap.elbo_star >= gap.elbo_amortized - tol_b)
    approx, amort = gap.approximation_gap, gap.amortization_gap
    assert approx[0] > 0 and amort[0] > 0
    assert set(gap.summary()) >= {"approximation_gap", "amortization_gap", "log_p"}


@pytest.mark.slow
def test_checkpoint_weights_only_and_resume_equivalence(tmp_path):
    kwargs = dict(num_train=200, batch_size=50, lr=3e-3, seed=4, checkpoint_every=1,
                  latent_dim=3, hidden_dim=16, num_layers=1, val_particles=8,
                  lr_patience=1, weight_decay=1e-4)  # fmt: skip
    objective = parse_objective("iwae-4-dreg")
    full = train_digits_vae(objective, epochs=4, checkpoint=tmp_path / "a.pt", **kwargs)
    part = train_digits_vae(objective, epochs=2, checkpoint=tmp_path / "b.pt", **kwargs)
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["model"]) == set(part.model_params)
    assert set(state["guide"]) == set(part.guide_params)
    assert state["param_order"] == list(part.model_params + part.guide_params)
    assert len(state["optimizer"]["state"]) == len(state["param_order"])  # Adam moments
    assert state["scheduler"]["mode"] == "max"
    resumed = train_digits_vae(
        objective, epochs=4, checkpoint=tmp_path / "b.pt", resume=True, **kwargs
    )
    assert resumed.epochs == 4
    np.testing.assert_array_equal(resumed.train_loss, full.train_loss)
    np.testing.assert_array_equal(resumed.val_bound, full.val_bound)
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 4
    with pytest.raises(OptionError, match="other settings"):
        train_digits_vae(
            objective, epochs=5, checkpoint=tmp_path / "b.pt", resume=True,
            **{**kwargs, "lr": 1e-3},
        )  # fmt: skip
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.slow
def test_early_stopping_keeps_best_epoch():
    result = train_digits_vae(
        Objective("trace"), epochs=40, patience=2, lr=0.05, num_train=100, batch_size=100,
        latent_dim=2, hidden_dim=16, num_layers=1, val_particles=8,
    )  # fmt: skip
    assert result.status == "early_stopped"
    assert result.best_val == pytest.approx(np.nanmax(result.val_bound))
    assert result.epochs == int(np.argmax(result.val_bound)) + 1 + 2


# ----------------------------------------------------- CLI, report, example


def _vae_parser():
    from vimodels.cli import vae
    from vimodels.cli.options import Parser as _Parser

    parser = _Parser(prog="vimodels")
    vae.register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser


TINY = (
    "--num-train 150 --batch-size 50 --eval-particles 50 --num-test 40 --gap-images 2 "
    "--gap-steps 10 --nuts-images 1 --nuts-warmup 20 --nuts-samples 20 --latent-dim 2 "
    "--hidden-dim 16 --quiet"
).split()


@pytest.mark.slow
def test_cli_vae_writes_checkpoint_results_and_report(tmp_path, capsys):
    parser = _vae_parser()
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        args = parser.parse_args(["vae", "--out", str(tmp_path), *TINY, *extra])
        assert args.func(args) == 0
    args = parser.parse_args(["vae", "--out", str(tmp_path), "--elbo", "iwae", "--particles",
                              "4", "--estimator", "dreg", "--epochs", "1", *TINY])  # fmt: skip
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "trace" / "result.json").read_text())
    assert summary["training"]["epochs"] == 2  # resumed: continued the epoch count
    assert summary["evaluation"]["test"]["num_particles"] == 50
    assert (tmp_path / "iwae-4-dreg" / "checkpoint.pt").is_file()
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 7
    assert "trace" in html and "iwae-4-dreg" in html
    assert "test log-likelihood" in capsys.readouterr().out


def test_cli_vae_rejects_bad_options(tmp_path):
    from vimodels.errors import VimodelsError

    parser = _vae_parser()
    args = parser.parse_args(["vae", "--out", str(tmp_path), "--estimator", "dreg"])
    with pytest.raises(VimodelsError):
        args.func(args)


def test_report_figures_from_arrays(tmp_path):
    from vimodels.vae.report import image_grid, project_2d, write_report

    rng = np.random.default_rng(0)
    grid = image_grid(rng.random((5, 64)), ncol=3)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1)
    xy, axis = project_2d(rng.standard_normal((30, 5)))
    assert xy.shape == (30, 2) and axis == "principal component"
    arrays = {
        "trace": {
            "inputs": rng.random((16, 64)), "recon": rng.random((16, 64)),
            "samples": rng.random((64, 64)), "latents": rng.standard_normal((30, 8)),
            "labels": rng.integers(0, 10, 30), "train_loss": np.linspace(30, 20, 5),
            "val_bound": np.linspace(-30, -20, 5),
        }
    }  # fmt: skip
    summaries = [{"objective": "trace", "training": {"epochs": 5, "best_epoch": 5},
                  "evaluation": {"test": {"log_likelihood": -20.0, "log_likelihood_mcse": 0.01,
                                          "elbo": -21.0, "elbo_mcse": 0.02,
                                          "num_particles": 5000}}}]  # fmt: skip
    path = write_report(tmp_path / "r.html", summaries, arrays)
    text = path.read_text()
    assert text.count("data:image/png;base64,") == 4
    assert "-20.00 &plusmn; 0.01 (5000)" in text


def _run_summary(objective: str, latent_dim: int, num_data: int, lr: float = 1e-3) -> dict:
    settings = {"elbo": objective.split("-")[0], "num_particles": 1, "elbo_class": "Trace_ELBO",
                "lr": lr, "seed": 0, "num_data": num_data, "num_val": 180,
                "static": {"latent_dim": latent_dim, "hidden_dim": 128}}  # fmt: skip
    return {"objective": objective, "training": {"epochs": 2, "best_epoch": 2,
                                                 "settings": settings},
            "evaluation": {"test": {"log_likelihood": -20.0, "log_likelihood_mcse": 0.01,
                                    "elbo": -21.0, "elbo_mcse": 0.02, "num_particles": 8,
                                    "num_data": 20}},
            "evaluation_settings": {"gap_images": 0}}  # fmt: skip


def test_report_shows_the_settings_that_differ_between_runs(tmp_path):
    """Runs with another latent dimension and training set were rows side by side, unmarked."""
    from vimodels.vae.report import COLUMNS, table_columns, table_rows, write_report

    runs = [_run_summary("trace", 2, 200), _run_summary("iwae-5", 8, 1293)]
    columns = table_columns(runs)
    assert columns == (COLUMNS[0], "training images", "latent_dim", *COLUMNS[1:])
    rows = table_rows(runs)
    assert [r[1:3] for r in rows] == [["200", "2"], ["1293", "8"]]
    assert all(len(r) == len(columns) for r in rows)
    text = write_report(tmp_path / "r.html", runs, {}).read_text()
    assert "differ in more than their objective" in text and "<th>latent_dim</th>" in text
    # the same settings (the objective's own differ by design): the table as before
    same = [_run_summary("trace", 8, 1293), _run_summary("iwae-5", 8, 1293)]
    assert table_columns(same) == COLUMNS
    assert "differ in more" not in write_report(tmp_path / "s.html", same, {}).read_text()


@pytest.mark.slow
def test_example_runs_with_tiny_arguments(tmp_path):
    script = ROOT / "examples" / "train_digits_vae.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--epochs", "1", "--num-train", "100", "--out",
         str(tmp_path), "--eval-particles", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test log-likelihood" in proc.stdout
    assert (tmp_path / "report.html").is_file()


@pytest.mark.parametrize(
    "elbo, options, particles",
    [
        ("trace", {}, None),
        ("trace", {"estimator": "stl"}, None),
        ("meanfield", {}, None),
        ("iwae", {}, 4),
        ("iwae", {"estimator": "dreg"}, 4),
        ("weighted_kl", {"beta": 0.5}, None),
    ],
)
def test_generic_fit_runs_every_objective_on_the_catalog_entry(elbo, options, particles):
    from vimodels.svi.fit import fit

    data = {"subsample_size": 20, "latent_dim": 2, "hidden_dim": 8, "num_layers": 1}
    result = fit("digits_vae", data, guide="encoder", elbo=elbo, elbo_options=options,
                 num_particles=particles, num_steps=3, num_eval=2, progress=False,
                 jit=False)  # fmt: skip
    assert result.num_steps == 3 and np.all(np.isfinite(result.losses))
    assert result.settings["elbo_options"] == options
