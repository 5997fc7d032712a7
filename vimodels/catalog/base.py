"""The catalog entry contract.

A catalog *entry* binds a Pyro model function (a *family*) to one data set.
Entries are frozen dataclasses; building one never reads data: the loader
runs the first time :meth:`CatalogEntry.data` is called and is cached.

Model functions take their data as keyword arguments (``model(**data)``), with
observed values among them; passing ``None`` for an observed value turns the
model into its prior predictive. Tensor-valued data is passed positionally by
the fitting code so that models can be JIT-compiled.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DataDict = dict[str, Any]


@dataclass(frozen=True)
class NutsSettings:
    """Settings under which an entry's NUTS reference passes its checks.

    Attributes
    ----------
    num_warmup, num_samples : int
        Warm-up and kept draws per chain.
    num_chains : int
        Independently seeded chains (see ``chain_method`` for how they run).
    target_accept_prob : float
        Dual-averaging target acceptance.
    max_tree_depth : int
        NUTS maximum tree depth.
    jit_compile : bool
        Whether the model's potential may be JIT-compiled.
    sampler : str
        ``"vimodels"`` (default): the project's NUTS on the flat
        unconstrained vector (:mod:`diagnostics.nuts.kernel`; Pyro's potential,
        Stan's algorithm and warm-up, about 5x less Python per leapfrog step);
        ``"auto"``: ``"nutpie"`` where the flat unconstrained vector
        has at most 64 elements, else ``"vimodels"``
        (:func:`diagnostics.nuts.nutpie_engine.resolve_sampler`; benchmarks/README.md,
        3c: nutpie gave 1.3x-12.5x the ESS per second of the project's sampler on
        10 of 11 models up to 64 dimensions, the project's diagonal metric with
        chains in lockstep won on the radon entries of 89-175 dimensions; measured
        before the project's sampler adapted on nutpie's schedule, 3d);
        ``"nutpie"``: nutpie's NUTS (Rust; a diagonal plus low-rank mass matrix
        adapted over the whole warm-up) on the project's traced potential
        (:mod:`diagnostics.nuts.nutpie_engine`; ``metric`` and ``chain_method``
        do not apply; the optional extra ``vimodels[nutpie]``; not the default:
        it lost to the project's sampler on every model re-run and with it the
        slow reference tests failed on five entries, benchmarks/README.md, 3d);
        ``"pyro"``: :class:`pyro.infer.NUTS`. The engine that ran is the
        reference's ``settings["sampler_used"]`` and part of its cache key.
    chain_method : str
        How the project's sampler runs the chains: ``"lockstep"`` (default):
        all chains of a process together, one batched gradient per leapfrog
        step of all of them; ``"independent"``: each chain on its own (the
        Pyro sampler always runs them so). Part of the reference's cache key:
        the batched gradient rounds differently, so the draws differ.
    metric : str
        The project's sampler's adapted metric (inverse mass matrix):
        ``"diag"``: the posterior variances (Stan's ``diag_e``, in Stan's
        warm-up windows); ``"dense"``: the full covariance (Stan's
        ``dense_e``, regularized relative to the variances), for correlated
        posteriors; ``"low_rank"``: nutpie's diagonal plus low-rank metric,
        learnt from the draws and their gradients; ``"auto"``: dense up to 64
        dimensions where the warm-up's final window holds at least 5 draws per
        dimension, else low rank; diagonal above 64 dimensions
        (``diagnostics.nuts.kernel.resolve_metric``). The dense and low-rank
        metrics adapt in nutpie's schedule: estimated from the tenth warm-up
        draw on and every 10 draws after, from windows that switch every 10
        draws in the first 30 % of the warm-up, then after 80 draws and
        doubling; the last 15 % adapts the step size only; before 2 draws per
        dimension (and 20) the dense metric is the low-rank estimate
        (``diagnostics.nuts.kernel.SwitchingWindows``). The Pyro sampler
        takes ``"dense"`` as ``full_mass=True`` and the others as diagonal.
        The default, ``"auto"``, is what a model without its own settings
        (a user's model) gets: on benchmark 3d's battery it was at or above
        NumPyro's ESS per second on every model but the GP, where the
        diagonal metric was below on four, and 10x NumPyro's (not 0.17x) on
        a badly conditioned 26-parameter regression (benchmarks/README.md,
        3d). The catalog's and the validation suite's entries name their
        metric (``"diag"`` unless it says otherwise): their references were
        checked under it.
    """

    num_warmup: int = 500
    num_samples: int = 500
    num_chains: int = 4
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    jit_compile: bool = True
    sampler: str = "vimodels"
    chain_method: str = "lockstep"
    metric: str = "auto"


@dataclass(frozen=True)
class ExactPosterior:
    """Closed-form posterior of an entry, for validating everything else.

    Attributes
    ----------
    mean : dict of str to ndarray
        Posterior mean of each site of interest, in the site's shape.
    sd : dict of str to ndarray
        Posterior standard deviation of each site, in the site's shape.
    cov : ndarray or None
        Joint covariance of the flattened, concatenated sites of interest
        (order of ``sites``), shape ``(D, D)``, where Gaussian.
    log_evidence : float or None
        Exact ``log p(data)`` in nats.
    sampler : callable or None
        ``sampler(n, rng) -> dict[str, ndarray]`` exact draws with a leading axis ``n``.
    """

    mean: Mapping[str, np.ndarray]
    sd: Mapping[str, np.ndarray]
    cov: np.ndarray | None = None
    log_evidence: float | None = None
    sampler: Callable[[int, np.random.Generator], dict[str, np.ndarray]] | None = None


@dataclass(frozen=True, eq=False)
class CatalogEntry:
    """A model bound to its data, with what is worth checking.

    Attributes
    ----------
    name : str
        Unique snake_case name, ``<dataset>_<family>``.
    description : str
        One line: what the model is, the data's provenance and units.
    model : callable
        Pyro model, called as ``model(**data)``.
    loader : callable
        ``loader() -> dict`` returning the data (tensors and static options).
    sites : tuple of str
        Sites of interest (latent or deterministic) reported by metrics.
    family : str
        Key under which hand-written guides are registered.
    observed : tuple of str
        Names of data entries that are observed values (set to ``None`` for prediction).
    discrete : bool
        True if the model has discrete latent sites (only the ``enum`` ELBO applies).
    amortized : bool
        True if the default guide is an amortized encoder.
    nuts : NutsSettings
        Settings for the reference sampler.
    exact : callable or None
        ``exact(data) -> ExactPosterior`` where the posterior is known in closed form.
    default_guides : tuple of str
        Guides compared by default.
    max_plate_nesting : int or None
        Plate depth, when it cannot be guessed by a trace.
    options : dict
        Static keyword arguments for the model (e.g. number of components).
    reference_from : str or None
        Name of an entry with the same data and the same posterior over this
        entry's latent sites, in another parameterization (e.g. non-centered),
        whose NUTS draws serve as this entry's reference. Set it where NUTS on
        this form is unreliable (funnels); :func:`diagnostics.nuts.reference.run_nuts`
        on this entry still samples this form.
    """

    name: str
    description: str
    model: Callable[..., Any]
    loader: Callable[[], DataDict]
    sites: tuple[str, ...]
    family: str
    observed: tuple[str, ...] = ()
    discrete: bool = False
    amortized: bool = False
    nuts: NutsSettings = field(default_factory=NutsSettings)
    exact: Callable[[DataDict], ExactPosterior] | None = None
    default_guides: tuple[str, ...] = ("mean_field", "full_rank")
    max_plate_nesting: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    reference_from: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def data(self) -> DataDict:
        """Load (once) and return a copy of the data dict.

        Tensors, arrays and containers are copied, so a caller that edits what it
        got (``d["y"][0] = 0``) changes its copy only, not the entry's data for the
        rest of the process (fits, references, exact posteriors and stored tasks
        all read it). The copy is cheap: 9 us per call for the largest entry,
        ``digits_vae`` (370 kB; 0.5 us for the shared dict before).
        """
        with self._lock:
            if "data" not in self._cache:
                loaded = dict(self.loader())
                loaded.update(self.options)
                self._cache["data"] = {k: _copied(v) for k, v in loaded.items()}
            return {k: _copied(v) for k, v in self._cache["data"].items()}

    @property
    def data_loaded(self) -> bool:
        """Whether the loader has run."""
        return "data" in self._cache

    def exact_posterior(self) -> ExactPosterior | None:
        """Return the closed-form posterior, or None when not known."""
        if self.exact is None:
            return None
        if "exact" not in self._cache:
            self._cache["exact"] = self.exact(self.data())
        return self._cache["exact"]


def _copied(value: Any) -> Any:
    """An independent copy of a data value (tensors, arrays, lists, dicts); others as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray) and not isinstance(value, np.memmap):
        return value.copy()
    if isinstance(value, (list, dict, set)):
        return copy.deepcopy(value)
    return value


def as_tensor(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert array-like data to a tensor of ``dtype`` (default float32, Pyro's default)."""
    return torch.as_tensor(np.asarray(x), dtype=dtype)
