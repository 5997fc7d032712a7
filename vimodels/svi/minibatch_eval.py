"""The ELBO of a fit whose model subsamples its data, from minibatches.

The full-data ELBO ``E_q[log p(x, z) - log q(z)]`` of a model with a
subsampled plate would cost ``num_eval x N`` likelihood terms; here it is
estimated from ``G`` groups of draws (100 by default), each group with its
own batch of rows drawn independently of the others
(:class:`~vimodels.svi.subsample.IndexSupplier`, scheme ``"independent"``).
Pyro's plate scales the batch's log likelihood by ``N / batch``, so every
draw's log weight is an unbiased estimate of its full-data log weight, and
the mean over all draws is unbiased for the ELBO. The groups are independent
and identically distributed (fresh ``z`` and a fresh batch), so the standard
error comes from the spread of the group means: it includes the subsampling
noise, which at large ``N`` dominates (it grows as ``N / sqrt(G x batch)``).
The cost is ``num_eval x batch`` terms whatever ``N``, in ``G`` passes, and
memory holds one group at a time.

The log weights themselves are per-draw estimates (each group shares one
batch), not the exact full-data weights: importance-sampling diagnostics
computed from them (PSIS k-hat, the IWAE bound) carry the subsampling noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vimodels.svi.draws import model_info, sample_guide
from vimodels.svi.subsample import IndexSupplier

#: Independent data batches of the final ELBO estimate (at most one per draw).
EVAL_BATCHES = 100


def group_sizes(num: int, batches: int = EVAL_BATCHES) -> np.ndarray:
    """Draws per group: ``num`` split as evenly as possible into ``min(num, batches)`` groups."""
    groups = max(1, min(int(num), int(batches)))
    edges = np.linspace(0, num, groups + 1).round().astype(int)
    return np.diff(edges)


def minibatch_log_weights(
    model: Callable,
    guide: Callable,
    kwargs: dict,
    num: int,
    max_plate_nesting: int,
    *,
    seed: int,
    batches: int = EVAL_BATCHES,
    report: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` log weights in groups, each group on its own independent data batch.

    Parameters
    ----------
    model, guide : callable
        Called as ``fn(**kwargs)``.
    kwargs : dict
        Data.
    num : int
        Number of draws.
    max_plate_nesting : int
        Plate depth of the model.
    seed : int
        Seed of the batches (the draws of ``z`` follow Pyro's random state).
    batches : int
        Number of groups (independent batches).
    report : dict, optional
        Filled as :func:`~vimodels.svi.draws.sample_guide` fills it: whether
        every group was evaluated under a particle plate, and the first reason
        one was not.

    Returns
    -------
    log_w : ndarray, shape (num,)
        Per-draw estimates of ``log p(x, z) - log q(z)`` (nats).
    sizes : ndarray of int
        Draws per group, in order.
    """
    sizes = group_sizes(num, batches)
    out = []
    report = {} if report is None else report
    report.update(vectorized=True, reason=None)
    info = None
    # one batch per group: its draws, and the one-draw checks of its vectorized pass, share it
    with IndexSupplier(seed, "independent", hold=True) as supplier:
        for n in sizes:
            supplier.advance()
            if info is None:  # traced once, on the first group's batch
                info = model_info(model, (), kwargs, max_plate_nesting)
            group: dict = {}
            # the first group's vectorized pass is checked against one-draw evaluation: the
            # others run the same pass unchecked while the checks pass
            checked = bool(out) and report["vectorized"]
            _, lw = sample_guide(
                model, guide, (), kwargs, info, int(n), int(n), group,
                sites=(), check=not checked, nan_as=np.nan,
            )  # fmt: skip
            out.append(lw)
            if not group.get("vectorized"):
                report["vectorized"] = False
                report["reason"] = report["reason"] or group.get("reason")
    return np.concatenate(out), sizes


def grouped_estimate(log_w: np.ndarray, sizes: np.ndarray) -> tuple[float, float]:
    """Mean of ``log_w`` and its standard error from independent groups of draws.

    The mean weights each group by its size; the standard error is that of
    a mean of independent cluster totals (``G / (G - 1)`` corrected), so it
    includes whatever the draws of a group share (here: their data batch).
    Returns ``(mean, nan)`` with a single group.
    """
    log_w = np.asarray(log_w, dtype=float)
    sizes = np.asarray(sizes, dtype=int)
    num = int(sizes.sum())
    if num != len(log_w):
        raise ValueError(f"group sizes add to {num}, not {len(log_w)} log weights")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    means = np.add.reduceat(log_w, starts) / sizes
    share = sizes / num
    est = float(np.sum(share * means))
    groups = len(sizes)
    if groups < 2:
        return est, float("nan")
    var = groups / (groups - 1) * float(np.sum(share**2 * (means - est) ** 2))
    return est, float(np.sqrt(var))


def minibatch_elbo(
    model: Callable,
    guide: Callable,
    kwargs: dict,
    num: int,
    max_plate_nesting: int,
    *,
    seed: int,
    batches: int = EVAL_BATCHES,
    report: dict | None = None,
) -> tuple[float, float]:
    """ELBO estimate and standard error (nats) from ``num`` draws on independent batches."""
    log_w, sizes = minibatch_log_weights(
        model,
        guide,
        kwargs,
        num,
        max_plate_nesting,
        seed=seed,
        batches=batches,
        report=report,
    )
    return grouped_estimate(log_w, sizes)
