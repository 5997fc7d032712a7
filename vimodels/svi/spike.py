"""Skip the SVI steps whose loss spikes far above the recent losses.

One guide draw can land where the model's log density explodes (``pdb_arma11``
with ``auto_multivariate_normal``, seed 0: a draw with ``|theta| > 1`` makes
the MA recursion blow up; the loss of step 98 was 2.9e13 against about 380
around it, its gradient norm 1e16 against about 100). Applied, such a step
puts the square of that gradient into Adam's second moment, which decays by
``beta2 = 0.999`` a step: every later step shrinks to about 1e-10 of the
learning rate and the fit freezes for tens of thousands of steps
(:mod:`vimodels.svi.stuck` reports such a fit; this module prevents it).

:class:`SpikeGuard` judges each finite loss against the last :data:`WINDOW`
applied losses, with median ``m`` and median absolute deviation ``MAD``: a
loss above ``m + FACTOR * max(MAD, REL_FLOOR * |m|, ABS_FLOOR)`` is a spike
and its step is not applied: neither the parameters nor Adam's state (moments,
step count, learning-rate schedule) see its gradient. With ``FACTOR = 1e3`` a
spike lies a thousand robust scales above the median (about 670 standard
deviations of a normal loss), and also more than ``10 * |m|`` and 1000 nats
above it, so a deterministic loss (a point-mass guide), whose MAD is only its
trend, is judged by the relative floor. The threshold is refreshed every
:data:`REFRESH` applied steps (two medians of a hundred floats cost about a
tenth of a small model's step; ``statistics.median``, not NumPy's, whose fixed
overhead is larger at this size), and no loss is judged before
:data:`MIN_HISTORY` steps were applied.

The loss is the only input: it is read into Python at every step already
(``float(loss)``), so the guard adds a comparison, no reduction and no host
synchronisation. The gradient norm would say more directly what swamps Adam,
but needs a reduction over every gradient per step; on ``pdb_arma11`` both
flag the same step (the loss 6.7e11 MADs above the median, the gradient norm
8.9e13 times its median) and no other step (the next largest gradient ratio,
100 at step 101, had a loss 8 MADs up and is harmless).

A skipped step is counted; when :data:`STOP_COUNT` of the last
:data:`STOP_WINDOW` steps were skipped the loss has moved to a level the
window does not describe and the fit stops as ``diverged`` (never
``converged``).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

#: Applied losses the median and MAD are taken over.
WINDOW = 100
#: Applied steps before any loss is judged.
MIN_HISTORY = 20
#: Robust scales above the median that make a spike.
FACTOR = 1e3
#: Floors of the robust scale: a fraction of ``|median|``, and nats.
REL_FLOOR = 1e-2
ABS_FLOOR = 1.0
#: The threshold is recomputed every this many applied steps.
REFRESH = 20
#: The fit stops (diverged) when this many of the last STOP_WINDOW steps were skipped.
STOP_WINDOW = 20
STOP_COUNT = 10


class SpikeGuard:
    """Decides, step by step, whether a finite loss is applied or skipped as a spike.

    Call :meth:`accepts` with each finite loss before the optimizer step;
    :meth:`diverged` after it says whether too many recent steps were skipped.
    """

    def __init__(self) -> None:
        self._window: deque[float] = deque(maxlen=WINDOW)
        self._since_refresh = 0
        self._threshold = float("inf")
        self._recent: deque[int] = deque(maxlen=STOP_WINDOW)
        self.skipped: list[int] = []  # step numbers (from 0)
        self.largest = -float("inf")  # the largest skipped loss
        self.threshold_at_first: float | None = None

    def accepts(self, step: int, loss: float) -> bool:
        """Whether step ``step``'s (finite) ``loss`` may update the parameters and Adam."""
        if loss > self._threshold:
            self.skipped.append(step)
            self._recent.append(1)
            self.largest = max(self.largest, loss)
            if self.threshold_at_first is None:
                self.threshold_at_first = self._threshold
            return False
        self._recent.append(0)
        self._window.append(loss)
        self._since_refresh += 1
        if len(self._window) >= MIN_HISTORY and self._since_refresh >= REFRESH:
            self._threshold = threshold(self._window)
            self._since_refresh = 0
        return True

    def diverged(self, step: int) -> str | None:
        """A one-line reason when too many of the latest steps were skipped, else None."""
        if not self.skipped or self.skipped[-1] != step:
            return None
        n = sum(self._recent)
        if n < STOP_COUNT:
            return None
        return (
            f"diverged at step {step}: {n} of the last {len(self._recent)} steps' losses "
            f"spiked above {self._threshold:.4g} (the recent losses' median + "
            f"{FACTOR:g} robust scales) and were skipped; the loss left the level it had"
        )

    def summary(self) -> dict[str, Any] | None:
        """The skipped steps, for a fit's settings (None when none was skipped)."""
        if not self.skipped:
            return None
        return {
            "skipped": len(self.skipped),
            "first_step": self.skipped[0],
            "steps": self.skipped[:100],
            "largest_loss": self.largest,
            "first_threshold": self.threshold_at_first,
            "factor": FACTOR,
            "window": WINDOW,
        }

    def note(self) -> str | None:
        """One clause for the fit's message (None when no step was skipped)."""
        if not self.skipped:
            return None
        n = len(self.skipped)
        return (
            f"skipped {n} step{'s' if n > 1 else ''} whose loss spiked (first at step "
            f"{self.skipped[0]}, largest loss {self.largest:.3g}): not applied to the "
            "parameters or Adam's state"
        )


def threshold(losses: Sequence[float]) -> float:
    """``median + FACTOR * max(MAD, REL_FLOOR * |median|, ABS_FLOOR)`` of ``losses`` (nats).

    In Python (``statistics.median``): for a hundred floats it costs a quarter of
    ``numpy.median``, whose fixed overhead dominates at this size.
    """
    med = float(statistics.median(losses))
    mad = float(statistics.median([abs(x - med) for x in losses]))
    return med + FACTOR * max(mad, REL_FLOOR * abs(med), ABS_FLOOR)
