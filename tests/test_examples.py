"""Every example runs as a user would run it, with tiny arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# every script in examples/ must appear here with arguments that make it quick
SMOKE_ARGS: dict[str, list[str] | None] = {
    "eight_schools_three_guides.py": ["--steps", "30", "--draws", "50"],
    "user_model.py": ["--steps", "30", "--draws", "50"],
    # run by tests/test_compare.py, where it reuses the session's cached NUTS reference
    "compare_eight_schools.py": None,
    # run by tests/test_vae.py with one epoch
    "train_digits_vae.py": None,
}


def test_every_example_is_listed():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(SMOKE_ARGS), (
        f"unlisted: {sorted(scripts - set(SMOKE_ARGS))}, "
        f"missing: {sorted(set(SMOKE_ARGS) - scripts)}"
    )


@pytest.mark.parametrize("script", sorted(k for k, v in SMOKE_ARGS.items() if v is not None))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    args = [a.replace("{tmp}", str(tmp_path)) for a in SMOKE_ARGS[script]]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example should print what it found"
