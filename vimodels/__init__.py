"""vimodels: a variational-inference workbench on Pyro."""

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
    "NutsSettings",
    "OptionError",
    "OutputError",
    "UnknownNameError",
    "VimodelsError",
    "find_mode",
    "fit",
    "get_model",
    "list_models",
    "laplace",
    "make_elbo",
    "pathfinder",
]
