"""Diagnostics: NUTS reference, comparison metrics, ArviZ export and reports.

The public API, re-exported from the modules that hold it:

- :func:`run_nuts`, :func:`exact_reference`, :func:`get_reference` and the
  :class:`Reference` record (:mod:`diagnostics.reference`);
- :func:`fit_to_inference_data`, :func:`reference_to_inference_data`,
  :func:`save_netcdf`, :func:`load_netcdf` (:mod:`diagnostics.convert`);
- :func:`compare`, :func:`run_compare` and the :class:`Comparison` record
  (:mod:`diagnostics.compare`);
- :func:`write_report` (:mod:`diagnostics.report`);
- :mod:`diagnostics.metrics`: pure functions on arrays.
"""

from diagnostics import metrics
from diagnostics.compare import CompareRun, Comparison, LogEvidence, compare, run_compare
from diagnostics.convert import (
    fit_to_inference_data,
    load_netcdf,
    reference_to_inference_data,
    save_netcdf,
)
from diagnostics.reference import (
    CacheWarning,
    Check,
    Reference,
    default_cache_dir,
    exact_reference,
    get_reference,
    run_nuts,
)
from diagnostics.report import write_report

__all__ = [
    "CacheWarning",
    "Check",
    "CompareRun",
    "Comparison",
    "LogEvidence",
    "Reference",
    "compare",
    "default_cache_dir",
    "exact_reference",
    "fit_to_inference_data",
    "get_reference",
    "load_netcdf",
    "metrics",
    "reference_to_inference_data",
    "run_compare",
    "run_nuts",
    "save_netcdf",
    "write_report",
]
