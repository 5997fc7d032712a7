"""Run independent tasks on this machine or on a Dask cluster, one interface.

Every executor has ``map(fn, tasks)``, which yields one :class:`Outcome` per
task, in the order tasks finish. ``fn(task)`` runs in a worker; an exception
it raises comes back as the outcome's ``error`` (with the worker's
traceback), so one failing task never stops the others. A worker process
that dies (out of memory, a crash in native code) costs only the task it was
running:

- :class:`LocalExecutor`: a pool of spawned processes on this machine. When a
  worker dies, the tasks that were in flight are rerun one at a time in a
  fresh process, which pins the crash on the task that causes it; the rest
  go on in a new pool.
- :class:`DaskExecutor`: Dask distributed, on a :class:`~distributed.LocalCluster`
  it starts (worker processes, one thread each) or on a running cluster at a
  scheduler address. Dask reruns a task whose worker was lost and reports
  ``KilledWorker`` for a task that keeps killing workers.
- :class:`SerialExecutor`: in this process, one task after another (for
  debugging: breakpoints and profilers work).

Executors are context managers; a pool or cluster starts on the first
``map`` and is reused by later calls until :meth:`close`.

Tasks and ``fn`` must be picklable (module-level functions, plain records).
Dask is imported only when a :class:`DaskExecutor` starts.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from vimodels.errors import OptionError, VimodelsError, check_option

EXECUTORS = ("local", "dask", "serial")
WORKER_LOST = "WorkerLost"


@dataclass(frozen=True)
class Outcome:
    """What running one task gave.

    Attributes
    ----------
    task : object
        The task as submitted.
    result : object
        ``fn(task)``; ``None`` when the task failed.
    error : str or None
        ``"<ExceptionType>: <message>"`` when the task failed, else ``None``.
    traceback : str
        The worker's traceback of the failure (empty when none).
    """

    task: Any
    result: Any = None
    error: str | None = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        """True when the task returned normally."""
        return self.error is None


def call_guarded(fn: Callable[[Any], Any], task: Any) -> tuple[Any, str | None, str]:
    """``(fn(task), None, "")``, or ``(None, error line, traceback)`` if it raises.

    Runs inside the worker, so failures travel back as data.
    """
    try:
        return fn(task), None, ""
    except Exception as exc:
        return None, _error_line(exc), traceback.format_exc()


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _outcome(task: Any, payload: tuple[Any, str | None, str]) -> Outcome:
    value, error, tb = payload
    return Outcome(task, value, error, tb)


class _Base:
    name = "base"

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release workers (nothing to release here)."""

    def describe(self) -> str:
        """One line: what runs the tasks."""
        return self.name


class SerialExecutor(_Base):
    """Run tasks in this process, one after another."""

    name = "serial"

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Outcome]:
        """Yield one :class:`Outcome` per task, in order."""
        for task in tasks:
            yield _outcome(task, call_guarded(fn, task))

    def describe(self) -> str:
        """One line: what runs the tasks."""
        return "serial (this process)"


class LocalExecutor(_Base):
    """A pool of spawned worker processes on this machine.

    Parameters
    ----------
    max_workers : int, optional
        Worker processes; default ``os.cpu_count()``. They start on demand (never
        more than the tasks in flight) and stay up for later ``map`` calls.
    """

    name = "local"

    def __init__(self, max_workers: int | None = None):
        if max_workers is not None:
            check_option("max_workers", max_workers, kind=int, low=1)
        self.max_workers = max_workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def describe(self) -> str:
        """One line: what runs the tasks."""
        return f"local process pool (up to {self.max_workers} workers)"

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.max_workers, mp_context=ctx)
        return self._pool

    def _shutdown(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the worker processes (they exit in the background)."""
        self._shutdown(wait=False)

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Outcome]:
        """Yield one :class:`Outcome` per task, in the order they finish."""
        queue = list(tasks)
        size = min(self.max_workers, len(queue))
        while queue:
            unfinished = yield from self._run(fn, queue)
            if not unfinished:
                return
            # A worker died. Tasks run in submission order, so the ones in flight
            # were the first ``size + 1`` unfinished (the pool queues one extra).
            # Rerun those alone to find which one kills its process.
            suspects, queue = unfinished[: size + 1], unfinished[size + 1 :]
            for task in suspects:
                again = yield from self._run(fn, [task])
                if again:
                    yield Outcome(
                        task,
                        error=f"{WORKER_LOST}: the worker process died while running this "
                        "task (alone in its process): out of memory or a crash in native code",
                    )

    def _run(self, fn: Callable, tasks: list) -> Iterator[Outcome]:
        """Run ``tasks``; yield outcomes; return the tasks cut short by a dead worker."""
        pool = self._get_pool()
        futures: dict[Future, int] = {}
        try:
            for i, task in enumerate(tasks):
                futures[pool.submit(fn, task)] = i
        except BrokenProcessPool:
            pass
        cut: set[int] = set(range(len(tasks))) - set(futures.values())
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=futures.__getitem__):
                i = futures[fut]
                try:
                    payload = (fut.result(), None, "")
                except BrokenProcessPool:
                    cut.add(i)
                    continue
                except Exception as exc:  # raised by the task, or a pickling error
                    remote = exc.__cause__  # the worker's traceback, as text
                    payload = (None, _error_line(exc), str(remote or traceback.format_exc()))
                yield _outcome(tasks[i], payload)
        if cut:
            self._shutdown()
        return [tasks[i] for i in sorted(cut)]


class DaskExecutor(_Base):
    """Dask distributed: a LocalCluster started here, or a running cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); default: start a
        :class:`~distributed.LocalCluster` of worker processes.
    n_workers : int, optional
        Workers of the LocalCluster; default ``os.cpu_count()``.
    timeout : float
        Seconds to wait for a scheduler to answer.
    **cluster_options
        Passed to :class:`~distributed.LocalCluster` (``dashboard_address`` ...).
    """

    name = "dask"

    def __init__(
        self,
        scheduler: str | None = None,
        n_workers: int | None = None,
        *,
        timeout: float = 30.0,
        **cluster_options: Any,
    ):
        if n_workers is not None:
            check_option("n_workers", n_workers, kind=int, low=1)
        if scheduler is not None and not isinstance(scheduler, str):
            raise OptionError(f"scheduler must be an address string, got {scheduler!r}")
        self.scheduler = scheduler
        self.n_workers = n_workers or os.cpu_count() or 1
        self.timeout = timeout
        self.cluster_options = cluster_options
        self._client: Any = None
        self._cluster: Any = None

    def describe(self) -> str:
        """One line: what runs the tasks."""
        if self.scheduler:
            return f"dask cluster at {self.scheduler}"
        return f"dask LocalCluster ({self.n_workers} worker processes, 1 thread each)"

    @property
    def client(self) -> Any:
        """The :class:`distributed.Client` (connects or starts the cluster on first use)."""
        if self._client is None:
            distributed = _import_distributed()
            if self.scheduler:
                try:
                    self._client = distributed.Client(self.scheduler, timeout=self.timeout)
                except (OSError, TimeoutError) as exc:
                    raise VimodelsError(
                        f"cannot reach the dask scheduler at {self.scheduler!r}: {exc}"
                    ) from exc
            else:
                options = {"threads_per_worker": 1, "processes": True}
                options.update(self.cluster_options)
                self._cluster = distributed.LocalCluster(n_workers=self.n_workers, **options)
                self._client = distributed.Client(self._cluster)
        return self._client

    def close(self) -> None:
        """Disconnect; stop the LocalCluster if this executor started it."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Outcome]:
        """Yield one :class:`Outcome` per task, in the order they finish."""
        tasks = list(tasks)
        if not tasks:
            return
        distributed = _import_distributed()
        client = self.client
        batch = uuid.uuid4().hex[:8]
        label = getattr(fn, "__name__", None) or getattr(
            getattr(fn, "func", None), "__name__", "task"
        )
        futures = {
            client.submit(call_guarded, fn, task, key=f"{label}-{batch}-{i}", pure=False): i
            for i, task in enumerate(tasks)
        }
        for fut in distributed.as_completed(futures):
            i = futures[fut]
            try:
                payload = fut.result()
            except Exception as exc:  # KilledWorker, lost connection, pickling
                payload = (None, _error_line(exc), traceback.format_exc())
            fut.release()
            yield _outcome(tasks[i], payload)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise VimodelsError(
            "the dask executor needs Dask distributed: install the 'dask' extra "
            "(pip install 'vimodels[dask]')"
        ) from exc
    return distributed


def make_executor(
    name: str = "local",
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    **dask_options: Any,
) -> LocalExecutor | DaskExecutor | SerialExecutor:
    """An executor by name.

    Parameters
    ----------
    name : str
        ``local`` (process pool), ``dask`` or ``serial``.
    scheduler : str, optional
        Dask scheduler address (``dask`` only).
    workers : int, optional
        Processes of the local pool or of the Dask LocalCluster; default the cores.
    **dask_options
        Passed to :class:`DaskExecutor`.
    """
    if name not in EXECUTORS:
        raise OptionError(f"unknown executor {name!r}; valid executors are: {', '.join(EXECUTORS)}")
    if (scheduler is not None or dask_options) and name != "dask":
        raise OptionError("a scheduler address needs the dask executor (--executor dask)")
    if name == "dask":
        return DaskExecutor(scheduler, workers, **dask_options)
    if name == "local":
        return LocalExecutor(workers)
    return SerialExecutor()
