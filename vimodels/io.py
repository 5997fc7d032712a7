"""Atomic file writes and safe output paths."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vimodels.errors import OutputError

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A file-name component derived from ``name`` that cannot leave its folder."""
    cleaned = _SAFE.sub("_", str(name)).strip("._")
    return cleaned or "unnamed"


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents); raise OutputError if it is a file or not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output folder {str(p)!r} is a file; give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {str(p)!r}: {exc.strerror}") from exc
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(p)!r} is not writable; choose another with --out")
    return p


@contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`ensure_dir` for a command's outputs, undone if nothing was written.

    The folders this call creates (``path`` and missing parents) are removed
    again on leaving the block, however it is left, when they are still
    empty: a command that fails before writing leaves no empty folder behind.
    """
    p = Path(path)
    created = []
    for folder in (p, *p.parents):
        if folder.exists():
            break
        created.append(folder)
    out = ensure_dir(p)
    try:
        yield out
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                break


def atomic_write(path: str | os.PathLike, writer: Callable[[str], Any]) -> Path:
    """Write a file through ``writer(tmp_path)`` then rename it into place.

    A crash leaves either the old file or none, never a truncated one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN written as null)."""
    return atomic_write_text(path, json.dumps(_nan_to_none(obj), indent=2, sort_keys=False))


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (dicts, lists, numbers, strings); the rest by name or repr."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if callable(obj):
        return getattr(obj, "__name__", repr(obj))
    return repr(obj)
