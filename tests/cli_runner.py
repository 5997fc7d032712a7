"""`python -m vimodels.cli` in a subprocess (imported as `cli_runner`: tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: object, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the CLI from the repository root with this checkout first on ``PYTHONPATH``.

    ``args`` are passed through ``str``; ``env`` adds to (or overrides) the
    current environment. Output is captured as text.
    """
    return subprocess.run(
        [sys.executable, "-m", "vimodels.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
