"""A statistical stopping rule for noisy SVI losses.

Every ``window`` steps the last ``2 * window`` losses are split into two
windows. Each window's mean has a standard error from ``num_batches`` batch
means (robust to the autocorrelation Adam induces). The fit has *stopped
improving* when the drop in mean loss between the windows is below
``z`` standard errors of the difference, or below ``rtol * |mean loss|``
(for deterministic losses such as MAP). ``patience`` consecutive such checks
declare convergence.

Adjacent windows alone call a slow improvement converged: on eight schools
(centered, ``auto_normal``) the ELBO gains about 0.05 nats per 200-step
window after step 1000, too little for one window's noise to show, and the
rule said "converged at step 1200" with an ELBO 3.3 nats below where the fit
went on to (12 000 steps). So a check is flat only if, as well, the last
window is no significantly better than the window that ended halfway through
the run (``half_window=True``): over half the run even a slow improvement
adds up to more than the noise. A fit is then converged only once its loss
has been level for the second half of its steps (the warm-up rule of MCMC).
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
    half_window : bool
        Also compare the last window with the one that ended halfway through the run.
    """

    window: int | None = None
    z: float = 2.0
    rtol: float = 1e-4
    patience: int = 3
    num_batches: int = 10
    early_stop: bool = True
    half_window: bool = True

    def resolve_window(self, num_steps: int) -> int:
        """Window length for a fit of ``num_steps`` steps."""
        return self.window if self.window is not None else min(500, max(50, num_steps // 10))


def _batch_mean_se(x: np.ndarray, num_batches: int) -> float:
    batches = np.array_split(x, num_batches)
    means = np.array([b.mean() for b in batches])
    return float(means.std(ddof=1) / np.sqrt(len(means)))


def window_improvement(
    losses: np.ndarray, window: int, num_batches: int = 10, lag: int | None = None
) -> tuple[float, float, float]:
    """Drop in mean loss between the last two windows and its standard error.

    Parameters
    ----------
    losses : ndarray, shape (n,)
        Loss trace, ``n >= 2 * window``.
    window : int
        Window length.
    lag : int, optional
        Steps from the end of the earlier window to the end of the run; default
        ``window`` (the two last windows).

    Returns
    -------
    drop : float
        ``mean(earlier window) - mean(last window)`` (positive while improving).
    se : float
        Standard error of ``drop`` from batch means.
    level : float
        Mean loss of the last window.
    """
    lag = window if lag is None else lag
    n = len(losses)
    prev = np.asarray(losses[n - lag - window : n - lag], dtype=float)
    last = np.asarray(losses[-window:], dtype=float)
    nb = max(2, min(num_batches, window // 2))
    se = float(np.hypot(_batch_mean_se(prev, nb), _batch_mean_se(last, nb)))
    return float(prev.mean() - last.mean()), se, float(last.mean())


def window_wander(losses: np.ndarray, window: int, span: int) -> float:
    """Standard error of a difference of two window means, from how window means wander.

    Adam's iterates wander slowly around the optimum, and so does the loss's
    level: consecutive window means then differ by more than the batch means
    within a window suggest (eight schools at lr 0.05: window means spread by
    0.1-0.2 nats where batch means give a se of 0.05). Over the last ``span``
    steps cut into whole windows, the sd of the differences of consecutive
    window means (a linear trend cancels in it); 0 with fewer than 3 windows.
    """
    m = int(span // window)
    if m < 3:
        return 0.0
    tail = np.asarray(losses[len(losses) - m * window :], dtype=float)
    means = tail.reshape(m, window).mean(axis=1)
    return float(np.diff(means).std(ddof=1))


def is_flat(losses: np.ndarray, window: int, rule: ConvergenceRule) -> bool:
    """Whether the last two windows show no significant improvement."""
    if len(losses) < 2 * window:
        return False
    drop, se, level = window_improvement(losses, window, rule.num_batches)
    return drop < max(rule.z * se, rule.rtol * abs(level))


def level_since_half(losses: np.ndarray, window: int, rule: ConvergenceRule) -> bool:
    """Whether the last window is no significant improvement on the one that ended halfway.

    The standard error is the larger of the batch means' and
    :func:`window_wander`'s over the second half of the run. False before the
    run is three windows long (the halfway window would overlap the last two).
    """
    n = len(losses)
    if n < 3 * window:
        return False
    lag = max(window, n - n // 2)
    drop, se, level = window_improvement(losses, window, rule.num_batches, lag)
    se = max(se, window_wander(losses, window, lag + window))
    return drop < max(rule.z * se, rule.rtol * abs(level))
