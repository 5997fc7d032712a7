"""The comparison grid: fit guides x ELBOs, get the reference, compare, write the report.

:func:`run_compare` is what ``vimodels compare`` runs. The fits run in this
process, or as tasks on an executor (:func:`vimodels.runs.sweep.fit_with_executor`)
that writes one folder per fit and reuses finished ones.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnostics.comparison import Comparison, compare, method_name
from diagnostics.nuts.reference import Reference
from diagnostics.references import get_reference
from diagnostics.report import write_report
from vimodels.catalog.base import CatalogEntry
from vimodels.errors import IncompatibleError, OptionError, VimodelsError, check_option
from vimodels.resolve import resolve_model
from vimodels.runs.config import check_grid_names, default_elbos, default_guides
from vimodels.runs.sweep import fit_with_executor
from vimodels.svi.by_optimizer import options_for_guide
from vimodels.svi.draws import model_info
from vimodels.svi.fit import fit


@dataclass(frozen=True, eq=False)
class CompareRun:
    """What :func:`run_compare` produced.

    Attributes
    ----------
    comparison : Comparison
    files : dict of str to Path
        Files written (empty when no output folder was given).
    """

    comparison: Comparison
    files: dict[str, Path]


def run_compare(
    model: str | CatalogEntry | Callable,
    guides: Sequence[str] | None = None,
    elbos: Sequence[str] | None = None,
    steps: int = 2000,
    out: str | Path | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    reference: str | Reference = "auto",
    seed: int = 0,
    num_draws: int = 4000,
    iwae_k: int = 50,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    nuts_settings: Mapping[str, Any] | None = None,
    num_workers: int | None = None,
    fit_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    netcdf: bool = True,
    executor: Any = None,
    sites: Sequence[str] | None = None,
) -> CompareRun:
    """Fit a grid of guides x ELBOs, get the reference, compare, write the report.

    Parameters
    ----------
    model : str, CatalogEntry or callable
        Catalog name or entry, or a Pyro model with ``data``.
    guides : sequence of str, optional
        Default :func:`default_guides`.
    elbos : sequence of str, optional
        ELBO names; default :func:`~vimodels.runs.config.default_elbos` (``enum``
        for a model with discrete latent sites, else ``trace``).
    steps : int
        Maximum SVI steps per fit.
    out : path, optional
        Output folder; nothing is written when omitted.
    data : dict, optional
        Data for a user model.
    reference : str or Reference
        ``auto`` (exact draws where the catalog has a sampler, else NUTS), ``nuts``,
        ``exact``, or a Reference already computed.
    seed : int
        Seed of the fits, the reference and the draws.
    num_draws, iwae_k
        Passed to :func:`compare`.
    cache, cache_dir, nuts_settings, num_workers
        Passed to :func:`~diagnostics.nuts.reference.run_nuts`.
    fit_options : dict, optional
        Extra keyword arguments of :func:`vimodels.svi.fit.fit` (``lr``, ``num_particles`` ...).
    progress : bool
        One line per stage on stderr.
    netcdf : bool
        Write one netcdf file per method and one for the reference.
    executor : str or executor, optional
        Run the fits as tasks (:mod:`vimodels.runs.tasks`) on ``local`` (a process
        pool), ``dask``, ``serial`` or an executor object, writing ``out/fits/``
        and reusing fits finished there before; a catalog model with its own
        data only. Default: fit in this process.
    sites : sequence of str, optional
        Sites of interest (checked in the reference and reported); default the
        entry's, or every latent and deterministic site of a user model.

    Returns
    -------
    CompareRun
    """
    check_option("steps", steps, kind=int, low=1)
    entry, fn, data_dict, name = resolve_model(model, data)
    if entry is not None and entry.amortized:
        raise IncompatibleError(
            f"{name!r} is amortized (a latent per image): its posterior has no global sites "
            "for NUTS to compare against; run `vimodels vae` (trains the encoder per "
            "objective, NUTS on z for a few test images, writes the report)"
        )
    guides = tuple(guides) if guides else default_guides(entry)
    if not elbos:  # enum for a model with discrete latent sites, else trace
        discrete = entry is None and bool(model_info(fn, (), data_dict).discrete)
        elbos = default_elbos(entry, discrete)
    elbos = tuple(elbos)
    check_grid_names(guides, elbos, entry)  # a typo stops here, before any work
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if isinstance(reference, Reference):
        ref = reference
    else:
        say(f"reference for {name} ({reference}) ...")
        ref = get_reference(
            entry if entry is not None else fn,
            data,
            kind=reference,
            settings=nuts_settings,
            seed=seed,
            cache=cache,
            cache_dir=cache_dir,
            num_workers=num_workers,
            progress=progress,
            **({"sites": tuple(sites)} if sites else {}),
        )
        say(
            f"  {ref.describe()}" + (" [cached]" if ref.from_cache else f" [{ref.wall_time:.0f} s]")
        )
    results, skipped = [], []
    partial, not_run = False, []
    options = dict(fit_options or {})
    options.setdefault("progress", False)
    if executor is not None:
        if entry is None or data is not None:
            raise OptionError("an executor runs catalog models by name, with their own data")
        got = fit_with_executor(
            entry.name,
            guides,
            elbos,
            steps=steps,
            seed=seed,
            fit_options=options,
            num_draws=num_draws,
            num_evidence=20000,  # compare()'s default, used below
            executor=executor,
            out=out,
            say=say,
        )
        results, skipped = list(got.fits), list(got.skipped)
        partial, not_run = got.partial, list(got.not_run)
        guides = ()  # fitted by the executor: the loop below has nothing left to do
    cells = [(guide, elbo) for guide in guides for elbo in elbos]
    for i, (guide, elbo) in enumerate(cells):
        try:
            r = fit(
                entry if entry is not None else fn,
                data,
                guide=guide,
                elbo=elbo,
                num_steps=steps,
                seed=seed,
                **({"sites": tuple(sites)} if sites else {}),
                **options_for_guide(options, guide),
            )
        except (IncompatibleError, OptionError) as exc:
            skipped.append(f"{guide}/{elbo}: {exc}")
            say(f"  skipped {guide}/{elbo}: {exc}")
            continue
        except KeyboardInterrupt:  # outside fit()'s step loop (setup): this cell is lost
            partial, not_run = True, [f"{g}/{e}" for g, e in cells[i:]]
            break
        say(f"  {method_name(r)}: {r.message} ({r.wall_time:.1f} s)")
        if r.status == "interrupted":  # Ctrl-C: keep what was learned, run nothing more
            partial, not_run = True, [f"{g}/{e}" for g, e in cells[i + 1 :]]
            if r.num_steps > 0:
                results.append(r)
            else:
                not_run.insert(0, f"{guide}/{elbo}")
            break
        results.append(r)
    if not results:
        if partial:
            raise KeyboardInterrupt("no fit of the grid had finished: nothing to report")
        raise VimodelsError("no guide/ELBO pair of the grid could be fitted: " + "; ".join(skipped))
    if partial:
        say("  interrupted: methods not run: " + (", ".join(not_run) or "none"))
    comparison = compare(
        results, ref, num_draws=num_draws, iwae_k=iwae_k, seed=seed, sites=sites or None
    )
    if skipped or partial:
        comparison = dataclasses.replace(
            comparison, skipped=tuple(skipped), partial=partial, not_run=tuple(not_run)
        )
    files = write_report(comparison, out, netcdf=netcdf) if out is not None else {}
    return CompareRun(comparison, files)
