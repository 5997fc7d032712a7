"""Your own model from the command line: ``FILE.py:FUNCTION`` and a data file.

:func:`load_model_spec` imports a Python file **and runs it** (it is the
user's own code, run on purpose, with the user's rights) and returns one of
its functions, the Pyro model. :func:`load_data` reads the model's arguments
from a file:

- ``.json``: an object of name -> number or (nested) list of numbers;
- ``.npz``: NumPy arrays by name (read with ``allow_pickle=False``);
- ``.csv``: one argument per column (read with pandas).

A data map (``{"argument": "column"}``, from a TOML or JSON file or repeated
``--arg argument=column``) renames columns to the model's argument names.
Columns the model does not take are left out when the model's signature
says which arguments it takes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimodels.errors import DataError, OptionError, UnknownNameError
from vimodels.io import safe_name

DATA_SUFFIXES = (".json", ".npz", ".csv")


def is_model_spec(text: str) -> bool:
    """Whether ``text`` names a model in a file (``FILE.py:FUNCTION``), not a catalog entry."""
    path, sep, _ = str(text).rpartition(":")
    return bool(sep) and path.endswith(".py")


def load_model_spec(spec: str) -> Callable:
    """Import ``FILE.py`` (running its code) and return its function ``FUNCTION``.

    Parameters
    ----------
    spec : str
        ``path/to/file.py:function_name``.

    Returns
    -------
    callable
        The model function; its ``__name__`` names the model in outputs.

    Raises
    ------
    OptionError
        When the spec is malformed, the file is missing, or importing it fails.
    UnknownNameError
        When the file has no such function.
    """
    path_text, sep, name = str(spec).rpartition(":")
    if not sep or not path_text.endswith(".py") or not name:
        raise OptionError(f"a model file is given as FILE.py:FUNCTION, got {spec!r}")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise OptionError(f"model file {path_text!r} does not exist (or is not a file)")
    # named by the file's path: the same file gets the same name, which the reference
    # cache's model fingerprint includes (a random name would miss the cache every run)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"vimodels_user_{safe_name(path.stem)}_{digest}"
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise OptionError(f"cannot import model file {path_text!r}")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module  # dataclasses and typing look their module up
    try:
        spec_obj.loader.exec_module(module)
    except Exception as exc:  # the user's own code: any error is theirs to fix
        line = _error_line(exc, path)
        raise OptionError(
            f"importing model file {path_text!r} failed: {type(exc).__name__}: {line}"
        ) from exc
    finally:
        # not importable by name in another process: NUTS then runs its chains here
        sys.modules.pop(module_name, None)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn) or inspect.isclass(fn):
        functions = sorted(
            k
            for k, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module_name and not k.startswith("_")
        )
        err = UnknownNameError("function", name, functions)
        err.args = (
            f"{path.name} has no function {name!r}; its functions are: "
            f"{', '.join(functions) or 'none'}",
        )
        raise err
    return fn


def _error_line(exc: BaseException, path: Path) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    tb = exc.__traceback__
    lineno = None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.lineno:
        lineno = exc.lineno
    return f"{msg} (line {lineno})" if lineno else msg


def read_data_map(path: str | Path | None, pairs: Sequence[str] | None = None) -> dict[str, str]:
    """``{argument: column}`` from a TOML or JSON file and/or ``argument=column`` pairs.

    Pairs override the file. A TOML file may hold the map at top level or in a
    ``[data]`` table.
    """
    out: dict[str, str] = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise OptionError(f"data map {str(path)!r} does not exist")
        try:
            if p.suffix.lower() == ".toml":
                raw: Any = tomllib.loads(p.read_text(encoding="utf-8"))
            elif p.suffix.lower() == ".json":
                raw = json.loads(p.read_text(encoding="utf-8"))
            else:
                raise OptionError(f"data map {str(path)!r} must be a .toml or .json file")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OptionError(f"data map {str(path)!r} is not valid: {exc}") from exc
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
            raw = raw["data"]
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise OptionError(
                f"data map {str(path)!r} must map argument names to column names (strings)"
            )
        out.update(raw)
    for pair in pairs or ():
        arg, sep, column = pair.partition("=")
        if not sep or not arg or not column:
            raise OptionError(f"--arg {pair!r} must look like ARGUMENT=COLUMN")
        out[arg] = column
    return out


def _read_columns(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise DataError(f"data file {path.name} must hold a JSON object of name -> value")
            return {k: _json_value(path, k, v) for k, v in raw.items()}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: np.array(z[k]) for k in z.files}
        if suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(path)
            return {str(c): np.array(frame[c].to_numpy()) for c in frame.columns}
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read data file {path.name}: {first}") from exc
    raise DataError(
        f"data file {path.name} has an unknown type; give one of {', '.join(DATA_SUFFIXES)}"
    )


def _json_value(path: Path, key: str, value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, list):
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise DataError(
                f"{path.name}: {key!r} must be a number or a rectangular list of numbers"
            )
        return arr
    raise DataError(f"{path.name}: {key!r} must be a number or a list of numbers")


def _accepted(model: Callable | None) -> set[str] | None:
    if model is None:
        return None
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def load_data(
    path: str | Path | None,
    data_map: Mapping[str, str] | None = None,
    model: Callable | None = None,
) -> dict[str, Any]:
    """The model's arguments from a ``.json``, ``.npz`` or ``.csv`` file.

    Parameters
    ----------
    path : path or None
        The data file; None gives no data (a model without arguments).
    data_map : dict of str to str, optional
        ``{argument: column}`` renames; every named column must exist.
    model : callable, optional
        With a signature that lists its arguments, columns it does not take are
        left out (a CSV file often has more columns than the model uses).

    Returns
    -------
    dict of str to value
        Arrays (NumPy) and numbers by argument name; :func:`vimodels.fit` checks
        them against the model.

    Raises
    ------
    DataError
        When the file is missing or unreadable, or a mapped column is absent.
    """
    data_map = dict(data_map or {})
    if path is None:
        if data_map:
            raise DataError("a data map was given without a data file; pass --data FILE")
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    columns = _read_columns(p)
    missing = sorted({c for c in data_map.values() if c not in columns})
    if missing:
        raise DataError(
            f"data file {p.name} has no column(s) {', '.join(missing)}; it has: "
            f"{', '.join(columns) or 'none'}"
        )
    out = {arg: columns[col] for arg, col in data_map.items()}
    used = set(data_map.values())
    accepted = _accepted(model)
    for name, value in columns.items():
        if name in used or name in out:
            continue
        if accepted is not None and name not in accepted:
            continue
        out[name] = value
    return out
