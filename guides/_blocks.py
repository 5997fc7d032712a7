"""Gaussian guide blocks over sites of any support (plain Pyro, ``pyro.param``).

A :class:`Site` names a model site, its support and event shape, and
optionally the ``dim=-1`` plate it sits in. Each site is mapped to
unconstrained space with ``biject_to(support)``, whose input shape may differ
from the site's shape (a K-simplex has K - 1 free coordinates, a 2 x 2
correlation Cholesky factor one).

- :func:`mean_field` samples every site from an independent Normal pushed
  through its bijection: one guide site per model site, in the order given,
  so Pyro's mean-field ELBO uses analytic KL terms where it knows them.
  Bijections that change the shape (simplex, correlation Cholesky) draw an
  auxiliary free value first, as ``TransformedDistribution`` cannot infer
  their shapes under the JIT tracer.
- :func:`full_rank` samples one joint Gaussian over all sites as an auxiliary
  vector and hands each site its slice through a ``Delta`` carrying the
  log-Jacobian, the bookkeeping of Pyro's ``AutoContinuous``.

Under vectorized particles (a particle plate at ``dim=-2``) global values have
batch shape ``(P, 1)`` and plated values ``(P, J)``, as in the models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import biject_to, constraints, transforms
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import Transform


@dataclass(frozen=True)
class Site:
    """One latent site of a model, as a guide block sees it.

    Attributes
    ----------
    name : str
        Model site name.
    support : Constraint
        The site's support (``constraints.positive``, ``constraints.simplex`` ...).
    shape : tuple of int
        Event shape of one value (per plate element for a plated site).
    plate : str or None
        Name of the enclosing ``dim=-1`` plate, or ``None`` for a global site.
    plate_size : int
        Size of that plate (1 for a global site).
    """

    name: str
    support: Constraint = constraints.real
    shape: tuple[int, ...] = ()
    plate: str | None = None
    plate_size: int = 1
    _transform: list = field(default_factory=list, repr=False, compare=False)

    @property
    def transform(self) -> Transform:
        """Bijection from unconstrained reals onto the support."""
        if not self._transform:
            self._transform.append(biject_to(self.support))
        return self._transform[0]

    @property
    def free_shape(self) -> tuple[int, ...]:
        """Unconstrained shape of one value."""
        return tuple(self.transform.inverse_shape(torch.Size(self.shape)))

    @property
    def batch(self) -> tuple[int, ...]:
        """Batch shape contributed by the plate: ``(J,)`` or ``()``."""
        return (self.plate_size,) if self.plate is not None else ()

    @property
    def numel(self) -> int:
        """Unconstrained coordinates of the whole site (all plate elements)."""
        return self.plate_size * math.prod(self.free_shape)

    def unconstrain(self, value: torch.Tensor) -> torch.Tensor:
        """Map a constrained value of shape ``batch + shape`` to ``batch + free_shape``."""
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        value = value.expand(self.batch + self.shape)
        return self.transform.inv(value).detach()


def _event_sum(site: Site, log_det: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """Sum a log-Jacobian over the dims it keeps beyond the batch."""
    extra = log_det.dim() - batch_ndim
    return log_det.sum(tuple(range(-extra, 0))) if extra > 0 else log_det


def _plate(site: Site, plates: dict[str, pyro.plate]) -> pyro.plate:
    """The site's plate, created once per guide call (re-entering a name twice is an error)."""
    if site.plate not in plates:
        plates[site.plate] = pyro.plate(site.plate, site.plate_size, dim=-1)
    return plates[site.plate]


def _sample(
    site: Site, fn: dist.Distribution, plates: dict[str, pyro.plate], infer: dict | None = None
) -> torch.Tensor:
    if site.plate is None:
        return pyro.sample(site.name, fn, infer=infer or {})
    with _plate(site, plates):
        return pyro.sample(site.name, fn, infer=infer or {})


def _sample_delta(
    site: Site, u: torch.Tensor, batch_ndim: int, plates: dict[str, pyro.plate]
) -> torch.Tensor:
    x = site.transform(u)
    log_det = _event_sum(site, site.transform.log_abs_det_jacobian(u, x), batch_ndim)
    return _sample(site, dist.Delta(x, log_density=-log_det, event_dim=len(site.shape)), plates)


def _init(site: Site, init: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unconstrained initial value for a site, zeros when not given."""
    if site.name in init:
        value = torch.as_tensor(init[site.name], dtype=torch.get_default_dtype())
        return value.expand(site.batch + site.free_shape).clone()
    return torch.zeros(site.batch + site.free_shape)


def mean_field(
    prefix: str, sites: Sequence[Site], init: Mapping[str, torch.Tensor], init_scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """Sample each site from an independent Normal in unconstrained space.

    Parameters
    ----------
    prefix : str
        Parameter name prefix (``{prefix}.{site}.loc`` and ``.scale``).
    sites : sequence of Site
        Sites, in the model's order.
    init : dict of str to Tensor
        Unconstrained initial locations (``batch + free_shape``); zeros if absent.
    init_scale : float
        Initial sd of every unconstrained coordinate.

    Returns
    -------
    dict of str to Tensor
        Sampled values in constrained space.
    """
    out = {}
    plates: dict[str, pyro.plate] = {}
    for site in sites:
        start = _init(site, init)
        loc = pyro.param(f"{prefix}.{site.name}.loc", start)
        scale = pyro.param(
            f"{prefix}.{site.name}.scale",
            torch.full_like(start, init_scale),
            constraint=constraints.positive,
        )
        base = dist.Normal(loc, scale).to_event(len(site.free_shape))
        if _is_identity(site.transform):
            out[site.name] = _sample(site, base, plates)
        elif site.free_shape == site.shape:
            out[site.name] = _sample(
                site, dist.TransformedDistribution(base, site.transform), plates
            )
        else:
            # Shape-changing bijections (simplex, correlation Cholesky) go through an
            # auxiliary free draw: TransformedDistribution cannot infer their shapes
            # under the JIT tracer.
            aux = Site(f"_{prefix}_{site.name}_free", plate=site.plate, plate_size=site.plate_size)
            u = _sample(
                aux,
                dist.Normal(loc, scale).to_event(len(site.free_shape)),
                plates,
                infer={"is_auxiliary": True},
            )
            out[site.name] = _sample_delta(site, u, u.dim() - len(site.free_shape), plates)
    return out


def _is_identity(transform: Transform) -> bool:
    if isinstance(transform, transforms.IndependentTransform):
        return _is_identity(transform.base_transform)
    return transform == transforms.identity_transform


def full_rank(
    prefix: str, sites: Sequence[Site], init: Mapping[str, torch.Tensor], init_scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """Sample all sites from one full-rank Gaussian in unconstrained space.

    Parameters
    ----------
    prefix : str
        Parameter name prefix (``{prefix}.loc``, ``{prefix}.scale_tril``).
    sites : sequence of Site
        Sites, in the model's order.
    init : dict of str to Tensor
        Unconstrained initial locations (``batch + free_shape``); zeros if absent.
    init_scale : float
        Initial sd of every unconstrained coordinate.

    Returns
    -------
    dict of str to Tensor
        Sampled values in constrained space.
    """
    start = torch.cat([_init(site, init).reshape(-1) for site in sites])
    dim = start.shape[0]
    loc = pyro.param(f"{prefix}.loc", start)
    # as Pyro's AutoMultivariateNormal: a positive scale per coordinate times a unit
    # lower-triangular factor, so that an optimizer step on an off-diagonal entry is
    # relative to its row's scale (a free Cholesky factor in 89 dimensions blew up
    # within 12-32 steps at lr 0.02 on radon)
    positive = dist.constraints.softplus_positive
    scale = pyro.param(
        f"{prefix}.scale", torch.full((dim,), init_scale, dtype=start.dtype), constraint=positive
    )
    unit_tril = pyro.param(
        f"{prefix}.scale_tril",
        torch.eye(dim, dtype=start.dtype),
        constraint=dist.constraints.unit_lower_cholesky,
    )
    scale_tril = scale[..., None] * unit_tril
    z = pyro.sample(
        f"_{prefix}_latent",
        dist.MultivariateNormal(loc, scale_tril=scale_tril),
        infer={"is_auxiliary": True},
    )
    return split(z, sites)


def split(z: torch.Tensor, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    """Hand slices of a joint unconstrained draw ``z`` to the sites as ``Delta`` values.

    Parameters
    ----------
    z : Tensor, shape (..., D)
        Joint draw, ``D = sum(site.numel)``; under a particle plate the batch is
        ``(P, 1)``.
    sites : sequence of Site

    Returns
    -------
    dict of str to Tensor
        Constrained values.
    """
    out = {}
    plates: dict[str, pyro.plate] = {}
    batch = z.shape[:-1]
    parts = torch.split(z, [site.numel for site in sites], dim=-1)
    for site, part in zip(sites, parts):
        if site.plate is None:
            u = part.reshape(batch + site.free_shape)
            out[site.name] = _sample_delta(site, u, len(batch), plates)
        else:
            # the trailing batch dim (size 1 under a particle plate) is the plate's
            outer = batch[:-1] if len(batch) else batch
            u = part.reshape(outer + (site.plate_size,) + site.free_shape)
            out[site.name] = _sample_delta(site, u, len(outer) + 1, plates)
    return out


def keyword_guide(body: Callable[[], object]) -> Callable[..., None]:
    """A guide taking the model's keyword arguments and running ``body()``.

    The blocks read nothing from the call's data: what they need (sizes,
    sufficient statistics) is bound when the guide is built.
    """

    def guide(**kwargs) -> None:
        body()

    return guide


def normal_param(
    prefix: str, init_loc: torch.Tensor, init_scale: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Register ``{prefix}.loc`` and a positive ``{prefix}.scale`` of ``init_loc``'s shape."""
    loc = pyro.param(f"{prefix}.loc", init_loc.detach().clone())
    scale = pyro.param(
        f"{prefix}.scale", torch.full_like(init_loc, init_scale), constraint=constraints.positive
    )
    return loc, scale
