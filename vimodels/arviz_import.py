"""Import ArviZ safely from many processes at once.

ArviZ 0.23.4 writes a once-a-day stamp file when it is imported
(``<user cache>/arviz/daily_warning``), through one fixed temporary name
(``daily_warning.tmp``) and a rename. Two processes importing ArviZ for the
first time on a day (pytest-xdist workers, the process pool of a sweep, Dask
workers) race on that name: the loser's rename finds the file gone and the
import fails with ``FileNotFoundError``. :func:`import_arviz` writes today's
stamp first under a name unique to the process, so ArviZ finds it current and
writes nothing. Every import of ArviZ in the project goes through it.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from platformdirs import user_cache_dir

STAMP_NAME = "daily_warning"


def _stamp_path() -> Path:
    return Path(user_cache_dir("arviz", "arviz")) / STAMP_NAME


def write_stamp() -> bool:
    """Record today in ArviZ's daily stamp, atomically under a unique temporary name.

    Returns
    -------
    bool
        True when the stamp holds today's date afterwards; False when the
        cache folder cannot be written (ArviZ is then left to itself).
    """
    path = _stamp_path()
    today = datetime.date.today().isoformat()
    try:
        if path.read_text().strip() == today:
            return True
    except (OSError, ValueError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{STAMP_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(today)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True


def import_arviz() -> ModuleType:
    """Import and return :mod:`arviz` without the concurrent-import race.

    If the import still fails on the stamp file (another process replaced it
    between the check and ArviZ's own write), it is retried once: by then the
    other process has written today's stamp.
    """
    if "arviz" in sys.modules:
        return sys.modules["arviz"]
    write_stamp()
    try:
        import arviz
    except OSError:
        write_stamp()
        import arviz
    return arviz
