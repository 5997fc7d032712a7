"""Iterate averaging leaves out stretches that are still drifting (issue 18)."""

from __future__ import annotations

import numpy as np
from fit_models import normal_model

import vimodels
from vimodels.svi.averaging import drifting, stationary_suffix


def batch_stats(x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(x) // batch
    xb = x[: n * batch].reshape(n, batch, -1)
    return xb.mean(axis=1), (xb**2).mean(axis=1)


def test_a_slow_drift_under_a_large_wander_is_not_averaged_over_the_whole_run():
    """Drift 1.0 over 1280 steps under noise sd 1: the halves differ by 0.5 < one sd (the
    old rule averaged all of it, lagging the end by 0.5), but the difference is ~6 of its
    standard errors: the whole run and its second half are refused."""
    rng = np.random.default_rng(3)
    steps = 1280
    x = np.linspace(0.0, 1.0, steps) + rng.normal(0, 1.0, steps)
    means, squares = batch_stats(x[:, None], 20)  # 64 batches
    half = len(means) // 2
    diff = means[:half].mean(0) - means[half:].mean(0)
    assert abs(diff[0]) < 1.0  # the sd test alone would accept the whole run
    assert drifting(means[:half], means[half:], diff)[0]
    sel = stationary_suffix(means, squares)
    assert sel.first_batch[0] >= half  # at most the second half, later if still drifting
    # the average it keeps lags the end (1.0) by less than the whole-run average does (0.5)
    assert abs(sel.mean[0] - 1.0) < abs(x.mean() - 1.0)


def test_stationary_noise_is_still_averaged_over_the_whole_run():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.0, (1280, 20))
    sel = stationary_suffix(*batch_stats(x, 20))
    # a 0.3 % test per coordinate: at most one of 20 coordinates falsely refused
    assert (sel.first_batch == 0).sum() >= 19


def test_a_deliberately_slow_run_says_what_was_averaged_and_why():
    """lr 1e-3 from far away: the mean crawls towards the posterior all run long."""
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, 40).astype(np.float32)
    r = vimodels.fit(
        normal_model,
        data={"x": x},
        guide="auto_normal",
        lr=1e-3,
        lr_decay=None,
        num_steps=1500,
        progress=False,
        num_eval=20,
        convergence=vimodels.ConvergenceRule(early_stop=False),
    )
    assert "no such stretch" in r.message or "still drifting" in r.message, r.message
    averaged = r.settings["averaged"]
    assert averaged is None or averaged["num_drifting"] >= 1
    # the drifting mean keeps its last iterate: no lagging average
    assert r.params["AutoNormal.locs.mu"] > 1.0
