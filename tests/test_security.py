"""Nothing a user can point the program at is unpickled; names cannot escape folders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vimodels.io import atomic_write_text, safe_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for d in ("vimodels", "guides", "diagnostics", "examples", "benchmarks")
    for p in (ROOT / d).rglob("*.py")
)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            owner = (
                func.value.id
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else ""
            )
            yield owner, name, node


def _kw(node, key):
    for kw in node.keywords:
        if kw.arg == key:
            return kw.value
    return None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialization(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for owner, name, node in _calls(tree):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        assert not (
            owner in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")
            and name in ("load", "loads")
        ), f"unpickling at {where}"
        if owner == "torch" and name == "load":
            value = _kw(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"torch.load without weights_only=True at {where}"
            )
        if owner == "np" and name == "load":
            value = _kw(node, "allow_pickle")
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), (
                f"np.load with allow_pickle at {where}"
            )
        if name in ("from_pickle", "read_pickle"):
            raise AssertionError(f"pickle reader at {where}")


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "a/b\\c", "..", "", "x" * 10 + "/..", "eight schools; rm -rf ~"]
)
def test_safe_name_stays_in_folder(name, tmp_path):
    target = (tmp_path / safe_name(name)).resolve()
    assert target.parent == tmp_path.resolve()
    atomic_write_text(tmp_path / safe_name(name), "ok")
    assert target.read_text() == "ok"


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("killed mid-write")

    from vimodels.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert target.stat().st_mode & 0o777 != 0o600
