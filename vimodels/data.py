"""Checking and converting user data before anything is fitted."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

from vimodels.errors import DataError, ModelError

_FLOAT_KINDS = "f"
_INT_KINDS = "iub"


def _to_tensor(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise DataError(f"data[{key!r}] is complex; give real numbers")
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        if arr.dtype.kind in _FLOAT_KINDS:
            return torch.as_tensor(arr, dtype=torch.float32)
        if arr.dtype.kind == "b":
            return torch.as_tensor(arr)
        if arr.dtype.kind in _INT_KINDS:
            return torch.as_tensor(arr, dtype=torch.int64)
        raise DataError(
            f"data[{key!r}] has dtype {arr.dtype} ({arr.dtype.kind!r}); give numbers "
            "(float or int arrays)"
        )
    return value


def check_finite(data: Mapping[str, Any]) -> None:
    """Raise DataError naming the first floating entry with NaN or infinite values."""
    for key, value in data.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                n = int(bad.sum())
                first = tuple(int(i) for i in bad.nonzero()[0]) if value.dim() else ()
                raise DataError(
                    f"data[{key!r}] has {n} NaN or infinite value(s) (first at index "
                    f"{first}); drop or impute them before fitting"
                )
        elif isinstance(value, float) and not np.isfinite(value):
            raise DataError(f"data[{key!r}] is {value}; give a finite number")


def check_signature(model: Callable, data: Mapping[str, Any]) -> None:
    """Raise DataError for keys the model does not take or required keys missing."""
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(data) - accepted)
    if unknown:
        raise DataError(
            f"model {getattr(model, '__name__', model)!r} takes no argument(s) "
            f"{', '.join(unknown)}; it takes: {', '.join(sorted(accepted)) or 'nothing'}"
        )
    required = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise DataError(
            f"data is missing key(s) {', '.join(missing)} required by model "
            f"{getattr(model, '__name__', model)!r}; pass them in data={{...}}"
        )


def prepare_data(model: Callable, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``data`` for ``model`` and convert arrays to tensors.

    Floating arrays become float32 tensors, integer arrays int64. Checks names
    against the model's signature, finiteness, and that one trace of the model
    under Pyro's validation succeeds (shape mismatches inside plates, values
    outside a distribution's support).

    Raises
    ------
    DataError
        Naming the offending key and the fix.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DataError(f"data must be a dict of name -> array, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise DataError(f"data keys must be strings (model argument names), got {key!r}")
    out = {k: _to_tensor(k, v) for k, v in data.items()}
    check_signature(model, out)
    check_finite(out)
    return out


def trace_check(model: Callable, data: Mapping[str, Any], name: str) -> poutine.Trace:
    """Run the model once under validation; wrap any failure as a DataError or ModelError.

    The error blames what is wrong: the data (a value outside a distribution's
    support, shapes that do not broadcast: raised inside Pyro or torch), or the
    model (its own code raised, or it uses something that cannot run:
    :class:`~vimodels.errors.ModelError`), and names the model's line.
    """
    try:
        with pyro.validation_enabled(True), poutine.block():
            tr = poutine.trace(model).get_trace(**data)
            tr.compute_log_prob()
    except Exception as exc:  # a user's model can raise anything: say whose fault it is
        raise blame(exc, name) from exc
    return tr


_LIBRARY_DIRS = tuple(
    str(Path(m.__file__).resolve().parent)
    for m in (torch, pyro, np)
    if getattr(m, "__file__", None)
) + (str(Path(__file__).resolve().parent),)


def _user_frame(exc: BaseException) -> tuple[str, bool] | None:
    """``("file.py:line", raised_there)`` of the last frame outside the libraries."""
    tb = exc.__traceback__
    found, last_user = None, False
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        path = str(Path(filename).resolve()) if not filename.startswith("<") else filename
        user = not path.startswith(_LIBRARY_DIRS) and "importlib" not in path
        if user:
            found = f"{Path(filename).name}:{tb.tb_lineno}"
        last_user = user
        tb = tb.tb_next
    return None if found is None else (found, last_user)


def blame(exc: BaseException, name: str) -> DataError:
    """The user error for ``exc`` raised by a run of model ``name``: data or model."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    msg = lines[0] if lines else type(exc).__name__
    if msg.endswith(":") and len(lines) > 1:  # "Error while computing log_prob at site 'x':"
        msg = f"{msg} {lines[1]}"
    frame = _user_frame(exc)
    at = f" at {frame[0]}" if frame else ""
    if isinstance(exc, NotImplementedError):
        return ModelError(
            f"model {name!r} cannot be run{at}: {msg} (NotImplementedError); the model uses "
            "something Pyro cannot do here"
        )
    in_model_code = frame is not None and frame[1]
    if isinstance(exc, (ValueError, RuntimeError, IndexError)) or (
        isinstance(exc, TypeError) and not in_model_code
    ):
        return DataError(
            f"data does not fit model {name!r}{at}: {msg}; check the shapes and values of the data"
        )
    return ModelError(
        f"model {name!r} fails{at}: {type(exc).__name__}: {msg}; fix the model's code "
        "(or the data it reads)"
    )
