"""fit()'s per-step callback: what it sees, and that sampling in it does not change the fit."""

from __future__ import annotations

import numpy as np
import pytest

import vimodels
from vimodels.errors import OptionError

MODEL = "eight_schools_noncentered"
STEPS = 30


def _fit(callback=None):
    return vimodels.fit(
        MODEL, guide="auto_normal", num_steps=STEPS, num_eval=10, progress=False, callback=callback
    )


def test_callback_sees_every_step_and_draws_at_current_params():
    seen = []

    def callback(progress):
        draws = progress.sample(200, seed=1)
        seen.append((progress.step, progress.loss, progress.elapsed, draws))

    result = _fit(callback)
    assert [s[0] for s in seen] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([s[1] for s in seen], result.losses)
    elapsed = [s[2] for s in seen]
    assert all(b >= a for a, b in zip(elapsed, elapsed[1:]))
    assert elapsed[-1] <= result.wall_time
    first, last = seen[0][3], seen[-1][3]
    assert set(last) == set(result.sites)
    assert last["theta"].shape == (200, 8)
    # the draws at the last step are the fitted guide's draws with the same seed
    final = result.sample(200, seed=1)
    for site in result.sites:
        np.testing.assert_allclose(last[site], final[site], rtol=1e-6)
    # and the parameters moved between the first and the last step
    assert not np.allclose(first["mu"], last["mu"])


def test_sampling_in_the_callback_does_not_change_the_fit():
    plain = _fit()
    sampled = _fit(lambda progress: progress.sample(50))
    np.testing.assert_array_equal(plain.losses, sampled.losses)
    assert plain.elbo == sampled.elbo


def test_callback_must_be_callable():
    with pytest.raises(OptionError, match="callback"):
        _fit(callback=3)
