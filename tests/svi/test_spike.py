"""A step whose loss spikes is skipped: neither the parameters nor Adam's state see it.

``pdb_arma11`` with ``auto_multivariate_normal`` (seed 0) froze at step 98, where one
guide draw gave a loss of 2.9e13 and a gradient that swamped Adam's second moment
(tests/svi/test_stuck.py has the fit).
"""

from __future__ import annotations

import importlib

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels
from vimodels.svi.optim import make_optimizer
from vimodels.svi.spike import FACTOR, MIN_HISTORY, STOP_COUNT, SpikeGuard, threshold

loop_module = importlib.import_module("vimodels.svi.loop")

SPIKE_CALL = 50  # the guide's call that spikes (fit also calls it before the steps)
DATA = {"x": torch.linspace(1.0, 3.0, 10)}


def spiking_model(x, calls):
    """A normal mean whose loss jumps by about 1e12 (and its gradient too) at one step.

    ``calls`` counts the guide's calls, one per SVI step (Python ELBO), plus a few
    before the steps.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
    if calls[0] == SPIKE_CALL:
        pyro.factor("spike", -1e12 * (1.0 + mu**2))


def point_guide(x, calls):
    """A point-mass guide: the loss is a deterministic function of the parameter."""
    calls[0] += 1
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Delta(loc))


def _run(num_steps, spike, particles, monkeypatch):
    """A Python-ELBO fit of ``num_steps`` steps; its result and its Adam."""
    made = []

    def capture(*args):
        made.append(make_optimizer(*args))
        return made[-1]

    monkeypatch.setattr(loop_module, "make_optimizer", capture)
    calls = [0 if spike else -(10**9)]
    r = vimodels.fit(
        spiking_model, data={**DATA, "calls": calls}, guide=point_guide, num_steps=num_steps,
        lr=0.05, lr_decay=None, jit=False, average=False, num_particles=particles,
        convergence=vimodels.ConvergenceRule(early_stop=False), progress=False, num_eval=5,
    )  # fmt: skip
    return r, made[-1]


@pytest.mark.parametrize("particles", [1, 4])
def test_a_skipped_spike_leaves_adam_as_if_the_step_were_absent(particles, monkeypatch):
    """On the old code the spike's gradient (2e12) entered Adam's second moment."""
    spiked, adam = _run(100, True, particles, monkeypatch)
    clean, ref = _run(99, False, particles, monkeypatch)
    assert adam._steps == ref._steps == 99
    (p,) = adam._optim.param_groups[0]["params"]
    (q,) = ref._optim.param_groups[0]["params"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(
            adam._optim.state[p][key], ref._optim.state[q][key], rtol=0, atol=0
        )
    np.testing.assert_array_equal(spiked.params["loc"], clean.params["loc"])
    k = spiked.settings["spikes"]["first_step"]
    assert spiked.settings["spikes"]["steps"] == [k] and 40 < k < 50, spiked.message
    assert spiked.settings["spikes"]["largest_loss"] > 1e11
    assert f"skipped 1 step whose loss spiked (first at step {k}" in spiked.message
    assert clean.settings["spikes"] is None
    assert spiked.losses[k] > 1e11 and len(spiked.losses) == 100
    np.testing.assert_array_equal(np.delete(spiked.losses, k), clean.losses)


def wall_model(x):
    """A normal mean with a wall: past ``mu = 3`` the loss grows by 1e12 per unit."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    pyro.factor("wall", -1e12 * torch.relu(mu - 3.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def narrow_guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 0.01))


@pytest.mark.parametrize("compiled", [True, False])
def test_a_loss_that_keeps_spiking_stops_the_fit_as_diverged(compiled, monkeypatch):
    """The data pull ``mu`` to 10, through the wall: once the guide reaches it most draws
    spike, and the fit stops as diverged instead of applying them (the old code applied
    them: 1e12 gradients froze Adam and the fit ran on)."""
    monkeypatch.setattr(loop_module, "COMPILE_MIN_STEPS", 2)
    r = vimodels.fit(
        wall_model, data={"x": torch.full((10,), 10.0)}, guide=narrow_guide, num_steps=500,
        lr=0.1, lr_decay=None, jit=None if compiled else False, progress=False, num_eval=20,
        seed=3,
    )  # fmt: skip
    assert r.settings["step_compiler"] == ("fx" if compiled else "python")
    assert r.status == "diverged" and not r.converged, r.message
    k = r.num_steps - 1
    assert f"diverged at step {k}: " in r.message and "spiked" in r.message
    assert r.settings["spikes"]["skipped"] >= STOP_COUNT
    assert r.params["loc"] < 3.0 + 0.1 + 0.01  # at most one step (lr 0.1) past the wall


def test_threshold_is_median_plus_a_thousand_robust_scales():
    losses = np.array([10.0, 11.0, 12.0, 14.0, 100.0])
    assert threshold(losses) == 12.0 + FACTOR * 2.0  # MAD 2 > 1 nat > 0.12
    assert threshold(np.full(30, 500.0)) == 500.0 + FACTOR * 5.0  # 1 % of |median|
    assert threshold(np.full(30, -0.5)) == -0.5 + FACTOR * 1.0  # 1 nat


def test_guard_judges_nothing_before_its_history_and_counts_skips():
    guard = SpikeGuard()
    assert all(guard.accepts(i, 1e6 if i == 3 else 1.0) for i in range(MIN_HISTORY))
    assert not guard.accepts(MIN_HISTORY, 1.0 + 1.001 * FACTOR)
    assert guard.accepts(MIN_HISTORY + 1, 1.0 + 0.999 * FACTOR)
    assert guard.skipped == [MIN_HISTORY] and guard.diverged(MIN_HISTORY) is None
    for i in range(MIN_HISTORY + 2, MIN_HISTORY + 2 + STOP_COUNT):
        assert not guard.accepts(i, 1e9)
    assert "diverged at step" in guard.diverged(i)
    assert guard.summary()["skipped"] == STOP_COUNT + 1
