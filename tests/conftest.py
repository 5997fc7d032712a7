"""Shared test setup: seeds, a clean param store, and a temporary reference cache."""

from __future__ import annotations

import os

import pyro
import pytest


@pytest.fixture(scope="session", autouse=True)
def _temporary_cache(tmp_path_factory):
    """Point the reference cache at a session-scoped temporary folder, never the user's."""
    before = os.environ.get("VIMODELS_CACHE")
    os.environ["VIMODELS_CACHE"] = str(tmp_path_factory.mktemp("vimodels_cache"))
    yield os.environ["VIMODELS_CACHE"]
    if before is None:
        os.environ.pop("VIMODELS_CACHE", None)
    else:
        os.environ["VIMODELS_CACHE"] = before


@pytest.fixture(autouse=True)
def _reset_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


@pytest.fixture(scope="session")
def tiny_nuts_eight_schools(_temporary_cache):
    """A deliberately short NUTS run (2 chains x 60 draws): real sample stats, fails its checks."""
    from diagnostics.reference import run_nuts

    return run_nuts(
        "eight_schools_noncentered",
        settings={"num_chains": 2, "num_warmup": 60, "num_samples": 60},
        seed=3,
        num_workers=1,
    )
