"""Pointwise log likelihood with the local discrete latents summed out.

For leave-one-out cross-validation (PSIS-LOO, WAIC) the pointwise log
likelihood of an observation must not condition on latents that belong to
that observation alone: in a mixture, ``log p(x_i | z_i, theta)`` with
``z_i`` drawn from its posterior given ``x_i`` keeps the left-out point's own
assignment in the prediction. The quantity LOO needs is
``log p(x_i | theta) = log sum_k p(z_i = k | theta) p(x_i | z_i = k, theta)``.

:func:`marginal_pointwise` takes a trace of the model run under parallel
enumeration of its discrete sites (continuous latents replayed at ``m``
draws, a plate of draws at dim ``-(depth + 1)``, enumeration to its left) and
sums out, per observed site, the discrete sites it depends on, where that is
a per-observation sum: each such discrete site has one value per element of
the observed site (the same plates), depends on no discrete site outside the
sum, and no other observed site depends on it. Observed sites that depend on
no discrete site are returned as they are; those where the sum is not
per-observation (a global discrete site, a chain of discrete states, two
observed sites sharing one assignment) are left out, and the caller keeps
their conditional log likelihood.

Masks (``poutine.mask``, ``Distribution.mask``) are honoured as in the
model's joint density: a masked-out observation contributes 0 (it is not
observed), whether or not it has a discrete latent; a masked-out discrete
prior drops out of the sum as Pyro drops it from the joint. Scales
(subsampling, ``poutine.scale``) are not applied: the log likelihood is per
observation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pyro.distributions.util import scale_and_mask


def site_log_prob(site: dict) -> torch.Tensor:
    """Unscaled ``log_prob`` of a trace site's value, the entries masked out 0.

    ``site["mask"]`` is what ``poutine.mask`` set (None, a bool, or a bool
    tensor broadcasting against the batch shape); a ``MaskedDistribution``
    masks in its own ``log_prob``.
    """
    return _masked(site["fn"].log_prob(site["value"]), site)


def _masked(lp: torch.Tensor, site: dict) -> torch.Tensor:
    """``lp`` with the entries where ``site``'s mask is False set to 0 (no scale)."""
    return scale_and_mask(lp, 1.0, site.get("mask"))


def _enum_dims(lp: torch.Tensor, depth: int) -> set[int]:
    """Negative dims of ``lp`` left of the draws plate where it varies (enumeration)."""
    return {d for d in range(-lp.dim(), -(depth + 1)) if lp.shape[d] > 1}


def _local(lp: torch.Tensor, depth: int) -> torch.Size:
    """The draws-and-plates part of ``lp``'s shape (its last ``depth + 1`` dims)."""
    full = lp.reshape((1,) * max(0, depth + 1 - lp.dim()) + tuple(lp.shape))
    return full.shape[-(depth + 1) :]


def marginal_pointwise(
    trace: object,
    observed: Iterable[str],
    discrete: Iterable[str],
    depth: int,
) -> dict[str, torch.Tensor]:
    """Per observed site, ``log p(x | continuous latents)`` with its local discrete sites summed.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        The model under ``poutine.enum`` (parallel) inside a plate of draws at
        dim ``-(depth + 1)``; enumeration dims at ``-(depth + 2)`` and left.
    observed, discrete : iterable of str
        Names of the observed and the discrete latent sites.
    depth : int
        The model's ``max_plate_nesting``.

    Returns
    -------
    dict of str to Tensor
        Each eligible observed site's log likelihood, shape ``(m, *plates)`` as
        the draws-and-plates part of its ``log_prob`` (enumeration dims summed
        out and dropped). Sites not eligible (see the module docstring) are absent.
    """
    nodes = trace.nodes
    discrete = [name for name in discrete if name in nodes]
    if any("_enumerate_dim" not in nodes[name]["infer"] for name in discrete):
        # a discrete site not enumerated in parallel (no finite support, or sequential)
        # was drawn at random in this trace: nothing here is conditioned on the draws
        return {}
    observed = [name for name in observed if name in nodes]
    # unmasked here: the sum over a masked observation's latent would give log K, not 0
    lps = {name: nodes[name]["fn"].log_prob(nodes[name]["value"]) for name in observed}
    dim_of: dict[int, str] = {}
    lp_d: dict[str, torch.Tensor] = {}
    for name in discrete:
        dim_of[nodes[name]["infer"]["_enumerate_dim"]] = name
        lp_d[name] = site_log_prob(nodes[name])
    users: dict[str, list[str]] = {}
    for name, lp in lps.items():
        for d in _enum_dims(lp, depth):
            if d in dim_of:
                users.setdefault(dim_of[d], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for name, lp in lps.items():
        dims = _enum_dims(lp, depth)
        if not dims:
            lp = _masked(lp, nodes[name])
            out[name] = lp.reshape(_local(lp, depth))
            continue
        if not dims <= set(dim_of):
            continue
        sites = [dim_of[d] for d in dims]
        if any(
            users[s] != [name]
            or not _enum_dims(lp_d[s], depth) <= dims
            or _local(lp_d[s], depth) != _local(lp, depth)
            for s in sites
        ):
            continue
        total = lp
        for s in sites:
            total = total + lp_d[s]
        total = _masked(total.logsumexp(dim=sorted(dims), keepdim=True), nodes[name])
        out[name] = total.reshape(_local(total, depth))
    return out
