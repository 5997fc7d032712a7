"""Iterate averaging (Polyak-Ruppert) of SVI parameters, over a stationary stretch.

With one-particle gradients Adam's iterates do not settle on the optimum: they
wander around it, and the size of that wander is set by the learning rate in
the parameters' own units, not by the posterior's scale. On radon the means of
a structured guide move by 0.2 to 0.8 posterior sd between checkpoints 200
steps apart at lr 0.02, and the last iterate ends 0.2-0.25 sd from the NUTS
means; averaged iterates end within 0.1.

Averaging only helps over iterates that are stationary. Early iterates are a
transient, and where the parameters still drift (an ill-conditioned
posterior, whose slow directions barely move the loss) a long average lags
behind the last iterate. So the iterates are kept as batch means (at most
:data:`MAX_BATCHES`; neighbours merge when full), and each coordinate is
averaged over the longest *halving suffix* of the run (all of it, its second
half, its last quarter, ...) whose two halves agree: their means differ by no
more than the sd of the iterates in the second half. A transient or a drift
fails that test on every suffix that holds it (for a linear drift of size
``d`` the halves differ by ``d / 2`` against an sd of ``d / (2 sqrt(12))``);
a coordinate with no passing suffix of :data:`MIN_BATCHES` batches keeps its
last iterate. This is the stationarity check of Dhaka et al., "Robust,
accurate stochastic optimization for variational inference" (NeurIPS 2020),
done on one trajectory with batch means and per coordinate.

The average is over the *unconstrained* parameters (what the optimizer
steps), so constrained parameters stay in their support.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pyro
import torch

MIN_BATCHES = 4
MAX_BATCHES = 64
MIN_DRIFT_BATCHES = 8
DRIFT_Z = 2.9677  # two-sided 0.3 % normal quantile


def t_quantile(df: int, z: float = DRIFT_Z) -> float:
    """Student t quantile matching the normal quantile ``z`` (Cornish-Fisher, 3 terms)."""
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Selection:
    """Which recent iterates each coordinate is averaged over.

    Attributes
    ----------
    first_batch : ndarray of int, shape (D,)
        Per coordinate, the first batch of its averaged suffix; ``-1`` where no
        suffix qualified and the last iterate is kept.
    mean : ndarray, shape (D,)
        Per coordinate, the average over its suffix (NaN where ``first_batch`` is -1).
    num_batches : int
        Batches collected.
    """

    first_batch: np.ndarray
    mean: np.ndarray
    num_batches: int


def halves_agree(means: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Per coordinate, whether the two halves of a run agree within the second half's sd.

    Parameters
    ----------
    means, squares : ndarray, shape (n, D)
        Consecutive batch means of the flat parameters and of their squares, ``n >= 4``.

    Returns
    -------
    ndarray of bool, shape (D,)
        ``|mean(first half) - mean(second half)| <= sd(second half)``, with the
        sd of the iterates themselves (within and between batches). When it
        holds, the average over the run lags the second half by no more than
        the wander it removes.
    """
    n = len(means)
    early, late = means[: n // 2], means[n // 2 :]
    diff = early.mean(axis=0) - late.mean(axis=0)
    late_squares = squares[n // 2 :]
    var = np.maximum(late_squares.mean(axis=0) - late.mean(axis=0) ** 2, 0.0)
    return (np.abs(diff) <= np.sqrt(var)) & ~drifting(early, late, diff)


def drifting(early: np.ndarray, late: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """Per coordinate, whether two halves' batch means differ significantly (still drifting).

    A two-sample t-test on the batch means (treated as independent) at the
    0.3 % level, Welch's standard error, ``n - 2`` degrees of freedom (the
    quantile by the Cornish-Fisher expansion, within 1 % for 6 or more degrees; below
    :data:`MIN_DRIFT_BATCHES` batches the test is not made). A slow
    drift under a large wander passes the sd test of :func:`halves_agree`
    (lag below one wander sd) but not this one once the stretch holds enough
    batches to see it; it is then averaged over a shorter, later stretch, or
    not at all.
    """
    n1, n2 = len(early), len(late)
    if n1 + n2 < MIN_DRIFT_BATCHES:
        return np.zeros(diff.shape, dtype=bool)
    se = np.sqrt(early.var(axis=0, ddof=1) / n1 + late.var(axis=0, ddof=1) / n2)
    crit = t_quantile(n1 + n2 - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(diff) > crit * se


#: Groups the second half of a run is cut into for :func:`second_half_drift`.
DRIFT_GROUPS = 8
#: Family-wise level of :func:`second_half_drift` over all coordinates (two-sided).
DRIFT_FAMILY_LEVEL = 0.01


def second_half_drift(means: np.ndarray) -> np.ndarray:
    """Per coordinate, whether its iterates drift across a stretch (the second half of a run).

    The stretch's batch means are cut into :data:`DRIFT_GROUPS` consecutive
    groups. A coordinate drifts when its first and last groups' means differ
    by more than ``c`` times the sd of the differences between consecutive
    groups (its wander at that scale: a linear trend cancels in that sd, a
    slow random wander does not), ``c`` the Student t quantile (``groups - 2``
    degrees of freedom) at the Bonferroni level :data:`DRIFT_FAMILY_LEVEL`
    over all coordinates. A steady drift of ``d`` per group gives a difference
    ``7 d`` against a wander that does not grow with ``d``; a random walk
    gives about ``2.6`` wander sds, below ``c`` (6.9 for 20 coordinates).

    Parameters
    ----------
    means : ndarray, shape (n, D)
        Consecutive batch means, ``n >= DRIFT_GROUPS``.

    Returns
    -------
    ndarray of bool, shape (D,)
    """
    groups = np.stack([g.mean(axis=0) for g in np.array_split(means, DRIFT_GROUPS)])
    wander = np.diff(groups, axis=0).std(axis=0, ddof=1)
    change = np.abs(groups[-1] - groups[0])
    d = means.shape[1]
    crit = t_quantile(DRIFT_GROUPS - 2, NormalDist().inv_cdf(1 - DRIFT_FAMILY_LEVEL / (2 * d)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(wander > 0, change > crit * wander, change > 0)


def stationary_suffix(means: np.ndarray, squares: np.ndarray) -> Selection:
    """Per coordinate, the longest halving suffix whose halves agree (see module docstring).

    The suffixes tried are the whole run, its second half, its last quarter, ...
    down to :data:`MIN_BATCHES` batches.

    Parameters
    ----------
    means, squares : ndarray, shape (n, D)
        Batch means of the flat parameters and of their squares.

    Returns
    -------
    Selection
    """
    n, d = means.shape
    first = np.full(d, -1)
    avg = np.full(d, np.nan)
    start = 0
    while n - start >= MIN_BATCHES:
        ok = (first < 0) & halves_agree(means[start:], squares[start:])
        first[ok] = start
        avg[ok] = means[start:, ok].mean(axis=0)
        start += (n - start) // 2
    return Selection(first, avg, n)


class IterateAverage:
    """Batch means of the parameter store's unconstrained tensors, and their stationary average.

    ``start(step, batch)`` (re)starts collecting with the next iterate,
    ``update()`` adds an iterate, ``selection()`` picks each coordinate's
    stationary suffix, ``swapped()`` temporarily puts the result in place of
    the parameters, and ``commit()`` writes it into them for good.
    """

    def __init__(self) -> None:
        self.from_step: int | None = None
        self.batch = 1
        self._params: list[torch.Tensor] = []
        self._sums: list[torch.Tensor] = []
        self._squares: list[torch.Tensor] = []
        self._in_batch = 0
        self._means: list[np.ndarray] = []
        self._mean_squares: list[np.ndarray] = []

    @property
    def active(self) -> bool:
        """Whether iterates are being collected."""
        return self.from_step is not None

    def start(self, step: int, batch: int) -> None:
        """Start (or restart) collecting with the next iterate.

        Parameters
        ----------
        step : int
            Steps completed so far; the first iterate collected is that of step ``step + 1``.
        batch : int
            Iterates per batch mean.
        """
        store = pyro.get_param_store()
        self.reset()
        self._params = [store._params[n] for n in store.keys()]
        self._sums = [torch.zeros_like(p) for p in self._params]
        self._squares = [torch.zeros_like(p) for p in self._params]
        self.batch = max(1, int(batch))
        self.from_step = step + 1

    def reset(self) -> None:
        """Stop collecting and drop what was collected."""
        self.__init__()

    def _flat(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1).double() for t in tensors]).numpy()

    def update(self) -> None:
        """Add the current iterate to the running batch."""
        if not self.active:
            return
        with torch.no_grad():
            now = [p.detach() for p in self._params]
            torch._foreach_add_(self._sums, now)
            torch._foreach_addcmul_(self._squares, now, now)
        self._in_batch += 1
        if self._in_batch == self.batch:
            self._means.append(self._flat(self._sums) / self.batch)
            self._mean_squares.append(self._flat(self._squares) / self.batch)
            torch._foreach_zero_(self._sums)
            torch._foreach_zero_(self._squares)
            self._in_batch = 0
            if len(self._means) == MAX_BATCHES:
                self._merge_pairs()

    def _merge_pairs(self) -> None:
        """Halve the number of batches by merging neighbours (the batch length doubles)."""
        self._means = [(a + b) / 2 for a, b in zip(self._means[::2], self._means[1::2])]
        self._mean_squares = [
            (a + b) / 2 for a, b in zip(self._mean_squares[::2], self._mean_squares[1::2])
        ]
        self.batch *= 2

    def selection(self) -> Selection | None:
        """Each coordinate's stationary suffix so far (``None`` before :data:`MIN_BATCHES`)."""
        if len(self._means) < MIN_BATCHES:
            return None
        return stationary_suffix(np.stack(self._means), np.stack(self._mean_squares))

    def drift_note(self, step: int) -> str | None:
        """Why the parameters have not settled, or ``None`` (:func:`second_half_drift`).

        A loss can look level while parameters still drift: a guide's scale
        shrinking towards a posterior 100x narrower than its prior moves the
        Monte Carlo loss of a 5000-row model by a fraction of a nat per window
        under a noise of tens of nats (a normal mean: called converged at step
        2400 with q's sd 1.55x the exact one).

        Parameters
        ----------
        step : int
            Steps completed; the second half of the run is judged.
        """
        if self.from_step is None:
            return None
        first = max(0, int(np.ceil((step / 2 - self.from_step) / self.batch)))
        if len(self._means) - first < 2 * DRIFT_GROUPS:
            return None
        drift = second_half_drift(np.stack(self._means[first:]))
        n = int(drift.sum())
        if n == 0:
            return None
        return (
            f"loss level but {n} of {drift.shape[0]} parameter coordinates still drift across "
            f"the second half of the run (their change exceeds their wander)"
        )

    def _estimate(self, sel: Selection) -> np.ndarray:
        """The flat parameters to use: the suffix average, or the last iterate where none."""
        current = self._flat(self._params)
        return np.where(sel.first_batch >= 0, sel.mean, current)

    def describe(self, sel: Selection | None) -> dict | None:
        """Summary of a selection for the fit's settings (``None``: nothing averaged).

        Returns
        -------
        dict or None
            ``from_step`` (first step of the longest suffix), ``steps`` (its
            length), ``batch`` (steps per batch) and ``fraction_averaged`` (of
            the coordinates; the rest keep the last iterate).
        """
        if sel is None or self.from_step is None or not (sel.first_batch >= 0).any():
            return None
        first = int(sel.first_batch[sel.first_batch >= 0].min())
        return {
            "from_step": self.from_step + first * self.batch,
            "steps": (sel.num_batches - first) * self.batch,
            "batch": self.batch,
            "fraction_averaged": float((sel.first_batch >= 0).mean()),
            "num_drifting": int((sel.first_batch < 0).sum()),
            "num_coordinates": int(sel.first_batch.shape[0]),
        }

    def _write(self, flat: np.ndarray) -> None:
        values = torch.as_tensor(flat)
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                p.copy_(values[offset : offset + n].reshape(p.shape).to(p.dtype))
                offset += n

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Put the selected averages in place of the parameters inside the block."""
        sel = self.selection()
        if sel is None:
            yield
            return
        with torch.no_grad():
            saved = [p.detach().clone() for p in self._params]
        self._write(self._estimate(sel))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._params, saved)

    def commit(self) -> dict | None:
        """Write the selected averages into the parameters; their summary, or ``None``."""
        sel = self.selection()
        if sel is None:
            return None
        self._write(self._estimate(sel))
        return self.describe(sel)
