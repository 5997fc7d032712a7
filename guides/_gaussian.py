"""Building blocks for hand-written Gaussian guides (plain Pyro, ``pyro.param``).

A joint Gaussian over several sites is sampled once as an auxiliary vector in
unconstrained space and handed to each site through a ``Delta`` whose
``log_density`` carries the change of variables, the same bookkeeping as
Pyro's ``AutoContinuous``. Plated sites must live in a single plate at
``dim=-1``; under vectorized particles the particle plate is at ``dim=-2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints, transforms

IDENTITY = transforms.identity_transform


@dataclass(frozen=True)
class SiteSpec:
    """One latent site in a joint Gaussian guide.

    Attributes
    ----------
    name : str
        Model site name.
    size : int
        Number of scalar elements.
    transform : Transform
        Map from unconstrained reals to the site's support (elementwise).
    plate : str or None
        Name of the ``dim=-1`` plate enclosing the site (then it has ``size`` batch
        elements and no event dimension); ``None`` for a global site.
    event : bool
        For a global site, whether it has an event dimension of ``size``.
    """

    name: str
    size: int = 1
    transform: transforms.Transform = field(default_factory=lambda: IDENTITY)
    plate: str | None = None
    event: bool = False


def positive() -> transforms.Transform:
    """Exp transform onto the positive reals."""
    return transforms.ExpTransform()


def joint_gaussian(
    prefix: str, specs: Sequence[SiteSpec], init_loc: torch.Tensor, init_scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """Sample ``specs`` from one full-rank Gaussian in unconstrained space.

    Parameters
    ----------
    prefix : str
        Prefix of the parameter names (``{prefix}.loc``, ``{prefix}.scale_tril``).
    specs : sequence of SiteSpec
        Sites in the order of the joint vector.
    init_loc : Tensor, shape (D,)
        Initial unconstrained location, ``D = sum(spec.size)``.
    init_scale : float
        Initial standard deviation of every unconstrained coordinate.

    Returns
    -------
    dict of str to Tensor
        The sampled site values in constrained space.
    """
    dim = sum(s.size for s in specs)
    loc = pyro.param(f"{prefix}.loc", init_loc.detach().clone())
    scale_tril = pyro.param(
        f"{prefix}.scale_tril",
        init_scale * torch.eye(dim, dtype=init_loc.dtype),
        constraint=constraints.lower_cholesky,
    )
    z = pyro.sample(
        f"_{prefix}_latent",
        dist.MultivariateNormal(loc, scale_tril=scale_tril),
        infer={"is_auxiliary": True},
    )
    return _split(z, specs)


def _split(z: torch.Tensor, specs: Sequence[SiteSpec]) -> dict[str, torch.Tensor]:
    out = {}
    pos = 0
    vectorized = z.dim() >= 3  # (particles, 1, D) under a particle plate at dim -2
    for spec in specs:
        u = z[..., pos : pos + spec.size]
        pos += spec.size
        x = spec.transform(u)
        log_det = spec.transform.log_abs_det_jacobian(u, x)
        if spec.plate is not None:
            if vectorized:
                x, log_det = x.squeeze(-2), log_det.squeeze(-2)
            with pyro.plate(spec.plate, spec.size, dim=-1):
                out[spec.name] = pyro.sample(spec.name, dist.Delta(x, log_density=-log_det))
        elif spec.event:
            out[spec.name] = pyro.sample(
                spec.name, dist.Delta(x, log_density=-log_det.sum(-1), event_dim=1)
            )
        else:
            out[spec.name] = pyro.sample(
                spec.name, dist.Delta(x[..., 0], log_density=-log_det[..., 0])
            )
    return out


def normal_param(
    prefix: str, init_loc: torch.Tensor, init_scale: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Register ``{prefix}.loc`` and a positive ``{prefix}.scale`` of ``init_loc``'s shape."""
    loc = pyro.param(f"{prefix}.loc", init_loc.detach().clone())
    scale = pyro.param(
        f"{prefix}.scale", torch.full_like(init_loc, init_scale), constraint=constraints.positive
    )
    return loc, scale
