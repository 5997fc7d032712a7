"""A Pyro model's log density as a function of one flat unconstrained vector.

The layout is the one Pyro's ``AutoContinuous`` guides use (latent sites in
trace order, each mapped to unconstrained space by ``biject_to(support).inv``
and flattened), so a vector found here can be handed to an autoguide as its
``loc`` unchanged. The density is

    log p(x, T(u)) + log |det dT/du|      (``jacobian=True``, the default)

which is the density that NUTS samples and whose Gaussian approximations the
Laplace method and Pathfinder build; ``jacobian=False`` gives the constrained
MAP objective ``log p(x, T(u))`` (what ``AutoDelta`` maximises).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.util import site_is_subsample

from vimodels.errors import IncompatibleError, OptionError
from vimodels.mode.plates import subsampled_plates


@dataclass(frozen=True)
class SiteBlock:
    """Where one latent site lives in the flat unconstrained vector.

    Attributes
    ----------
    name : str
        Sample site name.
    shape : tuple of int
        Shape of the constrained value (one model draw).
    unconstrained_shape : tuple of int
        Shape after ``biject_to(support).inv`` (differs for e.g. simplex, Cholesky).
    start, size : int
        Slice ``[start, start + size)`` of the flat vector.
    event_dim : int
        The site distribution's ``event_dim``.
    """

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    start: int
    size: int
    event_dim: int
    transform: Any = field(repr=False, compare=False, default=None)
    support: Any = field(repr=False, compare=False, default=None)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (constants made inside a model)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def cast_data(data: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors of ``data`` cast to ``dtype``; everything else unchanged."""
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in data.items()
    }


def _latent_sites(tr: poutine.Trace) -> list[dict]:
    return [
        s
        for s in tr.nodes.values()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not s["infer"].get("is_auxiliary")
        and not site_is_subsample(s)
    ]


def _plate_depth(tr: poutine.Trace) -> int:
    depth = 0
    for site in tr.nodes.values():
        if site["type"] == "sample":
            for f in site["cond_indep_stack"]:
                if f.vectorized:
                    depth = max(depth, -f.dim)
    return depth


class Potential:
    """``log p`` of a model over a flat unconstrained vector, with its gradient.

    Build with :func:`make_potential`. Methods take ``u`` of shape ``(dim,)``
    (or ``(n, dim)`` for :meth:`log_density_batch`) in the potential's dtype.

    Attributes
    ----------
    model : callable
        The model, called as ``model(**data)``.
    data : dict
        Its data (floating tensors in ``dtype``).
    blocks : tuple of SiteBlock
        The layout of the flat vector.
    dim : int
        Length of the flat vector.
    dtype : torch.dtype
    jacobian : bool
        Whether the log-Jacobian of the constraining transforms is included.
    max_plate_nesting : int
        Deepest plate dimension of the model (for batched evaluation).
    """

    def __init__(
        self,
        model: Callable,
        data: Mapping[str, Any],
        blocks: tuple[SiteBlock, ...],
        dtype: torch.dtype,
        jacobian: bool,
        max_plate_nesting: int,
        init_values: torch.Tensor,
    ):
        self.model = model
        self.data = dict(data)
        self.blocks = blocks
        self.dim = sum(b.size for b in blocks)
        self.dtype = dtype
        self.jacobian = jacobian
        self.max_plate_nesting = max_plate_nesting
        self.init_values = init_values
        self.num_evals = 0
        self._batch_ok: bool | None = None

    # -- layout ---------------------------------------------------------------
    def site_names(self) -> tuple[str, ...]:
        """Latent site names in layout order."""
        return tuple(b.name for b in self.blocks)

    def describe(self, index: int) -> str:
        """``"site[i, j]"`` for flat coordinate ``index`` (unconstrained element)."""
        for b in self.blocks:
            if b.start <= index < b.start + b.size:
                if b.unconstrained_shape == ():
                    return b.name
                idx = np.unravel_index(index - b.start, b.unconstrained_shape)
                return f"{b.name}[{', '.join(str(int(i)) for i in idx)}]"
        raise IndexError(index)

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained value per site; ``u`` of shape ``(*batch, dim)``."""
        batch = u.shape[:-1]
        return {
            b.name: u[..., b.start : b.start + b.size].reshape(batch + b.unconstrained_shape)
            for b in self.blocks
        }

    def constrain(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained value per site for ``u`` of shape ``(*batch, dim)``."""
        return {b.name: b.transform(v) for b, v in zip(self.blocks, self.unpack(u).values())}

    def unconstrain(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector of constrained ``values`` (one draw per site), shape ``(dim,)``."""
        parts = [
            b.transform.inv(torch.as_tensor(values[b.name], dtype=self.dtype)).reshape(-1)
            for b in self.blocks
        ]
        return torch.cat(parts)

    # -- density --------------------------------------------------------------
    def log_density(self, u: torch.Tensor) -> torch.Tensor:
        """``log p(x, T(u)) [+ log|J|]`` at one point ``u`` (dim,), a 0-dim tensor (nats).

        Where the model's own linear algebra fails at ``u`` (a covariance it
        builds is not positive definite there, ``torch.linalg.LinAlgError``),
        the density is ``-inf``, with a zero gradient: a point outside the
        support, as Stan treats an exception in the log density, so that a line
        search or a draw backs off instead of the whole fit raising.
        """
        try:
            return self._log_density(u)
        except torch.linalg.LinAlgError:
            return u.sum() * 0.0 - math.inf

    def _log_density(self, u: torch.Tensor) -> torch.Tensor:
        self.num_evals += 1
        with default_dtype(self.dtype):
            values = {}
            log_jac = u.new_zeros(())
            for b, v in zip(self.blocks, self.unpack(u).values()):
                c = b.transform(v)
                values[b.name] = c
                if self.jacobian:
                    lj = b.transform.log_abs_det_jacobian(v, c)
                    log_jac = log_jac + lj.sum()
            cond = poutine.condition(self.model, data=values)
            with poutine.block(), pyro.validation_enabled(False):
                tr = poutine.trace(cond).get_trace(**self.data)
                return tr.log_prob_sum() + log_jac

    def value_and_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(u), d log p / du)`` at ``u`` (dim,), both detached."""
        u = u.detach().requires_grad_(True)
        lp = self.log_density(u)
        (g,) = torch.autograd.grad(lp, u)
        return lp.detach(), g.detach()

    def log_density_batch(self, u: torch.Tensor) -> torch.Tensor:
        """``log p`` at each row of ``u`` (n, dim), shape ``(n,)``, without gradients.

        Runs the model once under a particle plate outside its own plates;
        models that cannot be batched are evaluated row by row.
        """
        with torch.no_grad():
            if self._batch_ok is not False:
                try:
                    out = self._batched(u)
                    if self._batch_ok is None:  # check once against the row-by-row value
                        # the first and the last row: a model that reads one particle's
                        # value (``s[0]`` of a one-element site) gets the first one right
                        for i in {0, u.shape[0] - 1}:
                            ref = self.log_density(u[i])
                            if not torch.allclose(out[i], ref, rtol=1e-5, atol=1e-5):
                                raise ValueError("batched log density differs")
                        self._batch_ok = True
                    return out
                except torch.linalg.LinAlgError:
                    # a row where the model's linear algebra fails: these rows one by one
                    # (that row -inf), the batched path kept for later calls
                    pass
                except (RuntimeError, ValueError, IndexError):
                    self._batch_ok = False
            return torch.stack([self.log_density(row) for row in u])

    def _batched(self, u: torch.Tensor) -> torch.Tensor:
        n = u.shape[0]
        ndim = self.max_plate_nesting + 1
        self.num_evals += n
        with default_dtype(self.dtype):
            values = {}
            total = u.new_zeros(n)
            batch = (n,) + (1,) * self.max_plate_nesting
            for b in self.blocks:
                # plate dims of the site take the places of the 1s, as in AutoContinuous
                event_dim = b.event_dim + len(b.unconstrained_shape) - len(b.shape)
                target = torch.broadcast_shapes(b.unconstrained_shape, batch + (1,) * event_dim)
                v = u[:, b.start : b.start + b.size].reshape(target)
                c = b.transform(v)
                values[b.name] = c
                if self.jacobian:
                    lj = b.transform.log_abs_det_jacobian(v, c)
                    total = total + lj.reshape(n, -1).sum(-1)
            with (
                poutine.block(),
                pyro.validation_enabled(False),
                pyro.plate("_potential_particles", n, dim=-ndim),
            ):
                tr = poutine.trace(poutine.condition(self.model, data=values)).get_trace(
                    **self.data
                )
            for site in tr.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                # scaled and masked as Trace.log_prob_sum does (poutine.scale, poutine.mask)
                lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
                if lp.dim() < ndim:
                    lp = lp.reshape((1,) * (ndim - lp.dim()) + lp.shape)
                total = total + lp.reshape(lp.shape[0], -1).sum(-1).expand(n)
        return total

    # -- initial points -------------------------------------------------------
    def random_inits(self, num: int, seed: int, radius: float = 2.0) -> torch.Tensor:
        """``num`` starting points, Uniform(-radius, radius) per coordinate (Stan's), (num, dim).

        Points whose log density is not finite are redrawn (up to 100 times).
        """
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            for _attempt in range(100):
                u = (torch.rand(self.dim, generator=gen, dtype=self.dtype) * 2 - 1) * radius
                with torch.no_grad():
                    if math.isfinite(float(self.log_density(u))):
                        break
            out.append(u)
        return torch.stack(out)


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Run the block on a stream seeded with ``seed``; the global random state is restored."""
    state = pyro.util.get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)


def make_potential(
    model: Callable,
    data: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    jacobian: bool = True,
    hide: tuple[str, ...] = (),
    init_loc_fn: Callable | None = None,
    seed: int = 0,
) -> Potential:
    """The flat unconstrained log density of ``model(**data)``.

    :attr:`Potential.init_values` (the prior median) is estimated from 15 prior
    draws per site; they come from a random stream seeded with ``seed``, and the
    global torch/NumPy/Python random state is saved before and restored after,
    so the start neither depends on nor changes what ran before in the process.

    Parameters
    ----------
    model : callable
        A Pyro model called as ``model(**data)``, all latent sites continuous.
    data : dict, optional
        Its data; floating tensors are cast to ``dtype``.
    dtype : torch.dtype
        ``torch.float64`` (default: curvature of badly conditioned posteriors
        needs it) or ``torch.float32``.
    jacobian : bool
        Include ``log|det J|`` of the constraining transforms (the posterior
        density of the unconstrained vector); False: the constrained MAP objective.
    hide : tuple of str
        Latent sites to leave out (blocked).
    init_loc_fn : callable, optional
        Pyro init strategy for :attr:`Potential.init_values` (default: the prior median).
    seed : int
        Seed of the prior draws of the init strategy (default 0).

    Raises
    ------
    IncompatibleError
        If the model has discrete latent sites or no latent sites.
    OptionError
        For a dtype other than float32/float64.
    """
    if dtype not in (torch.float32, torch.float64):
        raise OptionError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    data = cast_data(data or {}, dtype)
    if hide:
        model = poutine.block(model, hide=list(hide))
    name = getattr(model, "__name__", "model")
    with (
        _seeded_rng(seed),
        default_dtype(dtype),
        poutine.block(),
        pyro.validation_enabled(False),
    ):
        tr = poutine.trace(InitMessenger(init_loc_fn or init_to_median)(model)).get_trace(**data)
    plates = subsampled_plates(tr)
    if plates:  # each evaluation would draw other rows: L-BFGS needs one objective
        plate, (size, taken) = next(iter(plates.items()))
        raise IncompatibleError(
            f"model {name!r} subsamples plate {plate!r} ({taken} of {size} rows, drawn anew "
            "on each call); the mode, Laplace and Pathfinder need the same log density at "
            "every evaluation. Fit the model without subsample_size (all rows) or use an SVI "
            "guide such as 'auto_normal'"
        )
    sites = _latent_sites(tr)
    discrete = [s["name"] for s in sites if s["fn"].support.is_discrete]
    if discrete:
        raise IncompatibleError(
            f"model {name!r} has discrete latent site(s) {', '.join(discrete)}; the mode, "
            "Laplace and Pathfinder need continuous latents. Marginalize them out in the model "
            "(e.g. MixtureSameFamily) or fit with SVI and elbo='enum'"
        )
    if not sites:
        raise IncompatibleError(f"model {name!r} has no latent sites to fit")
    blocks = []
    start = 0
    init = []
    for s in sites:
        t = biject_to(s["fn"].support)
        value = s["value"].detach().to(dtype)
        uval = t.inv(value)
        size = int(np.prod(uval.shape, dtype=np.int64))
        blocks.append(
            SiteBlock(
                s["name"],
                tuple(value.shape),
                tuple(uval.shape),
                start,
                size,
                s["fn"].event_dim,
                t,
                s["fn"].support,
            )
        )
        init.append(uval.reshape(-1))
        start += size
    return Potential(
        model, data, tuple(blocks), dtype, jacobian, _plate_depth(tr), torch.cat(init).detach()
    )
