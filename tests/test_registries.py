"""Registries: names unique and snake_case; the README tables match them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guides.registry import GENERIC, HANDWRITTEN
from vimodels.catalog.registry import MODELS
from vimodels.svi.elbos import ELBOS

README = Path(__file__).resolve().parents[1] / "README.md"
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def _all_names():
    yield from MODELS
    yield from GENERIC
    for fam in HANDWRITTEN.values():
        yield from fam
    yield from ELBOS


@pytest.mark.parametrize("name", sorted(set(_all_names())))
def test_snake_case(name):
    assert SNAKE.match(name), name


def test_entry_names_match_keys():
    for key, entry in MODELS.items():
        assert entry.name == key
        assert entry.sites, f"{key} declares no sites of interest"


def test_handwritten_families_exist():
    families = {entry.family for entry in MODELS.values()}
    assert set(HANDWRITTEN) <= families, set(HANDWRITTEN) - families
    for entry in MODELS.values():
        known = set(GENERIC) | set(HANDWRITTEN.get(entry.family, {}))
        assert set(entry.default_guides) <= known, (entry.name, entry.default_guides)


def _readme_table(marker: str) -> set[str]:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", text, re.S)
    assert m, f"README has no {marker} table"
    names = set()
    for line in m.group(1).splitlines():
        cell = re.match(r"\|\s*`([a-z0-9_]+)`", line.strip())
        if cell:
            names.add(cell.group(1))
    return names


def test_readme_models_table():
    assert _readme_table("models") == set(MODELS)


def test_readme_guides_table():
    expected = set(GENERIC) | {n for fam in HANDWRITTEN.values() for n in fam}
    assert _readme_table("guides") == expected


def test_readme_elbos_table():
    assert _readme_table("elbos") == set(ELBOS)
