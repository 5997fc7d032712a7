"""compare on a fit whose model subsamples its data: log weights on the full data, or none."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diagnostics import evidence
from diagnostics.comparison import compare
from diagnostics.nuts.reference import exact_reference
from vimodels.catalog.conjugate import load_synthetic
from vimodels.catalog.registry import MODELS
from vimodels.svi.fit import fit

CONJ = "conjugate_linear_regression"
F32 = 1e-3  # the model's log density is summed in float32, and scaled by N / batch


@pytest.fixture(scope="module")
def sub_fit():
    ref = exact_reference(CONJ, num_chains=2, num_draws=1000, seed=0)
    r = fit(
        CONJ, data={"subsample_size": 10}, guide="full_rank", num_steps=1500, lr=0.05, seed=0,
        progress=False, num_eval=200,
    )  # fmt: skip
    return r, ref


def full_data_elbo(r) -> float:
    """Closed-form full-data ELBO of the fitted Gaussian q(beta) = N(m, L L^T)."""
    d = load_synthetic()
    X, y = d["X"].double().numpy(), d["y"].double().numpy()
    p = r.params
    m = p["full_rank.beta.loc"]  # the catalog's hand-written full-rank guide
    L = p["full_rank.beta.scale_tril"]
    C = L @ L.T
    s2, p2 = d["noise_scale"] ** 2, d["prior_scale"] ** 2
    n, k = X.shape
    lik = (
        -0.5 * n * math.log(2 * math.pi * s2)
        - 0.5 * (np.sum((y - X @ m) ** 2) + np.trace(X @ C @ X.T)) / s2
    )
    prior = -0.5 * k * math.log(2 * math.pi * p2) - 0.5 * (m @ m + np.trace(C)) / p2
    entropy = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * C)[1]
    return float(lik + prior + entropy)


def test_subsampled_fit_is_compared_on_full_data_log_weights(sub_fit):
    r, ref = sub_fit
    c = compare([r], ref, num_draws=2000, iwae_k=20, num_evidence=2000, seed=1)
    row = c.summary.iloc[0]
    log_z = MODELS[CONJ].exact_posterior().log_evidence
    # a lower bound: the IWAE bound cannot be above log p(x) (it was 8.6 nats above)
    assert row.iwae <= log_z + 5 * row.iwae_se + F32
    assert row.elbo == pytest.approx(full_data_elbo(r), abs=5 * row.elbo_se + F32)
    assert row.iwae >= row.elbo - 5 * row.elbo_se - F32
    # q is Gaussian like the posterior: the weights are well behaved
    assert row.khat < 0.5
    assert not any("misses posterior mass" in f for f in c.flags)
    assert row.log_weight_data.startswith("full")


def test_subsampled_fit_too_large_for_full_data_gets_no_iwae_or_khat(sub_fit, monkeypatch):
    r, ref = sub_fit
    monkeypatch.setattr(evidence, "FULL_DATA_BUDGET", 10, raising=False)
    c = compare([r], ref, num_draws=1000, iwae_k=20, num_evidence=1000, seed=1)
    row = c.summary.iloc[0]
    assert math.isnan(row.iwae) and math.isnan(row.khat)
    assert row.khat_verdict == "not applicable (subsampled log weights)"
    assert row.get("log_weight_data", "").startswith("subsampled")
    assert any("subsamples the data" in f for f in c.flags)
    assert not any("misses posterior mass" in f for f in c.flags)
    # the ELBO is the minibatch estimate: unbiased, its se includes the batch noise
    assert row.elbo == pytest.approx(full_data_elbo(r), abs=5 * row.elbo_se)


def test_memory_mapped_data_is_not_read_whole(mmap_subsampled_fit):
    _, r = mmap_subsampled_fit
    sub = evidence.subsampled(r)
    assert sub["plates"][0]["size"] == 200
    assert evidence.why_not_full_data(r, sub, 1000) == "memory-mapped data"


def test_evidence_log_weights_of_a_subsampled_fit_are_full_data_or_nan(sub_fit, monkeypatch):
    r, _ = sub_fit
    lw = evidence.evidence_log_weights(r, 2000, seed=4)
    # exact weights of a q close to the posterior: mean = the closed-form full-data ELBO, small
    # spread (one batch of 10 of 50 rows, scaled by 5, spread them over several nats)
    se = lw.std() / np.sqrt(len(lw))
    assert lw.mean() == pytest.approx(full_data_elbo(r), abs=5 * se + F32)
    assert lw.std() < 0.5
    monkeypatch.setattr(evidence, "FULL_DATA_BUDGET", 10, raising=False)
    assert np.isnan(evidence.evidence_log_weights(r, 100, seed=4)).all()
