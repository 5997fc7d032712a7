"""Checking and converting user data before anything is fitted."""

from __future__ import annotations

import inspect
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from vimodels.errors import DataError

_FLOAT_KINDS = "f"
_INT_KINDS = "iub"


def _from_pandas(key: str, value: Any) -> np.ndarray:
    """A pandas Series or DataFrame as a NumPy array (nullable dtypes included); NA refused.

    A one-column DataFrame becomes 1-D (its column); wider ones 2-D (rows x columns).
    """
    missing = np.asarray(value.isna())
    if missing.any():
        first = tuple(int(i) for i in np.argwhere(missing)[0])
        raise DataError(
            f"data[{key!r}] has {int(missing.sum())} missing value(s) (NaN or pandas NA; first "
            f"at position {first if len(first) > 1 else first[0]}); drop or impute them "
            "before fitting (e.g. df.dropna())"
        )
    dtypes = [value.dtype] if isinstance(value, pd.Series) else list(value.dtypes)
    if all(pd.api.types.is_bool_dtype(d) for d in dtypes):
        target: Any = bool
    elif all(pd.api.types.is_integer_dtype(d) or pd.api.types.is_bool_dtype(d) for d in dtypes):
        target = np.int64
    elif all(pd.api.types.is_numeric_dtype(d) for d in dtypes):
        target = np.float64
    else:
        bad = [str(d) for d in dtypes if not pd.api.types.is_numeric_dtype(d)]
        raise DataError(
            f"data[{key!r}] has non-numeric column dtype(s) {', '.join(sorted(set(bad)))}; give "
            "numbers (encode categories as integer codes, e.g. series.cat.codes)"
        )
    arr = value.to_numpy(dtype=target, copy=True)  # writable: torch refuses read-only views
    # a one-column DataFrame (df[["x"]]) is that column: 1-D, as df["x"] would be
    return arr[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr


def _to_tensor(key: str, value: Any) -> Any:
    if isinstance(value, (pd.Series, pd.DataFrame)):
        value = _from_pandas(key, value)
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
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY]
    if positional:
        raise DataError(
            f"model {getattr(model, '__name__', model)!r} takes {', '.join(positional)} "
            f"positionally only (its signature is {getattr(model, '__name__', 'model')}{sig}); "
            "data is passed by keyword (model(**data)): remove the '/' from its signature"
        )
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
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == 0:
            raise DataError(
                f"data[{key!r}] is empty (shape {tuple(value.shape)}); give at least one "
                "value (a model needs data to condition on)"
            )
    return out


def trace_check(model: Callable, data: Mapping[str, Any], name: str) -> poutine.Trace:
    """Run the model once under validation; wrap any failure as a DataError.

    Also refuses observed values that Pyro broadcast silently: a value whose
    shape differs from its site's batch and event shape (``y`` of shape
    ``(30, 1)`` under a plate of 30 would give a 30 x 30 likelihood).
    """
    try:
        with pyro.validation_enabled(True), poutine.block():
            tr = poutine.trace(model).get_trace(**data)
            tr.compute_log_prob()
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        if isinstance(exc, DataError):
            raise
        origin = _raised_in_user_code(exc)
        if origin is not None:
            raise DataError(
                f"model {name!r} raised {type(exc).__name__} ({origin}): {_one_line(exc)}; "
                "this came from the model's own code: fix the model, or the data it checks"
            ) from exc
        raise DataError(
            f"data does not fit model {name!r}: {_one_line(exc)}; check the shapes and values "
            "of the data"
        ) from exc
    check_observed_shapes(tr, data, name)
    return tr


def check_observed_shapes(tr: poutine.Trace, data: Mapping[str, Any], name: str) -> None:
    """Raise DataError for an observed value broadcast against its site's shape."""
    for site_name, site in tr.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if site["infer"].get("_deterministic"):
            continue
        value, fn = site["value"], site["fn"]
        if not isinstance(value, torch.Tensor) or not hasattr(fn, "batch_shape"):
            continue
        expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
        if tuple(value.shape) == expected:
            continue
        keys = [k for k, v in data.items() if v is value]
        what = f"data[{keys[0]!r}]" if keys else f"the value observed at site {site_name!r}"
        log_prob = site.get("log_prob")
        counted = (
            f"; its log-likelihood has shape {tuple(log_prob.shape)}"
            if isinstance(log_prob, torch.Tensor)
            else ""
        )
        raise DataError(
            f"{what} has shape {tuple(value.shape)} but observed site {site_name!r} of model "
            f"{name!r} expects shape {expected} (its plates and distribution){counted}: Pyro "
            "would broadcast it and count values several times; reshape the data to "
            f"{expected} (a column of a DataFrame: df['x'], not df[['x']]; or .reshape(-1))"
        )


def _one_line(exc: BaseException) -> str:
    """Pyro's message up to its trace-shape table, on one line, with the cause's shapes."""
    lines = []
    for line in str(exc).strip().splitlines():
        if line.strip().startswith("Trace Shapes"):
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines).rstrip(".") or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" ({_one_line(cause)})"
    return text.rstrip(".")


_LIBRARY_ROOTS = tuple(
    {
        str(Path(p).resolve())
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(k))
    }
)


def _raised_in_user_code(exc: BaseException) -> str | None:
    """``"in fn, file.py line n"`` when the innermost frame is outside the installed libraries."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    path = str(Path(code.co_filename).resolve())
    if code.co_filename.startswith("<") and code.co_filename != "<stdin>":
        if code.co_filename.startswith("<frozen"):
            return None
    elif any(path.startswith(root) for root in _LIBRARY_ROOTS):
        return None
    if Path(__file__).resolve().parent in Path(path).parents and "catalog" not in path:
        return None  # this package's own plumbing, not a model
    return f"in {code.co_name}, {Path(code.co_filename).name} line {tb.tb_lineno}"
