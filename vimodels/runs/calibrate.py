"""Simulation-based calibration of VI methods, as resumable tasks on an executor.

For each simulation ``i`` (seeded by :func:`simulation_seed`):

1. draw ``theta`` from the prior and data ``y`` from the model, with the same
   shapes as the entry's (or the template's) data: the model is traced with
   its observed data entries set to ``None``, and the sampled values of the
   observed sites replace them (:func:`simulate`);
2. fit every method on ``y`` (:func:`vimodels.fit` with the simulated data;
   the method ``exact`` draws from the entry's closed-form posterior instead,
   which validates the statistics themselves);
3. record, for every scalar element of the sites of interest, the rank of
   the true value among ``L`` draws of the approximation
   (:func:`diagnostics.calibration.ranks`).

Each simulation is one :class:`SimulationTask`, run by any executor of
:mod:`vimodels.runs.executors` and written as one JSON file
``OUT/sims/sim<i>-<hash>.json`` (named by every input, written atomically),
so a rerun skips finished simulations and equal seeds give equal files on
every executor. A fit that raises, ends on a non-finite loss or diverges is recorded
as failed (with its seed and error) and left out of the ranks; a fit that
did not converge within its steps is kept and listed. :func:`calibrate`
then computes the statistics (:mod:`diagnostics.calibration`) and writes
the report (:mod:`diagnostics.calibration_report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from diagnostics import calibration as stats
from diagnostics.calibration import ranks as rank_of
from diagnostics.calibration_report import write_calibration_report
from diagnostics.metrics import element_labels
from diagnostics.nuts.fingerprint import Unfingerprintable, data_fingerprint, fingerprint
from diagnostics.nuts.reference import NotCachedWarning
from guides.registry import get_guide_spec
from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.registry import get_model
from vimodels.data import trace_check
from vimodels.errors import DataError, IncompatibleError, OptionError, check_option
from vimodels.io import atomic_write_json, ensure_dir, safe_name
from vimodels.resolve import resolve_model
from vimodels.runs.sweep import _executor
from vimodels.runs.tasks import code_fingerprint, fit_option_names
from vimodels.svi.convergence import ConvergenceRule
from vimodels.svi.elbos import get_elbo_spec
from vimodels.svi.fit import fit
from vimodels.svi.result import DIVERGED, INTERRUPTED, NONFINITE

CALIBRATION_FORMAT = 1
SIMS = "sims"
EXACT = "exact"
FAILED = "failed"
_FIXED = frozenset({"model", "data", "guide", "elbo", "num_steps", "seed", "progress", "sites"})


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _derive(*parts: Any) -> int:
    """A seed in ``[0, 2**31)`` derived from ``parts`` (stable across machines)."""
    digest = hashlib.sha256(_canonical([str(p) for p in parts]).encode()).hexdigest()
    return int(digest[:8], 16) % (2**31)


def simulation_seed(seed: int, index: int) -> int:
    """Seed of simulation ``index`` of a run with base ``seed`` (prior and data draws)."""
    return _derive("simulate", seed, index)


def fit_seed(seed: int, index: int, method: str) -> int:
    """Seed of ``method``'s fit (and of its draws: this + 1) in simulation ``index``."""
    return _derive("fit", seed, index, method)


@dataclass(frozen=True)
class Method:
    """One approximation to calibrate.

    Attributes
    ----------
    guide : str
        A registered guide, or ``"exact"``: draws from the entry's closed-form
        posterior (a check of the statistics: it must pass).
    elbo : str
        ELBO name (ignored by ``exact``).
    scale : float
        Draws are pulled towards (below 1) or pushed away from (above 1) their
        mean by this factor before ranking: a deliberately mis-scaled
        approximation, to see the check flag it. 1 leaves them as drawn.
    """

    guide: str
    elbo: str = "trace"
    scale: float = 1.0

    @property
    def name(self) -> str:
        """``guide/elbo``, ``exact``, with `` x<scale>`` when scaled."""
        base = EXACT if self.guide == EXACT else f"{self.guide}/{self.elbo}"
        return base if self.scale == 1.0 else f"{base} x{self.scale:g}"


def as_method(spec: Method | str) -> Method:
    """A :class:`Method` from itself or ``"guide/elbo"`` / ``"guide"`` / ``"exact"``."""
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str) or not spec:
        raise OptionError(f"a method is 'guide/elbo' or 'exact', got {spec!r}")
    guide, _, elbo = spec.partition("/")
    return Method(guide, elbo or "trace")


@dataclass(frozen=True, eq=False)
class Problem:
    """What is simulated and which sites are ranked.

    Build with :func:`make_problem`.

    Attributes
    ----------
    name : str
        Catalog name, or the user model's name.
    model : str or callable
        Catalog name (workers look it up) or the user's Pyro model as given
        (must be importable by name for the local process pool); every use
        resolves it with :func:`vimodels.resolve.resolve_model`, as a fit does.
    template : dict or None
        The user model's data (shapes and the unobserved inputs); ``None``
        for a catalog entry (its own data).
    observed : dict of str to str
        Data key -> observed sample site whose simulated value replaces it.
    sites : tuple of str
        Sites whose elements are ranked.
    fingerprint : str
        SHA-256 (16 hex digits) of the model, the data, ``observed`` and
        ``sites``: a catalog entry's source (its code is also in each task's
        ``code``), a user model's fingerprint (code, closure, defaults, the
        globals, helpers and decorators it uses; as the NUTS cache keys it).
    """

    name: str
    model: str | Callable
    template: dict | None
    observed: dict[str, str]
    sites: tuple[str, ...]
    fingerprint: str

    @property
    def entry(self) -> Any:
        """The catalog entry, or None for a user model."""
        return get_model(self.model) if isinstance(self.model, str) else None

    def _resolved(self) -> tuple[Callable, dict[str, Any]]:
        # resolved where it runs (a worker): the adapted function of a user's model is
        # a closure that does not pickle, the user's own function does
        _, fn, data, _ = resolve_model(self.model, self.template)
        return fn, data

    def model_fn(self) -> Callable:
        """The Pyro model function, called as ``model(**data)`` (:func:`resolve_model`)."""
        return self._resolved()[0]

    def data(self) -> dict[str, Any]:
        """The base data (tensors), as :func:`vimodels.fit` binds it."""
        return self._resolved()[1]


def _source(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def _user_problem_key(fn: Callable, data: Mapping[str, Any], name: str) -> str:
    """What keys a user model's problem: its fingerprint and its data's, as the NUTS cache's.

    The model's fingerprint (:func:`diagnostics.nuts.fingerprint.fingerprint`:
    code, closure, defaults, globals and helpers read, decorators) and the
    data by content. When either cannot be had, a fresh random key: saved
    simulations are then never reused (:class:`NotCachedWarning`).
    """
    try:
        return f"user-model|{fingerprint(fn)}|{data_fingerprint(dict(data))}"
    except Unfingerprintable as exc:
        warnings.warn(
            f"saved simulations of {name!r} are not reused: {exc}; every run simulates anew",
            NotCachedWarning,
            stacklevel=3,
        )
        return f"not-reused|{uuid.uuid4().hex}"


def _observed_values(tr: poutine.Trace) -> dict[str, torch.Tensor]:
    """Observed sample site -> its value (no deterministic, factor or subsample site)."""
    return {
        n: s["value"]
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and s["is_observed"]
        and not s["infer"].get("_deterministic")
        and not site_is_subsample(s)
        and type(s["fn"]).__name__ != "Unit"
        and isinstance(s["value"], torch.Tensor)
    }


def _equal(observed: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``value`` (a data entry) equals an observed value (its shape and values)."""
    return observed.shape == value.shape and bool(torch.equal(observed, value.to(observed.dtype)))


def _ambiguous(what: str, keys: Sequence[str]) -> DataError:
    example = ", ".join(f"{k!r}: '<site>'" for k in keys)
    return DataError(
        f"{what}; give the observed entries distinct placeholder values, or map each "
        f"observed data entry to the site that observes it with observed={{{example}}}"
    )


def _detect_observed(tr: poutine.Trace, data: Mapping[str, Any]) -> tuple[str, ...]:
    """The data entries a user model observes as given, in data order.

    An observed site whose value *is* a data entry (the model passed it as
    ``obs=``) observes that entry, and no other entry that merely has equal
    values (an input that equals an observed array stays an input). A site
    observing no entry itself (``obs=y.double()``) observes the one entry
    equal to its value; several equal entries are ambiguous.
    """
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    found: set[str] = set()
    for site, value in _observed_values(tr).items():
        keys = [k for k, v in tensors.items() if v is value]
        how = "is given the one array passed as each of"
        if not keys:
            keys = [k for k, v in tensors.items() if _equal(value, v)]
            how = "observes a value equal to each of"
        if len(keys) > 1:
            raise _ambiguous(
                f"observed site {site!r} {how} the data entries "
                f"{', '.join(map(repr, keys))}, so which of them is observed is ambiguous",
                keys[:1],
            )
        found.update(keys)
    return tuple(k for k in data if k in found)


def _observed_sites(
    tr: poutine.Trace, data: Mapping[str, Any], observed: Sequence[str] | Mapping[str, str]
) -> dict[str, str]:
    """Map each observed data entry to the sample site that observes it.

    The site whose value is the entry itself (the array passed as ``obs=``)
    comes first; only when no site observes the entry itself does an equal
    value match (the model observes a copy: ``obs=y.double()``). Equal values
    alone never decide between several sites: placeholder observed entries
    are often all zeros. A mapping ``{entry: site}`` names the sites outright.

    Raises
    ------
    IncompatibleError
        An entry that no site observes unchanged.
    DataError
        An entry that several sites could observe, or two entries one site.
    """
    values = _observed_values(tr)
    keys = list(observed)
    for key in keys:
        if not isinstance(data.get(key), torch.Tensor):
            raise IncompatibleError(
                f"observed data entry {key!r} is not an array in the data; observed entries "
                "are the arrays the model observes (obs=...)"
            )
    out: dict[str, str] = {}
    if isinstance(observed, Mapping):
        for key, site in observed.items():
            if site not in values:
                raise OptionError(
                    f"observed={{{key!r}: {site!r}}}: {site!r} is not an observed sample site "
                    f"of the model; observed sites: {', '.join(values) or '(none)'}"
                )
            if not (values[site] is data[key] or _equal(values[site], data[key])):
                raise IncompatibleError(
                    f"observed site {site!r} does not take data entry {key!r} as it is (its "
                    "obs is a transform or a subsample of it); calibration replaces observed "
                    "entries by simulated values of the site, so the model must observe them "
                    "unchanged"
                )
            out[key] = site
    else:
        by_identity = {key: [n for n, v in values.items() if v is data[key]] for key in keys}
        claimed = {n for sites in by_identity.values() for n in sites}
        for key in keys:
            match = by_identity[key] or [
                n for n, v in values.items() if n not in claimed and _equal(v, data[key])
            ]
            if not match:
                raise IncompatibleError(
                    f"no observed site of the model takes data entry {key!r} as it is (its "
                    "obs is a transform or a subsample of it); calibration replaces observed "
                    "entries by simulated values of the site, so the model must observe them "
                    "unchanged"
                )
            if len(match) > 1:
                how = "are given" if by_identity[key] else "take values equal to"
                raise _ambiguous(
                    f"observed sites {', '.join(map(repr, match))} {how} data entry {key!r}, "
                    "so which one's simulated values replace it is ambiguous",
                    keys,
                )
            out[key] = match[0]
    sites = list(out.values())
    shared = sorted({n for n in sites if sites.count(n) > 1})
    if shared:
        keys = [k for k, n in out.items() if n in shared]
        raise _ambiguous(
            f"data entries {', '.join(map(repr, keys))} would all be replaced by the "
            f"simulated values of site(s) {', '.join(map(repr, shared))}",
            keys,
        )
    return out


def _check_generative(fn: Callable, name: str) -> None:
    """Refuse latent sites that cannot be drawn from their prior (the model adapted them)."""
    sites = getattr(fn, "unsampleable_sites", ())
    if sites:
        raise IncompatibleError(
            f"model {name!r} cannot be calibrated: calibration draws every latent site from "
            f"its prior by running the model, and site(s) {', '.join(sites)} have a "
            "distribution that cannot be sampled (such as ImproperUniform with the prior "
            "given by pyro.factor); write their prior as a distribution that can be sampled"
        )


def _check_no_factor(tr: poutine.Trace, name: str) -> None:
    """Refuse ``pyro.factor`` terms: simulating runs the model forward and would skip them."""
    factors = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and s["is_observed"] and type(s["fn"]).__name__ == "Unit"
    ]
    if factors:
        raise IncompatibleError(
            f"model {name!r} cannot be calibrated: it adds log-density terms with "
            f"pyro.factor ({', '.join(factors)}), which running the model forward (how "
            "calibration draws theta and the data) does not sample from, so the simulated "
            "data would not follow the model; write those terms as pyro.sample sites"
        )


def make_problem(
    model: str | Callable,
    data: Mapping[str, Any] | None = None,
    *,
    observed: Sequence[str] | Mapping[str, str] | None = None,
    sites: Sequence[str] | None = None,
) -> Problem:
    """A checked :class:`Problem` for a catalog name or a user model.

    Parameters
    ----------
    model : str or callable
        Catalog name, or a Pyro model called as ``model(**data)``.
    data : dict, optional
        A user model's template data set (its shapes are simulated; its observed
        entries' values are not used). Not accepted for a catalog entry.
    observed : sequence of str, or dict of str to str, optional
        Data entries that are observed values; default the entry's
        ``observed``, or for a user model every array the model observes as is
        (passes as ``obs=``). Each is matched to the site that observes it: the
        site given the entry itself, else the one site whose observed value
        equals it (an error when several do: placeholder entries with equal
        values, say all zeros, observed through a copy). A dict
        ``{entry: site}`` names each entry's site outright. An entry without
        observed data (``neals_funnel``: its target is its prior) is
        calibrated as is: every simulation fits the same target.
    sites : sequence of str, optional
        Sites to rank; default the entry's sites of interest, or every latent
        (and deterministic) continuous site of a user model.
    """
    if isinstance(observed, str) or (
        isinstance(observed, Mapping)
        and not all(isinstance(k, str) and isinstance(v, str) for k, v in observed.items())
    ):
        raise OptionError(
            "observed is a list of data entries or a dict of data entry -> observed site "
            f"(names), got {observed!r}"
        )
    if isinstance(model, CatalogEntry):
        model = model.name
    if isinstance(model, str):
        entry = get_model(model)
        if data is not None:
            raise OptionError(
                f"{model!r} is a catalog entry with its own data; data= is for a user model"
            )
        if entry.discrete or entry.amortized:
            raise IncompatibleError(
                f"calibration of {model!r} is not supported: it needs continuous latent sites "
                "fitted per data set (no enumerated or amortized model)"
            )
        _, fn, base, name = resolve_model(entry)
        template = None
        keys = tuple(observed or entry.observed)
        default_sites = entry.sites
    elif callable(model):
        if data is None:
            raise OptionError(
                "a user model needs data=: a template data set whose shapes are simulated"
            )
        _, fn, base, name = resolve_model(model, data)
        template = {
            k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in base.items()
        }
        keys = tuple(observed) if observed is not None else ()
        default_sites = None
    else:
        raise OptionError(
            f"model must be a catalog name or a Pyro model function, got {type(model).__name__}"
        )
    _check_generative(fn, name)
    tr = trace_check(fn, base, name)
    _check_no_factor(tr, name)
    if not keys and template is not None:  # a user model: every array it observes as is
        keys = _detect_observed(tr, base)
        if not keys:
            raise IncompatibleError(
                f"model {name!r} observes none of its data entries as given; name them with "
                "observed=[...]"
            )
    unknown = [k for k in keys if k not in base]
    if unknown:
        raise OptionError(
            f"observed entr(ies) {', '.join(unknown)} are not in the data; data keys: "
            f"{', '.join(base)}"
        )
    obs_map = _observed_sites(tr, base, observed if isinstance(observed, Mapping) else keys)
    latent = {
        n: s
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and not site_is_subsample(s)
        and (not s["is_observed"] or s["infer"].get("_deterministic"))
    }
    if sites is None:
        sites = default_sites or tuple(
            n
            for n, s in latent.items()
            if s["infer"].get("_deterministic") or not s["fn"].has_enumerate_support
        )
    sites = tuple(sites)
    missing = [s for s in sites if s not in latent]
    if missing or not sites:
        raise OptionError(
            f"site(s) {', '.join(missing) or '(none)'} are not latent sites of {name!r}; "
            f"latent sites: {', '.join(latent)}"
        )
    if template is None:  # a catalog entry: its source (its code is in the tasks' code hash)
        h = hashlib.sha256(_source(fn).encode())
        for k in sorted(base):
            v = base[k]
            h.update(k.encode())
            h.update(
                v.detach().cpu().numpy().tobytes() + str(tuple(v.shape)).encode()
                if isinstance(v, torch.Tensor)
                else repr(v).encode()
            )
    else:
        h = hashlib.sha256(_user_problem_key(fn, base, name).encode())
    h.update(_canonical({"observed": obs_map, "sites": list(sites)}).encode())
    return Problem(
        name=name,
        model=model,
        template=template,
        observed=obs_map,
        sites=sites,
        fingerprint=h.hexdigest()[:16],
    )


def simulate(problem: Problem, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Draw ``theta`` from the prior and data from the model, seeded.

    Returns
    -------
    theta : dict of str to ndarray
        True values of the problem's sites.
    data : dict
        The base data with each observed entry replaced by its simulated value
        (same shape and dtype).
    """
    base = problem.data()
    kwargs = dict(base)
    for key in problem.observed:
        kwargs[key] = None
    pyro.set_rng_seed(seed)
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        tr = poutine.trace(problem.model_fn()).get_trace(**kwargs)
    data = dict(base)
    for key, site in problem.observed.items():
        value = tr.nodes[site]["value"].detach()
        if value.shape != base[key].shape:
            raise IncompatibleError(
                f"simulated {site!r} has shape {tuple(value.shape)}, the data entry {key!r} "
                f"{tuple(base[key].shape)}: the model's observed site must have the data's shape"
            )
        data[key] = value.to(base[key].dtype)
    theta = {s: tr.nodes[s]["value"].detach().double().numpy() for s in problem.sites}
    return theta, data


@dataclass(frozen=True)
class SimulationTask:
    """One simulation and every method's fit on it; a pure task.

    Attributes
    ----------
    problem : Problem
        Travels with the task; only its fingerprint enters the digest.
    index : int
        Simulation number.
    seed : int
        Base seed of the run (the simulation's seeds derive from it and ``index``).
    methods : str
        Canonical JSON list of ``[guide, elbo, scale]``.
    steps : int
    options : str
        Other :func:`vimodels.fit` options as canonical JSON.
    num_draws : int
        ``L``: draws of each approximation per simulation (ranks in ``0..L``).
    code : str
        :func:`vimodels.runs.tasks.code_fingerprint`.
    """

    problem: Problem = field(compare=False, repr=False)
    problem_key: str
    index: int
    seed: int
    methods: str
    steps: int
    options: str
    num_draws: int
    code: str

    def method_list(self) -> list[Method]:
        """The methods, in order."""
        return [Method(g, e, float(s)) for g, e, s in json.loads(self.methods)]

    @property
    def sim_seed(self) -> int:
        """Seed of the prior and data draws."""
        return simulation_seed(self.seed, self.index)

    @property
    def digest(self) -> str:
        """SHA-256 of every input."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("problem")
        return hashlib.sha256(_canonical({"format": CALIBRATION_FORMAT, **d}).encode()).hexdigest()

    @property
    def file_name(self) -> str:
        """``sim<index>-<hash>.json``."""
        return f"sim{self.index:05d}-{self.digest[:10]}.json"

    @property
    def label(self) -> str:
        """``<model> sim <i> (seed <s>)``."""
        return f"{self.problem.name} sim {self.index} (seed {self.sim_seed})"


def read_record(task: SimulationTask, out_dir: str | Path) -> dict | None:
    """The finished record of ``task``, or None when absent, unreadable or another task's."""
    try:
        record = json.loads((Path(out_dir) / task.file_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("digest") != task.digest:
        return None
    return record


def run_simulation(task: SimulationTask, out_dir: str) -> dict:
    """Simulate, fit every method, rank the truth; write and return the record.

    The record (JSON): ``digest index sim_seed theta`` (site -> nested
    lists), ``methods`` (name -> ``status converged num_steps fit_seed
    wall_time_s message error ranks``; ``ranks``: site -> flat list, absent
    for a failed fit), ``data`` (the simulated observed entries, kept only when
    a fit failed or did not converge, to reproduce it) and ``wall_time_s``.

    Raises
    ------
    KeyboardInterrupt
        Ctrl-C stopped a fit; nothing is written.
    """
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        theta, data = simulate(task.problem, task.sim_seed)
        methods = {}
        for method in task.method_list():
            methods[method.name] = _fit_and_rank(task, method, data, theta, rank_of)
    finally:
        torch.set_num_threads(threads)
    record: dict[str, Any] = {
        "format": CALIBRATION_FORMAT,
        "digest": task.digest,
        "index": task.index,
        "sim_seed": task.sim_seed,
        "theta": {k: v.tolist() for k, v in theta.items()},
        "methods": methods,
        "wall_time_s": time.perf_counter() - t0,
    }
    if any(m["status"] == FAILED or not m["converged"] for m in methods.values()):
        record["data"] = {k: data[k].detach().cpu().numpy().tolist() for k in task.problem.observed}
    atomic_write_json(ensure_dir(out_dir) / task.file_name, record)
    return record


def _fit_and_rank(
    task: SimulationTask,
    method: Method,
    data: dict[str, Any],
    theta: dict[str, np.ndarray],
    rank_of: Callable,
) -> dict[str, Any]:

    problem = task.problem
    seed = fit_seed(task.seed, task.index, method.name)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"fit_seed": seed, "error": None}
    try:
        if method.guide == EXACT:
            exact = problem.entry.exact(data)
            draws = exact.sampler(task.num_draws, np.random.default_rng(seed + 1))
            info.update(status="exact", converged=True, num_steps=0, message="exact draws")
        else:
            options = json.loads(task.options)
            if "convergence" in options:
                options["convergence"] = ConvergenceRule(**options["convergence"])
            options.setdefault("num_threads", 1)
            fit_data = {k: data[k] for k in problem.observed} if problem.entry else data
            result = fit(
                problem.model,
                data=fit_data,
                guide=method.guide,
                elbo=method.elbo,
                num_steps=task.steps,
                seed=seed,
                progress=False,
                sites=problem.sites,
                **options,
            )
            if result.status == INTERRUPTED:
                raise KeyboardInterrupt(f"{task.label} {method.name} interrupted")
            info.update(
                status=result.status,
                converged=bool(result.converged),
                num_steps=int(result.num_steps),
                message=result.message,
            )
            if result.status in (NONFINITE, DIVERGED):
                raise FloatingPointError(result.message)
            draws = result.sample(task.num_draws, seed=seed + 1, sites=problem.sites)
        rng = np.random.default_rng(seed + 2)
        ranked = {}
        for site in problem.sites:
            d = np.asarray(draws[site], dtype=float).reshape((task.num_draws,) + theta[site].shape)
            if not np.all(np.isfinite(d)):
                raise FloatingPointError(f"non-finite draws of {site!r}")
            if method.scale != 1.0:
                center = d.mean(axis=0)
                d = center + method.scale * (d - center)
            ranked[site] = rank_of(d, theta[site], rng).reshape(-1).tolist()
        info["ranks"] = ranked
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # counted and listed, never dropped
        text = str(exc).strip().splitlines()
        info.update(
            status=FAILED,
            converged=False,
            error=f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "),
        )
        info.setdefault("num_steps", 0)
        info.setdefault("message", "")
    info["wall_time_s"] = time.perf_counter() - t0
    return info


@dataclass(frozen=True, eq=False)
class Calibration:
    """What :func:`calibrate` found.

    Attributes
    ----------
    model : str
    methods : tuple of str
        Method names, in order.
    sims : int
        Simulations asked for.
    num_draws : int
        ``L`` draws per simulation; ranks lie in ``0..L``.
    alpha : float
        Family-wise level of the tests (Holm over each method's elements).
    ranks : dict of str to dict of str to ndarray
        Method -> element label -> ranks over the simulations where it fitted.
    elements : DataFrame
        ``method`` + :func:`diagnostics.calibration.calibration_table` columns.
    sites : DataFrame
        ``method`` + :func:`diagnostics.calibration.site_table` columns.
    summary : DataFrame
        One row per method: ``method sims ranked failed not_converged
        sites_calibrated sites verdict median_fit_s``.
    failures : DataFrame
        One row per failed or non-converged fit: ``sim sim_seed method
        fit_seed status error`` (and the simulations that failed as a whole,
        method ``(simulation)``).
    settings : dict
        Steps, fit options, seed, executor, problem fingerprint.
    wall_time : float
    executed, reused : int
        Simulations run by this call and found finished.
    partial : bool
        Ctrl-C stopped the run: the tables cover the finished simulations.
    files : dict of str to Path
    """

    model: str
    methods: tuple[str, ...]
    sims: int
    num_draws: int
    alpha: float
    ranks: dict[str, dict[str, np.ndarray]]
    elements: pd.DataFrame
    sites: pd.DataFrame
    summary: pd.DataFrame
    failures: pd.DataFrame
    settings: dict[str, Any]
    wall_time: float
    executed: int = 0
    reused: int = 0
    partial: bool = False
    files: dict[str, Path] = field(default_factory=dict)

    def verdicts(self) -> dict[str, dict[str, str]]:
        """Method -> site -> verdict."""
        out: dict[str, dict[str, str]] = {}
        for row in self.sites.itertuples(index=False):
            out.setdefault(row.method, {})[row.site] = row.verdict
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly form (tables as records, ranks as lists)."""
        return {
            "model": self.model,
            "methods": list(self.methods),
            "sims": self.sims,
            "num_draws": self.num_draws,
            "alpha": self.alpha,
            "partial": self.partial,
            "executed": self.executed,
            "reused": self.reused,
            "wall_time_s": self.wall_time,
            "settings": self.settings,
            "summary": self.summary.to_dict("records"),
            "sites": self.sites.to_dict("records"),
            "elements": self.elements.to_dict("records"),
            "failures": self.failures.to_dict("records"),
            "ranks": {m: {k: v.tolist() for k, v in r.items()} for m, r in self.ranks.items()},
        }


def make_tasks(
    problem: Problem,
    methods: Sequence[Method],
    *,
    sims: int,
    steps: int,
    seed: int,
    num_draws: int,
    fit_options: Mapping[str, Any] | None = None,
) -> list[SimulationTask]:
    """The simulation tasks of a run (options checked)."""
    check_option("sims", sims, kind=int, low=1)
    check_option("steps", steps, kind=int, low=1)
    check_option("seed", seed, kind=int, low=0)
    check_option("num_draws", num_draws, kind=int, low=1)
    opts = dict(fit_options or {})
    unknown = sorted(set(opts) - set(fit_option_names()) | (set(opts) & _FIXED))
    if unknown:
        raise OptionError(
            f"unknown or fixed fit option(s) {', '.join(unknown)}; valid: "
            f"{', '.join(sorted(set(fit_option_names()) - _FIXED))}"
        )
    if "convergence" in opts and not isinstance(opts["convergence"], Mapping):
        opts["convergence"] = dataclasses.asdict(opts["convergence"])
    try:
        text = _canonical(opts)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"fit options must be plain values: {exc}") from exc
    spec = _canonical([[m.guide, m.elbo, m.scale] for m in methods])
    code = code_fingerprint()
    return [
        SimulationTask(problem, problem.fingerprint, i, seed, spec, steps, text, num_draws, code)
        for i in range(sims)
    ]


def _check_methods(problem: Problem, methods: Sequence[Method]) -> None:

    entry = problem.entry
    names = [m.name for m in methods]
    if not methods:
        raise OptionError("no method to calibrate: give guides (and ELBOs) or methods")
    if len(set(names)) != len(names):
        raise OptionError(f"methods repeat: {', '.join(names)}")
    for m in methods:
        check_option("scale", float(m.scale), kind=float, low=0.0, low_inclusive=False)
        if m.guide == EXACT:
            if entry is None or entry.exact is None or entry.exact_posterior().sampler is None:
                raise IncompatibleError(
                    f"method 'exact' needs a closed-form posterior sampler; {problem.name!r} "
                    "has none (catalog entries with one: conjugate_linear_regression, "
                    "neals_funnel)"
                )
            continue
        get_guide_spec(m.guide, entry.family if entry is not None else None)
        get_elbo_spec(m.elbo)


def calibrate(
    model: str | Callable,
    *,
    guides: Sequence[str] | None = None,
    elbos: Sequence[str] = ("trace",),
    methods: Sequence[Method | str] | None = None,
    sims: int = 200,
    steps: int = 2000,
    num_draws: int = 100,
    seed: int = 0,
    data: Mapping[str, Any] | None = None,
    observed: Sequence[str] | Mapping[str, str] | None = None,
    sites: Sequence[str] | None = None,
    fit_options: Mapping[str, Any] | None = None,
    alpha: float = 0.05,
    executor: Any = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    report: bool = True,
) -> Calibration:
    """Simulation-based calibration of VI methods on a model.

    Parameters
    ----------
    model : str or callable
        Catalog name, or a Pyro model called as ``model(**data)``.
    guides, elbos : sequence of str
        The methods are guides x ELBOs (default guides: the entry's defaults,
        or ``auto_normal`` and ``auto_multivariate_normal``); ``exact`` as a
        guide draws from the closed-form posterior.
    methods : sequence of Method or str, optional
        Instead of ``guides`` x ``elbos``: ``"guide/elbo"``, ``"exact"`` or
        :class:`Method` (which can mis-scale draws on purpose).
    sims : int
        Simulated data sets.
    steps : int
        Maximum SVI steps per fit.
    num_draws : int
        ``L`` approximation draws per simulation (ranks in ``0..L``).
    seed : int
        Base seed; simulation ``i`` and its fits derive theirs from it.
    data, observed, sites
        For a user model: the template data, its observed entries (a list, or
        a dict entry -> observed site), the sites to rank (see
        :func:`make_problem`); ``sites`` also for a catalog entry.
    fit_options : dict, optional
        Other :func:`vimodels.fit` options (``lr``, ``convergence`` ...).
    alpha : float
        Family-wise level of the tests (Holm over each method's elements).
    executor : str or executor
        ``local`` (process pool), ``dask``, ``serial``, or an executor object
        (left open).
    scheduler, workers
        Dask scheduler address; processes of the pool or LocalCluster.
    out : path, optional
        Output folder: ``sims/`` (one JSON per simulation, reused by a rerun)
        and the report. Default: a temporary folder, and no report.
    progress : bool
        One line per finished simulation on stderr.
    report : bool
        Write the report into ``out``.

    Returns
    -------
    Calibration
    """
    t0 = time.perf_counter()
    check_option("alpha", float(alpha), kind=float, low=0.0, high=1.0, low_inclusive=False)
    problem = make_problem(model, data, observed=observed, sites=sites)
    if methods is None:
        entry = problem.entry
        if guides is None:
            guides = (
                entry.default_guides
                if entry is not None
                else ("auto_normal", "auto_multivariate_normal")
            )
        if isinstance(guides, str) or isinstance(elbos, str):
            raise OptionError("guides and elbos must be lists of names")
        method_list = [Method(g, e) for g in guides for e in ([elbos[0]] if g == EXACT else elbos)]
    else:
        method_list = [as_method(m) for m in methods]
    _check_methods(problem, method_list)
    tasks = make_tasks(
        problem,
        method_list,
        sims=sims,
        steps=steps,
        seed=seed,
        num_draws=num_draws,
        fit_options=fit_options,
    )
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    ex, owned = _executor(executor, scheduler, workers)
    with tempfile.TemporaryDirectory(prefix="vimodels-calibrate-") as tmp:
        root = ensure_dir(out).resolve() if out is not None else Path(tmp)
        sims_dir = ensure_dir(root / SIMS)
        try:
            ran = run_simulations(tasks, sims_dir, ex, say)
        finally:
            if owned:
                ex.close()
        records = {t.index: read_record(t, sims_dir) for t in tasks}
    stop_errors = ("TaskInterrupted", "TaskCancelled")  # the interruption, not the task
    errors = {
        o.task.index: o.error
        for o in ran["outcomes"]
        if not o.ok and not (ran["interrupted"] and str(o.error).startswith(stop_errors))
    }
    settings = {
        "steps": steps,
        "fit_options": json.loads(tasks[0].options),
        "seed": seed,
        "observed": problem.observed,
        "sites": list(problem.sites),
        "problem": problem.fingerprint,
        "code": tasks[0].code,
        "executor": ex.describe(),
    }
    cal = summarize(
        problem.name,
        [m.name for m in method_list],
        tasks,
        records,
        errors,
        num_draws=num_draws,
        alpha=alpha,
        settings=settings,
    )
    cal = dataclasses.replace(
        cal,
        wall_time=time.perf_counter() - t0,
        executed=ran["executed"],
        reused=ran["reused"],
        partial=ran["interrupted"],
    )
    if report and out is not None:
        cal = dataclasses.replace(cal, files=write_calibration_report(cal, root))
    return cal


def run_simulations(
    tasks: Sequence[SimulationTask],
    sims_dir: Path,
    executor: Any,
    say: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Run the unfinished tasks; one progress line per finished simulation; Ctrl-C stops.

    Returns
    -------
    dict
        ``outcomes`` (list of :class:`~vimodels.runs.executors.Outcome`),
        ``executed`` and ``reused`` (counts), ``interrupted`` (bool).
    """
    todo = [t for t in tasks if read_record(t, sims_dir) is None]
    reused = len(tasks) - len(todo)
    if reused:
        say(f"{reused} simulation(s) already finished in {sims_dir}; not run again")
    say(f"calibrate {tasks[0].problem.name}: {len(todo)} simulation(s) on {executor.describe()}")
    outcomes = []
    t0 = time.perf_counter()
    try:
        for k, outcome in enumerate(
            executor.map(partial(run_simulation, out_dir=str(sims_dir)), todo)
        ):
            outcomes.append(outcome)
            say(
                f"[{k + 1}/{len(todo)}] {outcome.task.label} {_progress_detail(outcome)} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    except KeyboardInterrupt:
        say("interrupted: stopping; finished simulations are kept for a rerun")
        executor.interrupt()
        return {
            "outcomes": outcomes,
            "executed": len(outcomes),
            "reused": reused,
            "interrupted": True,
        }
    return {"outcomes": outcomes, "executed": len(todo), "reused": reused, "interrupted": False}


def _progress_detail(outcome: Any) -> str:
    if not outcome.ok:
        return f"FAILED: {outcome.error}"
    parts = []
    for name, m in outcome.result["methods"].items():
        state = m["status"] if m["status"] != FAILED else f"FAILED ({m['error']})"
        parts.append(f"{name} {state}")
    return "; ".join(parts)


def summarize(
    model: str,
    methods: Sequence[str],
    tasks: Sequence[SimulationTask],
    records: Mapping[int, dict | None],
    errors: Mapping[int, str | None],
    *,
    num_draws: int,
    alpha: float,
    settings: Mapping[str, Any],
) -> Calibration:
    """The statistics and tables of the finished simulation records."""
    failures = []
    ranks: dict[str, dict[str, list]] = {m: {} for m in methods}
    counts = {m: {"ranked": 0, "failed": 0, "not_converged": 0, "wall": []} for m in methods}
    for t in tasks:
        rec = records.get(t.index)
        if rec is None:
            if t.index in errors:
                failures.append(
                    {
                        "sim": t.index,
                        "sim_seed": t.sim_seed,
                        "method": "(simulation)",
                        "fit_seed": None,
                        "status": FAILED,
                        "error": errors[t.index],
                    }
                )
                for m in methods:
                    counts[m]["failed"] += 1
            continue
        for m in methods:
            info = rec["methods"][m]
            c = counts[m]
            c["wall"].append(info["wall_time_s"])
            if info["status"] == FAILED or not info["converged"]:
                failures.append(
                    {
                        "sim": t.index,
                        "sim_seed": rec["sim_seed"],
                        "method": m,
                        "fit_seed": info["fit_seed"],
                        "status": info["status"],
                        "error": info["error"] or info.get("message", ""),
                    }
                )
            if info["status"] == FAILED:
                c["failed"] += 1
                continue
            c["not_converged"] += int(not info["converged"])
            c["ranked"] += 1
            for site in t.problem.sites:
                shape = np.shape(rec["theta"][site])
                for label, r in zip(element_labels(site, shape), info["ranks"][site]):
                    ranks[m].setdefault(label, []).append(r)
    arrays = {m: {k: np.asarray(v, dtype=int) for k, v in r.items()} for m, r in ranks.items()}
    elem_tables, site_tables, rows = [], [], []
    sites = tuple(settings.get("sites", ()))
    for m in methods:
        el = stats.calibration_table(arrays[m], num_draws + 1, alpha=alpha)
        st = stats.site_table(el, alpha)
        if not el.empty:
            el.insert(0, "method", m)
            st.insert(0, "method", m)
            elem_tables.append(el)
            site_tables.append(st)
        c = counts[m]
        calibrated = int((st["verdict"] == stats.CALIBRATED).sum()) if not st.empty else 0
        bad = (
            []
            if st.empty
            else [f"{s}: {v}" for s, v in zip(st["site"], st["verdict"]) if v != stats.CALIBRATED]
        )
        rows.append(
            {
                "method": m,
                "sims": len(tasks),
                "ranked": c["ranked"],
                "failed": c["failed"],
                "not_converged": c["not_converged"],
                "sites": len(st) if not st.empty else len(sites),
                "sites_calibrated": calibrated,
                "verdict": (
                    "no data" if st.empty else (stats.CALIBRATED if not bad else "; ".join(bad))
                ),
                "median_fit_s": float(np.median(c["wall"])) if c["wall"] else float("nan"),
            }
        )
    failures_df = pd.DataFrame(
        failures, columns=["sim", "sim_seed", "method", "fit_seed", "status", "error"]
    )
    return Calibration(
        model=model,
        methods=tuple(methods),
        sims=len(tasks),
        num_draws=num_draws,
        alpha=alpha,
        ranks=arrays,
        elements=pd.concat(elem_tables, ignore_index=True) if elem_tables else pd.DataFrame(),
        sites=pd.concat(site_tables, ignore_index=True) if site_tables else pd.DataFrame(),
        summary=pd.DataFrame(rows),
        failures=failures_df,
        settings=dict(settings),
        wall_time=0.0,
    )


def default_out(model: str) -> Path:
    """``runs/calibrate/<model>``."""
    return Path("runs") / "calibrate" / safe_name(model)


__all__ = [
    "Calibration",
    "Method",
    "Problem",
    "SimulationTask",
    "calibrate",
    "make_problem",
    "make_tasks",
    "run_simulation",
    "simulate",
]
