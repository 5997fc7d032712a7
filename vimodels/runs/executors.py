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

Ctrl-C: whoever consumes ``map`` catches :class:`KeyboardInterrupt` and calls
``interrupt()`` (leaving the ``with`` block with it does too), which stops
the run promptly and leaves no worker behind:

- :class:`LocalExecutor`: queued tasks are cancelled; a running task gets one
  ``KeyboardInterrupt`` (a terminal's Ctrl-C reaches the workers too, being
  in the same process group; ``interrupt`` sends one to workers that did not
  get it) and a grace period to save what it has; a second Ctrl-C in a
  worker is ignored while that task finishes. Idle or starting workers
  ignore Ctrl-C, so they never die with a traceback. Workers still alive
  after the grace period are terminated, and all are reaped.
- :class:`SerialExecutor`: the task itself gets the ``KeyboardInterrupt`` and
  ``map`` stops there.
- :class:`DaskExecutor`: the tasks are cancelled and a LocalCluster is shut
  down (its workers ignore Ctrl-C themselves); a task already running is
  lost (Dask cannot interrupt it), or on a remote cluster runs to its end.

Tasks and ``fn`` must be picklable (module-level functions, plain records).
Dask is imported only when a :class:`DaskExecutor` starts.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vimodels.errors import OptionError, VimodelsError, check_option
from vimodels.runs.worker import (
    TaskCancelled,
    TaskInterrupted,
    call_in_worker,
    ignore_sigint,
    init_worker,
)

__all__ = [
    "EXECUTORS",
    "DaskExecutor",
    "LocalExecutor",
    "Outcome",
    "SerialExecutor",
    "TaskCancelled",
    "TaskInterrupted",
    "make_executor",
]

EXECUTORS = ("local", "dask", "serial")
WORKER_LOST = "WorkerLost"
INTERRUPT_GRACE_S = 60.0  # how long interrupted tasks may take to save a partial result


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

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.interrupt()  # nothing may run on once Ctrl-C left the block
        self.close()

    def close(self) -> None:
        """Release workers (nothing to release here)."""

    def interrupt(self, grace: float = INTERRUPT_GRACE_S) -> None:
        """Stop after Ctrl-C (nothing runs in the background here)."""

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
        self._stop: Any = None  # the pool's event: set, its workers start no more tasks

    def describe(self) -> str:
        """One line: what runs the tasks."""
        return f"local process pool (up to {self.max_workers} workers)"

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._stop = ctx.Event()
            self._pool = ProcessPoolExecutor(
                max_workers=self.max_workers,
                mp_context=ctx,
                initializer=init_worker,
                initargs=(self._stop,),
            )
        return self._pool

    def _shutdown(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the worker processes (they exit in the background)."""
        self._shutdown(wait=False)

    def interrupt(self, grace: float = INTERRUPT_GRACE_S) -> None:
        """Stop after Ctrl-C: cancel queued tasks, interrupt running ones, end every worker.

        A running task gets one ``KeyboardInterrupt`` and up to ``grace``
        seconds to return (a fit saves its partial result); workers still
        alive then are terminated. Returns once every worker has exited and
        been reaped. A second Ctrl-C here cuts the wait short (workers are
        still terminated).
        """
        pool = self._pool
        if pool is None:
            return
        # the pool's own table of worker processes (pid -> Process); shutdown() drops it
        procs = list((getattr(pool, "_processes", None) or {}).values())
        self._stop.set()  # workers start no further task, even one already handed over
        pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        try:
            for p in procs:
                if p.exitcode is None and p.pid is not None:
                    try:
                        os.kill(p.pid, signal.SIGINT)
                    except ProcessLookupError:
                        pass
            _wait_exit(procs, grace)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.terminate()
            _wait_exit(procs, 5.0)
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join(5.0)

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
                with _children_ignore_sigint():  # submit() may start a worker
                    futures[pool.submit(call_in_worker, fn, task)] = i
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


def _wait_exit(procs: list, timeout: float) -> None:
    """Wait until every process in ``procs`` has exited, or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if p.exitcode is None]
    while alive and time.monotonic() < deadline:
        multiprocessing.connection.wait(
            [p.sentinel for p in alive], timeout=max(0.0, deadline - time.monotonic())
        )
        alive = [p for p in alive if p.exitcode is None]


@contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT while worker processes are started here, so that they start deaf to it.

    An ignored signal stays ignored across ``exec`` (Python then installs no
    KeyboardInterrupt handler), which covers a worker's start-up, before its
    own code runs. A Ctrl-C in these few milliseconds of process starts is lost
    for this process too (pressing it again works). Only the main thread can
    change signal handlers; elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
        self._futures: list = []  # of the map in progress

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
                # its workers are in this process group: a terminal's Ctrl-C must not
                # kill each with a traceback (:meth:`interrupt` stops them)
                self._client.run(ignore_sigint)
        return self._client

    def close(self) -> None:
        """Disconnect; stop the LocalCluster if this executor started it."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def interrupt(self, grace: float = INTERRUPT_GRACE_S) -> None:
        """Stop after Ctrl-C: cancel the tasks of the current ``map``; stop a LocalCluster.

        Tasks already running on a remote cluster run to the end (Dask cannot
        interrupt them); their folders are kept for a rerun.
        """
        if self._client is not None and self._futures:
            try:
                self._client.cancel(self._futures, force=True)
            except Exception:  # a scheduler gone or going: nothing left to cancel
                pass
        self._futures = []
        if self._cluster is not None:
            self.close()

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
        self._futures = list(futures)
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
