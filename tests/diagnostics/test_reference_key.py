"""The reference cache is keyed by what produced the draws, and its manifests are checksummed.

A model built by a factory, reading a module-level constant or a default
argument has the same source text whatever the value: the key must still
change with the value (else a stale entry is returned). An edited manifest is
a damaged entry.
"""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from diagnostics.nuts import fingerprint as fingerprint_module
from diagnostics.nuts.fingerprint import Unfingerprintable, data_fingerprint, fingerprint
from diagnostics.nuts.reference import (
    CacheWarning,
    NotCachedWarning,
    cache_key,
    data_id,
    run_nuts,
)
from vimodels.catalog.base import NutsSettings
from vimodels.catalog.registry import MODELS
from vimodels.data import RowArray

TINY = {"num_chains": 1, "num_warmup": 30, "num_samples": 30}
DATA = {"y": torch.tensor([0.1, -0.2, 0.3])}
SCALE = 0.1  # read by _global_model; the tests change it


def make_model(loc):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(loc, 0.1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 10.0), obs=y)

    return model


def make_tensor_model(loc: torch.Tensor):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(loc, 0.1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 10.0), obs=y)

    return model


def _global_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, SCALE))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


def _default_model(y, loc=0.0):
    mu = pyro.sample("mu", dist.Normal(loc, 0.1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


def _helper_loc():
    return 0.0


def _calls_helper(y):
    mu = pyro.sample("mu", dist.Normal(_helper_loc(), 0.1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


def _key(model):
    return cache_key(model, DATA, NutsSettings(), 0, ("mu",))


def test_factory_closure_over_a_float_changes_the_key():
    assert _key(make_model(0.0)) != _key(make_model(10.0))
    assert _key(make_model(0.0)) == _key(make_model(0.0))  # same value, same key


def test_closure_over_a_tensor_is_keyed_by_its_content():
    a, b = make_tensor_model(torch.zeros(1)), make_tensor_model(torch.full((1,), 10.0))
    assert _key(a) != _key(b)
    assert _key(a) == _key(make_tensor_model(torch.zeros(1)))


def test_module_level_constant_changed_between_calls(monkeypatch):
    before = _key(_global_model)
    monkeypatch.setattr(__import__(__name__), "SCALE", 5.0)
    assert _key(_global_model) != before


def test_default_argument_changes_the_key():
    before = _key(_default_model)
    _default_model.__defaults__ = (10.0,)
    try:
        assert _key(_default_model) != before
    finally:
        _default_model.__defaults__ = (0.0,)
    assert _key(_default_model) == before


def test_a_called_helper_function_is_part_of_the_key():
    global _helper_loc
    before = _key(_calls_helper)
    original = _helper_loc
    _helper_loc = lambda: 10.0  # noqa: E731 - a different helper under the same name
    try:
        assert _key(_calls_helper) != before
    finally:
        _helper_loc = original


def test_every_catalog_model_has_a_fingerprint():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for entry in MODELS.values():
            assert len(fingerprint(entry.model)) == 64


def test_an_object_that_cannot_be_fingerprinted_is_refused():
    class Opaque:
        loc = 0.0

    thing = Opaque()

    def model(y):
        pyro.sample("mu", dist.Normal(thing.loc, 0.1))

    with pytest.raises(Unfingerprintable, match="closure variable 'thing'"):
        fingerprint(model)


LOC = 0.0  # read by _global_loc_model; the fresh-reference test changes it


def _global_loc_model(y):
    mu = pyro.sample("mu", dist.Normal(LOC, 0.1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


def _loc_arg_model(y, loc=0.0):
    mu = pyro.sample("mu", dist.Normal(loc, 0.1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


def with_loc(loc):
    """A user's decorator (functools.wraps): the wrapper passes ``loc``."""

    def deco(f):
        @functools.wraps(f)
        def wrapper(y):
            return f(y, loc)

        return wrapper

    return deco


class _Priors:
    LOC = 0.0  # read by _class_attribute_model; the fresh-reference test changes it


def _class_attribute_model(y):
    mu = pyro.sample("mu", dist.Normal(_Priors.LOC, 0.1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


def _param_model(y):
    loc = pyro.param("prior_loc", torch.tensor(0.0))
    mu = pyro.sample("mu", dist.Normal(loc, 0.1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 10.0), obs=y)


@pytest.fixture
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _model_at(variant: str, loc: float, monkeypatch):
    """The model of ``variant`` with its location set to ``loc`` (same source text)."""
    if variant == "factory_float":
        return make_model(loc)
    if variant == "decorator":
        return with_loc(loc)(_loc_arg_model)
    if variant == "class_attribute":
        monkeypatch.setattr(_Priors, "LOC", loc)
        return _class_attribute_model
    if variant == "param_store":
        pyro.clear_param_store()
        pyro.param("prior_loc", torch.tensor(loc))
        return _param_model
    if variant == "closure_tensor":
        return make_tensor_model(torch.tensor(loc))
    if variant == "module_constant":
        monkeypatch.setattr(__import__(__name__), "LOC", loc)
        return _global_loc_model
    monkeypatch.setattr(_default_model, "__defaults__", (loc,))
    return _default_model


@pytest.mark.parametrize(
    "variant",
    [
        "factory_float",
        "closure_tensor",
        "module_constant",
        "default_argument",
        "decorator",
        "class_attribute",
        "param_store",
    ],
)
def test_changed_value_gets_a_fresh_reference_not_the_cached_one(
    tmp_path, monkeypatch, variant, _clean_param_store
):
    """The reported bug: loc=10 returned the loc=0 draws from the cache.

    Also through a ``functools.wraps`` decorator's argument, a class attribute
    and a ``pyro.param`` value in the param store (each served stale before).
    """

    def run(loc):
        return run_nuts(
            _model_at(variant, loc, monkeypatch),
            DATA,
            settings=TINY,
            sites=("mu",),
            cache_dir=tmp_path,
            num_workers=1,
        )

    at0 = run(0.0)
    at10 = run(10.0)
    assert not at0.from_cache and not at10.from_cache and at10.cache_key != at0.cache_key
    # prior sd 0.1, likelihood sd 10 over 3 points: the posterior mean is within 0.1 of loc
    assert abs(at10.draws["mu"].mean() - 10.0) < 0.5 and abs(at0.draws["mu"].mean()) < 0.5
    again = run(0.0)  # the same value again: the cached draws
    assert again.from_cache
    np.testing.assert_array_equal(again.draws["mu"], at0.draws["mu"])


def test_unfingerprintable_model_is_not_cached_and_says_so(tmp_path):
    class Opaque:
        loc = 0.0

    thing = Opaque()

    def model(y):
        mu = pyro.sample("mu", dist.Normal(thing.loc, 0.1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 10.0), obs=y)

    with pytest.warns(NotCachedWarning, match="not cached: .*closure variable 'thing'"):
        ref = run_nuts(model, DATA, settings=TINY, cache_dir=tmp_path, num_workers=1)
    assert ref.cache_path is None and not ref.from_cache
    assert ref.settings["cache"].startswith("not cached")
    assert not list(tmp_path.rglob("*.npz"))


# ------------------------------------------------------------ edited manifests


@pytest.fixture
def cached(tmp_path):
    def run():
        return run_nuts(
            "conjugate_linear_regression", settings=TINY, seed=7, cache_dir=tmp_path, num_workers=1
        )

    first = run()
    return first, run


def _edit(manifest_path, change):
    manifest = json.loads(manifest_path.read_text())
    change(manifest)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def _rename_a_dim(m):
    site = next(k for k, v in m["dims"].items() if v)
    m["dims"][site][0] = "renamed"


def _grow_a_plate(m):
    plate = next(iter(m["plate_sizes"]))
    m["plate_sizes"][plate] += 1


EDITS = {
    "dim_name": _rename_a_dim,
    "model_name": lambda m: m.update(model="eight_schools_noncentered"),
    "kind": lambda m: m.update(kind="exact"),
    "plate_size": _grow_a_plate,
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_manifest_is_a_damaged_entry(cached, edit):
    first, run = cached
    manifest = first.cache_path.with_suffix(".json")
    _edit(manifest, EDITS[edit])
    with pytest.warns(CacheWarning, match="does not match its checksum"):
        again = run()
    assert not again.from_cache
    assert again.model_name == "conjugate_linear_regression" and again.kind == "nuts"
    assert again.dims == first.dims and again.plate_sizes == first.plate_sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run().from_cache  # the recomputed entry is whole again


def test_a_value_deep_in_a_large_tensor_in_a_dict_changes_the_key():
    """torch's repr of a 5000-element tensor elides the middle: the key hashed that repr."""
    a = torch.zeros(5000)
    b = a.clone()
    b[2500] = 7.0
    s = NutsSettings()
    assert cache_key(_global_model, {"g": {"x": a}}, s, 0, ("mu",)) != cache_key(
        _global_model, {"g": {"x": b}}, s, 0, ("mu",)
    )
    assert data_fingerprint({"s": np.float32(1.0)}) != data_fingerprint({"s": 1.0})
    assert data_fingerprint({"g": [a, 1]}) == data_fingerprint({"g": [a.clone(), 1]})


@pytest.mark.parametrize("lazy", ["memmap", "row_array"])
def test_memory_mapped_data_is_keyed_by_its_content_in_chunks(tmp_path, monkeypatch, lazy):
    """RowArray's repr is its key, shape and dtype: the key missed new values in the file."""
    monkeypatch.setattr(fingerprint_module, "_CHUNK_BYTES", 64)  # 64 bytes: many chunks
    values = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    keys = []
    for shift in (0.0, 0.0, 50.0):
        path = tmp_path / f"y{shift}.npy"
        np.save(path, values + shift)
        y = np.load(path, mmap_mode="r")
        keys.append(data_fingerprint({"y": y if lazy == "memmap" else RowArray("y", y)}))
    assert keys[0] == keys[1] != keys[2]
    # the chunked digest is the digest of the whole array's bytes
    assert keys[0] == data_fingerprint({"y": values})


def test_data_that_cannot_be_hashed_by_content_is_not_cached(tmp_path):
    class Opaque:
        pass

    with pytest.warns(NotCachedWarning, match="not cached: .*Opaque"):
        assert data_id({"y": DATA["y"], "extra": Opaque()}) is None

    def model(y, extra):
        mu = pyro.sample("mu", dist.Normal(0.0, 0.1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 10.0), obs=y)

    with pytest.warns(NotCachedWarning):
        ref = run_nuts(
            model, {"y": DATA["y"], "extra": Opaque()}, settings=TINY, cache_dir=tmp_path
        )
    assert ref.settings["cache"].startswith("not cached") and not list(tmp_path.rglob("*.npz"))
