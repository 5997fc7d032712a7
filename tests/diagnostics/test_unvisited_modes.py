"""A mode no chain visited makes the NUTS reference untrusted.

An equal mixture of N(-8, 0.5) and N(8, 0.5): four chains started in
Uniform(-2, 2) all land in the same mode one seed in eight (seed 0 here), R-hat,
ESS, divergences and E-BFMI all pass, and the reference was trusted with half
the posterior missing (mean 8 where the truth is 0). L-BFGS from four more such
starts finds the other mode, with Laplace mass equal to the sampled one's.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from diagnostics.nuts.modes import MASS_RATIO_MIN, unvisited_mode_check
from diagnostics.references import get_reference


def _mixture(weight: float):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1000.0))
        lp = dist.Normal(torch.tensor([-8.0, 8.0]), 0.5).log_prob(x.unsqueeze(-1))
        w = torch.tensor([weight, 1.0 - weight])
        pyro.factor("mix", torch.logsumexp(lp + w.log(), -1))

    return model


@pytest.mark.slow
def test_a_reference_whose_chains_all_sit_in_one_mode_is_untrusted(tmp_path):
    ref = get_reference(_mixture(0.5), {}, seed=0, cache_dir=tmp_path)
    x = ref.draws["x"]
    assert (x > 0).all()  # every chain in the + mode: what R-hat cannot see
    others = [c for c in ref.checks if c.name != "modes"]
    assert all(c.ok for c in others)
    (modes,) = [c for c in ref.checks if c.name == "modes"]
    assert not modes.ok and not ref.trusted
    assert modes.value == pytest.approx(0.0, abs=0.05)  # equal masses
    assert "x = -8" in modes.detail
    again = get_reference(_mixture(0.5), {}, seed=0, cache_dir=tmp_path)  # kept in the cache
    assert again.from_cache and not again.trusted
    assert [c.ok for c in again.checks if c.name == "modes"] == [False]


@pytest.mark.parametrize("weight, ok", [(0.5, False), (0.02, False), (0.002, True)])
def test_the_check_weighs_the_missing_mode_by_its_laplace_mass(weight, ok):
    """Draws from the + mode only; the - mode has mass weight / (1 - weight) of it:
    fails from MASS_RATIO_MIN (1 %) on, and the value is that log ratio."""
    rng = np.random.default_rng(0)
    draws = {"x": 8.0 + 0.5 * rng.standard_normal((4, 500))}
    found = None
    for seed in range(3):  # starts that reach the - mode (the prior median is 0)
        found = unvisited_mode_check(_mixture(weight), {}, draws, seed=seed)
        if found is not None and found.value > -math.inf:
            break
    assert found is not None and found.ok is ok
    assert found.value == pytest.approx(math.log(weight / (1 - weight)), abs=0.01)
    assert found.threshold == pytest.approx(math.log(MASS_RATIO_MIN))


def test_a_unimodal_posterior_passes():
    rng = np.random.default_rng(1)

    def model():
        pyro.sample("mu", dist.Normal(0.0, 10.0))
        pyro.sample("s", dist.HalfNormal(2.0))

    draws = {"mu": rng.normal(0, 10, (4, 500)), "s": np.abs(rng.normal(0, 2, (4, 500)))}
    found = unvisited_mode_check(model, {}, draws)
    assert found is not None and found.ok and found.value == -math.inf


def test_a_failing_mode_search_keeps_the_draws_and_says_so(monkeypatch, tmp_path):
    import diagnostics.nuts.reference as reference

    def broken(*args, **kwargs):
        raise NotImplementedError("no such transform")

    monkeypatch.setattr(reference, "unvisited_mode_check", broken)

    def model():
        pyro.sample("mu", dist.Normal(1.0, 2.0))

    ref = get_reference(
        model, {}, seed=0, cache=False, settings={"num_warmup": 200, "num_samples": 300}
    )
    assert ref.draws["mu"].shape == (4, 300)
    assert "modes" not in {c.name for c in ref.checks}
    assert any("mode search not run (NotImplementedError" in n for n in ref.notes)


def test_the_mode_search_time_is_recorded_within_the_wall_time(monkeypatch):
    """Benchmarks that set a fit's time against the reference's take the sampling's
    time: the search's own seconds are in ``settings["mode_search_s"]``."""
    import time as _time

    import diagnostics.nuts.reference as reference

    real = reference.unvisited_mode_check

    def slow(*args, **kwargs):
        _time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "unvisited_mode_check", slow)

    def model():
        pyro.sample("mu", dist.Normal(1.0, 2.0))

    ref = get_reference(
        model, {}, seed=0, cache=False, settings={"num_warmup": 200, "num_samples": 300}
    )
    assert "modes" in {c.name for c in ref.checks}
    assert 0.5 <= ref.settings["mode_search_s"] < ref.wall_time


def _minor_mode_model(main_loc: float = 4.0):
    """0.95 N(4, 0.5) + 0.05 N(-4, 0.5)."""

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 10.0))
        lp = dist.Normal(torch.tensor([main_loc, -main_loc]), 0.5).log_prob(x.unsqueeze(-1))
        pyro.factor("mix", torch.logsumexp(lp + torch.tensor([0.95, 0.05]).log(), -1))

    return model


def test_chains_in_the_minor_mode_fail_when_every_search_finds_the_major_one():
    """Every chain in the 5 % mode and every L-BFGS start in the 95 % one: the check
    returned None ("not applicable") and the reference stayed trusted with 95 % of the
    mass missing. The draws' median is now a start (it ends where the chains are)."""
    rng = np.random.default_rng(0)
    draws = {"x": -4.0 + 0.5 * rng.standard_normal((4, 500))}
    # seed 443: every one of the chains' kind of start (and the prior median) ends at +4
    found = unvisited_mode_check(_minor_mode_model(), {}, draws, seed=443)
    assert found is not None and not found.ok
    assert found.value == pytest.approx(math.log(0.95 / 0.05), abs=0.01)


def test_a_mode_inside_the_box_of_correlated_draws_is_found():
    """A 20 % mode at (2.5, -2.5) beside a main mode with correlation 0.975: the main
    draws span -7..7 in each coordinate, so a per-coordinate box called the minor mode
    visited; in the draws' whitened space it is 8 units from the nearest draw."""
    main = dist.MultivariateNormal(torch.zeros(2), torch.tensor([[4.0, 3.9], [3.9, 4.0]]))
    minor = dist.MultivariateNormal(torch.tensor([2.5, -2.5]), 0.09 * torch.eye(2))

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        pyro.factor(
            "f",
            torch.logaddexp(math.log(0.8) + main.log_prob(x), math.log(0.2) + minor.log_prob(x)),
        )

    torch.manual_seed(0)
    draws = {"x": main.sample((4, 500)).numpy()}
    results = [unvisited_mode_check(model, {}, draws, seed=s) for s in range(4)]
    hits = [r for r in results if r is not None and r.value > -math.inf]
    assert hits, results  # some seed's starts reach the minor mode's basin
    for r in hits:
        assert not r.ok and "whitened units" in r.detail
        assert r.value == pytest.approx(math.log(0.2 / 0.8), abs=0.1)
