"""Validation suite: nine posteriordb posteriors with Stan reference draws.

Models this project did not write (posteriordb's Stan programs, translated to
Pyro in :mod:`vimodels.validation.models`), registered apart from the catalog
(:data:`VALIDATION_MODELS`, names ``pdb_*``) but resolved by
:func:`vimodels.catalog.registry.get_model`, so ``vimodels compare
pdb_kidiq_interaction``, sweeps and fits accept them. Their ground truth is
posteriordb's reference posterior (:mod:`vimodels.validation.reference`).
The data and reference files are copies (new BSD licence, see
``vimodels/validation/posteriordb/README.md``).
"""

from vimodels.validation.reference import (
    EXTERNAL_KIND,
    parse_stan_name,
    reference_draws,
    reference_json,
    reference_table,
)
from vimodels.validation.registry import (
    POSTERIORS,
    PREFIX,
    VALIDATION_MODELS,
    ValidationSpec,
    get_spec,
    get_validation_model,
    list_posteriors,
    list_validation_models,
)

__all__ = [
    "EXTERNAL_KIND",
    "POSTERIORS",
    "PREFIX",
    "VALIDATION_MODELS",
    "ValidationSpec",
    "get_spec",
    "get_validation_model",
    "list_posteriors",
    "list_validation_models",
    "parse_stan_name",
    "reference_draws",
    "reference_json",
    "reference_table",
]
