"""Evaluating an amortized model with local latents: likelihood, ELBO, gaps, NUTS.

All functions run under the caller's Pyro param store (for a trained VAE:
``with result.scope(): ...``) and treat the model's parameters as fixed. The
model and guide are called as ``fn(**data)`` with a data plate ``"data"`` at
``dim=-1`` whose only latent site is ``z`` (``latent``), observed site ``x``.

- :func:`log_likelihood`: ``log p(x_i)`` by importance sampling, ``K`` draws per
  data point (chunked), with a delta-method Monte Carlo standard error and the
  PSIS k-hat of each point's weights, and the ELBO from the encoder's draws. The
  proposal is defensive: half the draws from the encoder, half from Student-t's
  with its location and twice its scale, so that an encoder narrower than the
  posterior does not bias the estimate low.
- :func:`amortization_gap`: per data point, the best Gaussian of the guide's
  family ``q*`` (optimised with the decoder fixed), and the decomposition
  ``log p(x) - L[q_phi] = (log p(x) - L[q*]) + (L[q*] - L[q_phi])``
  into the approximation and the amortization gap.
- :func:`nuts_latent_posterior`: NUTS on ``z`` of one data point.
- :func:`compare_draws`: mean error in posterior sds, sd ratio, coverage and
  the standardized 2-Wasserstein distance between two sets of draws.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS

from diagnostics import metrics
from guides.vae import encoder_guide
from vimodels.arviz_import import import_arviz
from vimodels.catalog.vae import digits_split, digits_vae
from vimodels.compile.units import private_units
from vimodels.errors import IncompatibleError, OptionError, check_option
from vimodels.svi.logweight import NotVectorizable, counted_sites, log_weight_terms
from vimodels.vae.trainer import split_data

LATENT = "z"
OBSERVED = "x"


def single_threaded(fn: Callable) -> Callable:
    """Run ``fn`` with one torch thread, restoring the previous setting afterwards.

    Small tensors run many times slower with two threads on a loaded two-core machine.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


#: Share of the test log-likelihood's draws from the defensive component.
DEFENSIVE_SHARE = 0.5
#: Degrees of freedom of the defensive component (independent Student-t per coordinate).
DEFENSIVE_DF = 5.0
#: Scale of the defensive component, in units of the encoder's scale.
DEFENSIVE_WIDEN = 2.0
PROPOSALS = ("defensive", "guide")


@dataclass(frozen=True)
class LikelihoodEstimate:
    """Importance-sampling estimate of ``log p(x_i)`` and the ELBO, per data point.

    Attributes
    ----------
    log_p : ndarray, shape (n,)
        ``log (1/K) sum_k w_ik`` per data point, nats.
    log_p_se : ndarray, shape (n,)
        Delta-method Monte Carlo standard error of ``log_p`` (``sd(w) / (sqrt(K) mean(w))``,
        per stratum of the proposal).
    elbo : ndarray, shape (n,)
        ``mean_k log w_ik`` over the encoder's draws per data point, nats.
    elbo_se : ndarray, shape (n,)
        Its Monte Carlo standard error.
    num_particles : int
        ``K``, every draw of the proposal.
    khat : ndarray, shape (n,)
        PSIS k-hat of each data point's importance weights; at or above
        :data:`diagnostics.metrics.KHAT_BAD` (0.7) the estimate and its
        standard error are not to be trusted.
    proposal : str
        ``defensive`` (encoder and widened Student-t mixture) or ``guide``.
    """

    log_p: np.ndarray
    log_p_se: np.ndarray
    elbo: np.ndarray
    elbo_se: np.ndarray
    num_particles: int
    khat: np.ndarray | None = None
    proposal: str = "guide"

    @property
    def mean_log_p(self) -> float:
        """Average ``log p(x)`` per data point, nats."""
        return float(self.log_p.mean())

    @property
    def mean_log_p_se(self) -> float:
        """Monte Carlo standard error of :attr:`mean_log_p`."""
        return float(np.sqrt(np.sum(self.log_p_se**2)) / len(self.log_p_se))

    @property
    def mean_elbo(self) -> float:
        """Average ELBO per data point, nats."""
        return float(self.elbo.mean())

    @property
    def mean_elbo_se(self) -> float:
        """Monte Carlo standard error of :attr:`mean_elbo`."""
        return float(np.sqrt(np.sum(self.elbo_se**2)) / len(self.elbo_se))

    @property
    def num_unreliable(self) -> int:
        """Data points whose k-hat is at least 0.7 (or not finite): their estimate is flagged."""
        if self.khat is None:
            return 0
        return int(np.sum(~(self.khat < metrics.KHAT_BAD)))

    def summary(self) -> dict[str, Any]:
        """JSON-friendly averages, with the k-hat flag."""
        khat = None if self.khat is None else self.khat[np.isfinite(self.khat)]
        return {
            "log_likelihood": self.mean_log_p,
            "log_likelihood_mcse": self.mean_log_p_se,
            "elbo": self.mean_elbo,
            "elbo_mcse": self.mean_elbo_se,
            "num_particles": self.num_particles,
            "num_data": len(self.log_p),
            "proposal": self.proposal,
            "khat_max": float(khat.max()) if khat is not None and len(khat) else None,
            "khat_bad": self.num_unreliable,
            "log_likelihood_reliable": self.num_unreliable == 0,
        }


def _lme_stats(
    log_w: np.ndarray, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise log-mean-exp of ``log_w`` (n, K) and its delta-method standard error.

    ``strata`` labels each column with the proposal it was drawn from (stratified
    sampling, a fixed number of draws from each): the variance of the mean then
    adds the strata's variances, ``sum_s K_s var_s / K^2``.
    """
    k = log_w.shape[1]
    m = log_w.max(1, keepdims=True)
    w = np.exp(log_w - m)
    mean = w.mean(1)
    labels = np.zeros(k, dtype=int) if strata is None else np.asarray(strata)
    blocks = [w[:, labels == s] for s in np.unique(labels)]
    if min(b.shape[1] for b in blocks) < 2:
        return m[:, 0] + np.log(mean), np.full(len(w), np.nan)
    var = sum(b.var(1, ddof=1) * b.shape[1] for b in blocks) / k**2
    return m[:, 0] + np.log(mean), np.sqrt(var) / mean


def subset(data: Mapping[str, Any], index: np.ndarray | slice) -> dict[str, Any]:
    """The data points ``index`` of ``data`` (tensors sliced on their first dim)."""
    tensors, static, _ = split_data(data)
    if not isinstance(index, slice):
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return {**{k: v[index] for k, v in tensors.items()}, **static}


@contextlib.contextmanager
def frozen_params() -> Iterator[None]:
    """Turn off gradients of the param store's parameters within the block."""
    store = pyro.get_param_store()
    params = [store[n].unconstrained() for n in store.keys()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def per_datapoint(model_tr: poutine.Trace, guide_tr: poutine.Trace | None, k: int) -> torch.Tensor:
    """``log p(x_i, z_ki) [- log q(z_ki | x_i)]`` from traces under a particle plate at dim -2.

    The sum of :func:`vimodels.svi.logweight.log_weight_terms`, kept per element
    of the data plate ``"data"`` (its subsample scale divided out); float64,
    shape ``(k, n)``.

    Raises
    ------
    IncompatibleError
        A site outside the data plate ``("data", dim=-1)``, or with more batch dims.
    """
    try:
        terms = log_weight_terms(model_tr, guide_tr, k, 2, plate="data")
    except NotVectorizable as exc:
        raise IncompatibleError(f"{exc}; these evaluations need one latent per data point") from exc
    frames = [
        f
        for tr in (model_tr, guide_tr)
        if tr is not None
        for s in counted_sites(tr, False)
        for f in s["cond_indep_stack"]
        if f.name == "data" and f.vectorized
    ]
    if terms.other_sites or terms.local is None or any(f.dim != -1 for f in frames):
        name = terms.other_sites[0] if terms.other_sites else "data"
        raise IncompatibleError(
            f"site {name!r} is not local to the data plate ('data', dim=-1); these "
            "evaluations need one latent per data point"
        )
    return terms.local


def datapoint_log_weights(
    model: Callable, guide: Callable, data: Mapping[str, Any], num_particles: int
) -> torch.Tensor:
    """``log p(x_i, z_ik) - log q(z_ik | x_i)`` with ``z_ik ~ q``, float64 shape ``(K, n)``.

    One vectorized pass; use :func:`log_likelihood` for chunking.
    """
    with pyro.plate("_eval_particles", num_particles, dim=-2):
        guide_tr = poutine.trace(guide).get_trace(**data)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(**data)
    return per_datapoint(model_tr, guide_tr, num_particles)


def _defensive_log_weights(
    model: Callable, guide: Callable, data: Mapping[str, Any], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` draws per data point from the defensive mixture, and the encoder's own weights.

    The first ``k_q`` draws come from the encoder ``q = N(loc, scale)``, the other
    ``k_t`` from independent Student-t's (:data:`DEFENSIVE_DF`) with location
    ``loc`` and scale ``DEFENSIVE_WIDEN * scale``, where ``k_q, k_t = _split(k)``
    (``k_t = round(DEFENSIVE_SHARE * k)``); every draw is weighted against the
    mixture with the same shares (stratified sampling, unbiased for ``p(x_i)``).

    Returns
    -------
    log_w : Tensor, shape (k, n)
        ``log p(x_i, z) - log r(z)`` with ``r`` the mixture.
    log_w_q : Tensor, shape (k_q, n)
        ``log p(x_i, z) - log q(z)`` of the encoder's draws (for the ELBO).
    """
    loc, scale = gaussian_encoder(guide, data)
    k_q, k_t = _split(k)
    q = dist.Normal(loc, scale)
    t = dist.StudentT(DEFENSIVE_DF, loc, DEFENSIVE_WIDEN * scale)
    z = torch.cat([q.sample((k_q,)), t.sample((k_t,))])
    log_q, log_t = q.log_prob(z).sum(-1).double(), t.log_prob(z).sum(-1).double()
    log_r = _mixture_log_prob(log_q, log_t, k_q, k_t)
    log_p = log_joint(model, data, z).double()
    return log_p - log_r, log_p[:k_q] - log_q[:k_q]


@single_threaded
def log_likelihood(
    model: Callable,
    guide: Callable,
    data: Mapping[str, Any],
    num_particles: int = 5000,
    *,
    seed: int = 0,
    max_rows: int = 200_000,
    proposal: str = "defensive",
) -> LikelihoodEstimate:
    """Importance-sampled ``log p(x_i)`` and ELBO per data point.

    Parameters
    ----------
    model, guide : callable
    data : dict
        Data points to evaluate (e.g. the test set).
    num_particles : int
        ``K`` draws per data point.
    seed : int
        Seed of the draws (the global RNG is restored afterwards).
    max_rows : int
        Bound on ``particles x data points`` per vectorized pass (memory).
    proposal : str
        ``defensive`` (default): half the draws from the encoder, half from
        Student-t's with its location and :data:`DEFENSIVE_WIDEN` times its
        scale, weighted against their mixture; it needs a guide whose ``z`` is a
        diagonal Normal. ``guide``: the encoder alone, which is biased low
        (by more than its standard error) when the encoder is narrower than
        the posterior. Either way each data point's PSIS k-hat is reported.

    Notes
    -----
    With the encoder alone as proposal the weights ``p(x, z) / q(z | x)`` are
    unbounded wherever the posterior has heavier tails than the encoder: the
    estimate is then dominated by rare draws, biased low at any practical
    ``K``, and its delta-method standard error understates the error (on a
    linear-Gaussian VAE whose encoder is 0.6x the posterior's spread: 0.10 to
    0.17 nats low, 5 standard errors, with 20000 draws). The Student-t
    component makes ``p / r`` bounded for any posterior with Gaussian tails, at
    the price of at most a factor 2 in the weights' spread when the encoder is
    good.
    """
    check_option("num_particles", num_particles, kind=int, low=2)
    if proposal not in PROPOSALS:
        raise OptionError(f"proposal must be one of {', '.join(PROPOSALS)}, got {proposal!r}")
    defensive = proposal == "defensive"
    n = split_data(data)[2]
    data_chunk = max(1, min(n, max_rows // min(num_particles, max_rows)))
    part_chunk = max(2, min(num_particles, max_rows // data_chunk))
    rows, q_rows = [], []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, n, data_chunk):
            part = subset(data, slice(start, start + data_chunk))
            cols, q_cols = [], []
            for done in range(0, num_particles, part_chunk):
                k = min(part_chunk, num_particles - done)
                if defensive:
                    lw, lw_q = _defensive_log_weights(model, guide, part, k)
                else:
                    lw = lw_q = datapoint_log_weights(model, guide, part, k)
                cols.append(lw)
                q_cols.append(lw_q)
            rows.append(torch.cat(cols, 0).T.numpy())
            q_rows.append(torch.cat(q_cols, 0).T.numpy())
    log_w, log_w_q = np.concatenate(rows, 0), np.concatenate(q_rows, 0)
    # stratified: the encoder's and the t's draws, chunk by chunk
    strata = _stratum(num_particles, part_chunk) if defensive else None
    log_p, log_p_se = _lme_stats(log_w, strata)
    return LikelihoodEstimate(
        log_p=log_p,
        log_p_se=log_p_se,
        elbo=log_w_q.mean(1),
        elbo_se=log_w_q.std(1, ddof=1) / np.sqrt(log_w_q.shape[1]),
        num_particles=num_particles,
        khat=np.array([metrics.psis_khat(row) for row in log_w]),
        proposal=proposal,
    )


def _split(k: int) -> tuple[int, int]:
    """Draws of a ``k``-draw chunk from the encoder and from the mixture's other component."""
    k_other = int(round(DEFENSIVE_SHARE * k))
    return k - k_other, k_other


def _stratum(num_particles: int, chunk: int) -> np.ndarray:
    """0 for the encoder's draws, 1 for the other component's, in draw order (:func:`_split`)."""
    out = []
    for done in range(0, num_particles, chunk):
        k_q, k_t = _split(min(chunk, num_particles - done))
        out.append(np.r_[np.zeros(k_q, int), np.ones(k_t, int)])
    return np.concatenate(out)


def _mixture_log_prob(log_q: torch.Tensor, log_t: torch.Tensor, k_q: int, k_t: int) -> torch.Tensor:
    """Log density of the mixture with the chunk's shares ``k_q / k`` and ``k_t / k``."""
    if k_t == 0:
        return log_q
    k = k_q + k_t
    return torch.logaddexp(log_q + math.log(k_q / k), log_t + math.log(k_t / k))


def gaussian_encoder(
    guide: Callable, data: Mapping[str, Any], latent: str = LATENT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and scale ``(n, D)`` of a guide whose site ``latent`` is a diagonal Normal."""
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(guide).get_trace(**data)
    if latent not in tr.nodes:
        raise IncompatibleError(f"the guide has no site {latent!r}")
    fn = tr.nodes[latent]["fn"]
    while isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        fn = fn.base_dist
    if not isinstance(fn, torch.distributions.Normal):
        raise IncompatibleError(
            f"the guide's {latent!r} is {type(fn).__name__}; a diagonal Normal is needed here"
        )
    return fn.loc.detach().clone(), fn.scale.detach().clone()


def log_joint(
    model: Callable, data: Mapping[str, Any], z: torch.Tensor, latent: str = LATENT
) -> torch.Tensor:
    """``log p(x_i, z_ki)`` for ``z`` of shape ``(K, n, D)``; returns ``(K, n)``."""
    with pyro.plate("_eval_particles", z.shape[0], dim=-2), poutine.block():
        tr = poutine.trace(poutine.condition(model, data={latent: z})).get_trace(**data)
    return per_datapoint(tr, None, z.shape[0]).to(z.dtype)


def _diag_normal_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dist.Normal(loc, scale).log_prob(z).sum(-1)


@dataclass(frozen=True)
class GapEstimate:
    """Decomposition of ``log p(x) - L[q_phi]`` for a sample of data points.

    Per-data-point arrays have shape ``(n,)``, nats. ``log_p`` is estimated by
    importance sampling with the defensive mixture ``(q_phi + q*) / 2``.

    Attributes
    ----------
    index : ndarray of int
        Which data points (indices into the data given).
    log_p, log_p_se : ndarray
    elbo_star, elbo_star_se : ndarray
        ELBO of ``q*``, the diagonal Gaussian optimised for each data point.
    elbo_amortized, elbo_amortized_se : ndarray
        ELBO of the encoder's ``q_phi(z | x)``.
    num_particles : int
        Draws per data point for each estimate.
    steps : int
        Optimisation steps of ``q*``.
    """

    index: np.ndarray
    log_p: np.ndarray
    log_p_se: np.ndarray
    elbo_star: np.ndarray
    elbo_star_se: np.ndarray
    elbo_amortized: np.ndarray
    elbo_amortized_se: np.ndarray
    num_particles: int
    steps: int

    @staticmethod
    def _mean(x: np.ndarray, se: np.ndarray) -> tuple[float, float]:
        return float(x.mean()), float(np.sqrt(np.sum(se**2)) / len(se))

    @property
    def approximation_gap(self) -> tuple[float, float]:
        """Mean ``log p(x) - L[q*]`` and its Monte Carlo standard error."""
        return self._mean(self.log_p - self.elbo_star, np.hypot(self.log_p_se, self.elbo_star_se))

    @property
    def amortization_gap(self) -> tuple[float, float]:
        """Mean ``L[q*] - L[q_phi]`` and its Monte Carlo standard error."""
        return self._mean(
            self.elbo_star - self.elbo_amortized,
            np.hypot(self.elbo_star_se, self.elbo_amortized_se),
        )

    def summary(self) -> dict[str, float]:
        """JSON-friendly averages."""
        lp, lp_se = self._mean(self.log_p, self.log_p_se)
        es, es_se = self._mean(self.elbo_star, self.elbo_star_se)
        ea, ea_se = self._mean(self.elbo_amortized, self.elbo_amortized_se)
        ag, ag_se = self.approximation_gap
        mg, mg_se = self.amortization_gap
        return {
            "num_data": len(self.index),
            "num_particles": self.num_particles,
            "steps": self.steps,
            "log_p": lp,
            "log_p_mcse": lp_se,
            "elbo_star": es,
            "elbo_star_mcse": es_se,
            "elbo_amortized": ea,
            "elbo_amortized_mcse": ea_se,
            "approximation_gap": ag,
            "approximation_gap_mcse": ag_se,
            "amortization_gap": mg,
            "amortization_gap_mcse": mg_se,
        }


@single_threaded
def optimize_local_gaussian(
    model: Callable,
    data: Mapping[str, Any],
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    steps: int = 500,
    lr: float = 0.05,
    num_particles: int = 16,
    latent: str = LATENT,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Maximise each data point's ELBO over a diagonal Gaussian, the model fixed.

    Adam with a cosine-decayed learning rate and the sticking-the-landing
    gradient (its noise vanishes at the optimum), starting from ``loc, scale``.

    Returns
    -------
    loc, scale : Tensor, shape (n, D)
    trace : ndarray, shape (steps,)
        Mean ELBO per data point at each step (noisy), nats.
    """
    check_option("steps", steps, kind=int, low=1)
    loc = loc.detach().clone().requires_grad_(True)
    log_scale = scale.detach().log().clone().requires_grad_(True)
    opt = torch.optim.Adam([loc, log_scale], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 50)
    trace = np.empty(steps)
    with frozen_params():
        for i in range(steps):
            s = log_scale.exp()
            z = loc + s * torch.randn(num_particles, *loc.shape)
            lw = log_joint(model, data, z, latent) - _diag_normal_log_prob(
                z, loc.detach(), s.detach()
            )
            loss = -lw.mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            trace[i] = float(-loss.detach()) / loc.shape[0]
    return loc.detach(), log_scale.detach().exp(), trace


def _elbo_draws(
    model: Callable, data: dict, loc: torch.Tensor, scale: torch.Tensor, k: int, latent: str
) -> tuple[np.ndarray, np.ndarray]:
    z = loc + scale * torch.randn(k, *loc.shape)
    lw = (log_joint(model, data, z, latent) - _diag_normal_log_prob(z, loc, scale)).double()
    return lw.mean(0).numpy(), (lw.std(0) / math.sqrt(k)).numpy()


@single_threaded
def amortization_gap(
    model: Callable,
    guide: Callable,
    data: Mapping[str, Any],
    index: np.ndarray,
    *,
    steps: int = 500,
    lr: float = 0.05,
    opt_particles: int = 16,
    num_particles: int = 5000,
    seed: int = 0,
    latent: str = LATENT,
    chunk: int = 1000,
) -> GapEstimate:
    """Approximation and amortization gaps on the data points ``index``.

    Parameters
    ----------
    model, guide : callable
        The guide's ``latent`` site must be a diagonal Normal (its family is
        the family of ``q*``).
    data : dict
        Data set (e.g. the test images); ``index`` selects the points.
    index : array of int
        Data points to analyse.
    steps, lr, opt_particles :
        Optimisation of ``q*`` (see :func:`optimize_local_gaussian`).
    num_particles : int
        Draws per data point for each ELBO and for ``log p(x)``.
    seed : int
        Seed (the global RNG is restored afterwards).
    chunk : int
        Particles per vectorized pass.
    """
    check_option("num_particles", num_particles, kind=int, low=4)
    index = np.asarray(index, dtype=int)
    part = subset(data, index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loc_a, scale_a = gaussian_encoder(guide, part, latent)
        loc_s, scale_s, _ = optimize_local_gaussian(
            model, part, loc_a, scale_a, steps=steps, lr=lr, num_particles=opt_particles,
            latent=latent,
        )  # fmt: skip
        with torch.no_grad():
            ea, es, log_w = [], [], []
            for done in range(0, num_particles, chunk):
                k = min(chunk, num_particles - done)
                m, s = _elbo_draws(model, part, loc_a, scale_a, k, latent)
                ea.append((m, s, k))
                m, s = _elbo_draws(model, part, loc_s, scale_s, k, latent)
                es.append((m, s, k))
                # defensive mixture proposal: half the draws from each component
                k_a, k_s = _split(k)
                z = torch.cat(
                    [
                        loc_a + scale_a * torch.randn(k_a, *loc_a.shape),
                        loc_s + scale_s * torch.randn(k_s, *loc_s.shape),
                    ]
                )
                log_q = _mixture_log_prob(
                    _diag_normal_log_prob(z, loc_a, scale_a),
                    _diag_normal_log_prob(z, loc_s, scale_s),
                    k_a,
                    k_s,
                )
                log_w.append((log_joint(model, part, z, latent) - log_q).double().T.numpy())
    # stratified: a fixed share of the draws from each component, chunk by chunk
    log_p, log_p_se = _lme_stats(np.concatenate(log_w, 1), _stratum(num_particles, chunk))
    elbo_a, elbo_a_se = _pool(ea)
    elbo_s, elbo_s_se = _pool(es)
    return GapEstimate(
        index=index,
        log_p=log_p,
        log_p_se=log_p_se,
        elbo_star=elbo_s,
        elbo_star_se=elbo_s_se,
        elbo_amortized=elbo_a,
        elbo_amortized_se=elbo_a_se,
        num_particles=num_particles,
        steps=steps,
    )


def _pool(chunks: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Combine chunked means and standard errors into one estimate per data point."""
    total = sum(k for _, _, k in chunks)
    mean = sum(m * k for m, _, k in chunks) / total
    var_of_mean = sum((s * k) ** 2 for _, s, k in chunks) / total**2
    return mean, np.sqrt(var_of_mean)


@dataclass(frozen=True)
class NutsDraws:
    """NUTS draws of one data point's latent with the model's parameters fixed.

    Attributes
    ----------
    draws : ndarray, shape (chains, samples, D)
    rhat, ess : ndarray, shape (D,)
        Split R-hat and bulk effective sample size (ArviZ).
    divergences : int
    wall_time : float
        Seconds.
    """

    draws: np.ndarray
    rhat: np.ndarray
    ess: np.ndarray
    divergences: int
    wall_time: float

    @property
    def flat(self) -> np.ndarray:
        """Draws with chains concatenated, shape (chains * samples, D)."""
        return self.draws.reshape(-1, self.draws.shape[-1])


@single_threaded
def nuts_latent_posterior(
    model: Callable,
    data: Mapping[str, Any],
    *,
    num_warmup: int = 300,
    num_samples: int = 300,
    num_chains: int = 2,
    seed: int = 0,
    latent: str = LATENT,
    full_mass: bool = True,
    jit_compile: bool = True,
) -> NutsDraws:
    """NUTS on ``latent`` of a single data point (``data`` holds that point only).

    The param store supplies the (fixed) model parameters. Chains run one after
    another in this process with a dense mass matrix (cheap for a small latent);
    the potential is JIT-compiled where it traces, else a one-line note is
    printed and the Python potential is used.
    """
    check_option("num_chains", num_chains, kind=int, low=1)
    check_option("num_samples", num_samples, kind=int, low=2)
    check_option("num_warmup", num_warmup, kind=int, low=0)

    def conditioned() -> None:
        model(**data)

    def run_chain(jit: bool) -> Any:
        kernel = NUTS(conditioned, full_mass=full_mass, jit_compile=jit, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, disable_progbar=True)
        mcmc.run()
        return mcmc

    chains, divergences = [], 0
    t0 = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[]),
        frozen_params(),
        pyro.validation_enabled(False),
        private_units(),  # the JIT potential's traces are freed with the chains
    ):
        for c in range(num_chains):
            pyro.set_rng_seed(seed + c)
            try:
                mcmc = run_chain(jit_compile)
            except RuntimeError as exc:  # JIT tracing failures vary widely
                if not jit_compile:
                    raise
                print(
                    f"NUTS: JIT unavailable ({type(exc).__name__}); using Python", file=sys.stderr
                )
                jit_compile = False
                pyro.set_rng_seed(seed + c)
                mcmc = run_chain(False)
            z = mcmc.get_samples()[latent].detach().double().numpy()
            chains.append(z.reshape(num_samples, -1))
            for div in mcmc.diagnostics().get("divergences", {}).values():
                divergences += len(div)
    draws = np.stack(chains)
    rhat, ess = chain_diagnostics(draws)
    return NutsDraws(draws, rhat, ess, divergences, time.perf_counter() - t0)


def chain_diagnostics(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split R-hat and bulk ESS (ArviZ) per coordinate of ``draws`` (chains, samples, D).

    A chain that never moved (zero variance, e.g. after a very short warm-up)
    gives a non-finite R-hat, reported as such instead of a division warning.
    """
    az = import_arviz()

    dataset = az.convert_to_dataset({"z": draws})
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.asarray(az.rhat(dataset)["z"].values)
        ess = np.asarray(az.ess(dataset)["z"].values)
    return rhat, ess


def guide_draws(
    guide: Callable, data: Mapping[str, Any], num_samples: int, latent: str = LATENT, seed: int = 0
) -> np.ndarray:
    """Draws of ``latent`` from the guide for one data point, shape ``(num_samples, D)``."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), poutine.block():
        torch.manual_seed(seed)
        with pyro.plate("_eval_particles", num_samples, dim=-2):
            tr = poutine.trace(guide).get_trace(**data)
    return tr.nodes[latent]["value"].reshape(num_samples, -1).double().numpy()


def compare_draws(approx: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Compare draws of an approximation with reference (NUTS) draws.

    Uses the project's shared metrics (:mod:`diagnostics.metrics`: per-coordinate
    marginal metrics and joint metrics).

    Parameters
    ----------
    approx : ndarray, shape (n, D)
    reference : ndarray, shape (chains, draws, D) or (m, D)
    seed : int
        Seed of the subsample used by the exact Wasserstein distance.

    Returns
    -------
    dict
        ``mean_error_sd``: largest ``|mean_q - mean_ref| / sd_ref`` over coordinates;
        ``sd_ratio_min`` / ``sd_ratio_max``: range of ``sd_q / sd_ref``;
        ``coverage90_min``: smallest fraction of reference draws inside the
        approximation's central 90 % interval (0.90 when right);
        ``w2``: 2-Wasserstein distance with every coordinate standardized by the
        reference sd (exact optimal transport on at most 1000 draws of each);
        ``metrics``: the module whose definitions were used.
    """
    a = np.asarray(approx, dtype=float)
    ref = np.asarray(reference, dtype=float)
    if ref.ndim == 2:
        ref = ref[None]
    flat = ref.reshape(-1, ref.shape[-1])
    rows = [metrics.marginal_metrics(a[:, d], ref[..., d]) for d in range(a.shape[1])]
    err = np.array([abs(r["std_mean_error"]) for r in rows])
    ratio = np.array([r["sd_ratio"] for r in rows])
    cover = np.array([r["coverage90"] for r in rows])
    w2 = metrics.joint_metrics(a, flat, seed=seed)["w2"]
    source = "diagnostics.metrics"
    return {
        "mean_error_sd": float(err.max()),
        "sd_ratio_min": float(ratio.min()),
        "sd_ratio_max": float(ratio.max()),
        "coverage90_min": float(cover.min()),
        "w2": float(w2),
        "metrics": source,
    }


def decoder_means(
    model: Callable, data: Mapping[str, Any], z: torch.Tensor, latent: str = LATENT,
    observed: str = OBSERVED,
) -> np.ndarray:  # fmt: skip
    """Mean of the observed site given ``z`` ``(n, D)`` (pixel probabilities), ``(n, pixels)``."""
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(poutine.condition(model, data={latent: z})).get_trace(**data)
    return tr.nodes[observed]["fn"].mean.double().numpy()


@dataclass(frozen=True)
class VaeEvaluation:
    """Evaluation of a trained digits VAE.

    Attributes
    ----------
    summary : dict
        JSON-friendly numbers: ``test`` (:meth:`LikelihoodEstimate.summary`),
        ``gap`` (:meth:`GapEstimate.summary`), ``nuts`` (one dict per image:
        :func:`compare_draws` plus R-hat, ESS, divergences), timings.
    arrays : dict of str to ndarray
        ``inputs``, ``recon``, ``samples``, ``latents``, ``labels`` for the report.
    """

    summary: dict[str, Any]
    arrays: dict[str, np.ndarray]


@single_threaded
def evaluate_digits_vae(
    result: Any,
    *,
    ll_particles: int = 5000,
    gap_images: int = 20,
    gap_steps: int = 500,
    gap_particles: int = 5000,
    nuts_images: int = 3,
    nuts_warmup: int = 300,
    nuts_samples: int = 300,
    nuts_chains: int = 2,
    num_test: int | None = None,
    seed: int = 0,
) -> VaeEvaluation:
    """Test log-likelihood and ELBO, gaps, NUTS comparison and report arrays.

    Parameters
    ----------
    result : TrainResult
        A run of :func:`vimodels.vae.train.train_digits_vae`.
    ll_particles : int
        ``K`` for the test log-likelihood.
    gap_images, gap_steps, gap_particles :
        Test images (a seeded random sample), optimisation steps of ``q*`` and
        draws per estimate for :func:`amortization_gap` (0 images: skipped).
    nuts_images, nuts_warmup, nuts_samples, nuts_chains :
        Test images analysed with :func:`nuts_latent_posterior` (0: skipped).
    num_test : int, optional
        Evaluate the log-likelihood on the first ``num_test`` test images only.
    seed : int
    """
    split = digits_split()
    static = dict(result.settings["static"])
    test = {"x": split.x_test, **static}
    labels = split.y_test
    if num_test is not None:
        test, labels = subset(test, slice(0, num_test)), labels[:num_test]
    n = split_data(test)[2]
    order = np.random.default_rng(seed).permutation(n)
    summary: dict[str, Any] = {}
    with result.scope():
        t0 = time.perf_counter()
        ll = log_likelihood(digits_vae, encoder_guide, test, ll_particles, seed=seed)
        summary["test"] = {**ll.summary(), "seconds": time.perf_counter() - t0}
        summary["gap"] = None
        if gap_images > 0:
            t0 = time.perf_counter()
            gap = amortization_gap(
                digits_vae, encoder_guide, test, order[:gap_images], steps=gap_steps,
                num_particles=gap_particles, seed=seed + 1,
            )  # fmt: skip
            summary["gap"] = {**gap.summary(), "seconds": time.perf_counter() - t0}
        summary["nuts"] = []
        for i in order[:nuts_images]:
            one = subset(test, [int(i)])
            ref = nuts_latent_posterior(
                digits_vae, one, num_warmup=nuts_warmup, num_samples=nuts_samples,
                num_chains=nuts_chains, seed=seed + 2,
            )  # fmt: skip
            q = guide_draws(encoder_guide, one, max(len(ref.flat), 2), seed=seed + 3)
            summary["nuts"].append(
                {
                    "image": int(i),
                    **compare_draws(q, ref.draws),
                    "rhat_max": float(np.max(ref.rhat)),
                    "ess_min": float(np.min(ref.ess)),
                    "divergences": ref.divergences,
                    "seconds": ref.wall_time,
                }
            )
        shown = subset(test, slice(0, 16))
        loc, _ = gaussian_encoder(encoder_guide, shown)
        latents, _ = gaussian_encoder(encoder_guide, test)
        prior = {"x": None, "num_data": 64, **static}
        with torch.random.fork_rng(devices=[]), torch.no_grad(), poutine.block():
            torch.manual_seed(seed + 4)  # z from the model's prior (learned or N(0, I))
            z_prior = poutine.trace(digits_vae).get_trace(**prior).nodes[LATENT]["value"]
        arrays = {
            "inputs": shown["x"].numpy().astype(float),
            "recon": decoder_means(digits_vae, shown, loc),
            "samples": decoder_means(digits_vae, prior, z_prior),
            "latents": latents.numpy().astype(float),
            "labels": np.asarray(labels),
        }
    return VaeEvaluation(summary, arrays)
