"""A fit whose parameters stopped moving under a noisy loss is stuck, not converged.

The loss-window rule (:mod:`vimodels.svi.convergence`) sees a flat loss both
where the fit has settled and where it can no longer move. The two differ in
the parameters: with one-particle gradients Adam keeps every coordinate the
loss depends on wandering, by steps of a few per cent of the learning rate
(0.7 % to 6 % per step on the catalog fits measured), while a stuck fit stops:
its steps shrink by Adam's ``beta1 = 0.9`` a step, to 1e-10 of the learning
rate within two hundred steps, while the loss, a Monte Carlo estimate, stays as
noisy as ever. Two causes: a gradient that vanished (a saturated region, a cut
gradient path), or Adam's second moment swamped by one outlying gradient (it
decays by ``beta2 = 0.999`` a step, so a gradient 1e11 times the usual one
freezes the fit for tens of thousands of steps). ``pdb_arma11`` with
``auto_multivariate_normal`` (seed 0) does the latter: a draw with
``|theta| > 1`` makes the MA recursion explode, the loss of step 98 is 2.9e13,
and the fit, frozen from then on, was called converged at step 800 with an ELBO
of -389 against ``auto_normal``'s +57.

:class:`StepActivity` keeps, per unconstrained coordinate, the summed size of
its steps over the first convergence window and over the latest one. A
coordinate is *frozen* when it moved in the first window and its latest
window's steps add up to less than :data:`FROZEN_RATIO` of the first's. A fit
with a frozen coordinate under a loss that still varies (its sd over the
window above the rule's ``rtol`` times its level, so a deterministic loss that
settled is not affected) is not converged.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch

FROZEN_RATIO = 1e-4


class StepActivity:
    """Summed absolute steps of each unconstrained parameter coordinate, window by window.

    ``start()`` captures the parameter store's tensors (after the first step,
    once they exist), ``update()`` adds the step just taken, ``end_window()``
    closes a window, and ``frozen()`` counts the frozen coordinates.
    """

    def __init__(self) -> None:
        self._params: list[torch.Tensor] = []
        self._prev: list[torch.Tensor] = []
        self._acc: list[torch.Tensor] = []
        self.first: np.ndarray | None = None
        self.last: np.ndarray | None = None

    @property
    def active(self) -> bool:
        """Whether steps are being recorded."""
        return bool(self._params)

    def start(self) -> None:
        """Start recording with the next step."""
        store = pyro.get_param_store()
        self.__init__()
        self._params = [store._params[n] for n in store.keys()]
        with torch.no_grad():
            self._prev = [p.detach().clone() for p in self._params]
            self._acc = [torch.zeros_like(p) for p in self._params]

    def update(self) -> None:
        """Add the size of the step just taken."""
        if not self._params:
            return
        with torch.no_grad():
            now = [p.detach() for p in self._params]
            diff = torch._foreach_sub(now, self._prev)
            torch._foreach_abs_(diff)
            torch._foreach_add_(self._acc, diff)
            torch._foreach_copy_(self._prev, now)

    def end_window(self) -> None:
        """Close the current window (the first one closed is kept as the reference)."""
        if not self._params:
            return
        flat = torch.cat([a.reshape(-1).double() for a in self._acc]).numpy().copy()
        torch._foreach_zero_(self._acc)
        if self.first is None:
            self.first = flat
        self.last = flat

    def frozen(self) -> tuple[int, int]:
        """Frozen coordinates in the latest window, and the coordinates that moved at first."""
        if self.first is None or self.last is None or self.last is self.first:
            return 0, 0
        moved = self.first > 0
        frozen = moved & (self.last < FROZEN_RATIO * self.first)
        return int(frozen.sum()), int(moved.sum())


def noisy(losses: np.ndarray, window: int, rtol: float) -> bool:
    """Whether the last window's loss varies by more than ``rtol`` of its level (Monte Carlo).

    A deterministic loss (MAP by Adam) that settled varies by less; there, a
    level loss is convergence even while the parameters still creep.
    """
    last = np.asarray(losses[-window:], dtype=float)
    return bool(last.std() > rtol * abs(last.mean()))


def stuck_note(activity: StepActivity, losses: np.ndarray, window: int, rtol: float) -> str | None:
    """Why a flat loss is not convergence (frozen parameters under a noisy loss), or ``None``.

    Parameters
    ----------
    activity : StepActivity
        With the latest window closed.
    losses : ndarray
        The loss trace so far.
    window : int
        Window length (steps).
    rtol : float
        The convergence rule's ``rtol``: a loss whose sd over the window is below
        ``rtol * |mean|`` counts as deterministic, where settling means stopping.
    """
    n_frozen, n_moved = activity.frozen()
    if n_frozen == 0 or not noisy(losses, window, rtol):
        return None
    return (
        f"loss flat but {n_frozen} of {n_moved} parameter coordinates stopped moving (their "
        f"steps fell below {FROZEN_RATIO:g} of their first window's) while the loss stays "
        "noisy: the optimizer is stuck (a vanished gradient, or Adam's step scale swamped "
        "by an outlying gradient)"
    )
