"""Run a comparison grid on an executor, resumably, and report on all of it.

:func:`run_sweep` turns a :class:`~diagnostics.sweep_config.SweepConfig` into
tasks: one :class:`~diagnostics.tasks.Task` per model x guide x ELBO x seed
(guides hand-written for another model family are left out and listed), and
one :class:`~diagnostics.tasks.ReferenceTask` per model that needs NUTS
(exact references are drawn here, in a blink). Tasks whose folder is already
finished are not run again; the others go to the executor together, and a
task that fails is reported with its inputs while the rest finish.

Then, per model and seed, the stored fits are compared with the model's
reference (:func:`diagnostics.compare.compare`, the same numbers ``vimodels
compare`` gives), and :mod:`diagnostics.sweep_report` writes the combined
report. Output folder::

    fits/<task folder>/            draws.nc, arrays.npz, summary.json (one per fit)
    reports/<model>/seed<k>/       a full compare report (unless reports = false)
    summary.csv  sites.csv  by_method.csv  sweep.json  report.md  report.html
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from diagnostics.executors import Outcome, make_executor
from diagnostics.sweep_config import SweepConfig
from diagnostics.tasks import (
    ReferenceTask,
    StoredFit,
    Task,
    execute,
    is_done,
    load_fit,
    make_reference_task,
    make_task,
)
from vimodels.errors import OptionError, VimodelsError
from vimodels.io import ensure_dir, safe_name

if TYPE_CHECKING:
    from diagnostics.compare import Comparison
    from diagnostics.reference import Reference

FITS = "fits"


@dataclass(frozen=True)
class Failure:
    """A task that failed, with its inputs.

    Attributes
    ----------
    stage : str
        ``fit``, ``reference`` or ``compare``.
    model : str
    guide, elbo : str or None
        ``None`` for a reference.
    seed : int or None
    error : str
        ``"<ExceptionType>: <message>"``.
    traceback : str
    """

    stage: str
    model: str
    guide: str | None
    elbo: str | None
    seed: int | None
    error: str
    traceback: str = ""

    @property
    def label(self) -> str:
        """One line naming the inputs and the error."""
        what = " ".join(
            x
            for x in (
                self.model,
                f"{self.guide}/{self.elbo}" if self.guide else None,
                f"seed={self.seed}" if self.seed is not None else None,
            )
            if x
        )
        return f"{self.stage} {what}: {self.error}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dataclasses.asdict(self)


def _failure(outcome: Outcome, stage: str | None = None) -> Failure:
    task = outcome.task
    if isinstance(task, Task):
        return Failure(
            stage or "fit",
            task.model,
            task.guide,
            task.elbo,
            task.seed,
            outcome.error or "",
            outcome.traceback,
        )
    return Failure(
        stage or "reference",
        task.model,
        None,
        None,
        task.seed,
        outcome.error or "",
        outcome.traceback,
    )


@dataclass(frozen=True, eq=False)
class SweepRun:
    """What :func:`run_sweep` did and found.

    Attributes
    ----------
    config : SweepConfig
    out : Path
    executor : str
        Description of the executor.
    tasks : tuple of Task
        Every fit of the grid.
    executed : tuple of Task
        Fits run by this call (the others were finished before).
    reused : tuple of Task
        Fits found finished and not run again.
    failures : tuple of Failure
    skipped : tuple of str
        Grid cells left out (guide not written for the model's family).
    references : dict of str to Reference
    comparisons : dict of (str, int) to Comparison
        Per model and seed.
    summary : DataFrame
        One row per model, seed and method: ``model seed`` then the columns of
        :func:`diagnostics.compare.compare`'s summary.
    sites : DataFrame
        One row per model, seed, method and site element.
    by_method : DataFrame
        One row per model and method: mean and sd over seeds.
    wall_time : float
        Seconds the whole call took.
    files : dict of str to Path
    """

    config: SweepConfig
    out: Path
    executor: str
    tasks: tuple[Task, ...]
    executed: tuple[Task, ...]
    reused: tuple[Task, ...]
    failures: tuple[Failure, ...]
    skipped: tuple[str, ...]
    references: dict[str, Any]
    comparisons: dict[tuple[str, int], Any]
    summary: pd.DataFrame
    sites: pd.DataFrame
    by_method: pd.DataFrame
    wall_time: float
    files: dict[str, Path] = dataclasses.field(default_factory=dict)


def grid(config: SweepConfig) -> tuple[list[Task], list[str]]:
    """The fit tasks of a sweep, and the cells left out (with the reason)."""
    from diagnostics.compare import default_guides
    from guides.registry import get_guide_spec
    from vimodels.catalog.registry import get_model

    tasks, skipped = [], []
    for model in config.models:
        entry = get_model(model)
        for guide in config.guides or default_guides(entry):
            try:
                get_guide_spec(guide, entry.family)
            except VimodelsError as exc:
                skipped.append(f"{model} {guide}: {exc}")
                continue
            for elbo in config.elbos:
                options = dict(config.fit_options)
                if guide in config.guide_options:
                    options["guide_options"] = config.guide_options[guide]
                if elbo in config.elbo_options:
                    options["elbo_options"] = config.elbo_options[elbo]
                for seed in config.seeds:
                    tasks.append(
                        make_task(
                            model,
                            guide,
                            elbo,
                            seed=seed,
                            steps=config.steps,
                            options=options,
                            num_draws=config.num_draws,
                            num_evidence=config.num_evidence,
                        )
                    )
    return tasks, skipped


def _needs_nuts(model: str, kind: str) -> bool:
    from vimodels.catalog.registry import get_model

    entry = get_model(model)
    exact = entry.exact_posterior() if entry.exact is not None else None
    return kind == "nuts" or (kind == "auto" and (exact is None or exact.sampler is None))


def run_tasks(
    tasks: Sequence[Task | ReferenceTask],
    fits_dir: str | Path,
    executor: Any,
    say: Callable[[str], None] = lambda msg: None,
) -> tuple[list[Outcome], list[Task], list[Task]]:
    """Run the unfinished tasks on ``executor``.

    Returns
    -------
    outcomes : list of Outcome
        One per task run (reference tasks always run: the cache makes them cheap).
    executed, reused : list of Task
        Fit tasks run now, and fit tasks found finished.
    """
    fits_dir = ensure_dir(fits_dir).resolve()
    reused = [t for t in tasks if isinstance(t, Task) and is_done(t, fits_dir)]
    done = set(reused)
    todo = [t for t in tasks if not (isinstance(t, Task) and t in done)]
    executed = [t for t in todo if isinstance(t, Task)]
    if reused:
        say(f"{len(reused)} fit(s) already finished in {fits_dir}; not run again")
    outcomes = []
    t0 = time.perf_counter()
    for k, outcome in enumerate(executor.map(partial(execute, out_dir=str(fits_dir)), todo)):
        outcomes.append(outcome)
        state = "done  " if outcome.ok else "FAILED"
        detail = "" if outcome.ok else f": {outcome.error}"
        say(
            f"[{k + 1}/{len(todo)}] {state} {outcome.task.label} "
            f"({time.perf_counter() - t0:.0f} s){detail}"
        )
    return outcomes, executed, reused


def _executor(executor: Any, scheduler: str | None, workers: int | None) -> tuple[Any, bool]:
    if isinstance(executor, str):
        return make_executor(executor, scheduler=scheduler, workers=workers), True
    if scheduler is not None or workers is not None:
        raise OptionError("scheduler and workers apply to an executor given by name")
    return executor, False


def run_sweep(
    config: SweepConfig,
    out: str | Path,
    executor: Any = "local",
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> SweepRun:
    """Run a sweep (skipping finished fits), compare, and write the combined report.

    Parameters
    ----------
    config : SweepConfig
        See :func:`diagnostics.sweep_config.load_config`.
    out : path
        Output folder; on a cluster, a folder every worker can write to.
    executor : str or executor
        ``local``, ``dask``, ``serial``, or an executor from :mod:`diagnostics.executors`
        (left open, so it can be reused).
    scheduler : str, optional
        Dask scheduler address (``executor="dask"``).
    workers : int, optional
        Processes of the local pool or of the Dask LocalCluster.
    progress : bool
        One line per finished task on stderr.

    Returns
    -------
    SweepRun
    """
    from diagnostics.reference import get_reference
    from diagnostics.sweep_report import write_sweep_report

    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    out = ensure_dir(out).resolve()
    tasks, skipped = grid(config)
    ref_tasks = {
        m: make_reference_task(
            m,
            config.nuts,
            seed=config.reference_seed,
            cache=config.cache,
            cache_dir=config.cache_dir,
        )
        for m in config.models
        if _needs_nuts(m, config.reference)
    }
    ex, owned = _executor(executor, scheduler, workers)
    say(
        f"sweep {config.name}: {len(tasks)} fit(s) and {len(ref_tasks)} NUTS reference(s) "
        f"on {ex.describe()}"
    )
    try:
        outcomes, executed, reused = run_tasks(
            list(ref_tasks.values()) + tasks, out / FITS, ex, say
        )
    finally:
        if owned:
            ex.close()
    failures = [_failure(o) for o in outcomes if not o.ok]
    references: dict[str, Reference] = {
        o.task.model: o.result for o in outcomes if o.ok and isinstance(o.task, ReferenceTask)
    }
    for model in config.models:
        if model not in ref_tasks:
            references[model] = get_reference(
                model, kind=config.reference, seed=config.reference_seed
            )
    failed = {o.task for o in outcomes if not o.ok}
    finished = [t for t in tasks if t not in failed]
    comparisons, rows, site_rows = {}, [], []
    for model in config.models:
        for seed in config.seeds:
            group = [t for t in finished if t.model == model and t.seed == seed]
            lost = [
                f"{f.guide}/{f.elbo}: {f.error}"
                for f in failures
                if f.stage == "fit" and f.model == model and f.seed == seed
            ]
            if not group:
                continue
            fits = {f"{t.guide}/{t.elbo}": load_fit(t, out / FITS) for t in group}
            if model not in references:
                rows.append(_fit_rows(fits, model, seed))
                continue
            try:
                c = _compare(fits, references[model], config, seed, lost)
            except VimodelsError as exc:
                failures.append(Failure("compare", model, None, None, seed, str(exc)))
                rows.append(_fit_rows(fits, model, seed))
                continue
            comparisons[(model, seed)] = c
            rows.append(_with_keys(c.summary, model, seed))
            site_rows.append(_with_keys(c.sites, model, seed))
    summary = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    sites = pd.concat(site_rows, ignore_index=True) if site_rows else pd.DataFrame()
    run = SweepRun(
        config=config,
        out=out,
        executor=ex.describe(),
        tasks=tuple(tasks),
        executed=tuple(executed),
        reused=tuple(reused),
        failures=tuple(failures),
        skipped=tuple(skipped),
        references=references,
        comparisons=comparisons,
        summary=summary,
        sites=sites,
        by_method=by_method(summary),
        wall_time=time.perf_counter() - t0,
    )
    return dataclasses.replace(run, files=write_sweep_report(run))


def _compare(
    fits: Mapping[str, StoredFit], reference: Any, config: SweepConfig, seed: int, lost: list[str]
) -> Comparison:
    from diagnostics.compare import compare

    c = compare(
        fits,
        reference,
        num_draws=config.num_draws,
        iwae_k=config.iwae_k,
        num_evidence=config.num_evidence,
        seed=seed,
    )
    return dataclasses.replace(c, skipped=tuple(lost)) if lost else c


def _with_keys(df: pd.DataFrame, model: str, seed: int) -> pd.DataFrame:
    df = df.copy()
    df.insert(0, "seed", seed)
    df.insert(0, "model", model)
    return df


def _fit_rows(fits: Mapping[str, StoredFit], model: str, seed: int) -> pd.DataFrame:
    """Rows without reference metrics (the model has no reference)."""
    from diagnostics import metrics
    from diagnostics.convert import group_arrays

    rows = []
    for name, f in fits.items():
        lw = group_arrays(f.inference_data, "sample_stats")["log_weight"].reshape(-1)
        lw = lw[np.isfinite(lw)]
        elbo, se = metrics.elbo(lw) if len(lw) > 1 else (float("nan"), float("nan"))
        rows.append(
            {
                "method": name,
                "guide": f.guide_name,
                "elbo_name": f.elbo_name,
                "status": f.status,
                "converged": f.converged,
                "num_steps": f.num_steps,
                "wall_time_s": f.wall_time,
                "elbo": elbo,
                "elbo_se": se,
            }
        )
    return _with_keys(pd.DataFrame(rows), model, seed)


AGGREGATED = (
    "elbo",
    "iwae",
    "gap",
    "khat",
    "w1_mean",
    "worst_sd_ratio",
    "coverage_min",
    "sliced_w2",
    "wall_time_s",
)


def by_method(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of the main columns, one row per model and method.

    Columns: ``model method seeds`` then ``<col>_mean`` and ``<col>_sd`` (sd
    with ``ddof=1``, NaN for one seed), then ``converged`` and ``reliable`` as
    the share of seeds.
    """
    if summary.empty:
        return pd.DataFrame()
    out = []
    for (model, method), g in summary.groupby(["model", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "method": method, "seeds": len(g)}
        for col in AGGREGATED:
            if col in g:
                x = g[col].to_numpy(dtype=float)
                row[f"{col}_mean"] = float(np.mean(x))
                row[f"{col}_sd"] = float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")
        for col in ("converged", "reliable"):
            if col in g:
                row[col] = float(g[col].astype(float).mean())
        out.append(row)
    return pd.DataFrame(out)


def fit_with_executor(
    model: str,
    guides: Iterable[str],
    elbos: Iterable[str],
    *,
    steps: int,
    seed: int,
    fit_options: Mapping[str, Any] | None,
    num_draws: int,
    num_evidence: int,
    executor: Any,
    out: str | Path | None,
    say: Callable[[str], None] = lambda msg: None,
) -> tuple[list[StoredFit], list[str]]:
    """The guide x ELBO fits of ``vimodels compare`` as tasks on an executor.

    Task folders go to ``out/fits`` (a temporary folder when ``out`` is None),
    so a rerun with the same settings reuses finished fits.

    Returns
    -------
    fits : list of StoredFit
        In grid order.
    skipped : list of str
        ``"<guide>/<elbo>: <error>"`` for each fit that failed.
    """
    tasks = [
        make_task(
            model,
            g,
            e,
            seed=seed,
            steps=steps,
            options=fit_options,
            num_draws=num_draws,
            num_evidence=num_evidence,
        )
        for g in guides
        for e in elbos
    ]
    ex, owned = _executor(executor, None, None)
    with tempfile.TemporaryDirectory(prefix="vimodels-fits-") as tmp:
        fits_dir = Path(out) / FITS if out is not None else Path(tmp)
        try:
            outcomes, _, _ = run_tasks(tasks, fits_dir, ex, say)
        finally:
            if owned:
                ex.close()
        failed = {o.task: o.error for o in outcomes if not o.ok}
        fits = [load_fit(t, fits_dir) for t in tasks if t not in failed]
    skipped = [f"{t.guide}/{t.elbo}: {failed[t]}" for t in tasks if t in failed]
    return fits, skipped


def default_out(config_path: str | Path) -> Path:
    """``runs/sweep/<config stem>``."""
    return Path("runs") / "sweep" / safe_name(Path(config_path).stem)
