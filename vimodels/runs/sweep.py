"""Run a comparison grid on an executor, resumably, and report on all of it.

:func:`run_sweep` turns a :class:`~vimodels.runs.config.SweepConfig` into
tasks: one :class:`~vimodels.runs.tasks.Task` per model x guide x ELBO x seed
(guides hand-written for another model family are left out and listed), and
one :class:`~vimodels.runs.tasks.ReferenceTask` per model that needs NUTS
(exact references are drawn here, in a blink). Tasks whose folder is already
finished are not run again; the others go to the executor together, and a
task that fails is reported with its inputs while the rest finish.

Ctrl-C stops the executor (queued tasks cancelled, running fits interrupted
and given time to save a partial result, see :mod:`vimodels.runs.executors`);
the report is then written from what finished, marked partial, with the
cells not finished listed. Finished task folders are reused by a rerun.

Then, per model and seed, the stored fits are compared with the model's
reference (:func:`diagnostics.comparison.compare`, the same numbers ``vimodels
compare`` gives), and :mod:`vimodels.runs.report` writes the combined
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

from diagnostics import metrics
from diagnostics.comparison import compare
from diagnostics.convert import group_arrays
from diagnostics.references import get_reference
from guides.registry import get_guide_spec
from vimodels.catalog.registry import get_model
from vimodels.errors import OptionError, VimodelsError
from vimodels.io import ensure_dir, safe_name
from vimodels.runs.config import SweepConfig, default_elbos, default_guides
from vimodels.runs.executors import Outcome, TaskCancelled, TaskInterrupted, make_executor
from vimodels.runs.records import Failure, SweepRun
from vimodels.runs.report import write_sweep_report
from vimodels.runs.tasks import (
    ReferenceTask,
    StoredFit,
    Task,
    drop_partial,
    execute,
    is_done,
    load_fit,
    load_partial,
    make_reference_task,
    make_task,
)
from vimodels.svi.by_optimizer import options_for_guide

if TYPE_CHECKING:
    from diagnostics.comparison import Comparison
    from diagnostics.nuts.reference import Reference

FITS = "fits"


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


def grid(config: SweepConfig) -> tuple[list[Task], list[str]]:
    """The fit tasks of a sweep, and the cells left out (with the reason)."""
    tasks, skipped = [], []
    for model in config.models:
        entry = get_model(model)
        for guide in config.guides or default_guides(entry):
            try:
                get_guide_spec(guide, entry.family)
            except VimodelsError as exc:
                skipped.append(f"{model} {guide}: {exc}")
                continue
            for elbo in config.elbos or default_elbos(entry):
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

    entry = get_model(model)
    exact = entry.exact_posterior() if entry.exact is not None else None
    return kind == "nuts" or (kind == "auto" and (exact is None or exact.sampler is None))


@dataclass(frozen=True, eq=False)
class TaskRun:
    """What :func:`run_tasks` did.

    Attributes
    ----------
    outcomes : list of Outcome
        One per task that came back (reference tasks always run: the cache makes
        them cheap).
    executed, reused : list of Task
        Fit tasks handed to the executor, and fit tasks found finished.
    interrupted : bool
        Ctrl-C stopped the run: tasks without an outcome did not finish (look
        for their folders with :func:`~vimodels.runs.tasks.is_done` and
        :func:`~vimodels.runs.tasks.load_partial`).
    """

    outcomes: list[Outcome]
    executed: list[Task]
    reused: list[Task]
    interrupted: bool = False


def run_tasks(
    tasks: Sequence[Task | ReferenceTask],
    fits_dir: str | Path,
    executor: Any,
    say: Callable[[str], None] = lambda msg: None,
) -> TaskRun:
    """Run the unfinished tasks on ``executor``; on Ctrl-C, stop it and say so.

    Partial results of earlier interrupted runs are dropped first: a partial
    result found after this call was written by it.
    """
    fits_dir = ensure_dir(fits_dir).resolve()
    reused = [t for t in tasks if isinstance(t, Task) and is_done(t, fits_dir)]
    done = set(reused)
    todo = [t for t in tasks if not (isinstance(t, Task) and t in done)]
    executed = [t for t in todo if isinstance(t, Task)]
    for t in executed:
        drop_partial(t, fits_dir)
    if reused:
        say(f"{len(reused)} fit(s) already finished in {fits_dir}; not run again")
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    try:
        for k, outcome in enumerate(executor.map(partial(execute, out_dir=str(fits_dir)), todo)):
            outcomes.append(outcome)
            state = "done  " if outcome.ok else "FAILED"
            detail = "" if outcome.ok else f": {outcome.error}"
            say(
                f"[{k + 1}/{len(todo)}] {state} {outcome.task.label} "
                f"({time.perf_counter() - t0:.0f} s){detail}"
            )
    except KeyboardInterrupt:
        say(
            "interrupted: stopping; running fits save what they learned (not on Dask); "
            "Ctrl-C again to quit now"
        )
        executor.interrupt()
        return TaskRun(outcomes, executed, reused, interrupted=True)
    return TaskRun(outcomes, executed, reused)


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
        See :func:`vimodels.runs.config.load_config`.
    out : path
        Output folder; on a cluster, a folder every worker can write to.
    executor : str or executor
        ``local``, ``dask``, ``serial``, or an executor from :mod:`vimodels.runs.executors`
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
        ran = run_tasks(list(ref_tasks.values()) + tasks, out / FITS, ex, say)
    finally:
        if owned:
            ex.close()
    outcomes, executed, reused = ran.outcomes, ran.executed, ran.reused
    failures = [_failure(o) for o in outcomes if not o.ok and not _stopped(o, ran.interrupted)]
    references: dict[str, Reference] = {
        o.task.model: o.result for o in outcomes if o.ok and isinstance(o.task, ReferenceTask)
    }
    for model in config.models:
        if model not in ref_tasks:
            references[model] = get_reference(
                model, kind=config.reference, seed=config.reference_seed
            )
    failed = {o.task for o in outcomes if not o.ok and not _stopped(o, ran.interrupted)}
    fits_of = _collect(tasks, failed, out / FITS, ran.interrupted)
    not_run = [t for t in tasks if t not in failed and t not in fits_of]
    stopped = {t for t, f in fits_of.items() if f.status == "interrupted"}  # partial results
    if ran.interrupted:
        say(
            f"interrupted: {len(fits_of)} of {len(tasks)} fit(s) to report, "
            f"{len(not_run)} not finished"
        )
        if not fits_of:
            raise KeyboardInterrupt("no fit of the sweep had finished: nothing to report")
    comparisons, rows, site_rows = {}, [], []
    for model in config.models:
        for seed in config.seeds:
            group = [t for t in tasks if t in fits_of and t.model == model and t.seed == seed]
            lost = [
                f"{f.guide}/{f.elbo}: {f.error}"
                for f in failures
                if f.stage == "fit" and f.model == model and f.seed == seed
            ]
            missing = [
                f"{t.guide}/{t.elbo}" for t in not_run if t.model == model and t.seed == seed
            ]
            if not group:
                continue
            fits = {f"{t.guide}/{t.elbo}": fits_of[t] for t in group}
            if model not in references:
                rows.append(_fit_rows(fits, model, seed))
                continue
            try:
                c = _compare(fits, references[model], config, seed, lost)
                if ran.interrupted:
                    c = dataclasses.replace(c, partial=True, not_run=tuple(missing))
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
        executed=tuple(
            t for t in executed if not ran.interrupted or (t in fits_of and t not in stopped)
        ),
        reused=tuple(reused),
        failures=tuple(failures),
        skipped=tuple(skipped),
        references=references,
        comparisons=comparisons,
        summary=summary,
        sites=sites,
        by_method=by_method(summary),
        wall_time=time.perf_counter() - t0,
        partial=ran.interrupted,
        not_run=tuple(t.label for t in not_run),
    )
    return dataclasses.replace(run, files=write_sweep_report(run))


def _stopped(outcome: Outcome, interrupted: bool) -> bool:
    """An outcome of the interruption itself (not a failure of the task)."""
    return interrupted and bool(outcome.error) and outcome.error.startswith(_STOP_ERRORS)


_STOP_ERRORS = (TaskInterrupted.__name__, TaskCancelled.__name__)


def _collect(
    tasks: Sequence[Task], failed: set, fits_dir: Path, interrupted: bool
) -> dict[Task, StoredFit]:
    """The stored fit of every task that finished (and, after Ctrl-C, every partial one)."""
    out = {}
    for t in tasks:
        if t in failed:
            continue
        if not interrupted or is_done(t, fits_dir):
            out[t] = load_fit(t, fits_dir)
        elif (stored := load_partial(t, fits_dir)) is not None:
            out[t] = stored
    return out


def _compare(
    fits: Mapping[str, StoredFit], reference: Any, config: SweepConfig, seed: int, lost: list[str]
) -> Comparison:

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
                "failed": f.status in ("nonfinite", "diverged"),
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


@dataclass(frozen=True, eq=False)
class ExecutorFits:
    """The fits :func:`fit_with_executor` got.

    Attributes
    ----------
    fits : tuple of StoredFit
        In grid order: the finished fits and, after Ctrl-C, the partial ones
        (status ``interrupted``).
    skipped : tuple of str
        ``"<guide>/<elbo>: <error>"`` for each fit that failed.
    partial : bool
        Ctrl-C interrupted the grid.
    not_run : tuple of str
        ``"<guide>/<elbo>"`` of the cells with neither a finished nor a partial fit.
    """

    fits: tuple[StoredFit, ...]
    skipped: tuple[str, ...]
    partial: bool = False
    not_run: tuple[str, ...] = ()


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
) -> ExecutorFits:
    """The guide x ELBO fits of ``vimodels compare`` as tasks on an executor.

    Task folders go to ``out/fits`` (a temporary folder when ``out`` is None),
    so a rerun with the same settings reuses finished fits. On Ctrl-C the
    executor is stopped and what finished (or stopped early with a partial
    result) is returned, marked partial.
    """
    tasks = [
        make_task(
            model,
            g,
            e,
            seed=seed,
            steps=steps,
            options=options_for_guide(fit_options or {}, g),
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
            ran = run_tasks(tasks, fits_dir, ex, say)
        finally:
            if owned:
                ex.close()
        failed = {
            o.task: o.error for o in ran.outcomes if not o.ok and not _stopped(o, ran.interrupted)
        }
        fits_of = _collect(tasks, set(failed), fits_dir, ran.interrupted)
    return ExecutorFits(
        fits=tuple(fits_of[t] for t in tasks if t in fits_of),
        skipped=tuple(f"{t.guide}/{t.elbo}: {failed[t]}" for t in tasks if t in failed),
        partial=ran.interrupted,
        not_run=tuple(f"{t.guide}/{t.elbo}" for t in tasks if t not in fits_of and t not in failed),
    )


def default_out(config_path: str | Path) -> Path:
    """``runs/sweep/<config stem>``."""
    return Path("runs") / "sweep" / safe_name(Path(config_path).stem)
