"""ArviZ's first import of the day must not race between processes.

ArviZ 0.23.4 writes its daily stamp through one fixed temporary name; two
processes importing it at once (pytest-xdist workers, a sweep's process pool)
made the loser's import fail with FileNotFoundError (CI failed that way).
Each test runs in a fresh interpreter with its own cache folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lose the race on purpose: ArviZ's own rename of daily_warning.tmp finds the file gone
LOSE_THE_RACE = """
import pathlib
_replace = pathlib.Path.replace
def replace(self, target):
    if self.name == "daily_warning.tmp":
        raise FileNotFoundError(2, "No such file or directory (another process renamed it)")
    return _replace(self, target)
pathlib.Path.replace = replace
"""


def _run(code: str, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_the_race_breaks_a_plain_import(tmp_path):
    """The failure the guard exists for is real: without it the import fails."""
    done = _run(LOSE_THE_RACE + "import arviz\n", tmp_path)
    assert done.returncode != 0
    assert "FileNotFoundError" in done.stderr and "another process renamed it" in done.stderr


def test_import_arviz_survives_losing_the_race(tmp_path):
    code = LOSE_THE_RACE + (
        "from vimodels.arviz_import import import_arviz\n"
        "az = import_arviz()\n"
        "import diagnostics._arviz\n"
        "print(az.__name__, az.__version__)\n"
    )
    # and ArviZ's daily FutureWarning is not shown (the stamp is current)
    done = _run(code, tmp_path, "-W", "error::FutureWarning")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("arviz ")
    stamp = tmp_path / "arviz" / "daily_warning"
    assert stamp.exists()
    assert not list(stamp.parent.glob("*.tmp")), "a temporary stamp was left behind"


def test_unwritable_cache_leaves_arviz_to_itself(tmp_path):
    """A cache path that cannot be created does not make the guard raise."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = "from vimodels.arviz_import import write_stamp\nprint(write_stamp())\n"
    done = _run(code, blocker)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_every_arviz_import_goes_through_the_guard():
    """Library code imports ArviZ only via vimodels.arviz_import."""
    offenders = []
    for folder in ("vimodels", "diagnostics", "guides"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "arviz_import.py":
                continue
            text = path.read_text()
            if "import arviz" in text or "from arviz" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
