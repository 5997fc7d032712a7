"""Pyro guides from Gaussians over the flat unconstrained latents, and SVI starts from them.

:class:`FixedGaussianGuide` is an ``AutoContinuous`` guide whose posterior is
a fixed Gaussian (Laplace) or a mixture of Gaussians (Pathfinder's paths,
equal weights; nested Laplace's grid, weighted), so draws, log weights and
PSIS work as for any autoguide.
:func:`initialize_gaussian_guide` writes a Gaussian into the parameters of
``AutoNormal``, ``AutoMultivariateNormal`` or ``AutoLowRankMultivariateNormal``,
so SVI starts where the optimizer left off.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer import autoguide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam

from vimodels.errors import IncompatibleError, OptionError
from vimodels.mode.laplace import Gaussian
from vimodels.mode.potential import Potential

#: Guides whose parameters :func:`initialize_gaussian_guide` can set.
GAUSSIAN_GUIDES = (
    autoguide.AutoNormal,
    autoguide.AutoMultivariateNormal,
    autoguide.AutoLowRankMultivariateNormal,
)


def check_layout(guide: autoguide.AutoGuide, potential: Potential) -> None:
    """Raise IncompatibleError unless ``guide`` orders and sizes the latents as ``potential``."""
    if isinstance(guide, autoguide.AutoContinuous):
        shapes = dict(guide._unconstrained_shapes)
    else:
        shapes = {
            name: _unconstrained_shape(site)
            for name, site in guide.prototype_trace.iter_stochastic_nodes()
        }
    mine = {b.name: b.unconstrained_shape for b in potential.blocks}
    if list(shapes) != list(mine) or any(tuple(shapes[k]) != mine[k] for k in mine):
        raise IncompatibleError(
            f"the guide's latent layout {dict(shapes)} differs from the model's {mine}; "
            "initialize from a mode of the same model and data"
        )


def _unconstrained_shape(site: dict) -> tuple[int, ...]:
    return tuple(biject_to(site["fn"].support).inv(site["value"]).shape)


class FixedGaussianGuide(autoguide.AutoContinuous):
    """A guide with a fixed Gaussian (mixture) posterior over the flat unconstrained latents.

    Parameters
    ----------
    model : callable
        The Pyro model (called with the same arguments as the guide).
    locs : Tensor, shape (P, dim)
        Component means (``P = 1``: a single Gaussian).
    scale_trils : Tensor, shape (P, dim, dim)
        Lower Cholesky factors of the component covariances.
    potential : Potential, optional
        The model's flat unconstrained log density (Jacobian included) over the same
        layout, kept as :attr:`potential`: the importance resampling evaluates its
        proposal pool through the potential's frozen batched graph where that gives
        the same log weights (:mod:`vimodels.svi.pool`).
    logits : Tensor, shape (P,), optional
        Mixture log weights (normalized here); default equal weights.
    """

    def __init__(
        self,
        model: Callable,
        locs: torch.Tensor,
        scale_trils: torch.Tensor,
        potential: Potential | None = None,
        logits: torch.Tensor | None = None,
    ):
        super().__init__(model)
        self.potential = potential
        if locs.dim() != 2 or scale_trils.shape != locs.shape + locs.shape[-1:]:
            raise OptionError(
                f"locs must be (P, dim) and scale_trils (P, dim, dim), got "
                f"{tuple(locs.shape)} and {tuple(scale_trils.shape)}"
            )
        self.register_buffer("locs", locs.detach().clone())
        self.register_buffer("scale_trils", scale_trils.detach().clone())
        if logits is None:
            logits = locs.new_zeros(locs.shape[0])
        if logits.shape != locs.shape[:1] or not bool(torch.isfinite(logits).all()):
            raise OptionError(f"logits must be {locs.shape[0]} finite numbers")
        self.register_buffer("logits", torch.log_softmax(logits.detach().to(locs.dtype), 0))

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        if self.latent_dim != self.locs.shape[-1]:
            raise IncompatibleError(
                f"the Gaussian has {self.locs.shape[-1]} dimensions, the model "
                f"{self.latent_dim} unconstrained latents"
            )

    def get_posterior(self, *args, **kwargs):
        """The fixed Gaussian, or the mixture of the components (weights ``softmax(logits)``)."""
        # fixed, already checked factors: no per-call validation (a Cholesky check each time)
        if self.locs.shape[0] == 1:
            return dist.MultivariateNormal(
                self.locs[0], scale_tril=self.scale_trils[0], validate_args=False
            )
        mix = dist.Categorical(logits=self.logits, validate_args=False)
        comp = dist.MultivariateNormal(self.locs, scale_tril=self.scale_trils, validate_args=False)
        return dist.MixtureSameFamily(mix, comp, validate_args=False)

    def _loc_scale(self, *args, **kwargs):
        w = self.logits.exp()[:, None, None]
        loc = (w[:, :, 0] * self.locs).sum(0)
        second = (self.scale_trils @ self.scale_trils.transpose(-1, -2) * w).sum(0)
        second = second + (self.locs[:, :, None] * self.locs[:, None, :] * w).sum(0)
        cov = second - loc[:, None] * loc[None, :]
        return loc, cov.diagonal().clamp_min(0).sqrt()


def gaussian_guide(
    model: Callable,
    gaussians: tuple[Gaussian, ...],
    dtype: torch.dtype = torch.float32,
    potential: Potential | None = None,
    logits: torch.Tensor | None = None,
) -> FixedGaussianGuide:
    """A :class:`FixedGaussianGuide` from one or more :class:`Gaussian` (mixture if several).

    ``logits`` (P,) weight the mixture (default: equal weights).
    """
    locs = torch.stack([g.loc.to(dtype) for g in gaussians])
    trils = torch.stack([g.scale_tril.to(dtype) for g in gaussians])
    if logits is not None:
        logits = logits.to(dtype)
    return FixedGaussianGuide(model, locs, trils, potential, logits)


def lowrank_factors(cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, d)``, ``W W^T + diag(d)`` close to ``cov``: top ``rank`` eigenpairs, exact diagonal.

    ``W`` holds the leading eigenvectors scaled by the square roots of their
    eigenvalues less the smallest retained share; ``d`` makes the diagonal exact
    (floored at 1e-3 of it).
    """
    evals, evecs = torch.linalg.eigh(cov)
    rank = min(rank, cov.shape[0])
    top = evals[-rank:].clamp_min(0)
    w = evecs[:, -rank:] * top.sqrt()
    d = (cov.diagonal() - (w * w).sum(-1)).clamp_min(1e-3 * cov.diagonal())
    return w, d


def initialize_gaussian_guide(
    guide: autoguide.AutoGuide, gaussian: Gaussian, potential: Potential
) -> None:
    """Set an already set-up Gaussian autoguide's parameters to ``gaussian``.

    Called inside the fit's param-store scope after the guide has run once
    (so its parameters exist). ``AutoNormal`` takes the means and marginal sds,
    ``AutoMultivariateNormal`` the full covariance, ``AutoLowRankMultivariateNormal``
    its leading eigenpairs plus the exact diagonal (:func:`lowrank_factors`).

    Raises
    ------
    IncompatibleError
        For another guide type or a different latent layout.
    """
    if not isinstance(guide, GAUSSIAN_GUIDES):
        raise IncompatibleError(
            f"init from a mode needs a Gaussian autoguide (auto_normal, "
            f"auto_multivariate_normal, auto_lowrank_multivariate_normal), got "
            f"{type(guide).__name__}"
        )
    check_layout(guide, potential)
    dtype = next(iter(guide.parameters())).dtype if list(guide.parameters()) else torch.float32
    loc = gaussian.loc.detach().to(dtype)
    tril = gaussian.scale_tril.detach().to(torch.float64)
    cov = tril @ tril.T
    sd = cov.diagonal().sqrt()
    with torch.no_grad():
        if isinstance(guide, autoguide.AutoNormal):
            for b in potential.blocks:
                sl = slice(b.start, b.start + b.size)
                # AutoNormal's params have the unconstrained site shape: same element order
                shape = attrgetter(b.name)(guide.locs).shape
                event_dim = guide._event_dims[b.name]
                site_loc = loc[sl].reshape(shape).clone()
                site_sd = sd[sl].to(dtype).reshape(shape).clone()
                deep_setattr(guide.locs, b.name, PyroParam(site_loc, constraints.real, event_dim))
                deep_setattr(
                    guide.scales,
                    b.name,
                    PyroParam(site_sd, guide.scale_constraint, event_dim),
                )
        elif isinstance(guide, autoguide.AutoMultivariateNormal):
            diag = torch.diagonal(tril)
            guide.loc = PyroParam(loc.clone(), constraints.real)
            guide.scale = PyroParam(diag.to(dtype).clone(), guide.scale_constraint)
            guide.scale_tril = PyroParam(
                (tril / diag[:, None]).to(dtype).clone(), guide.scale_tril_constraint
            )
        else:
            w, d = lowrank_factors(cov, guide.rank)
            # Pyro's low-rank guide: cov = diag(s) (F F^T + I) diag(s)
            s_ = d.sqrt()
            guide.loc = PyroParam(loc.clone(), constraints.real)
            guide.scale = PyroParam(s_.to(dtype).clone(), guide.scale_constraint)
            guide.cov_factor = torch.nn.Parameter((w / s_[:, None]).to(dtype).clone())
