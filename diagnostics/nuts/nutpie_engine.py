"""nutpie (a Rust NUTS) as an engine of the NUTS reference, on the project's potential.

nutpie samples the same flat unconstrained potential as the project's sampler
(:class:`diagnostics.nuts.kernel.FlatPotential`: Pyro's potential, enumerated
discrete sites summed out, traced into one graph), with its mass matrix
adapted continuously over the whole warm-up from the draws' and gradients'
variances plus a low-rank correction for correlations
(``low_rank_modified_mass_matrix=True``). Each chain is one ``nutpie.sample``
call of one chain on one core, seeded with the chain's seed and started at
the chain's initial point (Pyro's ``init_to_uniform`` of that seed, as the
project's chains start), so a chain's draws depend on its seed alone:
deterministic, and the same whichever process or group runs it.

``NutsSettings(sampler="auto")`` takes nutpie up to :data:`NUTPIE_MAX_DIM`
dimensions of the flat vector and the project's sampler above
(:func:`resolve_sampler`; benchmarks/README.md, 3c: nutpie low-rank gave
1.3x-12.5x the ESS per second of the project's ``metric="auto"`` on 10 of
11 models up to 64 dimensions, GARCH 0.94x; the project's diagonal metric
with its chains in lockstep won on the radon entries of 89-175 dimensions;
measured before the project's sampler adapted its dense and low-rank metrics on
nutpie's schedule, after which nutpie lost on every model re-run, 3d). It
needs the optional extra ``vimodels[nutpie]``.

nutpie is imported inside :func:`run_chains_nutpie` only: importing the
reference path does not load it (nor the ArviZ and pandas it imports).
"""

from __future__ import annotations

import importlib.metadata
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.distributions import biject_to

from diagnostics.nuts import kernel
from vimodels.catalog.base import NutsSettings
from vimodels.catalog.registry import get_model

NUTPIE_MAX_DIM = 64
# nutpie's sample statistics -> the reference's (ArviZ's) names
STAT_RENAMES = {
    "diverging": "diverging",
    "step_size": "step_size",
    "depth": "tree_depth",
    "n_steps": "n_steps",
    "logp": "lp",
    "mean_tree_accept": "acceptance_rate",
    "energy": "energy",
    "energy_error": "energy_error",
}
METRIC_USED = "low_rank (nutpie)"


def flat_dim(info: Any) -> int:
    """Length of the flat unconstrained vector NUTS samples (continuous latent sites).

    Parameters
    ----------
    info : vimodels.svi.draws.ModelInfo
        The model's sites; each continuous latent site's support gives its
        unconstraining transform, whose shape (a simplex of ``K`` has ``K - 1``
        free coordinates) is what counts.

    Returns
    -------
    int
    """
    total = 0
    for name in info.continuous:
        site = info.sites[name]
        shape = torch.Size(site.shape)
        if site.support is not None:
            shape = biject_to(site.support).inv.forward_shape(shape)
        total += math.prod(shape)
    return int(total)


def resolve_sampler(sampler: str, dim: int) -> str:
    """The engine that runs for ``sampler`` on a ``dim``-dimensional potential.

    ``"auto"`` is ``"nutpie"`` up to :data:`NUTPIE_MAX_DIM` dimensions, else
    ``"vimodels"``; any other name is itself.

    Parameters
    ----------
    sampler : str
        ``NutsSettings.sampler``.
    dim : int
        Length of the flat unconstrained vector (:func:`flat_dim`).
    """
    if sampler != "auto":
        return sampler
    return "nutpie" if dim <= NUTPIE_MAX_DIM else "vimodels"


def nutpie_version() -> str:
    """The installed version of nutpie (read from its metadata, without importing it)."""
    try:
        return importlib.metadata.version("nutpie")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def make_logp_fn(potential: kernel.FlatPotential) -> Callable[[], Callable]:
    """The ``make_logp_fn`` of nutpie: the log density and its gradient at a flat point.

    nutpie calls the function from its own sampler thread. Torch's thread
    count and inference mode are per thread, so both are set there: without
    one torch thread each small operation runs on every core (22 ms against
    0.9 ms a gradient on radon, 89 dimensions, under load; benchmarks/README.md,
    3c). A non-finite potential or gradient is ``-inf``: no mass there.
    """
    frozen = potential.mode == "fx"
    local = threading.local()
    dim = potential.dim

    def make() -> Callable:
        def logp(x: np.ndarray, **unused: Any) -> tuple[float, np.ndarray]:
            if not getattr(local, "one_thread", False):
                torch.set_num_threads(1)
                local.one_thread = True
            with kernel._inference(frozen):
                u, g = potential(np.asarray(x, dtype=np.float64))
            if not (math.isfinite(u) and np.all(np.isfinite(g))):
                return -math.inf, np.zeros(dim)
            return -u, -g

        return logp

    return make


def _make_expand_fn(seed1: int, seed2: int, chain: int) -> Callable:
    """The ``make_expand_fn`` of nutpie: the draw is the flat vector itself, ``z``."""

    def expand(x: np.ndarray, **unused: Any) -> dict[str, np.ndarray]:
        return {"z": np.array(x, dtype=np.float64)}

    return expand


def compiled_model(potential: kernel.FlatPotential, z0: np.ndarray) -> Any:
    """The nutpie model of ``potential``, every chain of it starting at ``z0`` (shape (D,))."""
    from nutpie.compiled_pyfunc import from_pyfunc

    dim = potential.dim
    start = np.asarray(z0, dtype=np.float64).copy()
    return from_pyfunc(
        dim,
        make_logp_fn(potential),
        _make_expand_fn,
        [np.dtype("float64")],  # dtype instances: nutpie reads str(dtype)
        [(dim,)],
        ["z"],
        make_initial_point_fn=lambda seed: start.copy(),
    )


def _column(batch: Any, name: str) -> np.ndarray:
    import pyarrow as pa

    return pa.record_batch(batch).column(name).to_numpy(zero_copy_only=False)


def split_trace(draws: Any, stats: Any, dim: int) -> dict[str, Any]:
    """One chain's raw nutpie trace as the project's sampler returns it.

    Parameters
    ----------
    draws, stats : arrow record batches
        ``nutpie.sample(..., return_raw_trace=True).get_arrow_trace()``'s
        entries of one chain: warm-up rows first (``tuning`` true).
    dim : int
        Length of the flat vector.

    Returns
    -------
    dict
        ``draws``: the kept draws, unconstrained, shape ``(S, D)``;
        ``stats``: per kept draw, the reference's names (:data:`STAT_RENAMES`);
        ``warmup_steps``: leapfrog steps in warm-up.
    """
    import pyarrow as pa

    tuning = _column(stats, "tuning").astype(bool)
    z = pa.record_batch(draws).column("z").flatten().to_numpy(zero_copy_only=False)
    z = np.asarray(z, dtype=np.float64).reshape(len(tuning), dim)
    steps = _column(stats, "n_steps").astype(np.int64)
    out = {}
    for theirs, ours in STAT_RENAMES.items():
        value = np.asarray(_column(stats, theirs))[~tuning]
        out[ours] = value.astype(bool) if ours == "diverging" else value.astype(np.float64)
    out["tree_depth"] = out["tree_depth"].astype(np.int64)
    out["n_steps"] = out["n_steps"].astype(np.int64)
    return {"draws": z[~tuning], "stats": out, "warmup_steps": int(steps[tuning].sum())}


def sample_one(
    potential: kernel.FlatPotential,
    z0: np.ndarray,
    seed: int,
    s: NutsSettings,
    progress_bar: bool,
) -> dict[str, Any]:
    """One nutpie chain (one core) from ``z0``, seeded with ``seed``; see :func:`split_trace`."""
    import nutpie

    trace = nutpie.sample(
        compiled_model(potential, z0),
        draws=s.num_samples,
        tune=s.num_warmup,
        chains=1,
        cores=1,
        seed=int(seed),
        save_warmup=True,
        progress_bar=progress_bar,
        return_raw_trace=True,
        low_rank_modified_mass_matrix=True,
        target_accept=float(s.target_accept_prob),
        maxdepth=int(s.max_tree_depth),
    )
    draws, stats = trace.get_arrow_trace()
    return split_trace(draws[0], stats[0], potential.dim)


def _worker_data(spec: Mapping[str, Any]) -> tuple[Callable, dict]:
    model = spec["model"]
    fn = get_model(model).model if isinstance(model, str) else model
    data = {
        k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in spec["data"].items()
    }
    return fn, data


def run_chains_nutpie(specs: list[dict], progress_bar: bool = False) -> list[dict]:
    """Run the chains of ``specs`` with nutpie, one after another, in this process.

    The potential is traced once for the group (:func:`kernel._setup` at the
    chains' seeds: their initial points); each chain then runs alone
    (:func:`sample_one`). Each result is as
    :func:`diagnostics.nuts.chains.run_chain` returns it: constrained
    ``samples``, ``stats`` under the reference's names, ``leapfrog_steps``,
    ``metric`` ... ; ``wall_time`` is the group's.

    Parameters
    ----------
    specs : list of dict
        The chains' specs (model, data, settings, seed, chain, max_plate_nesting),
        differing only in ``seed`` and ``chain``.
    progress_bar : bool
        nutpie's own progress bar (on stderr), one per chain.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = specs[0]
        s: NutsSettings = spec["settings"]
        fn, data = _worker_data(spec)
        t0 = time.perf_counter()
        seeds = [x["seed"] for x in specs]
        setup = kernel._setup(fn, data, seeds, spec["max_plate_nesting"], bool(s.jit_compile))
        runs = [
            sample_one(setup.potential, z0, seed, s, progress_bar and sys.stderr.isatty())
            for z0, seed in zip(setup.z0, seeds)
        ]
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    potential = setup.potential
    return [
        {
            "chain": x["chain"],
            "samples": kernel._constrain(run["draws"], potential, setup.transforms, setup.dtype),
            "stats": run["stats"],
            "jit": potential.jit,
            "note": potential.note,
            "wall_time": wall,
            "leapfrog_steps": {
                "warmup": run["warmup_steps"],
                "sampling": int(run["stats"]["n_steps"].sum()),
            },
            "metric": METRIC_USED,
        }
        for x, run in zip(specs, runs)
    ]
