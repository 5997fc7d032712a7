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
