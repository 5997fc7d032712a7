"""The NUTS reference: agreement with an exact posterior, self-checks, discrete recovery, cache."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from diagnostics.comparison import compare
from diagnostics.nuts.reference import (
    ESS_MIN,
    RHAT_MAX,
    CacheWarning,
    cache_key,
    default_cache_dir,
    exact_reference,
    rebadged,
    reparameterized_reference,
    run_checks,
    run_nuts,
)
from diagnostics.references import get_reference
from vimodels.catalog.base import NutsSettings
from vimodels.catalog.registry import MODELS, get_model
from vimodels.errors import IncompatibleError, OptionError
from vimodels.svi.draws import model_info
from vimodels.svi.fit import fit

CONJ = "conjugate_linear_regression"
# the posterior is correlated (features with rho 0.8): 2 x 1000 draws give ESS comfortably >= 400
CONJ_SETTINGS = {"num_chains": 2, "num_warmup": 300, "num_samples": 1000}
TINY = {"num_chains": 1, "num_warmup": 25, "num_samples": 25}


@pytest.fixture(scope="session")
def conj_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("conj_cache")


@pytest.fixture(scope="session")
def conjugate_nuts(conj_cache):
    return run_nuts(CONJ, settings=CONJ_SETTINGS, seed=0, cache_dir=conj_cache, num_workers=1)


@pytest.mark.slow
def test_nuts_matches_exact_posterior_of_conjugate_model(conjugate_nuts):
    ref = conjugate_nuts
    exact = MODELS[CONJ].exact_posterior()
    table = ref.site_table()
    assert list(table["element"]) == ["beta[0]", "beta[1]", "beta[2]"]
    for i, row in table.iterrows():
        # mean within 5 Monte Carlo standard errors of the exact posterior mean
        assert abs(row["mean"] - exact.mean["beta"][i]) < 5 * row["mcse_mean"], row
        # sd: se(sd) ~ sd / sqrt(2 ESS)
        se_sd = exact.sd["beta"][i] / np.sqrt(2 * row["ess_bulk"])
        assert abs(row["sd"] - exact.sd["beta"][i]) < 5 * se_sd, row
    assert ref.kind == "nuts" and ref.trusted, ref.describe()
    assert ref.num_divergences == 0
    names = {c.name for c in ref.checks}
    assert names == {"rhat", "ess_bulk", "ess_tail", "divergences", "ebfmi", "modes"}
    assert ref.draws["beta"].shape == (2, 1000, 3)
    assert ref.log_likelihood["obs"].shape == (2, 1000, 50)
    s = ref.summary()
    assert s["trusted"] is True and s["settings"]["num_samples"] == 1000
    assert s["versions"]["pyro"] == pyro.__version__
    assert len(set(s["settings"]["chain_seeds"])) == 2


@pytest.mark.slow
def test_second_run_reuses_the_cache(conjugate_nuts, conj_cache):
    t0 = time.perf_counter()
    again = run_nuts(CONJ, settings=CONJ_SETTINGS, seed=0, cache_dir=conj_cache)
    assert again.from_cache and not conjugate_nuts.from_cache
    assert time.perf_counter() - t0 < 5
    assert again.cache_key == conjugate_nuts.cache_key
    assert again.cache_path == conjugate_nuts.cache_path
    for site in conjugate_nuts.draws:
        np.testing.assert_array_equal(again.draws[site], conjugate_nuts.draws[site])
    for name in conjugate_nuts.sample_stats:
        np.testing.assert_array_equal(again.sample_stats[name], conjugate_nuts.sample_stats[name])
    assert [c.as_dict() for c in again.checks] == [c.as_dict() for c in conjugate_nuts.checks]
    # a different seed is a different entry
    other = cache_key(
        MODELS[CONJ].model,
        MODELS[CONJ].data(),
        NutsSettings(**{**vars(MODELS[CONJ].nuts), **CONJ_SETTINGS}),
        1,
        ("beta",),
    )
    assert other != conjugate_nuts.cache_key


@pytest.fixture
def tiny_entry(tmp_path):
    """A tiny cached NUTS run in its own cache folder, and a way to rerun it."""

    def run(**kw):
        return run_nuts(CONJ, settings=TINY, seed=7, cache_dir=tmp_path, num_workers=1, **kw)

    first = run()
    assert not first.from_cache
    return first, run


def _assert_same_draws(a, b):
    for site in a.draws:
        np.testing.assert_array_equal(a.draws[site], b.draws[site])


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_byte", "no_manifest", "bad_manifest", "no_draws"]
)
def test_damaged_cache_entry_is_recomputed_with_a_warning(tiny_entry, damage):
    first, run = tiny_entry
    npz = first.cache_path
    manifest = npz.with_suffix(".json")
    if damage == "truncate":
        data = npz.read_bytes()
        npz.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "bad_manifest":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "no_draws":
        npz.unlink()
    with pytest.warns(CacheWarning):
        again = run()
    assert not again.from_cache
    _assert_same_draws(first, again)  # chains are seeded: recomputing gives the same draws
    # the rewritten entry is valid again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = run()
    assert third.from_cache
    json.loads(manifest.read_text())


def test_force_recomputes_and_no_cache_writes_nothing(tiny_entry, tmp_path):
    first, run = tiny_entry
    forced = run(force=True)
    assert not forced.from_cache
    _assert_same_draws(first, forced)
    empty = tmp_path / "unused"
    ref = run_nuts(CONJ, settings=TINY, seed=7, cache=False, cache_dir=empty, num_workers=1)
    assert ref.cache_path is None and not empty.exists()


def test_short_run_is_untrusted_everywhere(tiny_nuts_eight_schools):
    ref = tiny_nuts_eight_schools
    assert not ref.trusted
    failing = {c.name for c in ref.checks if not c.ok}
    assert {"ess_bulk"} <= failing
    assert "UNTRUSTED" in ref.describe()
    assert ref.summary()["trusted"] is False
    expected = {
        "diverging",
        "step_size",
        "tree_depth",
        "n_steps",
        "lp",
        "acceptance_rate",
        "energy",
        "energy_error",
        "max_energy_error",
    }
    if ref.settings["sampler_used"] == "nutpie":  # with sampler="auto" (10 dimensions)
        expected.discard("max_energy_error")  # nutpie does not record it
    assert set(ref.sample_stats) == expected
    # sites of interest include the deterministic theta, recomputed per draw
    theta = ref.draws["mu"][..., None] + ref.draws["tau"][..., None] * ref.draws["theta_tilde"]
    np.testing.assert_allclose(ref.draws["theta"], theta, rtol=1e-5, atol=1e-4)


def test_checks_on_draws_with_known_properties():
    rng = np.random.default_rng(0)
    good = {"x": rng.normal(size=(4, 1000)), "c": np.ones((4, 1000))}
    checks = {c.name: c for c in run_checks(good, ("x", "c"), 0)}
    assert all(c.ok for c in checks.values())
    assert checks["rhat"].value < RHAT_MAX and checks["ess_bulk"].value >= ESS_MIN
    stuck = {"x": rng.normal(size=(4, 1000)) + np.arange(4)[:, None]}  # chains disagree
    assert not {c.name: c for c in run_checks(stuck, ("x",), 0)}["rhat"].ok
    short = {"x": rng.normal(size=(2, 100))}
    assert not {c.name: c for c in run_checks(short, ("x",), 0)}["ess_bulk"].ok
    assert not {c.name: c for c in run_checks(good, ("x",), 3)}["divergences"].ok
    assert "divergences" not in {c.name for c in run_checks(good, ("x",), None)}


def _model_a(x):
    pyro.sample("a", dist.Normal(0.0, 1.0))


def _model_b(x):
    pyro.sample("a", dist.Normal(0.0, 2.0))


def test_cache_key_tracks_source_data_settings_and_seed():
    data = {"x": torch.ones(3)}
    s = NutsSettings()
    base = cache_key(_model_a, data, s, 0, ("a",))
    assert base == cache_key(_model_a, {"x": torch.ones(3)}, NutsSettings(), 0, ("a",))
    assert base != cache_key(_model_b, data, s, 0, ("a",))
    assert base != cache_key(_model_a, {"x": torch.ones(4)}, s, 0, ("a",))
    assert base != cache_key(_model_a, {"x": torch.zeros(3)}, s, 0, ("a",))
    assert base != cache_key(_model_a, data, NutsSettings(num_samples=10), 0, ("a",))
    assert base != cache_key(_model_a, data, s, 1, ("a",))
    assert base != cache_key(_model_a, data, NutsSettings(chain_method="independent"), 0, ("a",))


def test_cache_key_tracks_the_sampler_algorithm_version(monkeypatch):
    # a change of the warm-up (or the transition) changes a seed's draws: no reference drawn
    # by the old algorithm may be served for the new one
    from diagnostics.nuts import reference

    data, s = {"x": torch.ones(3)}, NutsSettings()
    base = cache_key(_model_a, data, s, 0, ("a",))
    monkeypatch.setattr(reference, "ALGORITHM_VERSION", reference.ALGORITHM_VERSION + 1)
    assert base != cache_key(_model_a, data, s, 0, ("a",))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VIMODELS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VIMODELS_CACHE")
    assert default_cache_dir().name in ("vimodels", "Cache")


def test_exact_reference_and_auto_choice(tiny_nuts_eight_schools):
    ref = exact_reference("neals_funnel", num_chains=2, num_draws=1000, seed=0)
    assert ref.kind == "exact" and ref.trusted
    assert ref.draws["x"].shape == (2, 1000, 4)
    assert abs(ref.flat("v").mean()) < 5 * 3.0 / np.sqrt(2000)
    assert get_reference(CONJ).kind == "exact"
    # eight schools has no closed form: auto means NUTS (here loaded from the session cache)
    es = get_reference(
        "eight_schools_noncentered",
        settings={"num_chains": 2, "num_warmup": 60, "num_samples": 60},
        seed=3,
    )
    assert es.kind == "nuts" and es.from_cache
    assert es.cache_key == tiny_nuts_eight_schools.cache_key


def test_centered_reference_is_noncentered_nuts_on_the_same_sites(tiny_nuts_eight_schools):
    """eight_schools_centered takes its draws from NUTS on the non-centered form."""
    src = tiny_nuts_eight_schools
    ref = get_reference(
        "eight_schools_centered",
        settings={"num_chains": 2, "num_warmup": 60, "num_samples": 60},
        seed=3,
    )
    assert ref.from_cache and ref.cache_key == src.cache_key  # the same NUTS run, reused
    assert ref.model_name == "eight_schools_centered" and ref.kind == "nuts"
    assert ref.latent_sites == ("mu", "tau", "theta") and "theta_tilde" not in ref.draws
    np.testing.assert_array_equal(ref.draws["theta"], src.draws["theta"])
    theta = src.draws["mu"][..., None] + src.draws["tau"][..., None] * src.draws["theta_tilde"]
    np.testing.assert_allclose(ref.draws["theta"], theta, rtol=1e-5, atol=1e-4)
    assert any("eight_schools_noncentered" in n for n in ref.notes)
    assert [c.name for c in ref.checks] == [c.name for c in src.checks]
    # the compare machinery takes it as a reference of the centered model
    r = fit("eight_schools_centered", guide="mean_field", num_steps=5, num_eval=4, progress=False)
    assert compare([r], ref, num_draws=50, iwae_k=2).model_name == "eight_schools_centered"
    # a source without the entry's sites cannot stand in for it
    with pytest.raises(IncompatibleError, match="lack"):
        reparameterized_reference(get_model("radon_varying_intercept_centered"), src)


def test_rebadged_keeps_the_models_sites_and_says_where_the_draws_came_from(
    tiny_nuts_eight_schools,
):
    """The one re-badging helper (catalog twins and decentered retries use it)."""
    src = tiny_nuts_eight_schools
    entry = get_model("eight_schools_centered")
    info = model_info(entry.model, (), entry.data(), entry.max_plate_nesting)
    ref = rebadged(
        src,
        info,
        model_name="renamed",
        sites=("tau",),
        reference_from="reference from elsewhere",
        note="a note",
        settings={"extra": 1},
    )
    assert ref.model_name == "renamed" and ref.sites == ("tau",)
    assert set(ref.draws) == {"mu", "tau", "theta"} and ref.latent_sites == ("mu", "tau", "theta")
    # the latent sites' and the observed site's (log_likelihood, observed_data) dims
    assert ref.dims == {k: info.dims[k] for k in ("mu", "tau", "theta", "obs") if k in info.dims}
    assert ref.plate_sizes == info.plate_sizes
    assert ref.reference_from == "reference from elsewhere" and ref.settings["extra"] == 1
    assert {k: v for k, v in ref.settings.items() if k not in ("reference_from", "extra")} == (
        src.settings
    )
    assert ref.notes == (*src.notes, "a note")
    expected = run_checks(ref.draws, ("tau",), src.num_divergences, src.sample_stats.get("energy"))
    assert ref.checks == expected and ref.trusted == all(c.ok for c in expected)
    with pytest.raises(IncompatibleError, match="lack nope; record them"):
        rebadged(src, info, model_name="x", sites=("nope",), reference_from="r", note="n")


def test_bad_options():
    with pytest.raises(OptionError):
        get_reference(CONJ, kind="magic")
    with pytest.raises(OptionError):
        run_nuts(CONJ, settings={"num_draws": 5}, cache=False)
    with pytest.raises(OptionError):
        run_nuts(CONJ, settings={"target_accept_prob": 1.5}, cache=False)
    with pytest.raises(OptionError):
        run_nuts(CONJ, sites=("nope",), cache=False)
    with pytest.raises(OptionError):
        exact_reference("eight_schools_noncentered")
    with pytest.raises(OptionError, match="valid: vimodels, pyro, nutpie, auto"):
        run_nuts(CONJ, settings={"sampler": "stan"}, cache=False)
    with pytest.raises(OptionError, match="valid: lockstep, independent"):
        run_nuts(CONJ, settings={"chain_method": "threads"}, cache=False)


def test_pyro_sampler_is_still_available():
    ref = run_nuts(CONJ, settings={**TINY, "sampler": "pyro"}, cache=False)
    assert ref.settings["sampler"].startswith("pyro NUTS")
    assert ref.settings["chain_method_used"] == "independent"  # Pyro's chains run alone
    assert ref.draws["beta"].shape[:2] == (1, 25)
    lean = run_nuts(CONJ, settings={**TINY, "sampler": "vimodels"}, cache=False)
    assert lean.settings["sampler"].startswith("vimodels NUTS")
    assert lean.settings["chain_leapfrog_steps"][0]["sampling"] >= 25


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lockstep", "independent"])
def test_parallel_chains_equal_serial_chains(tmp_path, method):
    settings = {"num_chains": 2, "num_warmup": 20, "num_samples": 20, "chain_method": method}
    settings["sampler"] = "vimodels"  # the project's sampler's chain methods
    serial = run_nuts(CONJ, settings=settings, seed=11, cache=False, num_workers=1)
    parallel = run_nuts(CONJ, settings=settings, seed=11, cache=False, num_workers=2)
    assert parallel.settings["num_workers"] == 2
    assert serial.settings["chain_method_used"] == parallel.settings["chain_method_used"] == method
    # in lockstep each process batches its own group of chains (here one each)
    _assert_same_draws(serial, parallel)


@pytest.mark.slow
def test_lockstep_reference_equals_independent_chains():
    settings = {"num_chains": 3, "num_warmup": 40, "num_samples": 30, "sampler": "vimodels"}
    lock = run_nuts(CONJ, settings=settings, seed=5, cache=False)
    alone = run_nuts(
        CONJ, settings={**settings, "chain_method": "independent"}, seed=5, cache=False
    )
    assert lock.settings["chain_method"] == "lockstep" and lock.settings["num_workers"] == 1
    assert lock.settings["potential_batch"] == ["vmap"]
    assert alone.settings["chain_method_used"] == "independent"
    assert alone.settings["potential_batch"] == []
    assert lock.cache_key != alone.cache_key  # the chain method is part of the key
    for site in lock.draws:  # the batched gradient rounds as the unbatched one on this model
        np.testing.assert_allclose(lock.draws[site], alone.draws[site], rtol=1e-5, atol=1e-6)


def mixture(x):
    """Two-component mixture with a known conditional p(z_i = 1 | loc, x_i)."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(loc + 4.0 * z, 1.0), obs=x)


@pytest.mark.slow
def test_discrete_sites_are_recovered_from_their_conditional():
    x = torch.tensor([-1.0, 0.5, 2.0, 4.5, 5.0, 0.0])
    ref = run_nuts(
        mixture,
        {"x": x},
        settings={"num_chains": 1, "num_warmup": 100, "num_samples": 400},
        cache=False,
    )
    assert ref.draws["z"].shape == (1, 400, 6)
    assert any("infer_discrete" in n for n in ref.notes)
    loc, z = ref.flat("loc"), ref.flat("z")
    xs = x.numpy()[None]
    log1 = np.log(0.3) - 0.5 * (xs - loc[:, None] - 4.0) ** 2
    log0 = np.log(0.7) - 0.5 * (xs - loc[:, None]) ** 2
    p1 = 1.0 / (1.0 + np.exp(log0 - log1))  # exact p(z_i = 1 | loc, x_i) per draw
    # E[z_i - p1_i] = 0 given the draws of loc; each term has variance p1 (1 - p1)
    resid = (z - p1).sum(0)
    se = np.sqrt((p1 * (1 - p1)).sum(0))
    assert np.all(np.abs(resid) <= 5 * se + 1e-9), (resid, se)
