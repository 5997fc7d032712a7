"""Records of a sweep: what ran, what failed, what was found."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vimodels.runs.config import SweepConfig
from vimodels.runs.tasks import Task


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
        Fits run by this call (the others were finished before); after Ctrl-C,
        those that finished.
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
        :func:`diagnostics.comparison.compare`'s summary.
    sites : DataFrame
        One row per model, seed, method and site element.
    by_method : DataFrame
        One row per model and method: mean and sd over seeds.
    wall_time : float
        Seconds the whole call took.
    files : dict of str to Path
    partial : bool
        True when Ctrl-C interrupted the run: the tables cover what finished.
    not_run : tuple of str
        Labels of the fits not finished because of the interruption (a fit
        stopped early with a partial result is in the tables instead, status
        ``interrupted``).
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
    partial: bool = False
    not_run: tuple[str, ...] = ()
