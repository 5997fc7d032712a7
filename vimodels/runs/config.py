"""The sweep configuration: a TOML file naming the grid, read and checked.

Example (every key but ``models`` is optional)::

    models = ["eight_schools_noncentered", "conjugate_linear_regression"]
    guides = ["auto_normal", "auto_multivariate_normal"]  # default: each model's defaults
    elbos = ["trace"]                     # default: each model's (enum for discrete sites)
    seeds = [0, 1]                                        # default [0]
    steps = 2000                                          # default 2000
    cache = "refcache"        # reference cache folder (relative to this file); false: none

    [fit]                     # other vimodels.svi.fit options, for every task
    lr = 0.02

    [guide_options.auto_iaf_normal]   # options of one guide
    hidden_dim = [20]

    [elbo_options.renyi]              # options of one ELBO
    alpha = 0.5

    [compare]
    draws = 4000              # guide draws per fit for the metrics
    iwae_k = 50
    num_evidence = 20000      # draws for log p(x) where no exact value exists
    reference = "auto"        # auto | nuts | exact
    reference_seed = 0
    reports = true            # a full compare report per model and seed

    [nuts]                    # overrides of the models' NUTS settings
    num_chains = 4

Every mistake raises :class:`~vimodels.errors.VimodelsError` naming the file
and the key, and listing the valid names.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guides.registry import get_guide_spec, guide_names
from vimodels.catalog.base import CatalogEntry, NutsSettings
from vimodels.catalog.registry import get_model
from vimodels.errors import OptionError, UnknownNameError, VimodelsError
from vimodels.runs.tasks import fit_option_names
from vimodels.svi.elbos import ELBOS, get_elbo_spec

TOP_KEYS = (
    "models",
    "guides",
    "elbos",
    "seeds",
    "steps",
    "cache",
    "fit",
    "guide_options",
    "elbo_options",
    "compare",
    "nuts",
)
COMPARE_KEYS = ("draws", "iwae_k", "num_evidence", "reference", "reference_seed", "reports")
REFERENCE_KINDS = ("auto", "nuts", "exact", "external")


@dataclass(frozen=True)
class SweepConfig:
    """A checked sweep grid: models x guides x ELBOs x seeds, and the comparison settings.

    Attributes
    ----------
    models : tuple of str
    guides : tuple of str or None
        ``None``: each model's default guides (see :func:`default_guides`).
    elbos : tuple of str or None
        ``None``: each model's default ELBOs (see :func:`default_elbos`: ``enum``
        for a model with discrete latent sites, else ``trace``).
    seeds : tuple of int
    steps : int
    fit_options : dict
        Other :func:`vimodels.svi.fit.fit` options for every task.
    guide_options, elbo_options : dict of str to dict
        Options per guide and per ELBO name.
    num_draws, iwae_k, num_evidence : int
        Passed to :func:`diagnostics.comparison.compare`.
    reference : str
        ``auto``, ``nuts`` or ``exact``.
    reference_seed : int
    nuts : dict
        NUTS setting overrides.
    cache : bool
        Use the reference cache.
    cache_dir : str or None
        Reference cache folder; default :func:`diagnostics.nuts.reference.default_cache_dir`.
    reports : bool
        Write a full compare report per model and seed.
    name : str
        Name of the sweep (the file's stem).
    """

    models: tuple[str, ...]
    guides: tuple[str, ...] | None = None
    elbos: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    steps: int = 2000
    fit_options: dict[str, Any] = field(default_factory=dict)
    guide_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    elbo_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_draws: int = 4000
    iwae_k: int = 50
    num_evidence: int = 20000
    reference: str = "auto"
    reference_seed: int = 0
    nuts: dict[str, Any] = field(default_factory=dict)
    cache: bool = True
    cache_dir: str | None = None
    reports: bool = True
    name: str = "sweep"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _err(where: str, msg: str) -> OptionError:
    return OptionError(f"{where}: {msg}")


def _names(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _err(where, f"{key} must be a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise _err(where, f"{key} lists a name twice: {value}")
    return tuple(value)


def _int(where: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _err(where, f"{key} must be an integer >= {low}, got {value!r}")
    return value


def _table(where: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _err(where, f"[{key}] must be a table, got {value!r}")
    return dict(value)


def _unknown(where: str, what: str, given: Any, valid: Any) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise _err(
            where,
            f"unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(valid))}",
        )


def config_from_dict(
    raw: Mapping[str, Any], *, where: str = "sweep config", base_dir: str | os.PathLike = "."
) -> SweepConfig:
    """Check a parsed configuration and build a :class:`SweepConfig`.

    Parameters
    ----------
    raw : dict
        The parsed TOML.
    where : str
        How errors name the source (the file path).
    base_dir : path
        Folder that a relative ``cache`` path is relative to.
    """
    _unknown(where, "key(s)", raw, TOP_KEYS)
    if "models" not in raw:
        raise _err(where, "needs models = [...] (see `vimodels list models`)")
    models = _names(where, "models", raw["models"])
    entries = []
    for name in models:
        try:
            entries.append(get_model(name))
        except UnknownNameError as exc:
            raise _err(where, str(exc)) from None
    guides = _names(where, "guides", raw["guides"]) if "guides" in raw else None
    for name in guides or ():
        if name not in guide_names(None):
            raise _err(where, str(UnknownNameError("guide", name, guide_names(None))))
    if guides is not None:
        usable = [g for g in guides if any(_fits(get_guide_spec, g, e.family) for e in entries)]
        if not usable:
            raise _err(where, f"no guide in {list(guides)} serves any model of the sweep")
    elbos = _names(where, "elbos", raw["elbos"]) if "elbos" in raw else None
    for name in elbos or ():
        try:
            get_elbo_spec(name)
        except UnknownNameError as exc:
            raise _err(where, str(exc)) from None
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise _err(where, f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    seeds = tuple(_int(where, "each seed", s, 0) for s in seeds)
    if len(set(seeds)) != len(seeds):
        raise _err(where, f"seeds lists a seed twice: {list(seeds)}")
    steps = _int(where, "steps", raw.get("steps", 2000), 1)

    fit_options = _table(where, "fit", raw.get("fit", {}))
    per_name = ("guide_options", "elbo_options")
    _unknown(
        where, "[fit] option(s)", fit_options, set(fit_option_names()) - set(per_name)
    )  # per-guide/ELBO options have their own tables
    tables = {}
    for key, valid in (
        ("guide_options", guides or guide_names(None)),
        ("elbo_options", elbos or tuple(ELBOS)),
    ):
        table = _table(where, key, raw.get(key, {}))
        _unknown(where, f"name(s) in [{key}]", table, valid)
        for name, opts in table.items():
            _table(where, f"{key}.{name}", opts)
        tables[key] = {k: dict(v) for k, v in table.items()}

    compare = _table(where, "compare", raw.get("compare", {}))
    _unknown(where, "[compare] key(s)", compare, COMPARE_KEYS)
    reference = compare.get("reference", "auto")
    if reference not in REFERENCE_KINDS:
        raise _err(
            where,
            f"[compare] reference must be one of {', '.join(REFERENCE_KINDS)}, got {reference!r}",
        )
    if reference == "exact":
        lacking = [e.name for e in entries if not _has_exact_sampler(e)]
        if lacking:
            raise _err(where, f"reference = 'exact' but {', '.join(lacking)} has no exact sampler")
    reports = compare.get("reports", True)
    if not isinstance(reports, bool):
        raise _err(where, f"[compare] reports must be true or false, got {reports!r}")
    nuts = _table(where, "nuts", raw.get("nuts", {}))
    _unknown(where, "[nuts] setting(s)", nuts, [f.name for f in dataclasses.fields(NutsSettings)])
    cache_value = raw.get("cache", True)
    cache, cache_dir = True, None
    if isinstance(cache_value, bool):
        cache = cache_value
    elif isinstance(cache_value, str) and cache_value:
        path = Path(cache_value).expanduser()
        cache_dir = str(path if path.is_absolute() else Path(base_dir) / path)
    else:
        raise _err(where, f"cache must be a folder path, true or false, got {cache_value!r}")
    return SweepConfig(
        models=models,
        guides=guides,
        elbos=elbos,
        seeds=seeds,
        steps=steps,
        fit_options=fit_options,
        guide_options=tables["guide_options"],
        elbo_options=tables["elbo_options"],
        num_draws=_int(where, "[compare] draws", compare.get("draws", 4000), 10),
        iwae_k=_int(where, "[compare] iwae_k", compare.get("iwae_k", 50), 1),
        num_evidence=_int(where, "[compare] num_evidence", compare.get("num_evidence", 20000), 10),
        reference=reference,
        reference_seed=_int(where, "[compare] reference_seed", compare.get("reference_seed", 0), 0),
        nuts=nuts,
        cache=cache,
        cache_dir=cache_dir,
        reports=reports,
        name=Path(where).stem if where.endswith(".toml") else "sweep",
    )


def _fits(get_guide_spec: Any, guide: str, family: str) -> bool:
    try:
        get_guide_spec(guide, family)
    except VimodelsError:
        return False
    return True


def _has_exact_sampler(entry: Any) -> bool:
    exact = entry.exact_posterior() if entry.exact is not None else None
    return exact is not None and exact.sampler is not None


def load_config(path: str | os.PathLike) -> SweepConfig:
    """Read and check a sweep TOML file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise VimodelsError(f"cannot read sweep config {str(path)!r}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VimodelsError(f"{path}: not valid TOML: {exc}") from exc
    return config_from_dict(raw, where=str(path), base_dir=path.resolve().parent)


def default_elbos(entry: CatalogEntry | None, discrete: bool = False) -> tuple[str, ...]:
    """``("enum",)`` for a model with discrete latent sites, else ``("trace",)``.

    Only the ``enum`` ELBO sums discrete sites out; under any other every pair of
    a default comparison of a mixture would be skipped. ``discrete`` says so for a
    user's model (a catalog entry says it itself).
    """
    return ("enum",) if discrete or (entry is not None and entry.discrete) else ("trace",)


def default_guides(entry: CatalogEntry | None) -> tuple[str, ...]:
    """The entry's default guides plus an autoregressive flow (a non-Gaussian family)."""
    if entry is None:
        return ("auto_normal", "auto_multivariate_normal")
    guides = tuple(entry.default_guides)
    if not entry.discrete and not entry.amortized and "auto_iaf_normal" not in guides:
        guides += ("auto_iaf_normal",)
    return guides


def check_grid_names(
    guides: Sequence[str], elbos: Sequence[str], entry: CatalogEntry | None = None
) -> None:
    """Raise UnknownNameError for a guide or ELBO name that no registry knows.

    Names that exist but do not apply to the model (another family's
    hand-written guide, a non-``enum`` ELBO on a discrete model) are not
    refused here: those pairs are skipped, and listed, when they are fitted.
    """
    for elbo in elbos:
        get_elbo_spec(elbo)  # UnknownNameError listing the valid ELBOs
    known = guide_names(None)
    for guide in guides:
        if guide not in known:
            raise UnknownNameError(
                "guide", guide, guide_names(entry.family if entry is not None else None)
            )
