"""The proposal pool of an importance resampling: guide draws and their log weights.

:func:`vimodels.svi.resample.resampled_draws` draws ``pool_factor`` times as
many proposal draws as it returns, each with ``log p(x, z) - log q(z)``.
Through Pyro's traces (:func:`vimodels.svi.draws.sample_guide`) that is a
model trace and a per-site sum for every chunk of 1000 draws. The guides of
Laplace and Pathfinder (:class:`~vimodels.mode.guides.FixedGaussianGuide`)
carry the model's flat unconstrained potential (Jacobian included), so the
same weight is

    log w = potential(u) - log q(u)

for the guide's flat draw ``u``: ``log p(x, T(u)) + log|det dT/du|`` less the
Gaussian's (mixture's) log density, where the trace path subtracts the guide's
``log q(u) - log|det dT/du|``. :func:`pool_draws` evaluates the potential by
its frozen batched graph (:func:`vimodels.mode.fast.frozen_log_density_batch`,
on blocks of rows, one intra-op thread) and ``log q`` by one triangular solve
per component (:func:`gaussian_log_density`); the guide itself still draws
every chunk as before, so the same seed gives the same draws. Measured in
benchmarks/README.md, section 4b ("Where the fixed costs go").

It does so only where the result is the same as the trace path's:

- the guide is a fixed Gaussian with a potential in its own dtype, the model
  has no discrete site, and only latent sites are asked for;
- the potential has a valid frozen graph (no value read into Python, no
  random operation, a batched density that matches the row-by-row one: what
  :mod:`vimodels.mode.fast` refuses, a masked site for one, stays on the traces);
- once per guide, :data:`CHECK_DRAWS` draws' log weights agree with the trace
  path's to :data:`RTOL` relative (a model that makes float32 constants, which
  the potential makes in float64, does not);
- every weight of the pool is finite (elsewhere the trace path, which reruns
  a draw that breaks Pyro's validation, decides).

Otherwise the pool is drawn through the traces, as before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

from vimodels.mode.fast import frozen_batch_sizes, frozen_log_density_batch
from vimodels.mode.guides import FixedGaussianGuide
from vimodels.mode.potential import Potential
from vimodels.svi.draws import _DRAWS_PLATE, LATENT, ModelInfo, _as_draws, _chunks, sample_guide

#: False: always draw the pool through Pyro's traces (for benchmarks of the difference)
ENABLED = True

#: Rows per call of the frozen graph: about this many data elements per call (the model's
#: arithmetic on large data stays in cache; small models make fewer calls), within
#: :data:`MIN_ROWS` and :data:`MAX_ROWS`. A graph already built for a size within a factor 2
#: (Pathfinder's 25 ELBO draws) is reused.
ROW_ELEMENTS = 40_000
MIN_ROWS = 25
MAX_ROWS = 500

#: Draws on which the frozen weights must match the traces' once per guide, and how closely.
CHECK_DRAWS = 16
RTOL = 1e-9
_CHECK_SEED = 20240917


def pool_draws(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    num_samples: int,
    *,
    sites: tuple[str, ...] | None = None,
    check: bool = True,
    chunk: int = 1000,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``num_samples`` guide draws and their log weights, as :func:`sample_guide` returns them.

    Parameters
    ----------
    model, guide, args, kwargs, info, num_samples, sites, check, chunk
        As for :func:`vimodels.svi.draws.sample_guide` (``check`` applies to the
        trace path only).

    Returns
    -------
    draws : dict of str to ndarray
        ``(num_samples, *site_shape)`` per requested site (default: every latent site).
    log_weights : ndarray, shape (num_samples,)
        ``log p(x, z) - log q(z)`` (nats); ``-inf`` for a draw without density.
    """
    sites = info.latent if sites is None else tuple(s for s in sites if s in info.sites)
    frozen = _frozen_for(model, guide, args, kwargs, info, sites)
    if frozen is not None:
        state = pyro.util.get_rng_state()
        out = _frozen_pool(guide, frozen, args, kwargs, info, num_samples, sites, chunk)
        if out is not None:
            return out
        pyro.util.set_rng_state(state)  # a non-finite weight: the traces decide, same draws
    return sample_guide(
        model, guide, args, kwargs, info, num_samples, chunk, sites=sites, check=check
    )


def _frozen_for(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    sites: tuple[str, ...],
) -> tuple[Callable, int] | None:
    """The frozen density and its row count where :func:`pool_draws` may use it, else None."""
    if not ENABLED or not isinstance(guide, FixedGaussianGuide):
        return None
    potential = guide.potential
    if potential is None or guide.locs.dtype != potential.dtype or info.discrete:
        return None
    if any(info.sites[s].kind != LATENT for s in sites):
        return None
    rows = _rows(potential)
    near = [n for n in frozen_batch_sizes(potential) if rows / 2 <= n <= 2 * rows]
    rows = near[0] if near else rows
    fn = frozen_log_density_batch(potential, rows)
    if fn is None:
        return None
    verdict = getattr(guide, "_pool_agrees", None)
    if verdict is None:
        verdict = _agrees(model, guide, (fn, rows), args, kwargs, info)
        guide._pool_agrees = verdict
    return (fn, rows) if verdict else None


def _rows(potential: Potential) -> int:
    """Rows per call of the frozen graph for this potential's data (see :data:`ROW_ELEMENTS`)."""
    size = sum(v.numel() for v in potential.data.values() if isinstance(v, torch.Tensor))
    return int(min(MAX_ROWS, max(MIN_ROWS, ROW_ELEMENTS // max(size, 1))))


def _agrees(
    model: Callable,
    guide: FixedGaussianGuide,
    frozen: tuple[Callable, int],
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
) -> bool:
    """Whether :data:`CHECK_DRAWS` draws' frozen weights are the traces' (random state kept)."""
    state = pyro.util.get_rng_state()
    try:
        pyro.set_rng_seed(_CHECK_SEED)
        _, ref = sample_guide(model, guide, args, kwargs, info, CHECK_DRAWS, sites=(), check=False)
        pyro.set_rng_seed(_CHECK_SEED)
        got = _frozen_pool(guide, frozen, args, kwargs, info, CHECK_DRAWS, (), CHECK_DRAWS)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    finally:
        pyro.util.set_rng_state(state)
    if got is None or not np.isfinite(ref).all():
        return False
    scale = 1.0 + float(np.abs(ref).max())
    return bool(np.allclose(got[1], ref, rtol=RTOL, atol=RTOL * scale))


def gaussian_log_density(
    locs: torch.Tensor,
    scale_trils: torch.Tensor,
    u: torch.Tensor,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log density of the mixture of ``N(locs[p], L_p L_p^T)`` at each row of ``u``.

    The formula of torch's ``MultivariateNormal`` and ``MixtureSameFamily``, with
    one triangular solve per component for all rows: under a plate of ``n`` draws
    the guide's own distribution solves ``n x P`` systems one by one (0.1 s per
    1000 draws of a 4-path, 3-dimensional Pathfinder mixture).

    Parameters
    ----------
    locs : Tensor, shape (P, dim)
    scale_trils : Tensor, shape (P, dim, dim)
    u : Tensor, shape (n, dim)
    logits : Tensor, shape (P,), optional
        Normalized mixture log weights; default equal weights.

    Returns
    -------
    Tensor, shape (n,)
        Nats, in the dtype of ``locs``.
    """
    u = u.to(locs.dtype)
    diff = (u.unsqueeze(0) - locs.unsqueeze(1)).transpose(-1, -2)  # (P, dim, n)
    m = torch.linalg.solve_triangular(scale_trils, diff, upper=False).pow(2).sum(-2)
    half_log_det = scale_trils.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    comp = -0.5 * (locs.shape[-1] * math.log(2 * math.pi) + m) - half_log_det.unsqueeze(-1)
    if locs.shape[0] == 1:
        return comp[0]
    if logits is None:
        logits = locs.new_zeros(locs.shape[0])
    log_mix = torch.log_softmax(logits.to(locs.dtype), -1).unsqueeze(-1)
    return torch.logsumexp(comp + log_mix, dim=0)


def _frozen_pool(
    guide: FixedGaussianGuide,
    frozen: tuple[Callable, int],
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    num_samples: int,
    sites: tuple[str, ...],
    chunk: int,
) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """Draws and log weights by the frozen density; None when a weight is not finite.

    The guide draws each chunk under the draws plate exactly as
    :func:`sample_guide` has it draw (same random numbers, same values); its
    flat draw ``u`` is the guide's auxiliary latent site, ``log q(u)`` comes
    from :func:`gaussian_log_density`.
    """
    fn, rows = frozen
    potential = guide.potential
    ndim = info.max_plate_nesting + 1
    aux = f"_{guide._pyro_name}_latent"
    values: dict[str, list[np.ndarray]] = {name: [] for name in sites}
    weights = []
    with torch.no_grad(), _one_thread():
        for start, stop in _chunks(num_samples, chunk):
            n = stop - start
            with pyro.plate(_DRAWS_PLATE, n, dim=-ndim):
                guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
            site = guide_tr.nodes[aux]
            u = site["value"].reshape(n, potential.dim).to(potential.dtype)
            log_q = gaussian_log_density(guide.locs, guide.scale_trils, u, guide.logits).double()
            log_p = torch.empty(n, dtype=torch.float64)
            for i in range(0, n, rows):
                part = u[i : i + rows]
                k = part.shape[0]
                if k < rows:  # the graph has a fixed row count: pad with the first row
                    part = torch.cat([part, part[:1].expand(rows - k, potential.dim)])
                log_p[i : i + k] = fn(part)[:k].double()
            lw = log_p - log_q
            if not bool(torch.isfinite(lw).all()):
                return None
            weights.append(lw.numpy().copy())
            for name in sites:
                values[name].append(
                    _as_draws(guide_tr.nodes[name]["value"], n, info.sites[name].shape)
                )
    draws = {name: np.concatenate(v) for name, v in values.items()}
    return draws, np.concatenate(weights) if weights else np.zeros(0)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the pool's small blocks (torch's setting restored after).

    Blocks of ~40 000 elements gain nothing from a second thread, and on a loaded
    machine each parallel operation waits for a descheduled one: tens of ms per
    operation, over hundreds of calls (benchmarks/README.md, section 4b). Rows are
    independent, so only the order of a reduction within a row could change: round-off.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
