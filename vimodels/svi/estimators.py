"""Lower-variance gradient estimators for reparameterized guides.

Both estimators evaluate ``log q(z)`` with the guide's distribution parameters
*detached*, so the gradient reaching the guide flows only through the sample
path ``z = g(eps, phi)``:

- **sticking the landing** (STL, Roeder et al. 2017) for the ELBO: the score
  term ``E_q[d log q / d phi]`` (zero in expectation) is dropped, which removes
  all gradient noise when ``q`` equals the posterior;
- **doubly reparameterized** (DReG, Tucker et al. 2019) for the IWAE bound,
  implemented in :mod:`vimodels.svi.iwae` with :func:`detach_distribution`.

:func:`detach_distribution` rebuilds a distribution with its parameters cut
from the autograd graph; :class:`StickingTheLanding` is a Pyro ``ELBO``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

from vimodels.errors import IncompatibleError
from vimodels.svi.logweight import log_weight_terms


def detach_distribution(fn: dist.Distribution) -> dist.Distribution:
    """Return ``fn`` with its parameters detached (same value, no gradient to them).

    Supports ``Independent``, ``ExpandedDistribution``, ``MaskedDistribution``,
    ``TransformedDistribution`` (parameter-free transforms), ``MultivariateNormal``
    and any distribution whose constructor takes the names of its
    ``arg_constraints``. ``Delta`` is returned unchanged: its ``log_density``
    is a function of the sample (a Jacobian term), not a parameter.

    Raises
    ------
    IncompatibleError
        For a distribution it cannot rebuild.
    """
    if isinstance(fn, dist.Delta):
        return fn
    if isinstance(fn, dist.Independent):
        return dist.Independent(detach_distribution(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return detach_distribution(fn.base_dist).expand(fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return dist.MaskedDistribution(detach_distribution(fn.base_dist), fn._mask)
    if isinstance(fn, torch.distributions.TransformedDistribution):
        return dist.TransformedDistribution(detach_distribution(fn.base_dist), fn.transforms)
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    names = list(getattr(fn, "arg_constraints", {}))
    params = {n: fn.__dict__[n] for n in names if n in fn.__dict__}
    if not params:
        raise IncompatibleError(
            f"cannot detach the parameters of {type(fn).__name__} for a path-derivative "
            "gradient estimator; use the standard estimator"
        )
    try:
        return type(fn)(
            **{n: v.detach() if isinstance(v, torch.Tensor) else v for n, v in params.items()}
        )
    except (TypeError, ValueError) as exc:
        raise IncompatibleError(
            f"cannot rebuild {type(fn).__name__} with detached parameters ({exc}); use the "
            "standard estimator"
        ) from exc


def _check_reparameterized(guide_tr: poutine.Trace, what: str) -> None:
    for name, site in guide_tr.nodes.items():
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and not site_is_subsample(site)
            and not site["fn"].has_rsample
        ):
            raise IncompatibleError(f"{what} needs reparameterizable guide sites; {name!r} is not")


class DifferentiableLossELBO(ELBO):
    """A Pyro ``ELBO`` defined by its ``differentiable_loss``.

    Subclasses implement ``differentiable_loss(model, guide, *args, **kwargs)``
    (a scalar tensor, minus the bound); ``loss`` and ``loss_and_grads`` follow.
    """

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Return minus the bound as a float (no gradients)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Compute minus the bound, backpropagate its gradient, return it as a float."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


class StickingTheLanding(DifferentiableLossELBO):
    """Monte Carlo ELBO with the sticking-the-landing gradient.

    The loss value equals ``Trace_ELBO``'s; the gradient for the guide flows
    only through the samples (``log q`` evaluated with detached parameters),
    for the model it is unchanged. Particles are vectorized with a plate just
    outside the model's plates.

    Parameters
    ----------
    num_particles : int
        Draws per step.
    max_plate_nesting : int, optional
        Plate depth of the model; found from one trace when omitted.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None):
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=True,
            max_plate_nesting=max_plate_nesting if max_plate_nesting is not None else float("inf"),
        )
        self._user_depth = max_plate_nesting
        self._depth: dict[tuple[int, int], int] = {}

    def _get_trace(self, model, guide, args, kwargs):  # required by the ELBO base class
        raise NotImplementedError("StickingTheLanding computes its own vectorized traces")

    def _plate_depth(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
        key = (id(model), id(guide))
        if key not in self._depth:
            with poutine.block():
                guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
                model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                    *args, **kwargs
                )
            _check_reparameterized(guide_tr, "the 'stl' estimator")
            depth = 0
            for tr in (model_tr, guide_tr):
                for site in tr.nodes.values():
                    if site["type"] == "sample":
                        for f in site["cond_indep_stack"]:
                            if f.vectorized:
                                depth = max(depth, -f.dim)
            if self._user_depth is not None:
                depth = max(depth, self._user_depth)
            self._depth[key] = depth
        return self._depth[key]

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """Return ``-ELBO`` as a scalar whose gradient is the STL estimator."""
        depth = self._plate_depth(model, guide, args, kwargs)
        ndim = depth + 1
        K = self.num_particles
        with pyro.plate("_stl_particles", K, dim=-ndim):
            guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                *args, **kwargs
            )
        log_w = log_weight_terms(
            model_tr, guide_tr, K, ndim, guide_fn=detach_distribution, dtype=None
        ).draws
        return -log_w.mean()
