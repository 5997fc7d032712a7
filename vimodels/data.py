"""Checking and converting user data before anything is fitted."""

from __future__ import annotations

import inspect
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vimodels.errors import DataError, ModelError, PrecisionWarning

_FLOAT_KINDS = "f"
_INT_KINDS = "iub"


#: Largest float32 rounding error, relative to the data's spread, that floating
#: data may take when it is converted to float32 (:func:`float32_rounding`).
FLOAT32_TOLERANCE = 1e-6
#: Rows of a memory-mapped floating array read once to measure its rounding (:class:`RowArray`).
ROWS_CHECKED = 1024
_CHUNK = 1 << 20  # elements per chunk of float32_rounding


def float32_rounding(arr: np.ndarray) -> float:
    """The worst float32 rounding error of ``arr``, relative to its spread.

    ``max |float32(x) - x| / sd(x)`` over the array (1-D) or per column: each
    position along the trailing axes, over the rows (axis 0); the largest over
    the columns. A column without spread (a constant, one row, a scalar) counts
    its error relative to ``|x|`` instead (float32 keeps that within 6e-8 above
    1e-38). Values beyond float32's range (about 3.4e38) give ``inf``. Read in
    chunks of rows: the extra memory is a few chunks, not copies of ``arr``.

    Parameters
    ----------
    arr : np.ndarray
        Floating values, any shape.

    Returns
    -------
    float
        0.0 when float32 holds ``arr`` exactly (float16/float32 input included),
        and for data with NaN or inf (refused by :func:`check_finite`).
    """
    if arr.dtype.itemsize <= 4 or arr.size == 0:
        return 0.0
    x = np.asarray(arr).reshape((arr.shape[0], -1) if arr.ndim else (1, 1))
    step = max(1, _CHUNK // max(1, x.shape[1]))

    def chunks() -> Iterator[np.ndarray]:
        for i in range(0, x.shape[0], step):
            yield x[i : i + step].astype(np.float64, copy=False)

    err = np.zeros(x.shape[1])
    total = np.zeros(x.shape[1])
    for c in chunks():
        if not np.isfinite(c).all():
            return 0.0
        with np.errstate(over="ignore"):
            e = np.abs(c.astype(np.float32).astype(np.float64) - c)
        if not np.isfinite(e).all():
            return float("inf")  # beyond float32's range
        err = np.maximum(err, e.max(axis=0))
        total += c.sum(axis=0)
    mean = total / x.shape[0]
    var = sum(((c - mean) ** 2).sum(axis=0) for c in chunks()) / x.shape[0]
    scale = np.sqrt(var)
    flat = scale <= 1e-12 * np.abs(mean)  # no spread (beyond summation error): |x|
    scale = np.where(flat, np.abs(mean), scale)
    rel = np.divide(err, scale, out=np.zeros_like(err), where=scale > 0)
    return float(rel.max())


class RowAccessError(DataError, AttributeError):
    """A :class:`RowArray` used as a whole (``x.sum()``, ``x @ w``) instead of by rows."""


class RowArray:
    """An array too large for memory, read one minibatch of rows at a time.

    :func:`prepare_data` wraps a memory-mapped array (``np.load(path,
    mmap_mode="r")``, :func:`load_arrays`) or any array-like that is not an
    ndarray, list or tensor but has ``shape``, ``dtype`` and NumPy indexing
    (an HDF5 dataset, a zarr array) in this class instead of converting it to
    a tensor. The model indexes it like a tensor with its plate's indices,
    ``x[idx]`` or ``x.index_select(0, idx)``, and gets a tensor of just those
    rows (float32 for floating data, int64 for integers), checked finite.
    Floating data that float32 would round (:func:`float32_rounding` of its
    first :data:`ROWS_CHECKED` rows above :data:`FLOAT32_TOLERANCE`: values
    far from zero for their spread) is read as float64, as in-memory data is.
    Its first axis is the rows: it is per-row data for the plate whose size
    is ``x.shape[0]``, and the model should only ever index it with that
    plate's subsample indices (anything else reads what it asks for).

    Attributes
    ----------
    shape : tuple of int
        The array's shape.
    rows_read : int
        Rows copied out so far (for checking that a fit reads only its batches).
    """

    def __init__(self, key: str, array: Any):
        self.key = key
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        kind = np.dtype(array.dtype).kind
        if kind not in _FLOAT_KINDS + _INT_KINDS:
            raise DataError(
                f"data[{key!r}] has dtype {array.dtype} ({kind!r}); give numbers "
                "(float or int arrays)"
            )
        if not self.shape:
            raise DataError(f"data[{key!r}] is a 0-d array; give rows (shape (N, ...))")
        self.kind = kind
        self.float_dtype = np.float32
        if kind in _FLOAT_KINDS and np.dtype(array.dtype).itemsize > 4:
            head = np.asarray(array[:ROWS_CHECKED])  # not counted in rows_read
            if float32_rounding(head) > FLOAT32_TOLERANCE:
                self.float_dtype = np.float64
        self.rows_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getattr__(self, name: str) -> Any:
        key = self.__dict__.get("key")
        if name.startswith("__") or key is None:
            raise AttributeError(name)
        raise RowAccessError(
            f"data[{key!r}] is read by rows (memory-mapped), so it has no .{name}; "
            f"index it with a plate's subsample indices, {key}[idx], and use the rows"
        )

    def __repr__(self) -> str:
        return f"RowArray({self.key!r}, shape={self.shape}, dtype={self.array.dtype})"

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    def dim(self) -> int:
        """Number of axes (as ``torch.Tensor.dim``)."""
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        """The shape, or its length along ``dim`` (as ``torch.Tensor.size``)."""
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def __getitem__(self, index: Any) -> torch.Tensor:
        """The rows at ``index`` (a tensor or array of row indices, an int or a slice)."""
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        rows = np.asarray(self.array[index])
        self.rows_read += int(rows.shape[0]) if rows.ndim == len(self.shape) else 1
        if self.kind in _FLOAT_KINDS:
            out = torch.from_numpy(np.ascontiguousarray(rows, dtype=self.float_dtype))
            if not bool(torch.isfinite(out).all()):
                raise DataError(
                    f"data[{self.key!r}] has NaN or infinite values among the rows read; "
                    "drop or impute them before fitting"
                )
            return out
        if self.kind == "b":
            return torch.from_numpy(np.ascontiguousarray(rows))
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """``self[index]`` for ``dim == 0`` (rows), as ``torch.Tensor.index_select``."""
        if dim not in (0, -len(self.shape)):
            raise DataError(f"data[{self.key!r}] can only be indexed by rows (dim 0), got {dim}")
        return self[index]


def _is_lazy_array(value: Any) -> bool:
    if isinstance(value, (RowArray, np.memmap)):
        return True
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor, list, tuple, str, bytes)):
        return False
    if type(value).__module__.split(".")[0] == "pandas":  # label indexing: left as given
        return False
    shape = getattr(value, "shape", None)
    return (
        isinstance(shape, tuple)
        and len(shape) >= 1
        and hasattr(value, "dtype")
        and hasattr(value, "__getitem__")
    )


def load_arrays(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """Memory-map the arrays of a ``.npy`` or ``.npz`` file: ``{name: array}``.

    A ``.npy`` file gives ``{key: array}`` (``key`` defaults to the file's stem);
    the members of an uncompressed ``.npz`` (``np.savez``) are memory-mapped in
    place, compressed ones (``np.savez_compressed``) are read into memory.
    Pass the result as ``data``: memory-mapped arrays become :class:`RowArray`.

    Raises
    ------
    DataError
        For a missing file, another suffix, or a file NumPy cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; give a .npy or .npz file")
    try:
        if path.suffix == ".npy":
            return {key or path.stem: np.load(path, mmap_mode="r", allow_pickle=False)}
        if path.suffix == ".npz":
            return _load_npz(path)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc}") from exc
    raise DataError(f"data file {str(path)!r} is not .npy or .npz; save arrays with np.save")


def _load_npz(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
    with open(path, "rb") as fh:
        for info in infos:
            name = info.filename[: -len(".npy")]
            if info.compress_type != zipfile.ZIP_STORED:
                with np.load(path, allow_pickle=False) as z:
                    out[name] = z[name]
                continue
            fh.seek(info.header_offset)
            header = fh.read(30)  # the member's local file header
            name_len = int.from_bytes(header[26:28], "little")
            extra_len = int.from_bytes(header[28:30], "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            if dtype.hasobject:
                raise DataError(f"{path.name}: member {name!r} holds Python objects; give numbers")
            out[name] = np.memmap(
                path,
                dtype=dtype,
                mode="r",
                offset=fh.tell(),
                shape=shape,
                order="F" if fortran else "C",
            )
    return out


def _from_pandas(key: str, value: Any) -> np.ndarray:
    """A pandas Series or DataFrame as a NumPy array (nullable dtypes included); NA refused.

    A one-column DataFrame becomes 1-D (its column); wider ones 2-D (rows x columns).
    """
    import pandas as pd

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
    if _is_lazy_array(value):
        return value if isinstance(value, RowArray) else RowArray(key, value)
    # a value can only be a pandas object once pandas is imported: importing it
    # here would cost every fit a second (tests/test_import_weight.py)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, (pd.Series, pd.DataFrame)):
        value = _from_pandas(key, value)
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise DataError(f"data[{key!r}] is complex; give real numbers")
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        if arr.dtype.kind in _FLOAT_KINDS:
            if float32_rounding(arr) > FLOAT32_TOLERANCE:
                return torch.as_tensor(arr, dtype=torch.float64)
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

    Floating arrays (NumPy, lists, pandas) become float32 tensors, unless float32
    would round them by more than :data:`FLOAT32_TOLERANCE` (1e-6) of their spread
    (:func:`float32_rounding`: values far from zero for their spread, such as
    ``1e6 + 0.01 * noise``, or beyond float32's range): those stay float64, and
    the model must then compute in float64 (constants and prior parameters made
    with the data's dtype) or a :class:`~vimodels.errors.PrecisionWarning` says
    that its float32 latents round the data. Tensors are kept as given (pass a
    float32 tensor to accept the rounding). Integer arrays become int64;
    memory-mapped arrays (and array-likes that are not ndarrays) become
    :class:`RowArray` (float32 rows, float64 by the same rule on its first rows),
    read a minibatch at a time (and checked finite as they are read). Checks names
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
    """Run the model once under validation; wrap any failure as a DataError or ModelError.

    The error blames what is wrong: the data (a value outside a distribution's
    support, shapes that do not broadcast: raised inside Pyro or torch), or the
    model (its own code raised, or it uses something that cannot run:
    :class:`~vimodels.errors.ModelError`), and names the model's line. Also
    refuses observed values that Pyro broadcast silently: a value whose shape
    differs from its site's batch and event shape (``y`` of shape ``(30, 1)``
    under a plate of 30 would give a 30 x 30 likelihood).
    """
    try:
        with pyro.validation_enabled(True), poutine.block():
            tr = poutine.trace(model).get_trace(**data)
            tr.compute_log_prob()
    except Exception as exc:  # a user's model can raise anything: say whose fault it is
        if isinstance(exc, DataError):
            raise
        err = blame(exc, name)
        wide = _needs_float64(data)
        if wide and "dtype" in str(err):
            err = type(err)(
                f"{err}; {_float64_note(wide)}: the model must compute in the data's dtype "
                f"(make its constants and prior parameters with dtype={next(iter(wide))}.dtype), "
                "or center or rescale the data so that float32 holds it"
            )
        lazy = sorted(k for k, v in data.items() if isinstance(v, RowArray))
        if lazy and not isinstance(err, ModelError):
            err = DataError(
                f"{err}; {', '.join(lazy)} are read by rows (memory-mapped): index them with "
                "a plate's subsample indices, x[idx]"
            )
        raise err from exc
    check_observed_shapes(tr, data, name)
    _check_latent_dtype(tr, data, name)
    _check_supports(tr, name)
    _check_static_supports(model, data, tr, name)
    return tr


def _continuous_supports(tr: poutine.Trace) -> Iterator[tuple[str, Any]]:
    """``(name, support)`` of each continuous latent sample site of ``tr``."""
    for site_name, site in tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        support = getattr(site["fn"], "support", None)
        if support is not None and not support.is_discrete:
            yield site_name, support


def _check_supports(tr: poutine.Trace, name: str) -> None:
    """ModelError for a continuous latent site whose support torch cannot unconstrain.

    Every guide, NUTS and the mode search move latent sites in unconstrained space
    through ``biject_to(support)``; a support class with no registered transform
    raised a bare ``NotImplementedError`` from deep inside whichever ran first.
    """
    for site_name, support in _continuous_supports(tr):
        try:
            torch.distributions.biject_to(support)
        except NotImplementedError:
            raise ModelError(
                f"latent site {site_name!r} of model {name!r} has support "
                f"{type(support).__name__}, which torch cannot map to unconstrained space (no "
                "biject_to transform is registered for it); sample an unconstrained variable "
                "and transform it with pyro.deterministic, or register one with "
                "torch.distributions.biject_to.register and transform_to.register"
            ) from None


def _bounds(constraint: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors a constraint holds (interval bounds ...), through wrapped constraints."""
    out: list[torch.Tensor] = []
    if depth > 4:
        return out
    for value in vars(constraint).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, torch.distributions.constraints.Constraint):
            out += _bounds(value, depth + 1)
    return out


def _bounded_latents(tr: poutine.Trace) -> dict[str, list[torch.Tensor]]:
    out = {}
    for site_name, support in _continuous_supports(tr):
        bounds = _bounds(support)
        if bounds:
            out[site_name] = bounds
    return out


def _check_static_supports(
    model: Callable, data: Mapping[str, Any], tr: poutine.Trace, name: str
) -> None:
    """ModelError for a continuous latent site whose support moves with other latent values.

    Every guide (Pyro's autoguides too), NUTS (Pyro's ``initialize_model``) and the
    mode search fix a site's unconstrained transform ``biject_to(support)`` at the
    support of one initial trace. ``b ~ Uniform(0, a)`` with ``a`` latent is then
    confined to ``(0, a_0)``: where ``a > a_0`` the region ``(a_0, a)`` is never
    reached, a wrong posterior with no error (NUTS's chains from other initial
    points raised "potential not finite"). Checked by a second run of the model
    at other prior draws (its subsample indices replayed, the RNG state
    restored), only when some latent's support holds tensors (bounds).
    """
    first = _bounded_latents(tr)
    if not first:
        return
    keep = poutine.Trace()
    for site_name, site in tr.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            keep.add_node(site_name, **site)
    try:
        with (
            torch.random.fork_rng(devices=[]),
            pyro.validation_enabled(False),
            poutine.block(),
        ):
            torch.manual_seed(torch.initial_seed() % (2**63) + 1)
            other = poutine.trace(poutine.replay(model, trace=keep)).get_trace(**data)
    except Exception:  # a model that runs once can fail on other draws: nothing to compare
        return
    second = _bounded_latents(other)
    for site_name, bounds in first.items():
        again = second.get(site_name)
        if again is None or len(again) != len(bounds):
            continue
        if any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(bounds, again)):
            support = tr.nodes[site_name]["fn"].support
            raise ModelError(
                f"latent site {site_name!r} of model {name!r} has a support that depends on "
                f"other latent values ({support}, with bounds that changed between two prior "
                "draws): guides, NUTS and the mode search map each site to unconstrained space "
                "with a transform fixed at one initial value, so the fit and the reference "
                "would cover the wrong range; sample a variable with a fixed support and "
                "transform it (for b ~ Uniform(0, a): b_unit ~ Uniform(0, 1), "
                'b = pyro.deterministic("b", a * b_unit))'
            )


def _needs_float64(data: Mapping[str, Any]) -> dict[str, float]:
    """``{key: float32 rounding / spread}`` of the float64 tensors that float32 would round."""
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            lost = float32_rounding(value.detach().cpu().numpy())
            if lost > FLOAT32_TOLERANCE:
                out[key] = lost
    return out


def _float64_note(wide: Mapping[str, float]) -> str:
    return ", ".join(
        f"data[{k!r}] is float64 (float32 would round it by {v:.2g} of its spread)"
        for k, v in wide.items()
    )


def _check_latent_dtype(tr: poutine.Trace, data: Mapping[str, Any], name: str) -> None:
    """Warn (PrecisionWarning) when data that needs float64 meets float32 latents."""
    narrow = [
        site_name
        for site_name, site in tr.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and isinstance(site["value"], torch.Tensor)
        and site["value"].dtype == torch.float32
    ]
    if not narrow:
        return
    wide = _needs_float64(data)
    if wide:
        warnings.warn(
            f"{_float64_note(wide)}, but model {name!r} makes float32 latents "
            f"({', '.join(narrow[:3])}): its float32 arithmetic with them can round away "
            "the same precision; make the model follow the data's dtype (prior parameters "
            f"as torch.tensor(0.0, dtype={next(iter(wide))}.dtype)), or center or rescale "
            "the data",
            PrecisionWarning,
            stacklevel=2,
        )


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
    """The user error for ``exc`` raised by a run of model ``name``: the data's or the model's.

    - ``NotImplementedError``: the model uses something Pyro cannot do here (ModelError);
    - raised by the model's own code (the innermost frame is the user's): ModelError
      naming the line, with the model's message;
    - raised inside Pyro or torch (a value outside a support, shapes that do not
      broadcast): DataError, with Pyro's message and shapes on one line;
    - anything else: ModelError.
    """
    msg = _one_line(exc)
    frame = _user_frame(exc)
    at = f" at {frame[0]}" if frame else ""
    if isinstance(exc, NotImplementedError):
        return ModelError(
            f"model {name!r} cannot be run{at}: {msg} (NotImplementedError); the model uses "
            "something Pyro cannot do here"
        )
    if frame is not None and frame[1]:
        return ModelError(
            f"model {name!r} raised {type(exc).__name__}{at}: {msg}; this came from the "
            "model's own code: fix the model, or the data it checks"
        )
    if isinstance(exc, (ValueError, RuntimeError, IndexError, TypeError)):
        return DataError(
            f"data does not fit model {name!r}{at}: {msg}; check the shapes and values of the data"
        )
    return ModelError(
        f"model {name!r} fails{at}: {type(exc).__name__}: {msg}; fix the model's code "
        "(or the data it reads)"
    )
