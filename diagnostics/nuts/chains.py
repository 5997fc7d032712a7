"""NUTS chains, run in this process or in a spawned worker: one by one, or in lockstep.

Kept apart from :mod:`diagnostics.nuts.reference` so that a worker process imports
only torch, Pyro and the catalog, not ArviZ, POT or matplotlib.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.poutine.messenger import Messenger

from diagnostics.nuts.kernel import sample_chain, sample_chains
from diagnostics.nuts.nutpie_engine import run_chains_nutpie
from diagnostics.nuts.progress import LiveProgress, statuses_for
from vimodels.catalog.base import NutsSettings
from vimodels.catalog.registry import get_model


class _DepthCounter(Messenger):
    """Counts NUTS tree doublings (its ``direction_t=..`` sample sites) in one transition."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _pyro_sample(self, msg: dict) -> None:
        if str(msg["name"]).startswith("direction_t="):
            self.count += 1


class _RecordingNUTS(NUTS):
    """NUTS that records per-transition statistics after warm-up."""

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:  # noqa: D102
        self.stats: dict[str, list] = {
            "diverging": [],
            "step_size": [],
            "tree_depth": [],
            "lp": [],
            "acceptance_rate": [],
        }
        super().setup(warmup_steps, *args, **kwargs)

    def sample(self, params: dict) -> dict:  # noqa: D102
        divergences = len(self._divergences)
        mean_before = self._mean_accept_prob
        with _DepthCounter() as depth:
            out = super().sample(params)
        if self._t > self._warmup_steps:
            n = self._t - self._warmup_steps
            accept = mean_before + n * (self._mean_accept_prob - mean_before)
            s = self.stats
            s["diverging"].append(len(self._divergences) > divergences)
            s["step_size"].append(float(self.step_size))
            s["tree_depth"].append(depth.count)
            s["lp"].append(-float(self._potential_energy_last))
            s["acceptance_rate"].append(min(max(float(accept), 0.0), 1.0))  # round-off
        return out


def _resolve_worker_model(model: str | Callable) -> Callable:
    return get_model(model).model if isinstance(model, str) else model


def run_chain(spec: dict, monitor: LiveProgress | None = None) -> dict:
    """Run one NUTS chain (in this process or a worker); arrays come back as numpy.

    ``monitor`` (in this process only) shows the project's sampler's progress.
    The Pyro sampler's metric is diagonal, or dense (``full_mass``) where the
    settings say ``metric="dense"``.
    """
    torch.set_num_threads(1)
    model = _resolve_worker_model(spec["model"])
    data = {
        k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in spec["data"].items()
    }
    s: NutsSettings = spec["settings"]
    if s.sampler == "vimodels":
        return _run_lean_chain(spec, model, data, s, monitor)
    jit = bool(s.jit_compile)
    note = None
    t0 = time.perf_counter()
    while True:
        pyro.set_rng_seed(spec["seed"])
        kernel = _RecordingNUTS(
            model,
            jit_compile=jit,
            ignore_jit_warnings=True,
            target_accept_prob=s.target_accept_prob,
            max_tree_depth=s.max_tree_depth,
            max_plate_nesting=spec["max_plate_nesting"],
            full_mass=s.metric == "dense",
        )
        mcmc = MCMC(
            kernel,
            num_samples=s.num_samples,
            warmup_steps=s.num_warmup,
            num_chains=1,
            disable_progbar=True,
        )
        try:
            mcmc.run(**data)
            break
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # JIT tracing failures vary widely
            if not jit:
                raise
            jit = False
            note = f"JIT unavailable ({type(exc).__name__}); ran the Python potential"
    samples = {
        k: v.detach().double().numpy() if v.is_floating_point() else v.numpy()
        for k, v in mcmc.get_samples().items()
    }
    stats = {k: np.asarray(v) for k, v in kernel.stats.items()}
    return {
        "chain": spec["chain"],
        "samples": samples,
        "stats": stats,
        "jit": jit,
        "note": note,
        "wall_time": time.perf_counter() - t0,
        "leapfrog_steps": None,
        "metric": "dense" if s.metric == "dense" else "diag",
    }


def _run_lean_chain(
    spec: dict, model: Callable, data: dict, s: NutsSettings, monitor: LiveProgress | None
) -> dict:
    t0 = time.perf_counter()
    statuses = statuses_for(monitor, [spec["chain"]], s.num_warmup, s.num_samples)
    out = sample_chain(
        model,
        data,
        seed=spec["seed"],
        status=statuses[0] if statuses else None,
        **_sampler_options(spec, s),
    )
    return _lean_result(spec, out, time.perf_counter() - t0)


def _sampler_options(spec: dict, s: NutsSettings) -> dict:
    """Keyword arguments of the project's sampler that every chain of ``spec`` shares."""
    return {
        "num_warmup": s.num_warmup,
        "num_samples": s.num_samples,
        "target_accept_prob": s.target_accept_prob,
        "max_tree_depth": s.max_tree_depth,
        "max_plate_nesting": spec["max_plate_nesting"],
        "jit": bool(s.jit_compile),
        "metric": s.metric,
    }


def _lean_result(spec: dict, out: dict, wall: float) -> dict:
    stats = dict(out["stats"])
    steps = stats["n_steps"]
    return {
        "chain": spec["chain"],
        "samples": out["samples"],
        "stats": stats,
        "jit": out["jit"],
        "note": out["note"],
        "batch": out.get("batch"),
        "wall_time": wall,
        "leapfrog_steps": {"warmup": int(out["warmup_steps"]), "sampling": int(steps.sum())},
        "metric": out["metric"],
    }


def run_chains_lockstep(specs: list[dict], monitor: LiveProgress | None = None) -> list[dict]:
    """Run the project's NUTS chains of ``specs`` together, in this thread, in lockstep.

    The specs differ only in their ``seed`` and ``chain``; one batched
    gradient serves a leapfrog step of every chain
    (:func:`diagnostics.nuts.kernel.sample_chains`). Each result is as
    :func:`run_chain` returns it, plus ``batch``; ``wall_time`` is the
    group's. ``monitor`` (in this process only) shows their progress.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = specs[0]
        s: NutsSettings = spec["settings"]
        model = _resolve_worker_model(spec["model"])
        data = {
            k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
            for k, v in spec["data"].items()
        }
        t0 = time.perf_counter()
        seeds = [x["seed"] for x in specs]
        statuses = statuses_for(monitor, [x["chain"] for x in specs], s.num_warmup, s.num_samples)
        outs = sample_chains(
            model, data, seeds=seeds, statuses=statuses, **_sampler_options(spec, s)
        )
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return [_lean_result(x, out, wall) for x, out in zip(specs, outs)]


def run_group(specs: list[dict], monitor: LiveProgress | None = None) -> list[dict]:
    """Run a group of chains in this process: in lockstep where the settings ask for it.

    Lockstep applies to the project's sampler (``sampler="vimodels"``) with
    ``chain_method="lockstep"``; nutpie (``sampler="nutpie"``) traces the
    potential once for the group and runs its chains one after another
    (:mod:`diagnostics.nuts.nutpie_engine`); otherwise the chains run one
    after another.
    ``monitor`` (in this process only) shows their progress.
    """
    s: NutsSettings = specs[0]["settings"]
    if s.sampler == "nutpie":
        # nutpie's own progress bar on a terminal (``monitor`` exists only there)
        return run_chains_nutpie(specs, progress_bar=monitor is not None)
    if is_lockstep(s):
        return run_chains_lockstep(specs, monitor)
    return [run_chain(spec, monitor) for spec in specs]


def is_lockstep(settings: NutsSettings) -> bool:
    """Whether chains under ``settings`` run in lockstep."""
    return settings.sampler == "vimodels" and settings.chain_method == "lockstep"


def runs_grouped(settings: NutsSettings) -> bool:
    """Whether the chains of a process run as one group (in lockstep, or nutpie's).

    ``settings.sampler`` is the resolved engine (not ``"auto"``).
    """
    return is_lockstep(settings) or settings.sampler == "nutpie"
