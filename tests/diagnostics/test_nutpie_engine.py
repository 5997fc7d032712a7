"""nutpie as an engine of the NUTS reference: choice, cache key, determinism, discrete sites."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from diagnostics.nuts.nutpie_engine import NUTPIE_MAX_DIM, flat_dim, resolve_sampler
from diagnostics.nuts.reference import SAMPLER_NAMES, cache_key, run_nuts
from vimodels.catalog.base import NutsSettings
from vimodels.errors import OptionError
from vimodels.svi.draws import model_info

DATA = {"x": torch.tensor([-1.0, 0.5, 2.0, 4.5, 5.0, 0.0])}


def mixture(x):
    """A location and an enumerated indicator per point: NUTS sums the indicators out."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc + 4.0 * z, scale), obs=x)


def simplex_model():
    pyro.sample("w", dist.Dirichlet(torch.ones(5)))
    pyro.sample("v", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))


def test_flat_dimension_counts_unconstrained_coordinates():
    # a simplex of 5 has 4 free coordinates; the discrete indicators are summed out
    assert flat_dim(model_info(simplex_model)) == 4 + 6
    assert flat_dim(model_info(mixture, (), DATA, 1)) == 2


def test_auto_is_nutpie_up_to_64_dimensions_and_the_projects_sampler_above():
    assert NUTPIE_MAX_DIM == 64
    assert resolve_sampler("auto", 1) == "nutpie"
    assert resolve_sampler("auto", 64) == "nutpie"
    assert resolve_sampler("auto", 65) == "vimodels"
    for name in ("nutpie", "vimodels", "pyro"):
        assert resolve_sampler(name, 3) == resolve_sampler(name, 500) == name
    # not the default: the slow reference tests failed on more entries with it
    assert NutsSettings().sampler == "vimodels"


def test_an_unknown_sampler_names_the_valid_ones():
    with pytest.raises(OptionError) as err:
        run_nuts(mixture, DATA, settings={"sampler": "stan"}, cache=False)
    for name in ("auto", "nutpie", "vimodels", "pyro"):
        assert repr(name)[1:-1] in str(err.value)
    assert set(SAMPLER_NAMES) == {"auto", "nutpie", "vimodels", "pyro"}


def test_cache_key_differs_by_engine():
    s = NutsSettings(num_chains=2, num_warmup=20, num_samples=20, sampler="auto")
    keys = {
        engine: cache_key(mixture, DATA, s, 0, ("loc",), engine=engine)
        for engine in ("nutpie", "vimodels", "pyro")
    }
    assert len(set(keys.values())) == 3
    # the default engine is the settings' sampler, resolved or not
    assert cache_key(mixture, DATA, s, 0, ("loc",)) not in keys.values()  # "auto"
    vim = NutsSettings(num_chains=2, num_warmup=20, num_samples=20, sampler="vimodels")
    assert cache_key(mixture, DATA, vim, 0, ("loc",)) == cache_key(
        mixture, DATA, vim, 0, ("loc",), engine="vimodels"
    )


# 6 s at load 2.4 (three nutpie runs, one of the project's sampler, the nutpie import)
@pytest.mark.slow
def test_nutpie_is_seeded_deterministic_cached_by_engine_and_recovers_discrete_sites(tmp_path):
    s = {"num_chains": 2, "num_warmup": 100, "num_samples": 50, "sampler": "auto"}
    a = run_nuts(mixture, DATA, seed=3, settings=s, cache_dir=tmp_path)
    hit = run_nuts(mixture, DATA, seed=3, settings=s, cache_dir=tmp_path)
    again = run_nuts(mixture, DATA, seed=3, settings=s, cache_dir=tmp_path, force=True)
    other = run_nuts(mixture, DATA, seed=4, settings=s, cache=False)
    ours = run_nuts(
        mixture, DATA, seed=3, settings={**s, "sampler": "vimodels"}, cache_dir=tmp_path
    )
    assert a.settings["sampler_used"] == "nutpie" and a.settings["sampler"] == SAMPLER_NAMES["auto"]
    assert a.settings["metric_used"] == ["low_rank (nutpie)"]
    # same seed, same draws (recomputed, not read back); another seed, other draws
    assert not a.from_cache and hit.from_cache and not again.from_cache
    for site in ("loc", "scale", "z"):
        np.testing.assert_array_equal(a.draws[site], again.draws[site])
    assert not np.array_equal(a.draws["loc"], other.draws["loc"])
    # the chains start apart (run_nuts's initial points) and differ
    assert not np.array_equal(a.draws["loc"][0], a.draws["loc"][1])
    # cached under its engine: the project's sampler is a miss, with its own draws
    assert not ours.from_cache and ours.settings["sampler_used"] == "vimodels"
    assert hit.settings["sampler_used"] == "nutpie" and ours.cache_key != a.cache_key
    # the indicators are recovered after NUTS, 0/1 per point
    assert a.draws["z"].shape == (2, 50, 6) and set(np.unique(a.draws["z"])) <= {0, 1}
    assert any("infer_discrete" in n for n in a.notes)
    # the reference's sample stats, under its names, for its checks
    stats = a.sample_stats
    for name in ("diverging", "step_size", "tree_depth", "n_steps", "lp", "acceptance_rate"):
        assert stats[name].shape == (2, 50), name
    assert stats["diverging"].dtype == bool and np.all(stats["n_steps"] >= 1)
    assert {ch.name for ch in a.checks} >= {"rhat", "ess_bulk", "divergences", "ebfmi"}
    steps = a.settings["chain_leapfrog_steps"]
    assert steps[0]["sampling"] == int(stats["n_steps"][0].sum()) and steps[0]["warmup"] > 0


@pytest.mark.parametrize("sampler", ["nutpie", "auto"])
def test_a_missing_nutpie_is_an_option_error_naming_the_extra(monkeypatch, tmp_path, sampler):
    import diagnostics.nuts.reference as reference

    monkeypatch.setattr(reference, "nutpie_version", lambda: "not installed")
    with pytest.raises(OptionError, match=r"vimodels\[nutpie\]"):
        run_nuts(mixture, DATA, settings={"sampler": sampler}, cache_dir=tmp_path)
    # the project's own sampler needs no nutpie: the check is not reached before sampling
    assert reference.resolve_sampler("vimodels", 2) == "vimodels"
