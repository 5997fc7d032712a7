"""Every call into ArviZ lives here.

ArviZ 1.x replaces ``InferenceData`` by ``xarray.DataTree`` and moves the
statistics to ``arviz-stats``; keeping the calls in one module makes that
move local. Nothing here knows about Pyro.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vimodels.arviz_import import import_arviz

az = import_arviz()

InferenceData = az.InferenceData

GROUPS = ("posterior", "sample_stats", "log_likelihood", "observed_data", "posterior_predictive")


def from_dict(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    dims: Mapping[str, Sequence[str]],
    coords: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
) -> InferenceData:
    """Build InferenceData from arrays.

    Parameters
    ----------
    groups : dict of str to dict of str to ndarray
        Group name (one of :data:`GROUPS`) to variables. Arrays of every group but
        ``observed_data`` have leading ``(chain, draw)`` axes.
    dims : dict of str to sequence of str
        Dimension names of each variable, without ``chain`` and ``draw``.
    coords : dict of str to ndarray
        Coordinates of named dimensions.
    attrs : dict
        Attributes stored on every group (strings and numbers only).
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown InferenceData group(s): {sorted(unknown)}")
    kwargs = {name: dict(values) for name, values in groups.items() if values}
    idata = az.from_dict(
        **kwargs,
        dims={k: list(v) for k, v in dims.items()},
        coords={k: np.asarray(v) for k, v in coords.items()},
        attrs=dict(attrs),
    )
    for name in idata.groups():  # ArviZ 0.23 puts them on the root and observed_data only
        idata[name].attrs.update(attrs)
    return idata


def to_netcdf(idata: InferenceData, path: str | os.PathLike) -> None:
    """Write ``idata`` to ``path`` with the h5netcdf engine (not atomic: see convert)."""
    idata.to_netcdf(str(path), engine="h5netcdf")


def from_netcdf(path: str | os.PathLike) -> InferenceData:
    """Read a netcdf file fully into memory and close it."""
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(str(path), engine="h5netcdf")


def group_names(idata: InferenceData) -> list[str]:
    """Names of the groups present in ``idata``."""
    return list(idata.groups())


def group_arrays(idata: InferenceData, group: str) -> dict[str, np.ndarray]:
    """Variables of one group as numpy arrays (empty dict when the group is absent)."""
    if group not in idata.groups():
        return {}
    ds = idata[group]
    return {name: np.asarray(ds[name].values) for name in ds.data_vars}


def rhat(draws: np.ndarray) -> float:
    """Rank-normalized split R-hat of one scalar quantity, ``draws`` shape (chain, draw).

    NaN for fewer than two chains (between-chain agreement cannot be checked).
    """
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 2 or draws.shape[0] < 2:
        return float("nan")
    return float(az.rhat(draws, method="rank"))


def ess(draws: np.ndarray, method: str = "bulk") -> float:
    """Effective sample size (``bulk`` or ``tail``) of ``draws`` shape (chain, draw)."""
    return float(az.ess(np.asarray(draws, dtype=float), method=method))


def mcse_mean(draws: np.ndarray) -> float:
    """Monte Carlo standard error of the mean of ``draws`` shape (chain, draw)."""
    return float(az.mcse(np.asarray(draws, dtype=float), method="mean"))


def psis_khat(log_weights: np.ndarray) -> float:
    """Pareto k-hat of importance log weights, shape (n,) (ArviZ ``psislw``, r_eff = 1).

    ArviZ's generalized-Pareto fit exponentiates differences of profile
    log likelihoods; with very heavy tails (a barely fitted guide, thousands of
    draws) some overflow to ``inf``, whose reciprocal is the correct weight 0.
    The overflow warning is therefore silenced here, not passed on.
    """
    with np.errstate(over="ignore"):
        _, khat = az.psislw(np.asarray(log_weights, dtype=float), reff=1.0)
    return float(np.asarray(khat))


def version() -> str:
    """The installed ArviZ version."""
    return az.__version__
