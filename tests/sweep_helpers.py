"""Light task functions for executor tests (importable by spawned workers, no torch)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def double_or_crash(task: str) -> str:
    """Return ``task * 2``; kill the worker process on ``"crash"``; raise on ``"raise"``."""
    if task == "crash":
        os._exit(3)
    if task == "raise":
        raise ValueError(f"bad input {task!r}")
    return task * 2


def sleep_until_interrupted(task: str) -> str:
    """Sleep for up to a minute, interruptibly; mark progress in files named after ``task``.

    ``task`` is a path stem: ``<stem>.started`` holds the worker's pid; on
    Ctrl-C the task "saves" for half a second (a second Ctrl-C must not cut
    that short), writes ``<stem>.saved`` and re-raises; ``<stem>.finished``
    means it was never interrupted.
    """
    stem = Path(task)
    stem.with_suffix(".started").write_text(str(os.getpid()))
    try:
        for _ in range(600):
            time.sleep(0.1)
    except KeyboardInterrupt:
        time.sleep(0.5)
        stem.with_suffix(".saved").write_text("")
        raise
    stem.with_suffix(".finished").write_text("")
    return task
