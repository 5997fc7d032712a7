"""Iterate averaging: the stationary-suffix rule, the parameter store side, and fits."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from fit_models import normal_model
from torch.distributions import constraints

import vimodels
from vimodels.svi.averaging import MIN_BATCHES, IterateAverage, halves_agree, stationary_suffix


def batch_stats(x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch means of ``x`` (steps, D) and of its squares."""
    n = len(x) // batch
    xb = x[: n * batch].reshape(n, batch, -1)
    return xb.mean(axis=1), (xb**2).mean(axis=1)


def test_stationary_iterates_are_averaged_over_the_whole_run():
    rng = np.random.default_rng(0)
    x = 3.0 + rng.normal(size=(800, 5))
    sel = stationary_suffix(*batch_stats(x, 20))
    assert (sel.first_batch == 0).all() and sel.num_batches == 40
    np.testing.assert_allclose(sel.mean, x.mean(axis=0))
    # 800 independent iterates: the average is within 5 standard errors of the truth
    assert np.abs(sel.mean - 3.0).max() <= 5 / np.sqrt(800)


def test_a_drifting_coordinate_keeps_its_last_iterate():
    rng = np.random.default_rng(1)
    steps = np.arange(800)
    drift = steps / 80.0 + rng.normal(0, 0.1, 800)  # 10 units of drift, noise 0.1
    flat = rng.normal(0, 1, 800)
    sel = stationary_suffix(*batch_stats(np.stack([drift, flat], axis=1), 20))
    # a linear drift fails the halves test on every suffix: |d / 2| > sd = d / sqrt(12)
    assert sel.first_batch[0] == -1 and np.isnan(sel.mean[0])
    assert sel.first_batch[1] == 0


def test_a_drift_that_stops_is_averaged_after_it_stops():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.linspace(-5.0, 0.0, 400), np.zeros(400)]) + rng.normal(0, 1, 800)
    sel = stationary_suffix(*batch_stats(x[:, None], 20))
    assert sel.first_batch[0] == 20  # the second half: the run from step 400
    assert abs(sel.mean[0]) <= 5 / np.sqrt(400)


def test_halves_agree_is_per_coordinate():
    means = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    squares = means**2 + np.array([0.0, 1.0])
    # coordinate 0: halves differ by 1, the second half has sd 0; coordinate 1: equal halves
    assert halves_agree(means, squares).tolist() == [False, True]


def test_iterate_average_swaps_and_commits_unconstrained_values():
    with pyro.get_param_store().scope():
        a = pyro.param("a", torch.zeros(3))
        pyro.param("b", torch.tensor(1.0), constraint=constraints.positive)
        avg = IterateAverage()
        avg.start(10, batch=2)
        assert avg.from_step == 11 and avg.selection() is None
        store = pyro.get_param_store()
        values = []
        for k in range(2 * MIN_BATCHES):
            with torch.no_grad():
                store._params["a"].copy_(torch.full((3,), float(k % 2)))
                store._params["b"].copy_(torch.tensor(float(k % 3)))  # log scale
            values.append(k % 3)
            avg.update()
        sel = avg.selection()
        assert sel is not None and sel.num_batches == MIN_BATCHES
        last_a = pyro.param("a").detach().clone()
        with avg.swapped():
            np.testing.assert_allclose(pyro.param("a").detach().numpy(), 0.5)
            expected_b = np.exp(np.mean(values))
            assert float(pyro.param("b").detach()) == pytest.approx(expected_b, rel=1e-5)
        assert torch.equal(pyro.param("a").detach(), last_a)
        summary = avg.commit()
        assert summary == {
            "from_step": 11,
            "steps": 8,
            "batch": 2,
            "fraction_averaged": 1.0,
            "num_drifting": 0,
            "num_coordinates": 4,
        }
        np.testing.assert_allclose(a.detach().numpy(), 0.5)
        avg.reset()
        assert not avg.active and avg.commit() is None


def test_fit_reports_the_average_and_can_turn_it_off():
    kw = dict(guide="mean_field", num_steps=4000, lr=0.05, num_eval=50, progress=False, seed=1)
    on = vimodels.fit("eight_schools_noncentered", **kw)
    off = vimodels.fit("eight_schools_noncentered", average=False, **kw)
    window = on.settings["convergence"]["window"]
    averaged = on.settings["averaged"]
    assert on.converged and averaged is not None
    # iterates are collected from step 2; the averaged stretch is a halving suffix of them
    assert 2 <= averaged["from_step"] <= on.num_steps - 4 * averaged["batch"] + 1
    assert averaged["steps"] >= 4 * averaged["batch"] and window // 10 <= averaged["batch"]
    assert "average of the iterates" in on.message
    assert off.settings["averaged"] is None and "average" not in off.message
    np.testing.assert_array_equal(on.losses, off.losses)  # same path, different read-out
    assert on.params["mean_field.mu.loc"] != off.params["mean_field.mu.loc"]


@pytest.mark.slow
def test_averaging_brings_the_mean_closer_to_the_exact_posterior():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, 40).astype(np.float32)
    precision = 1 / 100 + len(x)
    post_mean, post_sd = x.sum() / precision, precision**-0.5
    errors = {True: [], False: []}
    for seed in range(6):
        for average in (True, False):
            r = vimodels.fit(
                normal_model,
                data={"x": x},
                guide="auto_normal",
                seed=seed,
                average=average,
                progress=False,
                num_eval=50,
            )
            loc = r.params["AutoNormal.locs.mu"]
            errors[average].append(float(loc - post_mean) / post_sd)
    rms = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in errors.items()}
    # The last iterate wanders by about 0.1 posterior sd at these settings; 400
    # averaged iterates with a relaxation time of about 10 steps hold about 20
    # independent ones, so the average's error is about 0.1 / sqrt(20) = 0.022
    # sd: 5 of those is 0.11.
    assert rms[True] <= 0.11
    assert rms[True] < rms[False]
