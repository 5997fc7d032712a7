"""vimodels: a variational-inference workbench on Pyro."""

import importlib

from vimodels.catalog import (
    MODELS,
    CatalogEntry,
    ExactPosterior,
    NutsSettings,
    get_model,
    list_models,
)
from vimodels.errors import (
    CurvatureError,
    DataError,
    IncompatibleError,
    ModelError,
    OptionError,
    OutputError,
    UnknownNameError,
    VimodelsError,
)
from vimodels.mode import find_mode, laplace, pathfinder
from vimodels.svi.convergence import ConvergenceRule
from vimodels.svi.elbos import ELBOS, make_elbo
from vimodels.svi.fit import FitProgress, FitResult, fit

__version__ = "0.1.0"


def __getattr__(name: str):
    """``calibrate`` (:func:`vimodels.runs.calibrate.calibrate`), imported on first use.

    The runs layer sits above diagnostics; importing it lazily keeps ``import
    vimodels`` light and free of cycles.
    """
    if name == "calibrate":  # by name, as diagnostics' lazy exports: runs sits above
        calibrate = importlib.import_module("vimodels.runs.calibrate").calibrate
        globals()[name] = calibrate
        return calibrate
    raise AttributeError(f"module 'vimodels' has no attribute {name!r}")


__all__ = [
    "MODELS",
    "ELBOS",
    "CatalogEntry",
    "ConvergenceRule",
    "CurvatureError",
    "DataError",
    "ExactPosterior",
    "FitProgress",
    "FitResult",
    "IncompatibleError",
    "ModelError",
    "NutsSettings",
    "OptionError",
    "OutputError",
    "UnknownNameError",
    "VimodelsError",
    "calibrate",
    "find_mode",
    "fit",
    "get_model",
    "list_models",
    "laplace",
    "make_elbo",
    "pathfinder",
]
