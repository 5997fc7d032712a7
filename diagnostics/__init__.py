"""Diagnostics: NUTS reference, comparison metrics, ArviZ export and reports.

The public API, re-exported (lazily, so that worker processes stay light)
from the modules that hold it:

- :func:`run_nuts`, :func:`exact_reference`, :func:`get_reference` and the
  :class:`Reference` record (:mod:`diagnostics.nuts.reference`);
- :func:`fit_to_inference_data`, :func:`reference_to_inference_data`,
  :func:`save_netcdf`, :func:`load_netcdf` (:mod:`diagnostics.convert`);
- :func:`compare` and the :class:`Comparison` record
  (:mod:`diagnostics.comparison`);
- :func:`write_report` (:mod:`diagnostics.report`);
- :func:`write_calibration_report` (:mod:`diagnostics.calibration_report`) and
  :mod:`diagnostics.calibration`: simulation-based calibration statistics;
- :mod:`diagnostics.metrics`: pure functions on arrays.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheWarning": "diagnostics.nuts.reference",
    "Check": "diagnostics.nuts.reference",
    "Reference": "diagnostics.nuts.reference",
    "default_cache_dir": "diagnostics.nuts.reference",
    "exact_reference": "diagnostics.nuts.reference",
    "get_reference": "diagnostics.references",
    "run_nuts": "diagnostics.nuts.reference",
    "fit_to_inference_data": "diagnostics.convert",
    "load_netcdf": "diagnostics.convert",
    "reference_to_inference_data": "diagnostics.convert",
    "save_netcdf": "diagnostics.convert",
    "Comparison": "diagnostics.comparison",
    "LogEvidence": "diagnostics.comparison",
    "compare": "diagnostics.comparison",
    "write_report": "diagnostics.report",
    "write_calibration_report": "diagnostics.calibration_report",
    "metrics": "diagnostics.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "metrics" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
