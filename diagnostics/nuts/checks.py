"""One self-check of a reference: the record every reference check returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """One self-check of a reference.

    Attributes
    ----------
    name : str
        ``rhat``, ``ess_bulk``, ``ess_tail``, ``divergences``, ``ebfmi`` or ``modes``
        (a mode the chains never visited, :mod:`diagnostics.nuts.modes`).
    ok : bool
    value : float
        Worst value seen (max R-hat, min ESS, number of divergences, min E-BFMI).
    threshold : float
    detail : str
        One line naming the worst site element.
    """

    name: str
    ok: bool
    value: float
    threshold: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dataclasses.asdict(self)
