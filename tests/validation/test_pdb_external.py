"""How posteriordb's references are judged (:mod:`diagnostics.external`).

The shipped draws are 10 chains x 100 thinned draws; their R-hat bound is the
noise bound of that shape (:func:`diagnostics.external.thinned_rhat_max`), not
the 1.01 made for long chains. A faithful copy must pass, a corrupted one must
not.
"""

from __future__ import annotations

import numpy as np
import pytest

import diagnostics.external as external
from diagnostics import _arviz
from diagnostics.external import RHAT_FALSE_ALARM, thinned_rhat_max
from diagnostics.nuts.reference import RHAT_MAX
from vimodels.validation import reference_draws


def test_bound_of_the_thinned_shape():
    bound = thinned_rhat_max(10, 100, 10)
    assert 1.014 < bound < 1.015  # F(19, 980) quantile 1 - 0.01 / 20
    assert thinned_rhat_max(10, 100, 4) < bound < thinned_rhat_max(10, 100, 13)
    # long chains: R-hat's noise is far below 1.01, which stays the bound
    assert thinned_rhat_max(10, 1000, 10) == RHAT_MAX
    assert thinned_rhat_max(1, 100, 10) == RHAT_MAX


def test_bound_false_alarm_rate_on_independent_draws():
    # 300 faultless references of the shipped shape (10 x 100, 4 elements), independent draws:
    # the bound fails about 1 % of them (Bonferroni: at most RHAT_FALSE_ALARM); 1.01 fails ~4 %
    rng = np.random.default_rng(11)
    bound = thinned_rhat_max(10, 100, 4)
    worst = np.array(
        [
            max(_arviz.rhat(x[..., j]) for j in range(4))
            for x in rng.standard_normal((300, 10, 100, 4))
        ]
    )
    assert (worst >= bound).sum() <= 3 * RHAT_FALSE_ALARM * len(worst)
    assert (worst >= RHAT_MAX).sum() >= 4


@pytest.mark.parametrize("name", ["pdb_nes1972", "pdb_arma11"])
def test_faithful_copy_is_trusted(name):
    ref = external.external_reference(name)
    checks = {c.name: c for c in ref.checks}
    assert ref.trusted, ref.describe()
    assert set(checks) == {"rhat", "ess_bulk", "ess_tail", "summary"}
    # the plain 1.01 would call these UNTRUSTED (R-hat 1.014 and 1.012 on 10 x 100 draws)
    assert RHAT_MAX <= checks["rhat"].value < checks["rhat"].threshold
    assert "noise bound" in checks["rhat"].detail


def _corrupted(monkeypatch, name, change):
    draws = {k: v.copy() for k, v in reference_draws(name).items()}
    change(draws)
    monkeypatch.setattr(external, "reference_draws", lambda entry: draws)
    ref = external.external_reference(name)
    return ref, {c.name: c for c in ref.checks}


def test_one_chain_shifted_is_untrusted(monkeypatch):
    def shift(draws):
        beta = draws["beta"]
        beta[3, :, 1] += beta[..., 1].std()  # chain 4 of beta[2], one posterior sd off

    ref, checks = _corrupted(monkeypatch, "pdb_nes1972", shift)
    assert not ref.trusted
    assert not checks["rhat"].ok and checks["rhat"].value > 1.03
    assert "beta[1]" in checks["rhat"].detail


def test_draws_that_are_not_posteriordbs_run_are_untrusted(monkeypatch):
    # every chain moved by 0.25 sd: the chains agree (R-hat passes) but the draws' mean is
    # ~8 MCSE from posteriordb's mean over all 10 000 draws
    def shift(draws):
        draws["sigma"] += 0.25 * draws["sigma"].std()

    ref, checks = _corrupted(monkeypatch, "pdb_nes1972", shift)
    assert checks["rhat"].ok
    assert not checks["summary"].ok and "sigma" in checks["summary"].detail
    assert not ref.trusted
