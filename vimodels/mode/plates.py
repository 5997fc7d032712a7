"""Which plates of a model trace subsample their rows, and which latent sites are per row."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pyro.poutine.util import site_is_subsample


def subsampled_plates(trace: Any) -> dict[str, tuple[int, int]]:
    """The plates of a model trace that took fewer rows than they have.

    Returns
    -------
    dict of str to (int, int)
        Plate name to ``(size, rows taken)``, in trace order.
    """
    out: dict[str, tuple[int, int]] = {}
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            size = getattr(site["fn"], "size", None)
            taken = int(site["value"].numel())
            if size is not None and taken < int(size):
                out[name] = (int(size), taken)
    return out


def local_latent_sites(trace: Any, plates: Iterable[str]) -> list[str]:
    """Latent sites of a trace inside any of ``plates`` (a value per row of the plate)."""
    plates = set(plates)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and any(f.name in plates for f in site["cond_indep_stack"])
    ]


def rows_of(plates: dict[str, tuple[int, int]]) -> int:
    """Rows of the full data summed over :func:`subsampled_plates`' plates."""
    return sum(size for size, _ in plates.values())
