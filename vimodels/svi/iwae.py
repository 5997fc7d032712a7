r"""Importance-weighted bound (IWAE) that stays a bound under subsampling.

Pyro's ``RenyiELBO(alpha=0)`` puts the subsample scale ``N / b`` inside the
log-sum-exp over particles, which overestimates ``log p(x)``. Here the bound is
taken per data point wherever a data plate encloses local latent sites:

.. math::

    \mathcal{L}_K = \mathbb{E}_{q(g)}\Big[\log \frac{p(g)}{q(g)}
      + \frac{N}{b} \sum_{i \in \text{batch}} \log \frac{1}{K}
      \sum_{k=1}^K \frac{p(x_i, z_{ik} \mid g)}{q(z_{ik} \mid x_i, g)}\Big]

with the global latents ``g`` drawn once and shared by the ``K`` local particles.
The mode is chosen from the model's structure (see :class:`IWAE`).

With ``estimator="dreg"`` the guide's gradient is the doubly reparameterized
estimator (Tucker et al. 2019): ``sum_k w~_k^2 d log w_k / d z_k * d z_k / d phi``
with ``w~`` the normalised importance weights of each data point; the model's
gradient is the usual ``sum_k w~_k d log w_k / d theta``. It is implemented by
evaluating ``log q`` with detached parameters and multiplying the gradient that
reaches each sample ``z_k`` by ``w~_k`` with a backward hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from vimodels.errors import IncompatibleError, OptionError
from vimodels.svi.estimators import DifferentiableLossELBO, detach_distribution
from vimodels.svi.logweight import log_weight_terms

ESTIMATORS = ("standard", "dreg")

JOINT = "joint"  # one log-sum-exp over the whole log weight (no subsampling)
PER_DATAPOINT = "per_datapoint"  # local plate, no global latents
HIERARCHICAL = "hierarchical"  # subsampled local plate with global latents
ELBO_FALLBACK = "elbo"  # subsampled likelihood with only global latents: plain ELBO average


@dataclass(frozen=True)
class Structure:
    """How the log weight decomposes."""

    mode: str
    plate: str | None
    plate_dim: int | None
    max_plate_nesting: int
    global_sites: tuple[str, ...]


def _frames(site: dict) -> dict[str, object]:
    return {f.name: f for f in site["cond_indep_stack"] if f.vectorized}


def analyse(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int | None = None,
) -> Structure:
    """Trace once and decide how the IWAE bound decomposes for this model and guide."""
    with poutine.block():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    depth = 0
    for tr in (model_tr, guide_tr):
        for site in tr.nodes.values():
            if site["type"] == "sample":
                for f in site["cond_indep_stack"]:
                    if f.vectorized:
                        depth = max(depth, -f.dim)
    if max_plate_nesting is not None:
        depth = max(depth, max_plate_nesting)
    latent = {
        n: s
        for n, s in model_tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }
    observed = {
        n: s for n, s in model_tr.nodes.items() if s["type"] == "sample" and s["is_observed"]
    }
    for name, site in guide_tr.nodes.items():
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and not site_is_subsample(site)
            and not site["fn"].has_rsample
        ):
            raise IncompatibleError(
                f"iwae needs reparameterizable guide sites; {name!r} is not "
                "(use the 'renyi' or 'enum' ELBO for discrete latents)"
            )
    observed_plates = (
        set().union(*[set(_frames(s)) for s in observed.values()]) if observed else set()
    )
    local_plates: dict[str, object] = {}
    for site in latent.values():
        for name, frame in _frames(site).items():
            if name in observed_plates:
                local_plates[name] = frame
    subsampled = any(
        not isinstance(s["scale"], torch.Tensor)
        and s["scale"] != 1.0
        or isinstance(s["scale"], torch.Tensor)
        and bool((s["scale"] != 1).any())
        for s in observed.values()
    )
    if local_plates:
        # the outermost local plate is the data plate
        name, frame = max(local_plates.items(), key=lambda kv: -kv[1].dim)
        globals_ = tuple(n for n, s in latent.items() if name not in _frames(s))
        if not globals_:
            mode = PER_DATAPOINT
        elif subsampled:
            mode = HIERARCHICAL
        else:
            mode = JOINT
        return Structure(mode, name, frame.dim, depth, globals_)
    return Structure(ELBO_FALLBACK if subsampled else JOINT, None, None, depth, tuple(latent))


class IWAE(DifferentiableLossELBO):
    """Importance-weighted autoencoder bound with ``num_particles`` = K.

    Parameters
    ----------
    num_particles : int
        Number of importance samples K per data point (or per model draw).
    max_plate_nesting : int, optional
        Plate depth of the model; guessed from a trace when omitted.

    Notes
    -----
    Modes, chosen from one trace of the model and guide:

    ``joint``
        No subsampling: ``log mean_k exp(log p(x, z_k) - log q(z_k))``.
    ``per_datapoint``
        Latents are all local to a data plate: the log-mean-exp is taken per
        data point and the subsample scale ``N / b`` multiplies it from outside.
    ``hierarchical``
        A subsampled data plate with global latents: globals drawn once, the
        ``K`` local particles share them, per-data-point log-mean-exp.
    ``elbo``
        Only global latents but a subsampled likelihood: no unbiased IWAE
        estimator exists, so the K particles are averaged (the ELBO), which is
        a valid bound.

    Gradients are reparameterized (all guide sites must have ``rsample``).
    ``estimator="dreg"`` (doubly reparameterized guide gradient) applies in the
    ``joint`` and ``per_datapoint`` modes, for guides whose parameters are not
    shared with the model.
    """

    def __init__(
        self,
        num_particles: int = 8,
        max_plate_nesting: int | None = None,
        estimator: str = "standard",
    ):
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=True,
            max_plate_nesting=max_plate_nesting if max_plate_nesting is not None else float("inf"),
        )
        if estimator not in ESTIMATORS:
            raise OptionError(
                f"iwae estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
            )
        self.estimator = estimator
        self._user_depth = max_plate_nesting
        self._structure: dict[tuple[int, int], Structure] = {}

    def _get_trace(self, model, guide, args, kwargs):  # required by the ELBO base class
        raise NotImplementedError("IWAE computes its own vectorized traces")

    def structure(self, model: Callable, guide: Callable, *args, **kwargs) -> Structure:
        """The decomposition used for ``model`` and ``guide`` (cached per pair)."""
        key = (id(model), id(guide))
        if key not in self._structure:
            st = analyse(model, guide, args, kwargs, self._user_depth)
            if self.estimator == "dreg":
                _check_dreg(model, guide, args, kwargs, st)
            self._structure[key] = st
        return self._structure[key]

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """Return ``-bound`` as a differentiable scalar tensor."""
        st = self.structure(model, guide, *args, **kwargs)
        K = self.num_particles
        pdim = -(st.max_plate_nesting + 1)
        ndim = st.max_plate_nesting + 1
        particles = pyro.plate("_iwae_particles", K, dim=pdim)
        if st.mode == HIERARCHICAL:
            # draw the globals once; the K local particles share them. Only the sites inside
            # the data plate are drawn anew: a global's auxiliary site (an autoguide's
            # ``<site>_unconstrained``, outside the plate) stays with it, else the global
            # is replayed as a Delta at its old value and log q of the new draw is -inf
            guide_g = poutine.trace(guide).get_trace(*args, **kwargs)
            for name in list(guide_g.nodes):
                site = guide_g.nodes[name]
                if site["type"] == "sample" and (
                    name not in st.global_sites
                    and (site_is_subsample(site) or st.plate in _frames(site))
                ):
                    guide_g.remove_node(name)
            run_guide = poutine.replay(guide, trace=guide_g)
        else:
            run_guide = guide
        with particles:
            guide_tr = poutine.trace(run_guide).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                *args, **kwargs
            )
        per_point = st.mode in (PER_DATAPOINT, HIERARCHICAL)
        dreg = self.estimator == "dreg"
        terms = log_weight_terms(
            model_tr,
            guide_tr,
            K,
            ndim,
            plate=st.plate if per_point else None,
            guide_fn=detach_distribution if dreg else None,
            dtype=None,
        )
        global_w, local_w, plate_scale = terms.draws, terms.local, terms.plate_scale
        if st.mode == JOINT:
            total = global_w
            bound = torch.logsumexp(total, 0) - math.log(K)
            if dreg and bound.requires_grad:
                _dreg_hooks(guide_tr, torch.softmax(total.detach(), 0), ndim, None)
        elif st.mode == ELBO_FALLBACK:
            bound = global_w.mean()
        else:
            local = local_w
            lme = torch.logsumexp(local, 0) - math.log(K)
            bound = global_w.mean() + plate_scale * lme.sum()
            if dreg and bound.requires_grad:
                _dreg_hooks(guide_tr, torch.softmax(local.detach(), 0), ndim, st.plate_dim)
        return -bound


def _guide_sample_sites(guide_tr: poutine.Trace) -> list[dict]:
    """Latent guide sites that draw randomness (``Delta`` sites are functions of others)."""
    return [
        site
        for site in guide_tr.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not isinstance(site["fn"], dist.Delta)
    ]


def _check_dreg(model: Callable, guide: Callable, args: tuple, kwargs: dict, st: Structure) -> None:
    """Raise IncompatibleError where the DReG estimator is not defined."""
    if st.mode not in (JOINT, PER_DATAPOINT):
        raise IncompatibleError(
            f"the 'dreg' estimator needs all latents local to the data plate (or no "
            f"subsampling); this model/guide decomposes as {st.mode!r}: use the standard "
            "estimator"
        )
    with poutine.block():
        with poutine.trace(param_only=True) as guide_params:
            guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        with poutine.trace(param_only=True) as model_params:
            poutine.replay(model, trace=guide_tr)(*args, **kwargs)
    shared = set(guide_params.trace.nodes) & set(model_params.trace.nodes)
    if shared:
        raise IncompatibleError(
            f"the 'dreg' estimator needs separate model and guide parameters; shared: "
            f"{', '.join(sorted(shared))}"
        )
    for site in _guide_sample_sites(guide_tr):
        detach_distribution(site["fn"])  # raises for distributions it cannot rebuild
        if st.mode == PER_DATAPOINT and st.plate not in _frames(site):
            raise IncompatibleError(
                f"the 'dreg' estimator needs every guide sample site inside the data plate "
                f"{st.plate!r}; {site['name']!r} is not"
            )


def _dreg_hooks(
    guide_tr: poutine.Trace, w_tilde: torch.Tensor, ndim: int, plate_dim: int | None
) -> None:
    """Scale the gradient reaching each guide sample by its normalised weight.

    ``w_tilde`` has shape ``(K,)`` (joint) or ``(K, B)`` with ``B`` the data
    plate size (per data point, ``plate_dim`` its dim).
    """
    for site in _guide_sample_sites(guide_tr):
        value = site["value"]
        if not value.requires_grad:
            continue
        event_dim = site["fn"].event_dim
        batch_ndim = value.dim() - event_dim
        first = batch_ndim - ndim  # position of the particle dim
        shape = [1] * value.dim()
        shape[first] = w_tilde.shape[0]
        if plate_dim is not None:
            shape[batch_ndim + plate_dim] = w_tilde.shape[1]
        weight = w_tilde.reshape(shape)
        value.register_hook(lambda grad, weight=weight: grad * weight)
