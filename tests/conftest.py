"""Shared fixtures: every test starts seeded, with an empty param store and validation on."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from vimodels.arviz_import import import_arviz
from vimodels.compile.units import private_units

# before any test module imports ArviZ: its first import of the day races between workers
import_arviz()

# tests/ holds helpers shared by the test packages (fit_models, sweep_helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Small models run many times slower with 2 intra-op threads on a loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    np.random.seed(0)
    threads = torch.get_num_threads()
    # what a test traces with TorchScript is freed with it, not kept for the worker's life
    with pyro.validation_enabled(True), private_units():
        yield
    torch.set_num_threads(threads)
    pyro.clear_param_store()


def _run_folder(tmp_path_factory) -> Path:
    """The base temporary folder of this run; under pytest-xdist, the one all workers share.

    Fresh each run (pytest keeps the last few and deletes older ones).
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point the reference cache at a fresh folder: CI starts cold, so must the tests.

    One folder for the run, shared by the xdist workers: each reference (NUTS of
    a catalog entry, the tiny eight-schools run) is computed once per run, not
    once per worker; the cache's file lock makes a worker that needs an entry
    another one is computing wait for it and load it.
    """
    path = _run_folder(tmp_path_factory) / "vimodels-cache"
    path.mkdir(exist_ok=True)
    old = os.environ.get("VIMODELS_CACHE")
    os.environ["VIMODELS_CACHE"] = str(path)
    yield os.environ["VIMODELS_CACHE"]
    if old is None:
        os.environ.pop("VIMODELS_CACHE", None)
    else:
        os.environ["VIMODELS_CACHE"] = old


@pytest.fixture(scope="session")
def reference_cache(_isolated_cache) -> Path:
    """The run's reference cache folder (see ``_isolated_cache``), for an explicit ``cache_dir``."""
    return Path(_isolated_cache)


@pytest.fixture(scope="session")
def tiny_nuts_eight_schools(_isolated_cache):
    """A deliberately short NUTS run (2 chains x 60 draws): real sample stats, fails its checks."""
    from diagnostics.nuts.reference import run_nuts

    return run_nuts(
        "eight_schools_noncentered",
        settings={"num_chains": 2, "num_warmup": 60, "num_samples": 60},
        seed=3,
        num_workers=1,
    )


def pytest_configure(config):
    # A shell that starts a job in the background without job control (`cmd &` in a
    # script) leaves SIGINT ignored, and an ignored signal stays ignored across exec:
    # the Ctrl-C tests' subprocesses would never see their SIGINT. Restore the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    # Slow tests (NUTS references, training, interrupts) first: pytest-xdist hands out
    # tests in collection order, so long ones left to the end would run alone on one
    # worker while the other core idles. The order is otherwise kept.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    out: set[int] = set()
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return out
    for task in tasks.iterdir():
        try:
            children = {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            continue
        for child in children:
            out |= {child} | _descendants(child)
    return out


@pytest.fixture
def no_leftover_processes():
    """Kill whatever processes a test started and left running (a timed-out subprocess).

    Not autouse: session fixtures (dask clusters, pools) keep workers across tests.
    """
    before = _descendants(os.getpid())
    yield
    for pid in _descendants(os.getpid()) - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
