"""Calibrating a user's model resolves it as a fit does (`resolve_model`)."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

from diagnostics.nuts.reference import NotCachedWarning
from vimodels.errors import DataError, IncompatibleError, OptionError
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


# ------------------------------------------------- which site observes which data entry


def two_obs(y1, y2):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(5.0, 1.0))
    with pyro.plate("n", 4):
        pyro.sample("obs1", dist.Normal(a, 0.1), obs=y1)
        pyro.sample("obs2", dist.Normal(b, 0.1), obs=y2)


def two_obs_copies(y1=None, y2=None):
    """Observes copies of its data: only their values tie the sites to the entries."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(5.0, 1.0))
    with pyro.plate("n", 4):
        pyro.sample("obs1", dist.Normal(a, 0.1), obs=None if y1 is None else y1.double())
        pyro.sample("obs2", dist.Normal(b, 0.1), obs=None if y2 is None else y2.double())


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.deterministic("x_copy", x)  # an observed-flagged site given x: not an observation
    with pyro.plate("n", 4):
        pyro.sample("y", dist.Normal(w * x, 0.1), obs=y)


ZEROS = {"y1": [0.0] * 4, "y2": [0.0] * 4}


def test_equal_placeholders_are_matched_to_the_sites_given_them():
    """All-zero placeholders: each entry gets its own site's simulations.

    Matching by value alone mapped both entries to the first site ({'y1': 'obs1',
    'y2': 'obs1'}): y2 received y1's simulations, and calibrate called an exact-enough
    auto_normal 'under-dispersed' for b.
    """
    problem = make_problem(two_obs, ZEROS)
    assert problem.observed == {"y1": "obs1", "y2": "obs2"}
    theta, data = simulate(problem, 1)
    # y2 ~ N(b, 0.1) with b ~ N(5, 1), y1 ~ N(a, 0.1): within 5 sd of their own means
    assert torch.all((data["y2"] - float(theta["b"])).abs() < 0.5)
    assert torch.all((data["y1"] - float(theta["a"])).abs() < 0.5)


def test_an_input_equal_to_an_observed_array_stays_an_input():
    """x equal in value to y is the regression's input, not an observed entry."""
    template = {"x": [0.0, 1.0, 2.0, 3.0], "y": [0.0, 1.0, 2.0, 3.0]}
    problem = make_problem(regression, template, sites=["w"])
    assert problem.observed == {"y": "y"}
    _, data = simulate(problem, 2)
    assert torch.equal(data["x"], torch.tensor(template["x"]))
    assert not torch.equal(data["y"], data["x"])


def test_value_matching_that_is_ambiguous_is_refused_with_the_fix():
    """Copies of equal placeholders could be either site's: an error naming both ways out."""
    with pytest.raises(DataError, match=r"ambiguous.*distinct placeholder.*observed=\{'y1'"):
        make_problem(two_obs_copies, ZEROS)
    with pytest.raises(DataError, match=r"'obs1', 'obs2'.*ambiguous"):
        make_problem(two_obs_copies, ZEROS, observed=["y1", "y2"])
    # distinct placeholders, or the sites named, resolve it
    distinct = make_problem(two_obs_copies, {"y1": [0.0] * 4, "y2": [1.0] * 4})
    assert distinct.observed == {"y1": "obs1", "y2": "obs2"}
    named = make_problem(two_obs_copies, ZEROS, observed={"y1": "obs1", "y2": "obs2"})
    assert named.observed == {"y1": "obs1", "y2": "obs2"}
    theta, data = simulate(named, 1)
    assert torch.all((data["y2"] - float(theta["b"])).abs() < 0.5)


def test_one_array_passed_as_two_entries_is_refused():
    zeros = torch.zeros(4)
    with pytest.raises(DataError, match=r"one array passed as each of.*'y1', 'y2'"):
        make_problem(two_obs, {"y1": zeros, "y2": zeros})
    with pytest.raises(DataError, match=r"'obs1', 'obs2' are given data entry 'y1'"):
        make_problem(two_obs, {"y1": zeros, "y2": zeros}, observed=["y1", "y2"])


def test_named_sites_are_checked():
    with pytest.raises(OptionError, match=r"'nope' is not an observed sample site.*obs1, obs2"):
        make_problem(two_obs, ZEROS, observed={"y1": "nope"})
    with pytest.raises(DataError, match=r"'y1', 'y2' would all be replaced.*'obs1'"):
        make_problem(two_obs, ZEROS, observed={"y1": "obs1", "y2": "obs1"})
    with pytest.raises(IncompatibleError, match=r"'obs2' does not take data entry 'y1'"):
        make_problem(two_obs, {"y1": [0.0] * 4, "y2": [1.0] * 4}, observed={"y1": "obs2"})
    with pytest.raises(OptionError, match="observed is a list"):
        make_problem(two_obs, ZEROS, observed="y1")


PRIOR_A = 2.0  # read by coin_global; the problem-key test changes it


def coin_global(trials, successes=None):
    p = pyro.sample("p", dist.Beta(PRIOR_A, 2.0))
    with pyro.plate("experiments", trials.shape[0]):
        pyro.sample("successes", dist.Binomial(trials, p), obs=successes)


def _with_prior(a):
    """A user's decorator (functools.wraps) that scales the log density by ``a``."""

    def deco(f):
        @functools.wraps(f)
        def wrapper(trials, successes=None):
            with poutine.scale(scale=a):
                return f(trials, successes)

        return wrapper

    return deco


def test_a_user_problem_is_keyed_by_what_the_model_computes(monkeypatch):
    """Saved simulations were reused after the prior changed: the key was the source text.

    The problem key follows a module-level constant the model reads and a
    decorator's argument, as the NUTS cache's fingerprint does.
    """
    before = make_problem(coin_global, DATA).fingerprint
    assert make_problem(coin_global, DATA).fingerprint == before
    monkeypatch.setattr(sys.modules[__name__], "PRIOR_A", 50.0)
    assert make_problem(coin_global, DATA).fingerprint != before
    assert (
        make_problem(_with_prior(1.0)(coin), DATA).fingerprint
        != make_problem(_with_prior(2.0)(coin), DATA).fingerprint
    )


def test_a_user_problem_that_cannot_be_fingerprinted_never_reuses_simulations():
    class Opaque:
        a = 2.0

    thing = Opaque()

    def opaque_coin(trials, successes=None):
        p = pyro.sample("p", dist.Beta(thing.a, 2.0))
        with pyro.plate("experiments", trials.shape[0]):
            pyro.sample("successes", dist.Binomial(trials, p), obs=successes)

    with pytest.warns(NotCachedWarning, match="not reused"):
        first = make_problem(opaque_coin, DATA).fingerprint
    with pytest.warns(NotCachedWarning):
        assert make_problem(opaque_coin, DATA).fingerprint != first
