"""compare on fits of a catalog entry given other data: the closed form and the reference.

The closed-form ``log p(x)`` must be that of the data the fits were made with (it was the
catalog's own data's: -73.48 against an ELBO of -623 on ``y + 5``), and a reference of other
data must be refused (it was accepted: W2 13.3 against the wrong posterior).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diagnostics import evidence
from diagnostics.comparison import compare
from diagnostics.nuts.reference import exact_reference
from vimodels.catalog.registry import MODELS
from vimodels.errors import IncompatibleError
from vimodels.svi.fit import fit

CONJ = "conjugate_linear_regression"
SHIFT = 5.0


def shifted_data() -> dict:
    d = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in MODELS[CONJ].data().items()
    }
    d["y"] = d["y"] + SHIFT
    return d


def exact_reference_on(data: dict, seed: int = 0):
    """The exact reference of the entry's closed form on ``data`` (kind ``exact``)."""
    ref = exact_reference(CONJ, num_chains=2, num_draws=1000, seed=seed)
    post = MODELS[CONJ].exact(data)
    beta = post.sampler(2000, np.random.default_rng(seed))["beta"].reshape(2, 1000, -1)
    observed = {"obs": data["y"].double().numpy()}
    return dataclasses.replace(ref, draws={"beta": beta}, observed_data=observed, log_likelihood={})


@pytest.fixture(scope="module")
def shifted_fit():
    return fit(
        CONJ, shifted_data(), guide="full_rank", num_steps=1500, lr=0.05, seed=0, progress=False,
        num_eval=200,
    )  # fmt: skip


def test_exact_log_evidence_is_that_of_the_fits_data(shifted_fit):
    d = shifted_data()
    want = MODELS[CONJ].exact(d).log_evidence
    own = MODELS[CONJ].exact_posterior().log_evidence
    assert abs(want - own) > 100  # the shift moves log p(x) by hundreds of nats
    # exact: the same closed form on the same float32 data
    assert evidence.exact_log_evidence([shifted_fit]) == pytest.approx(want, abs=1e-9)


def test_compare_on_other_data_uses_the_closed_form_of_that_data(shifted_fit):
    d = shifted_data()
    c = compare(
        [shifted_fit], exact_reference_on(d), num_draws=1000, iwae_k=20, num_evidence=1000, seed=1
    )
    row = c.summary.iloc[0]
    assert c.log_evidence.kind == evidence.EXACT
    assert c.log_evidence.value == pytest.approx(MODELS[CONJ].exact(d).log_evidence, abs=1e-9)
    # a Gaussian q of a Gaussian posterior: ELBO <= log p(x), gap small (was a gap of 550 nats)
    assert row.gap > -5 * row.gap_se - 1e-3
    assert row.gap < 1.0


def test_closed_form_that_cannot_take_the_data_is_not_claimed(shifted_fit, monkeypatch):
    entry = MODELS[CONJ]

    def refuses(data):
        raise KeyError("X")

    broken = dataclasses.replace(entry, exact=refuses)
    assert evidence.exact_log_evidence([dataclasses.replace(shifted_fit, entry=broken)]) is None


def test_reference_of_other_data_is_refused(shifted_fit):
    ref = exact_reference(CONJ, num_chains=2, num_draws=1000, seed=0)  # the catalog's own data
    with pytest.raises(
        IncompatibleError, match=r"other data than the reference.*'obs'.*Recompute the reference"
    ):
        compare([shifted_fit], ref, num_draws=200, iwae_k=10, num_evidence=200, seed=1)


def test_reference_of_the_same_data_in_float64_is_accepted(shifted_fit):
    d = shifted_data()
    ref = exact_reference_on(d)
    # the user's float64 values, rounded to float32 by the fit: the same data
    y64 = ref.observed_data["obs"] + np.random.default_rng(0).uniform(
        -1, 1, 50
    ) * 2.0**-25 * np.abs(ref.observed_data["obs"])
    ref = dataclasses.replace(ref, observed_data={"obs": y64})
    compare([shifted_fit], ref, num_draws=200, iwae_k=10, num_evidence=200, seed=1)
    # a difference of 10 float32 ulps is other data
    bad = dataclasses.replace(ref, observed_data={"obs": y64 * (1 + 10 * 2.0**-23)})
    with pytest.raises(IncompatibleError, match="differ"):
        compare([shifted_fit], bad, num_draws=200, iwae_k=10, num_evidence=200, seed=1)


def test_subsampled_fit_of_the_same_data_is_accepted():
    ref = exact_reference(CONJ, num_chains=2, num_draws=1000, seed=0)
    sub = fit(
        CONJ, data={"subsample_size": 10}, guide="full_rank", num_steps=50, seed=0,
        progress=False, num_eval=20,
    )  # fmt: skip
    compare([sub], ref, num_draws=200, iwae_k=10, num_evidence=200, seed=1)
    d = shifted_data()
    d["subsample_size"] = 10
    other = fit(CONJ, d, guide="full_rank", num_steps=50, seed=0, progress=False, num_eval=20)
    with pytest.raises(IncompatibleError, match="other data"):
        compare([other], ref, num_draws=200, iwae_k=10, num_evidence=200, seed=1)


def test_decentered_fit_observes_the_same_data():
    from types import SimpleNamespace

    from diagnostics.comparison import check_same_data
    from vimodels.resolve import resolve_model
    from vimodels.svi.draws import model_info

    entry, fn, data, _ = resolve_model("eight_schools_centered")
    observed = model_info(fn, (), data, entry.max_plate_nesting).observed_values
    r = fit(
        "eight_schools_centered", guide="auto_normal", num_steps=20, seed=0, progress=False,
        num_eval=20, reparam="decenter",
    )  # fmt: skip
    assert r.settings["reparam"]
    check_same_data({"decentered": r}, SimpleNamespace(observed_data=observed))
    other = {k: v + 1.0 for k, v in observed.items()}
    with pytest.raises(IncompatibleError, match="other data"):
        check_same_data({"decentered": r}, SimpleNamespace(observed_data=other))


def test_memory_mapped_subsampled_fit_is_checked_on_one_batch(mmap_subsampled_fit):
    """Memory-mapped data are not read whole: one batch against the same rows of the reference."""
    from types import SimpleNamespace

    from diagnostics.comparison import check_same_data

    full, r = mmap_subsampled_fit
    check_same_data({"mmap": r}, SimpleNamespace(observed_data={"x": full}))
    with pytest.raises(IncompatibleError, match="20 of 20 values differ"):
        check_same_data({"mmap": r}, SimpleNamespace(observed_data={"x": full + 1.0}))
