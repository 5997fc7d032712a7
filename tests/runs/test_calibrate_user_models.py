"""Calibrating a user's model resolves it as a fit does (`resolve_model`)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from vimodels.errors import IncompatibleError
from vimodels.runs.calibrate import calibrate, make_problem, simulate

DATA = {"trials": [20.0, 30.0, 25.0], "successes": [7.0, 11.0, 9.0]}
RUN = dict(
    guides=["auto_normal"],
    sims=3,
    steps=40,
    num_draws=20,
    executor="serial",
    report=False,
    fit_options={"jit": False, "num_eval": 10},
)


def coin(trials, successes=None):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("experiments", trials.shape[0]):
        pyro.sample("successes", dist.Binomial(trials, p), obs=successes)


def coin_positional(trials, successes=None, /):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("experiments", trials.shape[0]):
        pyro.sample("successes", dist.Binomial(trials, p), obs=successes)


def ordered_means(y=None):
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(0.0, 3.0).log_prob(mu).sum())
    with pyro.plate("n", 4):
        pyro.sample("y", dist.Normal(mu[0], 1.0), obs=y)


def shrunk_mean(y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    pyro.factor("shrink", -(mu**2))  # the prior is N(0, 3) times this: not what runs forward
    with pyro.plate("n", 4):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_positional_only_model_is_calibrated_like_its_keyword_twin(tmp_path):
    """``def model(trials, successes=None, /)`` is simulated and fitted by keyword.

    Same seeds: its simulations and ranks equal those of the same model with
    ordinary arguments, bit for bit.
    """
    problem = make_problem(coin_positional, DATA)
    assert problem.observed == {"successes": "successes"} and problem.sites == ("p",)
    assert problem.model is coin_positional  # the user's function travels to the workers
    theta, data = simulate(problem, 3)
    twin_theta, twin_data = simulate(make_problem(coin, DATA), 3)
    assert np.array_equal(theta["p"], twin_theta["p"])
    assert torch.equal(data["successes"], twin_data["successes"])
    cal = calibrate(coin_positional, data=DATA, out=tmp_path / "positional", **RUN)
    twin = calibrate(coin, data=DATA, out=tmp_path / "keyword", **RUN)
    assert cal.summary["ranked"].tolist() == [3] and cal.failures.empty is twin.failures.empty
    np.testing.assert_array_equal(
        cal.ranks["auto_normal/trace"]["p"], twin.ranks["auto_normal/trace"]["p"]
    )


def test_unsampleable_prior_is_refused_with_the_reason():
    """ImproperUniform + pyro.factor fits (the adapted model), but its prior cannot be drawn."""
    with pytest.raises(IncompatibleError, match=r"site\(s\) mu .*cannot be sampled"):
        make_problem(ordered_means, {"y": [0.0, 1.0, 2.0, 3.0]})


def test_factor_terms_are_refused_rather_than_simulated_wrongly():
    """Running the model forward skips ``pyro.factor``: the simulated data would be wrong."""
    with pytest.raises(IncompatibleError, match=r"pyro.factor \(shrink\)"):
        calibrate(shrunk_mean, data={"y": [0.0, 1.0, 2.0, 3.0]}, **{**RUN, "sims": 2})
