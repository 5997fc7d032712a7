"""A statistical stopping rule for noisy SVI losses.

Every ``window`` steps the last ``2 * window`` losses are split into two
windows. Each window's mean has a standard error from ``num_batches`` batch
means (robust to the autocorrelation Adam induces). The fit has *stopped
improving* when the drop in mean loss between the windows is below
``z`` standard errors of the difference, or below ``rtol * |mean loss|``
(for deterministic losses such as MAP). ``patience`` consecutive such checks
declare convergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvergenceRule:
    """Parameters of the stopping rule (see module docstring).

    Attributes
    ----------
    window : int or None
        Steps per window; ``None`` picks ``num_steps // 10`` clipped to [50, 500].
    z : float
        Significance of the improvement in standard errors.
    rtol : float
        Relative improvement below which a window counts as flat.
    patience : int
        Consecutive flat checks needed.
    num_batches : int
        Batch means per window for the standard error.
    early_stop : bool
        Stop the fit once converged (otherwise only record it).
    """

    window: int | None = None
    z: float = 2.0
    rtol: float = 1e-4
    patience: int = 3
    num_batches: int = 10
    early_stop: bool = True

    def resolve_window(self, num_steps: int) -> int:
        """Window length for a fit of ``num_steps`` steps."""
        return self.window if self.window is not None else min(500, max(50, num_steps // 10))


def _batch_mean_se(x: np.ndarray, num_batches: int) -> float:
    batches = np.array_split(x, num_batches)
    means = np.array([b.mean() for b in batches])
    return float(means.std(ddof=1) / np.sqrt(len(means)))


def window_improvement(
    losses: np.ndarray, window: int, num_batches: int = 10
) -> tuple[float, float, float]:
    """Drop in mean loss between the last two windows and its standard error.

    Parameters
    ----------
    losses : ndarray, shape (n,)
        Loss trace, ``n >= 2 * window``.
    window : int
        Window length.

    Returns
    -------
    drop : float
        ``mean(previous window) - mean(last window)`` (positive while improving).
    se : float
        Standard error of ``drop`` from batch means.
    level : float
        Mean loss of the last window.
    """
    prev = np.asarray(losses[-2 * window : -window], dtype=float)
    last = np.asarray(losses[-window:], dtype=float)
    nb = max(2, min(num_batches, window // 2))
    se = float(np.hypot(_batch_mean_se(prev, nb), _batch_mean_se(last, nb)))
    return float(prev.mean() - last.mean()), se, float(last.mean())


def is_flat(losses: np.ndarray, window: int, rule: ConvergenceRule) -> bool:
    """Whether the last two windows show no significant improvement."""
    if len(losses) < 2 * window:
        return False
    drop, se, level = window_improvement(losses, window, rule.num_batches)
    return drop < max(rule.z * se, rule.rtol * abs(level))
