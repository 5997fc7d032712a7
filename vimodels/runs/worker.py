"""The worker side of :class:`~vimodels.runs.executors.LocalExecutor`: Ctrl-C handling.

Standard library only, so a worker that runs light tasks starts light.

A worker ignores Ctrl-C while idle (a terminal's Ctrl-C reaches every
process of its group; an idle worker must not die with a traceback). While
it runs a task, the first Ctrl-C raises :class:`KeyboardInterrupt` in the
task, and later ones are ignored until the task returns, so that it can
save what it has. A worker of a pool that was stopped starts no further
task. :func:`interrupts_deferred` holds Ctrl-C while a result is written.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class TaskInterrupted(Exception):
    """A task stopped by Ctrl-C in a worker process (its message says what it kept)."""


class TaskCancelled(Exception):
    """A task not started because the run was interrupted."""


_STOP: Any = None  # the pool's stop event (a multiprocessing Event)


def init_worker(stop: Any) -> None:
    """Worker start: ignore Ctrl-C while idle; remember the pool's stop event.

    (The worker was started with SIGINT ignored already, so that its start-up
    is safe too; see ``executors._children_ignore_sigint``.)
    """
    global _STOP
    _STOP = stop
    ignore_sigint()


def ignore_sigint() -> None:
    """Ignore Ctrl-C in this process (call in its main thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupt_once(signum: int, frame: Any) -> None:
    """First Ctrl-C of a task: KeyboardInterrupt; later ones are ignored (it is saving)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def call_in_worker(fn: Callable[[Any], Any], task: Any) -> Any:
    """``fn(task)``, interruptible once by Ctrl-C; not started once the pool is stopped.

    Raises
    ------
    TaskInterrupted
        ``fn`` let a KeyboardInterrupt out (message: the interrupt's, if any).
    TaskCancelled
        The pool was stopped before this task started.
    """
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        if _STOP is not None and _STOP.is_set():
            raise TaskCancelled("not started: the run was interrupted")
        return fn(task)
    except KeyboardInterrupt as exc:
        raise TaskInterrupted(str(exc) or "interrupted by Ctrl-C") from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends (writing a finished result), then act on it.

    A Ctrl-C during the block is passed to the handler that was in place, once,
    after the block: KeyboardInterrupt in the main process or a busy worker;
    nothing where it was ignored. Outside the main thread (Dask worker threads)
    signals cannot be handled: a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held and callable(previous):
        previous(signal.SIGINT, None)
    elif held and previous == signal.SIG_DFL:
        raise KeyboardInterrupt
