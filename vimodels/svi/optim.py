"""The optimizer of a fit and one guarded SVI step.

The optimizer is ``torch.optim.Adam(fused=True)`` (torch's one-kernel Adam;
``foreach=True`` where the fused kernel is unavailable) with the learning
rate set per step, wrapped so that it is called like a Pyro optimizer:
``optim(params)`` with the parameters the step touched. Benchmark 2b
(``benchmarks/bench_optim.py``): ``foreach`` with an ``ExponentialLR``
schedule cost 2.5 times the fused kernel per step, 1.56 times the whole step
of a compiled eight-schools fit. It is
built lazily on the first call (Pyro creates parameters during the first
step); parameters first seen later join as a new group at the current
learning rate, and parameters a step did not touch are not moved. Nothing
is clipped: a fit that diverges is caught by the loop (a non-finite step, or
the divergence rule of :mod:`vimodels.svi.divergence` for finite losses out of
any plausible range), not hidden by clipping. Clipping the gradient norm to
100 was tried on the case that rule was made for (a full-rank Gaussian over
1000 dimensions whose loss fell from 1.9e3 to -7e7 at step 15): it ran away
at the same step, so no clipping option is offered. A step whose loss spikes
far above the recent losses is not clipped either but skipped whole
(:mod:`vimodels.svi.spike`, through the step's ``accept``): Adam's state never
sees its gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro import poutine
from pyro.infer.util import zero_grads


class Adam:
    """Adam over all parameters of a fit with a learning rate decaying per step.

    Step ``n`` (from 1) uses the rate ``lr * gamma**n``, as Pyro's
    ``ClippedAdam(lrd=gamma)`` does.

    Parameters
    ----------
    lr : float
        Initial learning rate.
    gamma : float
        Factor applied to the learning rate at every step (1: fixed).
    betas, eps : float
        Adam's moment decays and denominator offset.
    """

    def __init__(
        self,
        lr: float,
        gamma: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.lr = lr
        self.gamma = gamma
        self.betas = betas
        self.eps = eps
        self._optim: torch.optim.Adam | None = None
        self._known: set[torch.Tensor] = set()
        self._steps = 0

    def __call__(self, params: Iterable[torch.Tensor]) -> None:
        """One Adam step of ``params`` (their ``.grad`` holds the gradient)."""
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        self._steps += 1
        lr = self.current_lr
        if self._optim is None:
            self._optim = _adam(ps, lr, self.betas, self.eps)
            self._known = set(ps)
        else:
            new = [p for p in ps if p not in self._known]
            if new:
                self._optim.add_param_group({"params": new})
                self._known.update(new)
            if len(ps) < len(self._known):
                stepped = set(ps)
                for p in self._known - stepped:
                    p.grad = None  # untouched this step: Adam skips it
        for group in self._optim.param_groups:
            group["lr"] = lr
        self._optim.step()

    @property
    def current_lr(self) -> float:
        """The learning rate of the latest step (``lr * gamma**n`` at step ``n``)."""
        return self.lr * self.gamma ** max(self._steps, 1)


def _adam(
    params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Adam:
    """Torch's fused Adam kernel; its ``foreach`` implementation where that is unavailable."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


def make_optimizer(lr: float, lr_decay: float | None, num_steps: int) -> Adam:
    """Adam whose rate decays geometrically to ``lr * lr_decay`` over ``num_steps`` steps."""
    gamma = 1.0 if lr_decay is None else float(lr_decay) ** (1.0 / num_steps)
    return Adam(lr, gamma)


def svi_step(
    model: Callable,
    guide: Callable,
    loss_fn: Any,
    optim: Callable,
    args: tuple,
    accept: Callable[[float], bool] | None = None,
) -> tuple[float, bool]:
    """One SVI step that refuses to apply non-finite gradients.

    Parameters
    ----------
    accept : callable, optional
        ``accept(loss)`` for a finite step: False skips the optimizer (the
        parameters and its state stay as they were; a loss spike,
        :class:`vimodels.svi.spike.SpikeGuard`).

    Returns
    -------
    loss : float
        The step's loss (negative objective, nats).
    finite : bool
        False when the loss or a gradient was NaN or infinite (nothing was moved).
    """
    with poutine.trace(param_only=True) as capture, warnings.catch_warnings():
        # non-finite losses are detected and reported by the loop, with the step number
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        loss = loss_fn.loss_and_grads(model, guide, *args)
    params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    loss = float(loss)
    finite = math.isfinite(loss) and all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params
    )
    if finite and (accept is None or accept(loss)):
        optim(params)
    zero_grads(params)
    return loss, finite
