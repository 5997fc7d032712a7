"""Light task functions for executor tests (importable by spawned workers, no torch)."""

from __future__ import annotations

import os


def double_or_crash(task: str) -> str:
    """Return ``task * 2``; kill the worker process on ``"crash"``; raise on ``"raise"``."""
    if task == "crash":
        os._exit(3)
    if task == "raise":
        raise ValueError(f"bad input {task!r}")
    return task * 2
