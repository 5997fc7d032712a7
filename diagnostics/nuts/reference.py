"""Ground truth: a self-checked NUTS reference (or exact draws), cached on disk.

:func:`run_nuts` runs NUTS on Pyro's potential (JIT-compiled where the model
allows) in several independently seeded chains, with the engine
``NutsSettings.sampler`` names (default ``"vimodels"``: the project's sampler
with all chains of this process in lockstep, one batched gradient per leapfrog
step, or in parallel processes, ``NutsSettings.chain_method``; ``"nutpie"``:
:mod:`diagnostics.nuts.nutpie_engine`; ``"auto"``: nutpie up to 64 dimensions
of the flat unconstrained vector, the project's sampler above), then checks the draws before anyone
trusts them:

- rank-normalized split R-hat < 1.01,
- bulk and tail effective sample size >= 400 (both ArviZ's statistics, computed
  without importing ArviZ by :mod:`diagnostics.chainstats`),

for every element of every site of interest, no divergent transition, and
an energy Bayesian fraction of missing information (E-BFMI) of at least
0.3 on every chain (Stan's warning threshold; where the sampler records
the energy).
A reference that fails a check is returned with ``trusted=False``; reports
and JSON files show it, nothing uses it silently.

Results are cached under :func:`default_cache_dir` (``$VIMODELS_CACHE`` or
the platform's user cache folder), keyed by a SHA-256 of the model's
fingerprint (:mod:`diagnostics.nuts.fingerprint`: its code, closure values,
defaults, the globals, class attributes and module constants it reads, every
decorator layer, ``nn.Module`` state), the data by content, the values of the
``pyro.param`` sites it reads, the settings and the library versions; a model
or data whose fingerprint cannot be had is not cached (:class:`NotCachedWarning`).
The key cannot see what a model reads at call time from outside Python values
(environment variables, side files). Draws are stored as ``.npz`` (read with
``allow_pickle=False``) next to a JSON manifest that holds the draws'
checksum and its own; both are written atomically, the manifest last. An
entry that is half-written or does not match a checksum is recomputed with a
:class:`CacheWarning`.

:func:`exact_reference` draws from an entry's closed-form posterior where one
exists (reference kind ``"exact"``); :func:`get_reference` picks one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from filelock import FileLock
from pyro.poutine.util import site_is_subsample

from diagnostics import chainstats
from diagnostics.labels import element_labels
from diagnostics.nuts.chains import is_lockstep, run_group, runs_grouped
from diagnostics.nuts.checks import Check
from diagnostics.nuts.fingerprint import Unfingerprintable, data_fingerprint, fingerprint
from diagnostics.nuts.kernel import ALGORITHM_VERSION, AUTO_DENSE_MAX_DIM, AUTO_DRAWS_PER_DIM
from diagnostics.nuts.modes import unvisited_mode_check
from diagnostics.nuts.nutpie_engine import (
    NUTPIE_MAX_DIM,
    flat_dim,
    nutpie_version,
    resolve_sampler,
)
from diagnostics.nuts.progress import LiveProgress, live_progress
from vimodels.catalog.base import CatalogEntry, NutsSettings
from vimodels.catalog.registry import get_model
from vimodels.data import trace_check
from vimodels.errors import IncompatibleError, OptionError, check_option, check_seed
from vimodels.io import atomic_write, atomic_write_json, ensure_dir, jsonable, safe_name
from vimodels.mode.plates import subsampled_plates
from vimodels.resolve import resolve_model
from vimodels.svi.draws import ModelInfo, model_info, recover_discrete, replay_model
from vimodels.versions import versions

if TYPE_CHECKING:
    import pandas

RHAT_MAX = 1.01
ESS_MIN = 400.0
EBFMI_MIN = 0.3
# 3: ArviZ's sample_stats names (energy, n_steps ...); keyed by the model's fingerprint;
# the manifest has its own checksum. 4: deterministic sites replayed per draw where a
# vectorized replay does not keep the draws on their own axis (were scrambled across draws).
# 5: discrete sites recovered one draw at a time where the model does not broadcast over
# the draws (every draw's were drawn from the first draw's conditional). 6: the pointwise
# log likelihood sums out local discrete sites (was conditional on the drawn assignment).
# 7: masked-out observations score 0 in the pointwise log likelihood (the mask was ignored)
CACHE_FORMAT = 7
NUTS_KIND = "nuts"
SAMPLER_NAMES = {
    "vimodels": "vimodels NUTS (Stan's multinomial NUTS and warm-up, on Pyro's potential)",
    "pyro": "pyro NUTS (multinomial)",
    "nutpie": "nutpie NUTS (Rust; diagonal plus low-rank mass matrix adapted over the whole "
    "warm-up, on Pyro's potential)",
    "auto": f"nutpie up to {NUTPIE_MAX_DIM} dimensions of the flat unconstrained vector, "
    "else vimodels",
}
METRIC_NAMES = {
    "diag": "diagonal (Stan's diag_e)",
    "dense": "dense (Stan's dense_e, regularized relative to the variances)",
    "low_rank": "diagonal plus low rank from draws and gradients (nutpie's)",
    "auto": f"dense up to {AUTO_DENSE_MAX_DIM} dimensions with {AUTO_DRAWS_PER_DIM} draws per "
    "dimension in the last warm-up window, else low rank up to that many dimensions, "
    "else diagonal",
}
CHAIN_METHODS = {
    "lockstep": "all chains of a process together, one batched gradient per leapfrog step",
    "independent": "each chain on its own",
}
EXACT_KIND = "exact"
_GROUPS = ("posterior", "sample_stats", "log_likelihood", "observed_data")


class CacheWarning(UserWarning):
    """A cache entry was unreadable, half-written or corrupted and is recomputed."""


class NotCachedWarning(UserWarning):
    """A model depends on a value that cannot be fingerprinted: its reference is not cached."""


#: Checks that the draws alone cannot recompute (``modes``: L-BFGS runs on the model,
#: :mod:`diagnostics.nuts.modes`): kept in the cache manifest and restored on reading.
STORED_CHECKS = ("modes",)


def _stored_checks(entries: Sequence[Mapping[str, Any]]) -> tuple[Check, ...]:
    """The :data:`STORED_CHECKS` of a manifest's ``checks`` list (``Check.as_dict``)."""
    return tuple(Check(**c) for c in entries if c.get("name") in STORED_CHECKS)


@dataclass(frozen=True, eq=False)
class Reference:
    """Reference draws of a posterior and how far to trust them.

    Attributes
    ----------
    model_name : str
    kind : str
        ``"nuts"`` or ``"exact"`` (independent draws from a closed form).
    draws : dict of str to ndarray
        Latent, discrete (recovered) and deterministic sites, shape ``(chain, draw, *shape)``.
    sites : tuple of str
        Sites of interest (checked and reported).
    latent_sites : tuple of str
        Sampled latent sites (the joint metrics use their continuous ones).
    sample_stats : dict of str to ndarray
        ``(chain, draw)``, ArviZ's names (NUTS only): ``diverging``,
        ``step_size``, ``tree_depth``, ``lp``, ``acceptance_rate``; the
        project's sampler also ``n_steps`` (leapfrog steps), ``energy`` (the
        Hamiltonian at the draw), ``energy_error`` and ``max_energy_error``.
    log_likelihood : dict of str to ndarray
        Pointwise log likelihood of observed sites, ``(chain, draw, *batch_shape)``.
    observed_data : dict of str to ndarray
    dims : dict of str to tuple of str
        Dimension names of each site (without chain and draw).
    plate_sizes : dict of str to int
    settings : dict
        Sampler settings actually used (NUTS settings, seeds, JIT, workers).
    versions : dict of str to str
    checks : tuple of Check
    trusted : bool
        All checks passed.
    wall_time : float
        Seconds spent computing the draws (not loading them).
    cache_key : str
        SHA-256 hex digest of what produced the draws.
    cache_path : Path or None
        The ``.npz`` file of the cache entry.
    from_cache : bool
        Loaded rather than computed in this call.
    notes : tuple of str
        One-line remarks (JIT fallback, serial chains ...).
    """

    model_name: str
    kind: str
    draws: dict[str, np.ndarray] = field(repr=False)
    sites: tuple[str, ...]
    latent_sites: tuple[str, ...]
    sample_stats: dict[str, np.ndarray] = field(repr=False)
    log_likelihood: dict[str, np.ndarray] = field(repr=False)
    observed_data: dict[str, np.ndarray] = field(repr=False)
    dims: dict[str, tuple[str, ...]] = field(repr=False)
    plate_sizes: dict[str, int] = field(repr=False)
    settings: dict[str, Any] = field(repr=False)
    versions: dict[str, str] = field(repr=False)
    checks: tuple[Check, ...]
    trusted: bool
    wall_time: float
    cache_key: str
    cache_path: Path | None = None
    from_cache: bool = False
    notes: tuple[str, ...] = ()

    @property
    def num_chains(self) -> int:
        """Number of chains."""
        return int(next(iter(self.draws.values())).shape[0])

    @property
    def num_draws(self) -> int:
        """Draws per chain."""
        return int(next(iter(self.draws.values())).shape[1])

    @property
    def num_divergences(self) -> int:
        """Divergent transitions after warm-up (0 for exact draws)."""
        div = self.sample_stats.get("diverging")
        return int(np.sum(div)) if div is not None else 0

    @property
    def reference_from(self) -> str | None:
        """Where the draws came from when not from NUTS on the model as written, else None.

        ``"reference from the reparameterized model (LocScaleReparam(centered=0), ...,
        on: beta)"``
        (:mod:`diagnostics.reparam`) or the catalog entry whose draws stand in
        (:func:`reparameterized_reference`).
        """
        value = self.settings.get("reference_from")
        return str(value) if value else None

    def flat(self, site: str) -> np.ndarray:
        """Draws of ``site`` with chains pooled, shape ``(chain * draw, *shape)``."""
        x = self.draws[site]
        return x.reshape((-1,) + x.shape[2:])

    def site_rows(self) -> list[dict[str, Any]]:
        """:meth:`site_table` as a list of rows (dicts), without pandas."""
        return _site_rows(self.draws, self.sites)

    def site_table(self) -> pandas.DataFrame:
        """Per-element mean, sd, MCSE, split R-hat and bulk/tail ESS of the sites of interest."""
        import pandas as pd

        return pd.DataFrame(self.site_rows())

    def summary(self) -> dict[str, Any]:
        """JSON-friendly account: kind, trust, checks, settings, versions, cache."""
        return {
            "model": self.model_name,
            "kind": self.kind,
            "trusted": self.trusted,
            "checks": [c.as_dict() for c in self.checks],
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
            "num_divergences": self.num_divergences,
            "sites": list(self.sites),
            "settings": jsonable(self.settings),
            "versions": dict(self.versions),
            "wall_time_s": self.wall_time,
            "cache_key": self.cache_key,
            "cache_path": str(self.cache_path) if self.cache_path else None,
            "from_cache": self.from_cache,
            "notes": list(self.notes),
            "reference_from": self.reference_from,
        }

    def describe(self) -> str:
        """One line: kind, size, trust and the failing checks."""
        failing = [c.detail for c in self.checks if not c.ok]
        trust = "trusted" if self.trusted else "UNTRUSTED (" + "; ".join(failing) + ")"
        origin = f"; {self.reference_from}" if self.reference_from else ""
        return (
            f"{self.kind} reference for {self.model_name}: {self.num_chains} chain(s) x "
            f"{self.num_draws} draws, {trust}{origin}"
        )


# ----------------------------------------------------------------------------- checks


def _site_rows(
    draws: Mapping[str, np.ndarray], sites: tuple[str, ...], mcse: bool = True
) -> list[dict]:
    """Per-element summaries; ``mcse=False`` leaves out the MCSE (the checks do not use it)."""
    rows = []
    for site in sites:
        if site not in draws:
            continue
        x = np.asarray(draws[site], dtype=float)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        for j, label in enumerate(element_labels(site, x.shape[2:])):
            d = flat[:, :, j]
            constant = bool(np.ptp(d) == 0)
            rows.append(
                {
                    "site": site,
                    "element": label,
                    "mean": float(d.mean()),
                    "sd": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
                    "mcse_mean": float("nan") if constant or not mcse else chainstats.mcse_mean(d),
                    "rhat": float("nan") if constant else chainstats.rhat(d),
                    "ess_bulk": float("nan") if constant else chainstats.ess(d, "bulk"),
                    "ess_tail": float("nan") if constant else chainstats.ess(d, "tail"),
                }
            )
    return rows


def ebfmi(energy: np.ndarray) -> np.ndarray:
    """Energy Bayesian fraction of missing information per chain (as ``az.bfmi``).

    Parameters
    ----------
    energy : ndarray, shape (chain, draw)
        The Hamiltonian at each draw.

    Returns
    -------
    ndarray, shape (chain,)
        ``mean(diff(E)^2) / var(E)`` of each chain (``var`` with ``ddof=1``).
    """
    e = np.asarray(energy, dtype=float)
    return np.square(np.diff(e, axis=1)).mean(axis=1) / np.var(e, axis=1, ddof=1)


def run_checks(
    draws: Mapping[str, np.ndarray],
    sites: tuple[str, ...],
    num_divergences: int | None,
    energy: np.ndarray | None = None,
    rhat_max: float = RHAT_MAX,
) -> tuple[Check, ...]:
    """The reference checks on the sites of interest.

    Parameters
    ----------
    draws : dict of str to ndarray
        ``(chain, draw, *shape)``.
    sites : tuple of str
    num_divergences : int or None
        Divergent transitions; ``None`` for exact draws (no check).
    energy : ndarray or None
        ``(chain, draw)`` Hamiltonian of each draw; ``None`` where the sampler
        does not record it (no E-BFMI check).
    rhat_max : float
        R-hat threshold (default :data:`RHAT_MAX`; external references set their
        own, :func:`diagnostics.external.thinned_rhat_max`).

    Returns
    -------
    tuple of Check
        ``rhat`` (< ``rhat_max``), ``ess_bulk`` and ``ess_tail`` (>= 400), ``divergences`` (0),
        ``ebfmi`` (>= 0.3 on every chain, where ``energy`` is given).
    """
    rows = [r for r in _site_rows(draws, sites, mcse=False) if np.isfinite(r["ess_bulk"])]
    chains = int(next(iter(draws.values())).shape[0]) if draws else 0
    checks = []
    if not rows:
        checks.append(
            Check("rhat", False, float("nan"), rhat_max, "no varying site of interest to check")
        )
    elif chains < 2:
        checks.append(
            Check(
                "rhat",
                False,
                float("nan"),
                rhat_max,
                f"split R-hat needs at least 2 chains, got {chains}",
            )
        )
    else:
        worst = max(rows, key=lambda r: r["rhat"])
        checks.append(
            Check(
                "rhat",
                worst["rhat"] < rhat_max,
                worst["rhat"],
                rhat_max,
                f"max split R-hat {worst['rhat']:.4f} at {worst['element']} "
                f"(needs < {rhat_max:.4g})",
            )
        )
    for key in ("ess_bulk", "ess_tail") if rows else ():
        worst = min(rows, key=lambda r, k=key: r[k])
        checks.append(
            Check(
                key,
                worst[key] >= ESS_MIN,
                worst[key],
                ESS_MIN,
                f"min {key.replace('_', ' ')} {worst[key]:.0f} at "
                f"{worst['element']} (needs >= {ESS_MIN:.0f})",
            )
        )
    if num_divergences is not None:
        checks.append(
            Check(
                "divergences",
                num_divergences == 0,
                float(num_divergences),
                0.0,
                f"{num_divergences} divergent transition(s) after warm-up (needs 0)",
            )
        )
    if energy is not None and np.asarray(energy).ndim == 2 and np.asarray(energy).shape[1] > 2:
        per_chain = ebfmi(energy)
        worst = int(np.nanargmin(per_chain)) if np.isfinite(per_chain).any() else 0
        value = float(per_chain[worst])
        checks.append(
            Check(
                "ebfmi",
                bool(np.all(per_chain >= EBFMI_MIN)),
                value,
                EBFMI_MIN,
                f"min E-BFMI {value:.3f} on chain {worst} (needs >= {EBFMI_MIN})",
            )
        )
    return tuple(checks)


# ----------------------------------------------------------------------------- models


def model_fingerprint(fn: Callable) -> str | None:
    """:func:`~diagnostics.nuts.fingerprint.fingerprint` of ``fn``, or None when it has none.

    None means: do not cache (a value the model depends on cannot be hashed, so
    a cache hit could be another model's draws); the reason is warned once.
    """
    try:
        return fingerprint(fn)
    except Unfingerprintable as exc:
        warnings.warn(
            f"the reference of this model is not cached: {exc}; the model would be "
            "keyed by its code alone and could return draws of another model. Pass "
            "such values as data (model(**data)) to cache it",
            NotCachedWarning,
            stacklevel=3,
        )
        return None


def _model_source(fn: Callable) -> str:
    """What keys a model: its fingerprint, or its code when that cannot be had."""
    found = model_fingerprint(fn)
    return found if found is not None else _code_text(fn)


def _code_text(fn: Callable) -> str:
    target = inspect.unwrap(fn)
    code = getattr(target, "__code__", None)
    if code is None:
        return f"{type(target).__module__}.{type(target).__qualname__}"
    return f"{code.co_code.hex()}|{code.co_consts!r}|{code.co_names!r}"


def data_id(data: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> str | None:
    """:func:`~diagnostics.nuts.fingerprint.data_fingerprint` of the data (and params), or None.

    ``params`` are the values of the ``pyro.param`` sites the model reads
    (from the param store: part of what it computes). None means: do not
    cache (a value cannot be hashed by content); the reason is warned.
    """
    try:
        return data_fingerprint({"data": dict(data), "params": dict(params or {})})
    except Unfingerprintable as exc:
        warnings.warn(
            f"the reference of this model is not cached: {exc}; give the data as tensors, "
            "arrays, numbers, strings, or dicts and lists of them to cache it",
            NotCachedWarning,
            stacklevel=3,
        )
        return None


def _hash_data(h: Any, data: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> None:
    try:
        digest = data_fingerprint({"data": dict(data), "params": dict(params or {})})
    except Unfingerprintable:  # not cached (run_nuts): the key only names the draws
        digest = "unhashable:" + repr(sorted(data))
    h.update(f"|data:{digest}|".encode())


def param_values(tr: Any) -> dict[str, torch.Tensor]:
    """The values of the ``pyro.param`` sites of a trace (read from the param store)."""
    return {
        name: site["value"].detach()
        for name, site in tr.nodes.items()
        if site["type"] == "param" and isinstance(site["value"], torch.Tensor)
    }


def cache_key(
    model: Callable | str,
    data: Mapping[str, Any] | str,
    settings: NutsSettings,
    seed: int,
    sites: tuple[str, ...],
    kind: str = NUTS_KIND,
    engine: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """SHA-256 of the model, the data, the settings, the engine, the seed and the versions.

    ``model`` is a function (keyed by :func:`model_fingerprint`: its code,
    closure, defaults and the globals it reads) or such a fingerprint. ``data``
    is a data set (hashed by content, :func:`data_id`) or such a digest;
    ``params`` the values of the ``pyro.param`` sites the model reads. A NUTS
    key includes the sampler's ``ALGORITHM_VERSION`` (``diagnostics.nuts.kernel``),
    so a change of the algorithm serves no reference drawn before it.
    ``engine`` is the sampler that runs (``settings.sampler`` resolved,
    :func:`~diagnostics.nuts.nutpie_engine.resolve_sampler`; default
    ``settings.sampler``): the draws of one engine are never another's, and
    nutpie's version is part of its key.
    """
    engine = engine or settings.sampler
    engine_versions = {"nutpie": nutpie_version()} if engine == "nutpie" else {}
    h = hashlib.sha256()
    h.update(f"vimodels-reference-v{CACHE_FORMAT}|{kind}|".encode())
    if kind == NUTS_KIND:
        h.update(f"algorithm-v{ALGORITHM_VERSION}|".encode())
    h.update(_model_source(model).encode() if isinstance(model, Callable) else model.encode())
    if isinstance(data, str):
        h.update(f"|data:{data}|".encode())
    else:
        _hash_data(h, data, params)
    h.update(
        json.dumps(
            {
                "settings": dataclasses.asdict(settings),
                "seed": seed,
                "sites": list(sites),
                "engine": engine,
                "versions": {**versions(), **engine_versions},
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$VIMODELS_CACHE``, else the platform's user cache folder + ``vimodels``."""
    env = os.environ.get("VIMODELS_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "vimodels" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vimodels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vimodels"


# ----------------------------------------------------------------------------- cache


def _entry_paths(cache_dir: Path, name: str, key: str) -> tuple[Path, Path]:
    stem = f"{safe_name(name)}-{key[:24]}"
    folder = cache_dir / "reference"
    return folder / f"{stem}.npz", folder / f"{stem}.json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_cache(ref: Reference, npz: Path) -> None:
    ensure_dir(npz.parent)
    arrays = {}
    for group in _GROUPS:
        source = {
            "posterior": ref.draws,
            "sample_stats": ref.sample_stats,
            "log_likelihood": ref.log_likelihood,
            "observed_data": ref.observed_data,
        }[group]
        for name, value in source.items():
            arrays[f"{group}__{name}"] = np.asarray(value)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(npz, write)
    manifest = {
        "format": CACHE_FORMAT,
        "key": ref.cache_key,
        "model": ref.model_name,
        "kind": ref.kind,
        "sites": list(ref.sites),
        "latent_sites": list(ref.latent_sites),
        "dims": {k: list(v) for k, v in ref.dims.items()},
        "plate_sizes": ref.plate_sizes,
        "settings": jsonable(ref.settings),
        "versions": ref.versions,
        "wall_time_s": ref.wall_time,
        "notes": list(ref.notes),
        "checks": [c.as_dict() for c in ref.checks],
        "trusted": ref.trusted,
        "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()},
        "npz_file": npz.name,
        "npz_sha256": _sha256_file(npz),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    atomic_write_json(npz.with_suffix(".json"), manifest)


def _manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON, leaving out its own checksum field.

    An edited manifest (a dim name, the model name, ``kind``, a plate size) no
    longer matches it, so the entry is treated as damaged and recomputed.
    """

    def plain(obj: Any) -> Any:  # as written to disk: NaN as null, tuples as lists
        if isinstance(obj, float) and obj != obj:
            return None
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    body = plain({k: v for k, v in manifest.items() if k != "manifest_sha256"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(npz: Path, manifest_path: Path, key: str) -> Reference | None:
    """Load a cache entry; ``None`` when absent; warn and return ``None`` when broken."""
    if not manifest_path.exists():
        if npz.exists():
            warnings.warn(
                f"reference cache entry {npz.name} has no manifest (half-written); recomputing",
                CacheWarning,
                stacklevel=3,
            )
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != _manifest_sha256(
            manifest
        ):
            raise ValueError("the manifest does not match its checksum (edited or damaged)")
        if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
            raise ValueError("manifest does not match this reference's key")
        if not npz.exists():
            raise ValueError("draws file missing")
        if _sha256_file(npz) != manifest["npz_sha256"]:
            raise ValueError("draws file does not match its checksum (truncated or changed)")
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        expected = manifest["arrays"]
        if set(arrays) != set(expected) or any(
            [str(arrays[k].dtype), list(arrays[k].shape)] != v for k, v in expected.items()
        ):
            raise ValueError("arrays differ from the manifest")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        warnings.warn(
            f"reference cache entry {npz.name} is unreadable ({exc}); recomputing",
            CacheWarning,
            stacklevel=3,
        )
        return None
    groups: dict[str, dict[str, np.ndarray]] = {g: {} for g in _GROUPS}
    for k, v in arrays.items():
        group, name = k.split("__", 1)
        groups[group][name] = v
    sites = tuple(manifest["sites"])
    kind = manifest["kind"]
    div = groups["sample_stats"].get("diverging")
    checks = run_checks(
        groups["posterior"],
        sites,
        int(np.sum(div)) if kind == NUTS_KIND and div is not None else None,
        groups["sample_stats"].get("energy") if kind == NUTS_KIND else None,
    )
    checks = (*checks, *_stored_checks(manifest.get("checks", [])))
    return Reference(
        model_name=manifest["model"],
        kind=kind,
        draws=groups["posterior"],
        sites=sites,
        latent_sites=tuple(manifest["latent_sites"]),
        sample_stats=groups["sample_stats"],
        log_likelihood=groups["log_likelihood"],
        observed_data=groups["observed_data"],
        dims={k: tuple(v) for k, v in manifest["dims"].items()},
        plate_sizes={k: int(v) for k, v in manifest["plate_sizes"].items()},
        settings=manifest["settings"],
        versions=manifest["versions"],
        checks=checks,
        trusted=all(c.ok for c in checks),
        wall_time=float(manifest["wall_time_s"]),
        cache_key=key,
        cache_path=npz,
        from_cache=True,
        notes=tuple(manifest["notes"]),
    )


# ----------------------------------------------------------------------------- NUTS


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except (pickle.PicklingError, AttributeError, TypeError):
        return False


def _run_chains(
    specs: list[dict], num_workers: int, progress: bool
) -> tuple[list[dict], int, str | None]:
    """Run the chains in ``num_workers`` processes (1: in this one).

    Chains in lockstep (and nutpie's) are split into one contiguous group per process; chains
    run independently are handed out one at a time.
    """
    note = None
    if num_workers > 1 and not _picklable(specs[0]):
        note = "the model cannot be sent to worker processes (not importable); chains ran serially"
        num_workers = 1
    if runs_grouped(specs[0]["settings"]):
        groups = [list(g) for g in np.array_split(np.array(specs, dtype=object), num_workers)]
    else:
        groups = [[spec] for spec in specs]
    out: list[dict] = []
    if num_workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
            for results in pool.map(run_group, groups):
                _collect(out, results, progress)
        return out, num_workers, note
    threads = torch.get_num_threads()
    # live per-chain lines on a terminal (chains in this process); nothing otherwise
    monitor: LiveProgress | None = live_progress(progress)
    try:
        for group in groups:
            results = run_group(group, monitor)
            if monitor is not None:
                monitor.close()
            _collect(out, results, progress)
    finally:
        torch.set_num_threads(threads)
    return out, 1, note


def _collect(out: list[dict], results: list[dict], progress: bool) -> None:
    out.extend(results)
    if progress:
        chains = ", ".join(str(r["chain"]) for r in results)
        print(
            f"  chain(s) {chains} done in {results[0]['wall_time']:.1f} s",
            file=sys.stderr,
        )


def _auto_workers(settings: NutsSettings) -> int:
    """Worker processes for the chains.

    Chains in lockstep: 1 (one batched gradient for all of them beats a
    second process and its imports); nutpie's: 1 (one trace of the potential
    serves them all). Independent chains: one per chain up to
    the core count, for chains long enough to pay for a process start (about
    3 s importing torch and Pyro); else 1.
    """
    cores = os.cpu_count() or 1
    if runs_grouped(settings):
        return 1
    if settings.num_chains < 2 or cores < 2:
        return 1
    if settings.num_warmup + settings.num_samples < 1000:
        return 1
    return min(settings.num_chains, cores)


def _chain_seeds(seed: int, num_chains: int) -> list[int]:
    seq = np.random.SeedSequence(seed)
    return [int(s.generate_state(1)[0]) for s in seq.spawn(num_chains)]


def _settings_for(
    entry: CatalogEntry | None, settings: NutsSettings | Mapping | None
) -> NutsSettings:
    base = entry.nuts if entry is not None else NutsSettings()
    if settings is None:
        return base
    if isinstance(settings, NutsSettings):
        return settings
    unknown = set(settings) - {f.name for f in dataclasses.fields(NutsSettings)}
    if unknown:
        raise OptionError(
            f"unknown NUTS setting(s) {sorted(unknown)}; valid: "
            f"{', '.join(f.name for f in dataclasses.fields(NutsSettings))}"
        )
    return dataclasses.replace(base, **{k: v for k, v in settings.items() if v is not None})


def _validate(settings: NutsSettings) -> None:
    check_option("num_warmup", settings.num_warmup, kind=int, low=0)
    check_option("num_samples", settings.num_samples, kind=int, low=2)
    check_option("num_chains", settings.num_chains, kind=int, low=1)
    check_option("max_tree_depth", settings.max_tree_depth, kind=int, low=1)
    if settings.chain_method not in CHAIN_METHODS:
        raise OptionError(
            f"unknown chain method {settings.chain_method!r}; valid: {', '.join(CHAIN_METHODS)}"
        )
    if settings.metric not in METRIC_NAMES:
        raise OptionError(
            f"unknown NUTS metric {settings.metric!r}; valid: {', '.join(METRIC_NAMES)}"
        )
    if settings.sampler not in SAMPLER_NAMES:
        raise OptionError(
            f"unknown NUTS sampler {settings.sampler!r}; valid: {', '.join(SAMPLER_NAMES)}"
        )
    check_option(
        "target_accept_prob",
        float(settings.target_accept_prob),
        kind=float,
        low=0.0,
        low_inclusive=False,
        high=1.0,
    )
    if float(settings.target_accept_prob) >= 1.0:
        raise OptionError("target_accept_prob must be < 1")


def run_nuts(
    model: str | CatalogEntry | Callable,
    data: Mapping[str, Any] | None = None,
    *,
    settings: NutsSettings | Mapping[str, Any] | None = None,
    seed: int = 0,
    sites: tuple[str, ...] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    num_workers: int | None = None,
    progress: bool = False,
) -> Reference:
    """NUTS reference draws of a model's posterior, checked and cached.

    Parameters
    ----------
    model : str, CatalogEntry or callable
        Catalog name or entry, or a Pyro model called as ``model(**data)``.
    data : dict, optional
        Data of a user model; overrides for a catalog entry.
    settings : NutsSettings or dict, optional
        Defaults to the entry's ``nuts`` settings; a dict overrides single fields.
    seed : int
        Master seed; chain ``c`` gets an independent seed derived from it.
    sites : tuple of str, optional
        Sites of interest to check; defaults to the entry's, or every continuous
        latent and deterministic site (discrete sites are recovered but not checked).
    cache : bool
        Read and write the on-disk cache.
    cache_dir : path, optional
        Defaults to :func:`default_cache_dir`.
    force : bool
        Recompute even when a valid entry exists (and overwrite it).
    num_workers : int, optional
        Processes running chains in parallel. Chains in lockstep (the
        settings' ``chain_method``) are split into one group per process;
        default 1. Independent chains: default one per chain up to the number
        of cores when chains have at least 1000 iterations, else 1.
    progress : bool
        Print a line per finished chain to stderr.

    Returns
    -------
    Reference
    """
    seed = check_seed(seed)
    entry, fn, data_dict, name = resolve_model(model, data)
    s = _settings_for(entry, settings)
    _validate(s)
    tr = trace_check(fn, data_dict, name)  # data errors surface as one-line DataErrors
    _check_nuts_applies(tr, name)
    depth = entry.max_plate_nesting if entry is not None else None
    info = model_info(fn, (), data_dict, depth)
    if not info.continuous:
        raise IncompatibleError(
            f"model {name!r} has no continuous latent site for NUTS to sample"
            + (f" (only discrete ones: {', '.join(info.discrete)})" if info.discrete else "")
            + "; NUTS needs at least one pyro.sample site without obs= on a continuous support"
        )
    sites = (
        tuple(sites)
        if sites
        else (entry.sites if entry is not None else info.continuous + info.deterministic)
    )
    unknown = [x for x in sites if x not in info.sites or info.sites[x].kind == "observed"]
    if unknown:
        raise OptionError(
            f"unknown site(s) of interest {unknown}; the model's latent and "
            f"deterministic sites are {list(info.latent + info.deterministic)}"
        )
    model_id = model_fingerprint(fn)
    not_cached = None
    if model_id is None:
        model_id = _code_text(fn)
        if cache:
            not_cached = "not cached: the model depends on a value that cannot be fingerprinted"
            cache = False
    # the data by content, and the param store's values of the params the model reads
    data_key = data_id(data_dict, param_values(tr))
    if data_key is None:
        data_key = "unhashable:" + repr(sorted(data_dict))
        if cache:
            not_cached = "not cached: the data holds a value that cannot be hashed by content"
            cache = False
    engine = resolve_sampler(s.sampler, flat_dim(info))
    if engine == "nutpie" and nutpie_version() == "not installed":
        raise OptionError(
            f"NUTS sampler {s.sampler!r} runs nutpie on {name!r}, which is not installed; "
            'install the extra (pip install "vimodels[nutpie]") or use sampler="vimodels"'
        )
    key = cache_key(model_id, data_key, s, seed, sites, engine=engine)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    npz, manifest = _entry_paths(root, name, key)
    if not_cached:
        ref = _compute_nuts(
            entry, fn, data_dict, name, s, engine, seed, sites, info, key, num_workers, progress
        )
        return dataclasses.replace(
            ref, notes=ref.notes + (not_cached,), settings={**ref.settings, "cache": not_cached}
        )
    if cache:
        ensure_dir(npz.parent)
        with FileLock(str(npz.with_suffix(".lock"))):
            if not force:
                found = _read_cache(npz, manifest, key)
                if found is not None:
                    return found
            ref = _compute_nuts(
                entry, fn, data_dict, name, s, engine, seed, sites, info, key, num_workers, progress
            )
            _write_cache(ref, npz)
            return dataclasses.replace(ref, cache_path=npz)
    return _compute_nuts(
        entry, fn, data_dict, name, s, engine, seed, sites, info, key, num_workers, progress
    )


def _check_nuts_applies(tr: Any, name: str) -> None:
    """IncompatibleError for a model NUTS cannot sample: subsampled plates, no latent site."""
    plates = subsampled_plates(tr)
    if plates:
        plate, (size, taken) = next(iter(plates.items()))
        raise IncompatibleError(
            f"model {name!r} subsamples plate {plate!r} ({taken} of {size}): NUTS needs the "
            "full data in every step; remove subsample_size from the plate for the reference "
            "(subsampling is for SVI)"
        )
    latent = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    if not latent:
        raise IncompatibleError(
            f"model {name!r} has no latent site (every pyro.sample has obs=): there is no "
            "posterior to sample; add a pyro.sample site without obs= for each unknown"
        )


def _compute_nuts(
    entry: CatalogEntry | None,
    fn: Callable,
    data: dict,
    name: str,
    settings: NutsSettings,
    engine: str,
    seed: int,
    sites: tuple[str, ...],
    info: Any,
    key: str,
    num_workers: int | None,
    progress: bool,
) -> Reference:
    """NUTS draws of the model by ``engine`` (``settings.sampler`` resolved), checked."""
    s = dataclasses.replace(settings, sampler=engine)  # what the chains run
    if num_workers is None:
        num_workers = _auto_workers(s)
    check_option("num_workers", num_workers, kind=int, low=1)
    num_workers = min(num_workers, s.num_chains)
    seeds = _chain_seeds(seed, s.num_chains)
    worker_data = {
        k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()
    }
    model_ref: str | Callable = entry.name if entry is not None and fn is entry.model else fn
    specs = [
        {
            "model": model_ref,
            "data": worker_data,
            "settings": s,
            "seed": seeds[c],
            "chain": c,
            "max_plate_nesting": info.max_plate_nesting,
        }
        for c in range(s.num_chains)
    ]
    if progress:
        print(
            f"NUTS on {name} ({engine}): {s.num_chains} chains x ({s.num_warmup} warm-up + "
            f"{s.num_samples}) draws, {num_workers} process(es), chains "
            f"{'in lockstep' if is_lockstep(s) else 'independent'}",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    results, used_workers, note = _run_chains(specs, num_workers, progress)
    results.sort(key=lambda r: r["chain"])
    notes = [note] if note else []
    notes += sorted({r["note"] for r in results if r["note"]})
    continuous = {k: np.stack([r["samples"][k] for r in results]) for k in info.continuous}
    stats = {k: np.stack([r["stats"][k] for r in results]) for k in results[0]["stats"]}
    shape = (s.num_chains, s.num_samples)
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in continuous.items()}
    flat.update(recover_discrete(fn, (), data, info, flat))
    replay = replay_model(fn, (), data, info, flat)
    draws = {k: flat[k].reshape(shape + flat[k].shape[1:]) for k in info.latent}
    draws.update({k: v.reshape(shape + v.shape[1:]) for k, v in replay.deterministic.items()})
    log_lik = {k: v.reshape(shape + v.shape[1:]) for k, v in replay.log_likelihood.items()}
    if info.discrete:
        notes.append(
            f"discrete site(s) {', '.join(info.discrete)} summed out by NUTS and "
            "recovered with infer_discrete"
        )
    checks = run_checks(draws, sites, int(stats["diverging"].sum()), stats.get("energy"))
    t_search = time.perf_counter()
    if all(c.ok for c in checks) and not info.discrete:  # a mode no chain found?
        try:
            found = unvisited_mode_check(fn, data, continuous, seed=seed)
        except Exception as exc:  # an auxiliary search must not lose the draws: say so
            found = None
            notes.append(f"mode search not run ({type(exc).__name__}: {str(exc)[:120]})")
        if found is not None:
            checks = (*checks, found)
    search_s = time.perf_counter() - t_search
    wall = time.perf_counter() - t0
    used = {
        **dataclasses.asdict(settings),
        "sampler": SAMPLER_NAMES[settings.sampler],
        "sampler_used": engine,
        **({"nutpie_version": nutpie_version()} if engine == "nutpie" else {}),
        "seed": seed,
        "chain_seeds": seeds,
        "num_workers": used_workers,
        "chain_method_used": "lockstep" if is_lockstep(s) else "independent",
        "metric_used": sorted({r["metric"] for r in results}),
        "potential_batch": sorted({r["batch"] for r in results if r.get("batch")}),
        "jit_used": all(r["jit"] for r in results),
        "init_strategy": "init_to_uniform",
        "max_plate_nesting": info.max_plate_nesting,
        "chain_wall_time_s": [r["wall_time"] for r in results],
        "chain_leapfrog_steps": [r.get("leapfrog_steps") for r in results],
        # of wall_time: the unvisited-mode search (0 where it did not run)
        "mode_search_s": search_s,
    }
    return Reference(
        model_name=name,
        kind=NUTS_KIND,
        draws=draws,
        sites=sites,
        latent_sites=info.latent,
        sample_stats=stats,
        log_likelihood=log_lik,
        observed_data=info.observed_values,
        dims=info.dims,
        plate_sizes=info.plate_sizes,
        settings=used,
        versions=versions(),
        checks=checks,
        trusted=all(c.ok for c in checks),
        wall_time=wall,
        cache_key=key,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- exact


def exact_reference(
    model: str | CatalogEntry, *, num_chains: int = 4, num_draws: int | None = None, seed: int = 0
) -> Reference:
    """Independent draws from an entry's closed-form posterior (reference kind ``"exact"``).

    Parameters
    ----------
    model : str or CatalogEntry
        An entry whose exact posterior has a ``sampler``.
    num_chains, num_draws : int
        Layout of the draws (chains are independent blocks); ``num_draws``
        defaults to ``max(entry.nuts.num_samples, 1000)``.
    seed : int
        Seed of the numpy generator.
    """
    entry = get_model(model) if isinstance(model, str) else model
    exact = entry.exact_posterior()
    if exact is None or exact.sampler is None:
        raise OptionError(f"model {entry.name!r} has no exact posterior sampler; use NUTS")
    num_draws = num_draws or max(entry.nuts.num_samples, 1000)
    check_option("num_chains", num_chains, kind=int, low=1)
    check_option("num_draws", num_draws, kind=int, low=2)
    _, fn, data, name = resolve_model(entry)
    info = model_info(fn, (), data, entry.max_plate_nesting)
    t0 = time.perf_counter()
    raw = exact.sampler(num_chains * num_draws, np.random.default_rng(seed))
    flat = {k: np.asarray(v, dtype=float) for k, v in raw.items()}
    shape = (num_chains, num_draws)
    notes = ["independent draws from the closed-form posterior"]
    log_lik: dict[str, np.ndarray] = {}
    if all(k in flat for k in info.latent):
        replay = replay_model(fn, (), data, info, flat)
        flat.update(replay.deterministic)
        log_lik = {k: v.reshape(shape + v.shape[1:]) for k, v in replay.log_likelihood.items()}
    else:
        notes.append("the exact sampler does not give every latent site: no log likelihood")
    draws = {k: v.reshape(shape + v.shape[1:]) for k, v in flat.items()}
    wall = time.perf_counter() - t0
    sites = tuple(x for x in entry.sites if x in draws)
    checks = run_checks(draws, sites, None)
    settings = {
        "sampler": "exact",
        "num_chains": num_chains,
        "num_samples": num_draws,
        "seed": seed,
    }
    h = hashlib.sha256()
    h.update(f"vimodels-reference-v{CACHE_FORMAT}|exact|{_model_source(fn)}".encode())
    _hash_data(h, data)
    h.update(json.dumps({**settings, "versions": versions()}, sort_keys=True).encode())
    return Reference(
        model_name=name,
        kind=EXACT_KIND,
        draws=draws,
        sites=sites,
        latent_sites=tuple(k for k in info.latent if k in draws),
        sample_stats={},
        log_likelihood=log_lik,
        observed_data=info.observed_values,
        dims={k: v for k, v in info.dims.items()},
        plate_sizes=info.plate_sizes,
        settings=settings,
        versions=versions(),
        checks=checks,
        trusted=all(c.ok for c in checks),
        wall_time=wall,
        cache_key=h.hexdigest(),
        notes=tuple(notes),
    )


def reparameterized_reference(entry: CatalogEntry, source: Reference) -> Reference:
    """``source``'s draws as the reference of ``entry``, the same posterior in another form.

    Keeps the draws of ``entry``'s latent sites and sites of interest (deterministic
    sites of the source, such as ``theta = mu + tau * theta_tilde``), re-runs the
    checks on them and notes where the draws came from (:func:`rebadged`).

    Parameters
    ----------
    entry : CatalogEntry
        The entry the reference is for (its ``reference_from`` names the source).
    source : Reference
        NUTS draws of the source entry (same data, same observed sites).

    Raises
    ------
    IncompatibleError
        When the source lacks one of ``entry``'s latent sites or sites of interest.
    """
    _, fn, data, name = resolve_model(entry)
    return rebadged(
        source,
        model_info(fn, (), data, entry.max_plate_nesting),
        model_name=name,
        sites=tuple(entry.sites),
        reference_from=f"reference from {source.model_name} (the same posterior in "
        "another parameterization)",
        note=f"draws of {source.model_name} (the same posterior in another "
        f"parameterization), kept for the sites of {name}",
    )


def rebadged(
    source: Reference,
    info: ModelInfo,
    *,
    model_name: str,
    sites: tuple[str, ...],
    reference_from: str,
    note: str,
    settings: Mapping[str, Any] | None = None,
) -> Reference:
    """``source``'s draws relabelled as the reference of another form of the same posterior.

    The one place that re-badges a reference (a catalog twin's,
    :func:`reparameterized_reference`; a decentered retry's,
    :func:`diagnostics.reparam.retry_reparameterized`): keeps the draws of the
    model's latent sites and of ``sites``, re-runs the checks on them (with the
    source's divergences and energies when it is a NUTS run), takes the model's
    dimension names and plate sizes, and says where the draws came from.

    Parameters
    ----------
    source : Reference
        The draws, of a model with the same posterior whose draws include every
        latent site of the model the reference is for (as deterministic sites).
    info : ModelInfo
        The layout of the model the reference is for.
    model_name : str
        Its name.
    sites : tuple of str
        Its sites of interest.
    reference_from : str
        Where the draws came from, as every output shows it (``settings["reference_from"]``).
    note : str
        One line added to the source's notes.
    settings : dict, optional
        More settings to record (added to the source's).

    Raises
    ------
    IncompatibleError
        When the source's draws lack one of the model's latent sites or of ``sites``.
    """
    wanted = tuple(dict.fromkeys(info.latent + tuple(sites)))
    missing = [k for k in wanted if k not in source.draws]
    if missing:
        raise IncompatibleError(
            f"{source.model_name!r} cannot stand in for {model_name!r}: its draws lack "
            f"{', '.join(missing)}; record them as deterministic sites of {source.model_name!r}"
        )
    draws = {k: source.draws[k] for k in wanted}
    nuts = source.kind == NUTS_KIND
    # the source's log density is another parameterization's (its Jacobian differs):
    # kept under a name that says so, never as this model's ``lp``
    stats = {("lp_source" if k == "lp" else k): v for k, v in source.sample_stats.items()}
    # every site's dimension names from this model: its latent sites and the observed
    # sites of log_likelihood and observed_data (named by their plates, not ``y_dim_0``)
    shown = set(wanted) | set(source.log_likelihood) | set(source.observed_data)
    checks = run_checks(
        draws,
        tuple(sites),
        source.num_divergences if nuts else None,
        source.sample_stats.get("energy") if nuts else None,
    )
    # the same posterior in another parameterization: its modes are this model's
    checks = (*checks, *(c for c in source.checks if c.name in STORED_CHECKS))
    return dataclasses.replace(
        source,
        model_name=model_name,
        draws=draws,
        sites=tuple(sites),
        latent_sites=tuple(info.latent),
        dims={k: v for k, v in info.dims.items() if k in shown},
        plate_sizes=dict(info.plate_sizes),
        sample_stats=stats,
        checks=checks,
        trusted=all(c.ok for c in checks),
        settings={**source.settings, "reference_from": reference_from, **(settings or {})},
        notes=source.notes + (note,),
    )
