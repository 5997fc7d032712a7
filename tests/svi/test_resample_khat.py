"""Pareto k of importance weights with draws of weight 0 (``log p = -inf``)."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest

from vimodels.svi.resample import khat_note, khat_of, psis_probabilities, resample_settings


@pytest.fixture
def log_w() -> np.ndarray:
    rng = np.random.default_rng(3)
    lw = rng.standard_t(5, 4000) * 0.5
    lw[rng.choice(4000, 400, replace=False)] = -np.inf
    return lw


def test_zero_weights_count_as_zeros_as_in_arviz(log_w):
    # k was inf by fiat whenever one weight was 0; ArviZ keeps them as zeros
    _, k_az = az.psislw(log_w.copy(), reff=1.0)
    k = khat_of(log_w)
    assert math.isfinite(k) and k == pytest.approx(float(k_az), abs=1e-8)
    probs, k_p = psis_probabilities(log_w)
    assert k_p == k
    assert probs[np.isneginf(log_w)].sum() == 0.0 and probs.sum() == pytest.approx(1.0)
    settings = resample_settings(log_w)
    assert settings["zero_weight"] == 400 and settings["k_hat"] == k
    assert "400 of weight 0 where log p = -inf" in khat_note(k, 4000, 400)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_weights_leave_k_undefined(log_w, bad):
    log_w[0] = bad
    assert khat_of(log_w) == math.inf
    assert psis_probabilities(log_w)[1] == math.inf
    assert resample_settings(log_w)["reliable"] is False


def test_fewer_than_two_positive_weights():
    assert khat_of(np.r_[0.0, np.full(99, -np.inf)]) == math.inf
