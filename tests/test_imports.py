"""`guides` and `diagnostics` are generic names: prove they resolve to this project."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["vimodels", "guides", "diagnostics"])
def test_package_is_this_projects(name):
    module = importlib.import_module(name)
    path = Path(module.__file__).resolve()
    assert path.parent == ROOT / name, f"{name} imported from {path}, not this project"


def test_guides_registry_is_ours():
    import guides

    assert hasattr(guides, "make_guide") and "auto_normal" in guides.GENERIC
