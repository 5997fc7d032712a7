"""Stan's implicit and restricted priors as Pyro distributions.

A Stan parameter declared with a constraint and given no sampling statement
has a flat (improper) prior on its constrained support; a sampling statement
on a constrained parameter (``sigma ~ cauchy(0, 2.5)`` with ``<lower=0>``)
adds the density restricted to the support, *unnormalised* (Stan drops the
truncation constant). :class:`Flat` and :class:`Restricted` state exactly
that. Both can be sampled (Pyro's initialisation, the project's model checks
and autoguides draw from every latent site): a draw is a point uniform in
``(-2, 2)`` on the unconstrained scale of the support, only a starting point
for inference, not a prior draw.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

_RADIUS = 2.0


def _feasible(
    support: constraints.Constraint, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """A point uniform in ``(-2, 2)`` on the unconstrained scale of ``support``."""
    # through the torch module (fingerprinted by name): the NUTS cache fingerprints a
    # model's globals, and the transform registry object itself cannot be fingerprinted
    t = torch.distributions.transform_to(support)
    probe = t(torch.zeros(shape, dtype=dtype))
    u = t.inv(probe)
    return t(torch.rand_like(u) * (2 * _RADIUS) - _RADIUS)


class Flat(TorchDistribution):
    """Flat prior on a constrained support: ``log_prob`` is ``log_factor`` everywhere.

    Stan's implicit prior of a parameter without a sampling statement.
    ``log_factor`` (default 0) is a constant of the value, possibly depending
    on other parameters: the log-Jacobian of a reparameterised dependent bound.

    Parameters
    ----------
    support : Constraint
        Support of one event (``constraints.real``, ``constraints.positive``,
        ``constraints.unit_interval`` ...); an event of ``event_shape`` has the
        support elementwise unless it is a vector constraint already.
    event_shape : tuple of int
        Shape of one draw.
    log_factor : Tensor or float
        Log density, a constant of the value; its shape is the batch shape.
    dtype : torch.dtype
        Dtype of draws (``log_factor``'s when it is a tensor).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        support: constraints.Constraint,
        event_shape: tuple[int, ...] = (),
        log_factor: torch.Tensor | float = 0.0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if isinstance(log_factor, torch.Tensor):
            dtype = log_factor.dtype
        self.log_factor = torch.as_tensor(log_factor, dtype=dtype)
        self.dtype = dtype
        event_shape = torch.Size(event_shape)
        if len(event_shape) > support.event_dim:
            support = constraints.independent(support, len(event_shape) - support.event_dim)
        self._support = support
        super().__init__(self.log_factor.shape, event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        """The constrained support of one event."""
        return self._support

    def expand(self, batch_shape: torch.Size, _instance: Flat | None = None) -> Flat:
        """Broadcast to ``batch_shape``."""
        new = self._get_checked_instance(Flat, _instance)
        new.log_factor = self.log_factor.expand(batch_shape)
        new.dtype = self.dtype
        new._support = self._support
        super(Flat, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log_factor``, broadcast to the value's batch shape."""
        batch = value.shape[: value.dim() - self.event_dim]
        shape = torch.broadcast_shapes(batch, self.batch_shape)
        return self.log_factor.to(value.dtype).expand(shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """A feasible starting point (see the module docstring), not a prior draw."""
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        return _feasible(self._support, shape, self.dtype)


class Restricted(TorchDistribution):
    """``base``'s density on a smaller support, unnormalised (Stan's truncation-free prior).

    Parameters
    ----------
    base : Distribution
        Density whose ``log_prob`` is kept (e.g. independent normals).
    support : Constraint
        Support of one event (e.g. ``constraints.positive_ordered_vector``).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: TorchDistribution, support: constraints.Constraint) -> None:
        self.base = base
        self._support = support
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        """The restricted support."""
        return self._support

    def expand(self, batch_shape: torch.Size, _instance: Restricted | None = None) -> Restricted:
        """Broadcast to ``batch_shape``."""
        new = self._get_checked_instance(Restricted, _instance)
        new.base = self.base.expand(batch_shape)
        new._support = self._support
        super(Restricted, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``base.log_prob(value)`` (no normalisation over the support)."""
        return self.base.log_prob(value)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """A feasible starting point (see the module docstring), not a prior draw."""
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        probe = self.base.sample()
        return _feasible(self._support, shape, probe.dtype)
