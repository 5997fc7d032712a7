"""Is a model safe to evaluate under a plate of particles? One check for every path.

Log weights ``log p(x, z) - log q(z)`` for many guide draws are computed with
the draws stacked on a plate just outside the model's plates (``n`` draws in
one pass). That is only right when the model broadcasts every latent over the
leading draw axis; a model written for one draw at a time can silently give
wrong numbers instead of an error, for instance

- ``(X * beta.unsqueeze(-2)).sum(-1)`` inside a data plate: the mean gets shape
  ``(n, 1, N)``, the plate expands the singleton to ``(n, n, N)`` and every
  draw's log likelihood sums ``n`` draws' worth of cross terms;
- ``beta.reshape(-1)[:D]``: every draw uses the first draw's coefficients;
  the shapes are right, the values are not.

:func:`check_particles` therefore compares a vectorized pass with the same
draws evaluated one at a time, for a few draws spread over the pass (never
only the first, which the second kind of bug gets right), after a cheap check
that no site's batch holds more entries than ``n`` draws allow. The ELBO of a
fit, its draws and the diagnostics all come from
:func:`vimodels.svi.draws.sample_guide`, which goes through it and evaluates one
draw at a time when it fails, saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine

from vimodels.svi.logweight import NotVectorizable, counted_sites, trace_log_weights

#: Draws of a vectorized pass that are re-evaluated one at a time.
NUM_CHECK = 4
#: Agreement needed between a vectorized and a sequential log weight (nats):
#: ``ATOL + RTOL * |log w|``, far above float32 summation error and far below
#: any broadcasting mistake.
ATOL, RTOL = 1e-3, 1e-4


def _is_delta(fn: Any) -> bool:
    while True:
        if isinstance(fn, dist.Delta):
            return True
        base = getattr(fn, "base_dist", None)
        if base is None:
            return False
        fn = base


def _one_draw(value: torch.Tensor, i: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    size = int(np.prod(shape, dtype=int))
    if value.numel() == size:
        return value.reshape(shape)
    if value.numel() == n * size:
        return value.reshape((n, *shape))[i]
    raise NotVectorizable(
        f"a draw of shape {tuple(value.shape)} under {n} particles does not hold one "
        f"value of shape {shape} per particle"
    )


def _sequential(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    values: Mapping[str, torch.Tensor] | None,
) -> tuple[poutine.Trace, poutine.Trace, float]:
    """Guide and model traces of one draw (given values replayed) and its log weight."""
    if values is None:
        g = guide
    else:
        fake = poutine.Trace()
        for name, v in values.items():
            fake.add_node(name, type="sample", name=name, value=v, is_observed=False, infer={})
        g = poutine.replay(guide, trace=fake)
    guide_tr = poutine.trace(g).get_trace(*args, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return guide_tr, model_tr, float(trace_log_weights(model_tr, guide_tr, 1, None)[0])


def check_particles(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    model_tr: poutine.Trace,
    guide_tr: poutine.Trace,
    log_w: torch.Tensor | np.ndarray,
    num_check: int = NUM_CHECK,
) -> None:
    """Raise :class:`NotVectorizable` unless a vectorized pass matches one-draw evaluation.

    Parameters
    ----------
    model, guide : callable
        Called as ``fn(*args, **kwargs)`` (guide parameters in the active store).
    model_tr, guide_tr : Trace
        The vectorized pass: the guide traced under the particle plate and the
        model replayed on it.
    log_w : tensor or ndarray, shape (n,)
        The log weights the pass gave.
    num_check : int
        Draws re-evaluated one at a time: the first, the last and evenly between.

    Notes
    -----
    Draws are re-evaluated by replaying the guide's random choices (its
    ``Delta`` sites, which auto guides compute from other draws, are recomputed)
    and the model on them, with the random number generator left as it was.
    """
    log_w = np.asarray(log_w, dtype=float)
    n = len(log_w)
    picks = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(num_check, n))})
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        ref_g, ref_m, _ = _sequential(model, guide, args, kwargs, None)
        for vec, ref in ((guide_tr, ref_g), (model_tr, ref_m)):
            vec_sites = {s["name"]: s for s in counted_sites(vec, vec is guide_tr)}
            ref_sites = {s["name"]: s for s in counted_sites(ref, ref is ref_g)}
            if set(vec_sites) != set(ref_sites):
                raise NotVectorizable(
                    "the sites differ under a particle plate: "
                    f"{sorted(set(vec_sites) ^ set(ref_sites))}"
                )
            for name, site in vec_sites.items():
                one = int(np.prod(ref_sites[name]["fn"].batch_shape, dtype=int))
                many = int(np.prod(site["fn"].batch_shape, dtype=int))
                if many not in (one, n * one):
                    raise NotVectorizable(
                        f"site {name!r} has batch shape {tuple(site['fn'].batch_shape)} under "
                        f"{n} particles and {tuple(ref_sites[name]['fn'].batch_shape)} for one "
                        "draw: the model does not broadcast over the particles"
                    )
        shapes = {
            s["name"]: tuple(s["value"].shape)
            for s in counted_sites(ref_g, True)
            if not _is_delta(s["fn"])
        }
        for i in picks:
            values = {
                name: _one_draw(guide_tr.nodes[name]["value"], i, n, shape)
                for name, shape in shapes.items()
            }
            w = _sequential(model, guide, args, kwargs, values)[2]
            same = w == log_w[i] or (np.isnan(w) and np.isnan(log_w[i]))  # inf, nan alike
            if not same and not abs(w - log_w[i]) <= ATOL + RTOL * max(abs(w), abs(log_w[i])):
                raise NotVectorizable(
                    f"draw {i} of {n} has log weight {log_w[i]:.6g} under a particle "
                    f"plate and {w:.6g} on its own: the model does not broadcast over "
                    "the particles"
                )
