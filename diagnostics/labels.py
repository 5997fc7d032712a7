"""Labels of site elements (``name``, ``name[i]``, ``name[i,j]``): NumPy only, cheap to import."""

from __future__ import annotations

import numpy as np

__all__ = ["element_labels"]


def element_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """``name`` for scalars, ``name[i]`` / ``name[i,j]`` for array elements."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]
