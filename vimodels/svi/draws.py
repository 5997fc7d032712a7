"""From Pyro traces to arrays: site layout, guide draws and replays of the model.

Both the NUTS reference and the variational guides go through these
functions, so their draws are laid out alike:

- :func:`model_info` traces the model once and records every site's kind
  (latent, deterministic, observed), shape, support and dimension names;
- :func:`sample_guide` draws from a guide and returns the latent values with
  their log weights ``log p(x, z) - log q(z)`` from the *same* traces;
- :func:`recover_discrete` samples discrete sites that NUTS summed out
  (``infer_discrete``, temperature 1);
- :func:`replay_model` runs the model on given latent draws and returns the
  deterministic sites, the pointwise log likelihood of observed sites and,
  on request, posterior predictive draws.

All draws are numpy float64 (or int64) arrays with a leading draw axis
``(n, *site_shape)``. Work is vectorized with a plate outside the model's
plates and falls back to one draw at a time when a model cannot be
vectorized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate, infer_discrete
from pyro.infer.enum import get_importance_trace
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from vimodels.svi.logweight import NotVectorizable, trace_log_weights
from vimodels.svi.marginal import marginal_pointwise, site_log_prob
from vimodels.svi.particles import ATOL, NUM_CHECK, RTOL, _is_delta, _one_draw, check_particles

LATENT = "latent"
DETERMINISTIC = "deterministic"
OBSERVED = "observed"

_DRAWS_PLATE = "_vimodels_draws"
_FALLBACK_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError)


@dataclass(frozen=True)
class SiteInfo:
    """Layout of one sample site.

    Attributes
    ----------
    name : str
    kind : str
        ``latent``, ``deterministic`` or ``observed``.
    shape : tuple of int
        Shape of one draw of the site.
    event_dim : int
        Number of trailing event dimensions.
    dims : tuple of str
        Dimension names, one per axis of ``shape``: the plate's name for plate
        axes, ``<site>_dim_<i>`` otherwise.
    discrete : bool
        Discrete support.
    dtype : str
        Torch dtype name of the value (``float32``, ``int64`` ...).
    support : Constraint
        The distribution's support (latent sites), for unconstraining transforms.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    event_dim: int
    dims: tuple[str, ...]
    discrete: bool
    dtype: str
    support: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ModelInfo:
    """The sites of a model and how they are laid out.

    Attributes
    ----------
    sites : dict of str to SiteInfo
        In trace order.
    max_plate_nesting : int
        Plate depth; the draws plate goes just outside it.
    plate_sizes : dict of str to int
        Size of each named plate dimension.
    observed_values : dict of str to ndarray
        The observed data of each observed site.
    plate_rows : dict of str to ndarray
        For each plate that subsampled its rows in this trace, the rows it took
        (int64, shape ``(subsample_size,)``, indices into the full data): what
        the plate's axis of every site holds.
    plate_full_sizes : dict of str to int
        For the same plates, the number of rows of the full data.
    """

    sites: dict[str, SiteInfo]
    max_plate_nesting: int
    plate_sizes: dict[str, int]
    observed_values: dict[str, np.ndarray] = field(repr=False)
    plate_rows: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    plate_full_sizes: dict[str, int] = field(repr=False, default_factory=dict)

    def names(self, kind: str) -> tuple[str, ...]:
        """Names of the sites of one kind, in trace order."""
        return tuple(n for n, s in self.sites.items() if s.kind == kind)

    @property
    def latent(self) -> tuple[str, ...]:
        """Latent (sampled, unobserved) sites."""
        return self.names(LATENT)

    @property
    def continuous(self) -> tuple[str, ...]:
        """Latent sites with continuous support."""
        return tuple(n for n in self.latent if not self.sites[n].discrete)

    @property
    def discrete(self) -> tuple[str, ...]:
        """Latent sites with discrete support."""
        return tuple(n for n in self.latent if self.sites[n].discrete)

    @property
    def deterministic(self) -> tuple[str, ...]:
        """``pyro.deterministic`` sites."""
        return self.names(DETERMINISTIC)

    @property
    def observed(self) -> tuple[str, ...]:
        """Observed sites."""
        return self.names(OBSERVED)

    @property
    def dims(self) -> dict[str, tuple[str, ...]]:
        """Dimension names of every site."""
        return {n: s.dims for n, s in self.sites.items()}


def _site_kind(site: dict) -> str | None:
    if site["type"] != "sample" or site_is_subsample(site):
        return None
    if site["infer"].get("_deterministic"):
        return DETERMINISTIC
    if site["is_observed"]:
        return OBSERVED
    if site["infer"].get("is_auxiliary"):
        return None
    return LATENT


def _dim_names(
    name: str, site: dict, shape: tuple[int, ...], event_dim: int, deterministic: bool
) -> tuple[str, ...]:
    frames = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
    batch_ndim = len(shape) - event_dim
    names = []
    for j, size in enumerate(shape):
        # batch axes count from the right of the batch shape; a deterministic
        # site's plate axes sit in its event shape, so count from the right of it
        pos = j - batch_ndim if j < batch_ndim else (j - len(shape) if deterministic else None)
        frame = frames.get(pos) if pos is not None else None
        if frame is not None and frame.size == size and not frame.name.startswith("_"):
            names.append(frame.name)
        else:
            names.append(f"{name}_dim_{j}")
    return tuple(names)


def model_info(
    model: Callable,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    max_plate_nesting: int | None = None,
) -> ModelInfo:
    """Trace ``model(*args, **kwargs)`` once and describe its sites.

    Parameters
    ----------
    model : callable
        Pyro model.
    args, kwargs
        Its arguments (data).
    max_plate_nesting : int, optional
        Lower bound on the plate depth (the catalog's value when known).

    Returns
    -------
    ModelInfo
    """
    kwargs = dict(kwargs or {})
    # the random stream is left as it was: draws made after this call do not depend on it
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    depth = 0
    for site in tr.nodes.values():
        if site["type"] == "sample":
            for f in site["cond_indep_stack"]:
                if f.vectorized and f.dim is not None:
                    depth = max(depth, -f.dim)
    if max_plate_nesting is not None:
        depth = max(depth, int(max_plate_nesting))
    sites: dict[str, SiteInfo] = {}
    plates: dict[str, int] = {}
    observed: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    full_sizes: dict[str, int] = {}
    for name, site in tr.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            idx = torch.as_tensor(site["value"]).reshape(-1)
            if len(idx) < int(site["fn"].size):  # a subsample, not the whole plate
                rows[name] = idx.long().numpy().copy()
                full_sizes[name] = int(site["fn"].size)
            continue
        kind = _site_kind(site)
        if kind is None:
            continue
        value = site["value"]
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        shape = tuple(value.shape)
        fn = site["fn"]
        event_dim = int(getattr(fn, "event_dim", len(getattr(fn, "event_shape", ()))))
        event_dim = min(event_dim, len(shape))
        dims = _dim_names(name, site, shape, event_dim, kind == DETERMINISTIC)
        for d, size in zip(dims, shape):
            if not d.startswith(f"{name}_dim_"):
                plates[d] = size
        support = getattr(fn, "support", None)
        discrete = bool(kind == LATENT and support is not None and support.is_discrete)
        sites[name] = SiteInfo(
            name,
            kind,
            shape,
            event_dim,
            dims,
            discrete,
            str(value.dtype).replace("torch.", ""),
            support,
        )
        if kind == OBSERVED:
            observed[name] = _to_numpy(value)
    return ModelInfo(sites, depth, plates, observed, rows, full_sizes)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach()
    if x.is_floating_point():
        return x.double().numpy().copy()
    if x.dtype == torch.bool:
        return x.numpy().copy()
    return x.long().numpy().copy()


def _as_draws(value: Any, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """Reshape a vectorized site value to ``(n, *shape)`` (broadcasting if it has no draw axis)."""
    v = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    size = int(np.prod(shape, dtype=int))
    if v.numel() == n * size:
        return _to_numpy(v.reshape((n, *shape)))
    if v.numel() == size:
        return _to_numpy(v.reshape(shape).expand((n, *shape)))
    # broadcast the trailing site shape, then keep one entry per draw
    full = torch.broadcast_tensors(v, torch.zeros(shape))[0]
    lead = full.shape[: full.dim() - len(shape)]
    if int(np.prod(lead, dtype=int)) == n:
        return _to_numpy(full.reshape((n, *shape)))
    raise ValueError(f"cannot lay out a value of shape {tuple(v.shape)} as ({n}, *{shape})")


def _to_tensor(values: np.ndarray, info: SiteInfo) -> torch.Tensor:
    dtype = getattr(torch, info.dtype, torch.float32)
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def _padded(values: np.ndarray, info: SiteInfo, depth: int) -> torch.Tensor:
    """``(n, *shape)`` draws as a tensor that broadcasts against the draws plate."""
    n = values.shape[0]
    batch_ndim = len(info.shape) - info.event_dim
    pad = max(depth - batch_ndim, 0)
    return _to_tensor(values, info).reshape((n,) + (1,) * pad + info.shape)


def _fake_trace(
    draws: Mapping[str, np.ndarray], info: ModelInfo, depth: int | None, index: int | None = None
) -> poutine.Trace:
    """A trace holding latent values to replay: all draws (vectorized) or draw ``index``."""
    tr = poutine.Trace()
    for name, values in draws.items():
        site = info.sites[name]
        if index is None:
            value = _padded(values, site, depth)
        else:
            value = _to_tensor(values[index], site)
        tr.add_node(
            name,
            type="sample",
            name=name,
            value=value,
            is_observed=False,
            infer={},
            fn=None,
            args=(),
            kwargs={},
            cond_indep_stack=(),
            scale=1.0,
            mask=None,
            done=True,
            stop=False,
            continuation=None,
        )
    return tr


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _check_vectorized(site: dict, n: int, info: ModelInfo) -> None:
    """Raise ValueError when a site's log density has more entries than ``n`` draws allow.

    A model that broadcasts a latent against the wrong axis (for instance
    ``beta.unsqueeze(-2)`` inside a plate) gives ``n x n`` cross terms under a
    vectorized draws plate; the caller then falls back to one draw at a time.
    Used by :func:`replay_model`, which has no guide to compare with; guide
    draws go through :func:`vimodels.svi.particles.check_particles`.
    """
    known = info.sites.get(site["name"])
    if known is None:
        return
    size = int(np.prod(known.shape, dtype=int)) if known.shape else 1
    numel = int(np.prod(site["fn"].batch_shape, dtype=int))
    if numel > n * max(size, 1):
        raise ValueError(
            f"site {site['name']!r} has batch shape {tuple(site['fn'].batch_shape)} under a "
            f"plate of {n} draws: the model does not vectorize"
        )


def _pointwise(site: dict, n: int, info: SiteInfo) -> np.ndarray:
    """Unscaled log density of an observed site per draw, shape ``(n, *batch_shape)``.

    Entries masked out (``poutine.mask``) are 0, as in the model's joint density.
    """
    lp = site_log_prob(site)
    batch = info.shape[: len(info.shape) - info.event_dim]
    return _as_draws(lp, n, batch)


def _replay_one(
    model: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    latent: Mapping[str, np.ndarray],
    index: int,
) -> poutine.Trace:
    """The model's trace on draw ``index`` of ``latent`` alone (no draws plate)."""
    fake = _fake_trace(latent, info, None, index=index)
    return _tolerant(
        lambda: poutine.trace(poutine.replay(model, trace=fake)).get_trace(*args, **kwargs)
    )


def _check_layout(
    model: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    tr: poutine.Trace,
    n: int,
    names: tuple[str, ...],
) -> None:
    """Raise :class:`NotVectorizable` unless a vectorized pass lays ``names`` out per draw.

    A deterministic site holds whatever the model computes from its latent values:
    under a plate of ``n`` draws, ``torch.stack([a, b])`` has the draws on its last
    axis, ``W.sum()`` sums over every draw, ``W.T`` moves them; laid out by element
    count alone such values are scrambled across draws without any error. So the
    first, the last and evenly spaced draws are replayed one at a time and their
    deterministic values (and pointwise log likelihoods of observed sites) must
    equal the vectorized pass's; otherwise the caller evaluates every draw alone.

    Parameters
    ----------
    tr : Trace
        The model's vectorized trace (draws plate just outside its plates).
    n : int
        Draws in that pass.
    names : tuple of str
        Deterministic and observed sites to check.
    """
    if not names or n < 2:
        return
    latent = {k: _as_draws(tr.nodes[k]["value"], n, info.sites[k].shape) for k in info.latent}
    picks = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(NUM_CHECK, n))})
    for i in picks:
        one = _replay_one(model, args, kwargs, info, latent, i)
        for name in names:
            site = info.sites[name]
            if site.kind == OBSERVED:
                many = _pointwise(tr.nodes[name], n, site)[i]
                single = _pointwise(one.nodes[name], 1, site)[0]
            else:
                many = _as_draws(tr.nodes[name]["value"], n, site.shape)[i]
                single = _as_draws(one.nodes[name]["value"], 1, site.shape)[0]
            if not np.allclose(many, single, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise NotVectorizable(
                    f"site {name!r} of draw {i} differs under a plate of {n} draws and on its "
                    "own: the model's value does not keep the draws on their own axis"
                )


def sample_guide(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    num_samples: int,
    chunk: int = 1000,
    report: dict | None = None,
    *,
    sites: tuple[str, ...] | None = None,
    check: bool = True,
    weights: bool = True,
    nan_as: float = -np.inf,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Draw from ``guide`` and return the model's sites with their log importance weights.

    The one way the project draws from a guide: :meth:`FitResult.sample`, the
    fit's ELBO (:func:`vimodels.svi.weights.log_weights`), the minibatch ELBO,
    ArviZ conversion and the evidence estimate all call it, so the same seed
    gives the same draws everywhere. A vectorized pass (the draws on a plate
    just outside the model's plates) is used where
    :func:`vimodels.svi.particles.check_particles` finds it matches one-draw
    evaluation; otherwise draws are made one at a time. Log weights are summed
    by :func:`vimodels.svi.logweight.log_weight_terms`; enumerated discrete
    sites are summed out exactly (Pyro's tensor contraction, one draw at a
    time where that fails) and, when asked for, drawn from their conditional
    posterior (:func:`recover_discrete`).

    Parameters
    ----------
    model, guide : callable
        Called as ``fn(*args, **kwargs)``; the guide's parameters must be in the
        active param store.
    info : ModelInfo
        From :func:`model_info` on the same model and data.
    num_samples : int
        Number of draws.
    chunk : int
        Draws per vectorized pass.
    report : dict, optional
        Filled with ``vectorized`` (bool) and ``reason`` (why not, or None).
    sites : tuple of str, optional
        Sites to return (latent, deterministic or observed sites of ``info``;
        others are left out); default: every latent site. ``()`` for the log
        weights only.
    check : bool
        Check the first vectorized pass against one-draw evaluation (off where the
        same model and guide passed it before: a fit's ELBO records whether they did).
    weights : bool
        Return the log weights (else None; they are still computed for the check).
    nan_as : float
        What a NaN log weight (a draw where the model has no density) becomes.

    Returns
    -------
    draws : dict of str to ndarray
        Each requested site, shape ``(num_samples, *site_shape)``.
    log_weights : ndarray, shape (num_samples,), or None
        ``log p(x, z) - log q(z)`` of each draw (nats), discrete sites summed out;
        None unless ``weights``.
    """
    kwargs = dict(kwargs)
    sites = info.latent if sites is None else tuple(s for s in sites if s in info.sites)
    report = {} if report is None else report
    report.update(vectorized=False, reason=None)
    call = _GuideCall(model, guide, args, kwargs, info)
    if info.discrete:
        draws, lw = _sample_discrete(call, num_samples, chunk, sites, report)
    else:
        draws, lw = _sample_continuous(call, num_samples, chunk, sites, check, weights, report)
    return draws, np.where(np.isnan(lw), nan_as, lw) if weights else None


@dataclass(frozen=True)
class _GuideCall:
    """The model and guide (``fn(*args, **kwargs)``) and the model's layout, in one.

    What each private sampler of :func:`sample_guide` needs, passed as one argument
    instead of five.
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    info: ModelInfo

    def traces(self) -> tuple[poutine.Trace, poutine.Trace]:
        """A guide trace and the model's trace replayed on it."""
        guide_tr = poutine.trace(self.guide).get_trace(*self.args, **self.kwargs)
        model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(
            *self.args, **self.kwargs
        )
        return guide_tr, model_tr


def _sample_continuous(
    call: _GuideCall,
    num_samples: int,
    chunk: int,
    sites: tuple[str, ...],
    check: bool,
    weights: bool,
    report: dict,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    model, guide, args, kwargs, info = call.model, call.guide, call.args, call.kwargs, call.info
    ndim = info.max_plate_nesting + 1
    parts: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
    traces = call.traces

    with torch.no_grad():
        try:
            for start, stop in _chunks(num_samples, chunk):
                n = stop - start

                def vectorized_part(n: int = n, first: bool = start == 0) -> tuple:
                    with pyro.plate(_DRAWS_PLATE, n, dim=-ndim):
                        guide_tr, model_tr = traces()
                    weigh = weights or (first and check)
                    part = _weights_and_values(model_tr, guide_tr, info, sites, n, ndim, weigh)
                    if first and check:  # the same check as the ELBO's (vimodels.svi.particles)
                        check_particles(model, guide, args, kwargs, model_tr, guide_tr, part[1])
                    if first:  # deterministic sites: their layout, which the ELBO never sees
                        det = tuple(s for s in sites if info.sites[s].kind == DETERMINISTIC)
                        _check_layout(model, args, kwargs, info, model_tr, n, det)
                    return part

                parts.append(_tolerant(vectorized_part))
            report["vectorized"] = True
        except (NotVectorizable, *_FALLBACK_ERRORS) as exc:
            report["reason"] = _reason(exc)
            parts = []

            def one_draw() -> tuple:
                guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
                try:
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        *args, **kwargs
                    )
                except torch.linalg.LinAlgError:
                    # the model's own linear algebra fails at this draw (a covariance it
                    # builds is not positive definite): no density there, weight 0, as
                    # Potential.log_density has it; its latent values are the guide's
                    return _undefined_draw(guide_tr, info, sites)
                return _weights_and_values(model_tr, guide_tr, info, sites, 1, None, weights)

            for _ in range(num_samples):
                parts.append(_tolerant(one_draw))
    draws = (
        {name: np.concatenate([p[0][name] for p in parts]) for name in sites if name in parts[0][0]}
        if parts
        else {}
    )
    return draws, np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)


def _undefined_draw(
    guide_tr: poutine.Trace, info: ModelInfo, sites: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One draw where the model cannot be evaluated: log weight ``-inf``.

    Latent values from the guide's trace; other sites (deterministic, predictive)
    NaN, since the model never computed them.
    """
    values = {}
    for name in sites:
        shape = info.sites[name].shape
        if name in guide_tr.nodes and info.sites[name].kind == LATENT:
            values[name] = _as_draws(guide_tr.nodes[name]["value"], 1, shape)
        else:
            values[name] = np.full((1, *shape), np.nan)
    return values, np.array([-np.inf])


def _reason(exc: Exception) -> str:
    """Why draws are evaluated one at a time, in one line."""
    if isinstance(exc, NotVectorizable):
        return str(exc)[:300]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"the model fails under a particle plate ({type(exc).__name__}: {text})"[:300]


def _sample_discrete(
    call: _GuideCall, num_samples: int, chunk: int, sites: tuple[str, ...], report: dict
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draws and log weights of a model with enumerated discrete sites."""
    info = call.info
    deterministic = [s for s in sites if info.sites[s].kind != LATENT]
    recover = bool(deterministic) or any(s in info.discrete for s in sites)
    try:
        latent, lw = _sample_guide_enum(call, num_samples, chunk, recover)
        report["vectorized"] = True
    except (NotVectorizable, *_FALLBACK_ERRORS) as exc:
        report["reason"] = "enumerated discrete sites summed out one draw at a time: " + _reason(
            exc
        )
        latent, lw = _sample_guide_discrete(call, num_samples)
    draws = {s: latent[s] for s in sites if s in latent}
    if deterministic:
        replay = replay_model(call.model, call.args, call.kwargs, info, latent, chunk=chunk)
        found = {
            **replay.deterministic,
            **{k: _repeat(v, num_samples) for k, v in info.observed_values.items()},
        }
        draws.update({s: found[s] for s in deterministic if s in found})
    return {s: draws[s] for s in sites if s in draws}, lw


def _repeat(value: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(value, (n, *np.shape(value))).copy()


def _tolerant(traces: Callable[[], Any]) -> Any:
    """``traces()``, rerun without Pyro's validation where a guide draw breaks a constraint.

    A degenerate guide (a fit stopped on a non-finite loss, say) can draw values
    where the model cannot be evaluated: a scale that underflows to 0, a NaN.
    Those draws have no posterior density: rerun without validation, their log
    weights come out non-finite and count as ``-inf`` (weight 0), and the
    diagnostics flag the guide instead of failing on it.
    """
    try:
        return traces()
    except ValueError as exc:
        text = str(exc)
        if "invalid values" not in text and "Expected parameter" not in text:
            raise
        with pyro.validation_enabled(False):
            return traces()


def _weights_and_values(
    model_tr: poutine.Trace,
    guide_tr: poutine.Trace,
    info: ModelInfo,
    sites: tuple[str, ...],
    n: int,
    ndim: int | None,
    weigh: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The requested sites' values and the log weights of one pass (``ndim=None``: one draw).

    Without ``weigh`` the log weights are NaN (not computed).
    """
    if weigh:
        total = trace_log_weights(model_tr, guide_tr, n, ndim)
    else:
        total = torch.full((n,), float("nan"), dtype=torch.float64)
    values = {
        name: _as_draws(model_tr.nodes[name]["value"], n, info.sites[name].shape)
        for name in sites
        if name in model_tr.nodes
    }
    return values, total.numpy().copy()


def _per_draw(t: torch.Tensor, symbol: str, n: int) -> torch.Tensor:
    """Sum a packed log-density tensor over every dimension but the draws plate's."""
    dims = getattr(t, "_pyro_dims", "")
    if symbol not in dims:
        return t.sum().expand(n)
    axis = dims.index(symbol)
    other = [d for d in range(t.dim()) if d != axis]
    out = t.sum(other) if other else t
    return out.reshape(-1).expand(n) if out.numel() == 1 else out.reshape(n)


def _sample_guide_enum(
    call: _GuideCall, num_samples: int, chunk: int, recover: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Vectorized draws and log weights of a model whose discrete sites are enumerated.

    ``log p(x, z)`` sums the discrete sites out exactly (Pyro's tensor
    contraction, as in ``TraceEnum_ELBO``) separately for every draw; the
    discrete sites themselves are then drawn by :func:`recover_discrete`.
    """
    model, guide, args, kwargs, info = call.model, call.guide, call.args, call.kwargs, call.info
    depth = info.max_plate_nesting
    enum_model = config_enumerate(model, default="parallel")
    values: dict[str, list[np.ndarray]] = {name: [] for name in info.continuous}
    weights = []
    with torch.no_grad():
        for start, stop in _chunks(num_samples, chunk):
            n = stop - start
            g = EnumMessenger(first_available_dim=-2 - depth)(_in_plate(guide, n, depth))
            m = EnumMessenger()(_in_plate(enum_model, n, depth))
            model_tr, guide_tr = get_importance_trace("flat", depth + 1, m, g, args, kwargs)
            model_tr.pack_tensors()
            guide_tr.pack_tensors(model_tr.plate_to_symbol)
            costs, log_factors, _, sum_dims, scale = _compute_model_factors(model_tr, guide_tr)
            symbol = model_tr.plate_to_symbol[_DRAWS_PLATE]
            total = torch.zeros(n, dtype=torch.float64)
            for terms in costs.values():
                for t in terms:
                    total = total + _per_draw(t, symbol, n).double()
            if log_factors:
                t = contract_to_tensor(log_factors, sum_dims, target_ordinal=frozenset({symbol}))
                total = total + scale * _per_draw(t, symbol, n).double()
            for site in guide_tr.nodes.values():
                if site["type"] == "sample" and not site["is_observed"]:
                    total = total - _per_draw(site["packed"]["log_prob"], symbol, n).double()
            weights.append(total.numpy().copy())
            if start == 0:  # as check_particles does for models without discrete sites
                _check_enum_weights(call, guide_tr, weights[0], depth)
            for name in info.continuous:
                values[name].append(
                    _as_draws(model_tr.nodes[name]["value"], n, info.sites[name].shape)
                )
    draws = {name: np.concatenate(v) for name, v in values.items()}
    if recover:  # the discrete sites, from their conditional posterior
        draws.update(recover_discrete(model, args, kwargs, info, draws, chunk))
    return {name: draws[name] for name in info.latent if name in draws}, np.concatenate(weights)


def _check_enum_weights(
    call: _GuideCall, guide_tr: poutine.Trace, log_w: np.ndarray, depth: int
) -> None:
    """Raise :class:`NotVectorizable` unless a vectorized enumerated pass matches one-draw ones.

    The first, the last and evenly spaced draws of the pass are re-evaluated alone
    (the guide replayed on the draw's values, the discrete sites summed out by
    ``TraceEnum_ELBO``): a model that does not broadcast over the draws (say
    ``mu.reshape(-1)[0]``) gives every draw the first draw's likelihood under the
    plate, with an ELBO above ``log p(x)`` and discrete draws from the wrong
    conditional.
    """
    n = len(log_w)
    model, guide, args, kwargs = call.model, call.guide, call.args, call.kwargs
    elbo = TraceEnum_ELBO(max_plate_nesting=depth)
    enum_model = config_enumerate(model, default="parallel")
    picks = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(NUM_CHECK, n))})
    with torch.random.fork_rng(devices=[]):
        one = poutine.trace(guide).get_trace(*args, **kwargs)
        shapes = {
            name: tuple(site["value"].shape)
            for name, site in one.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not _is_delta(site["fn"])
        }
        for i in picks:
            fake = poutine.Trace()
            for name, shape in shapes.items():
                node = guide_tr.nodes[name]
                value = _one_draw(node["value"], i, n, shape)
                infer = dict(node["infer"])  # replay copies it: keeps is_auxiliary
                fake.add_node(
                    name, type="sample", name=name, value=value, is_observed=False, infer=infer
                )
            w = -elbo.loss(enum_model, poutine.replay(guide, trace=fake), *args, **kwargs)
            same = w == log_w[i] or (np.isnan(w) and np.isnan(log_w[i]))
            if not same and not abs(w - log_w[i]) <= ATOL + RTOL * max(abs(w), abs(log_w[i])):
                raise NotVectorizable(
                    f"draw {i} of {n} has log weight {log_w[i]:.6g} under a particle plate "
                    f"and {w:.6g} on its own (discrete sites summed out): the model does not "
                    "broadcast over the particles"
                )


def _sample_guide_discrete(
    call: _GuideCall, num_samples: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One draw at a time: enumerated ``log p`` and ``infer_discrete`` for hidden sites."""
    model, guide, args, kwargs, info = call.model, call.guide, call.args, call.kwargs, call.info
    depth = info.max_plate_nesting
    enum_model = config_enumerate(model, default="parallel")
    elbo = TraceEnum_ELBO(max_plate_nesting=depth)
    log_w = np.empty(num_samples)
    out: dict[str, list[np.ndarray]] = {name: [] for name in info.latent}
    with torch.no_grad():
        for i in range(num_samples):
            guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
            log_w[i] = -elbo.loss(
                enum_model, poutine.replay(guide, trace=guide_tr), *args, **kwargs
            )
            sampler = infer_discrete(
                poutine.replay(enum_model, trace=guide_tr),
                first_available_dim=-(depth + 1),
                temperature=1,
            )
            model_tr = poutine.trace(sampler).get_trace(*args, **kwargs)
            for name in info.latent:
                out[name].append(
                    _as_draws(model_tr.nodes[name]["value"], 1, info.sites[name].shape)
                )
    return {name: np.concatenate(v) for name, v in out.items()}, log_w


def _in_plate(fn: Callable, n: int, depth: int) -> Callable:
    """``fn`` run inside a plate of ``n`` draws just outside its own plates."""

    def wrapped(*args, **kwargs):
        with pyro.plate(_DRAWS_PLATE, n, dim=-(depth + 1)):
            return fn(*args, **kwargs)

    return wrapped


def recover_discrete(
    model: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    draws: Mapping[str, np.ndarray],
    chunk: int = 1000,
) -> dict[str, np.ndarray]:
    """Sample the discrete sites that NUTS summed out, given continuous draws.

    Uses ``infer_discrete`` (temperature 1): each discrete site is drawn from
    its conditional posterior given the continuous latent values of the same
    draw, so together they are joint posterior draws. The draws are vectorized
    (a plate of draws) where the first pass's observed log densities equal
    one-draw replays of the first, last and evenly spaced draws
    (:func:`_check_layout`); a model that does not broadcast over the draws
    (``mu.reshape(-1)[0]``) would draw every discrete site from the first draw's
    conditional, and is sampled one draw at a time instead.

    Returns
    -------
    dict of str to ndarray
        Each discrete site, shape ``(n, *site_shape)``.
    """
    if not info.discrete:
        return {}
    kwargs = dict(kwargs)
    cont = {k: np.asarray(draws[k]) for k in info.continuous}
    n = len(next(iter(cont.values()))) if cont else 0
    depth = info.max_plate_nesting
    enum_model = config_enumerate(model, default="parallel")
    out: dict[str, list[np.ndarray]] = {name: [] for name in info.discrete}
    with torch.no_grad():
        try:
            for start, stop in _chunks(n, chunk):
                part = {k: v[start:stop] for k, v in cont.items()}
                m = stop - start
                # the draws plate must sit inside what infer_discrete traces
                sampler = infer_discrete(
                    _in_plate(
                        poutine.replay(enum_model, trace=_fake_trace(part, info, depth)), m, depth
                    ),
                    first_available_dim=-(depth + 2),
                    temperature=1,
                )
                tr = poutine.trace(sampler).get_trace(*args, **kwargs)
                if start == 0:  # a model that does not broadcast over the draws: one at a time
                    _check_layout(model, args, kwargs, info, tr, m, info.names(OBSERVED))
                for name in info.discrete:
                    out[name].append(_as_draws(tr.nodes[name]["value"], m, info.sites[name].shape))
        except _FALLBACK_ERRORS:  # NotVectorizable included
            out = {name: [] for name in info.discrete}
            for i in range(n):
                sampler = infer_discrete(
                    poutine.replay(enum_model, trace=_fake_trace(cont, info, None, index=i)),
                    first_available_dim=-(depth + 1),
                    temperature=1,
                )
                tr = poutine.trace(sampler).get_trace(*args, **kwargs)
                for name in info.discrete:
                    out[name].append(_as_draws(tr.nodes[name]["value"], 1, info.sites[name].shape))
    return {name: np.concatenate(v) for name, v in out.items()}


class _ResampleObserved(Messenger):
    """Draw observed sites anew; unlike ``poutine.uncondition`` leaves deterministic sites."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] and not msg["infer"].get("_deterministic"):
            msg["is_observed"] = False
            msg["infer"]["was_observed"] = True
            msg["infer"]["obs"] = msg["value"]
            msg["value"] = None
            msg["done"] = False


@dataclass(frozen=True)
class Replay:
    """What a replay of the model on latent draws gives (arrays with a leading draw axis).

    Attributes
    ----------
    deterministic : dict of str to ndarray
        ``(n, *site_shape)`` for each deterministic site.
    log_likelihood : dict of str to ndarray
        ``(n, *batch_shape)``: unscaled log density of each observed value (nats).
    posterior_predictive : dict of str to ndarray
        ``(n, *site_shape)`` new draws of each observed site (empty unless requested).
    """

    deterministic: dict[str, np.ndarray]
    log_likelihood: dict[str, np.ndarray]
    posterior_predictive: dict[str, np.ndarray]


def replay_model(
    model: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    draws: Mapping[str, np.ndarray],
    *,
    predictive: bool = False,
    chunk: int = 1000,
) -> Replay:
    """Run the model on latent draws.

    Parameters
    ----------
    model : callable
    args, kwargs
        Data, as given to :func:`model_info`.
    info : ModelInfo
    draws : dict of str to ndarray
        Every latent site, shape ``(n, *site_shape)``.
    predictive : bool
        Also draw the observed sites anew (posterior predictive).
    chunk : int
        Draws per vectorized pass.

    Returns
    -------
    Replay
    """
    kwargs = dict(kwargs)
    latent = {k: np.asarray(draws[k]) for k in info.latent if k in draws}
    missing = set(info.latent) - set(latent)
    if missing:
        raise ValueError(f"replay needs every latent site; missing {sorted(missing)}")
    n = len(next(iter(latent.values()))) if latent else 0
    depth = info.max_plate_nesting
    names = {"det": info.deterministic, "obs": info.observed}
    out: dict[str, dict[str, list[np.ndarray]]] = {"det": {}, "ll": {}, "pp": {}}

    def collect(tr: poutine.Trace, m: int, pp_tr: poutine.Trace | None) -> None:
        # a site the model skipped on this draw (a branch on the draw's value): a
        # deterministic value is NaN, a log likelihood term 0 (nothing was added)
        for name in names["det"]:
            shape = info.sites[name].shape
            value = (
                _as_draws(tr.nodes[name]["value"], m, shape)
                if name in tr.nodes
                else np.full((m, *shape), np.nan)
            )
            out["det"].setdefault(name, []).append(value)
        for name in names["obs"]:
            site = info.sites[name]
            batch = site.shape[: len(site.shape) - site.event_dim]
            present = name in tr.nodes
            out["ll"].setdefault(name, []).append(
                _pointwise(tr.nodes[name], m, site) if present else np.zeros((m, *batch))
            )
            if pp_tr is not None:
                out["pp"].setdefault(name, []).append(
                    _as_draws(pp_tr.nodes[name]["value"], m, site.shape)
                    if name in pp_tr.nodes
                    else np.full((m, *site.shape), np.nan)
                )

    def run(fn: Callable) -> poutine.Trace:
        return _tolerant(lambda: poutine.trace(fn).get_trace(*args, **kwargs))

    vectorized = True
    with torch.no_grad():
        try:
            for start, stop in _chunks(n, chunk):
                part = {k: v[start:stop] for k, v in latent.items()}
                m = stop - start
                fake = _fake_trace(part, info, depth)
                with pyro.plate(_DRAWS_PLATE, m, dim=-(depth + 1)):
                    tr = run(poutine.replay(model, trace=fake))
                    for site in tr.nodes.values():
                        if site["type"] == "sample" and not site_is_subsample(site):
                            _check_vectorized(site, m, info)
                    pp = (
                        run(_ResampleObserved()(poutine.replay(model, trace=fake)))
                        if predictive
                        else None
                    )
                if start == 0:  # outside the draws plate: its draws replayed one at a time
                    _check_layout(model, args, kwargs, info, tr, m, names["det"] + names["obs"])
                collect(tr, m, pp)
        except (NotVectorizable, *_FALLBACK_ERRORS):
            out = {"det": {}, "ll": {}, "pp": {}}
            vectorized = False
            for i in range(n):
                fake = _fake_trace(latent, info, None, index=i)
                tr = run(poutine.replay(model, trace=fake))
                pp = (
                    run(_ResampleObserved()(poutine.replay(model, trace=fake)))
                    if predictive
                    else None
                )
                collect(tr, 1, pp)
    cat = {key: {k: np.concatenate(v) for k, v in group.items()} for key, group in out.items()}
    if info.discrete and names["obs"] and n:
        # LOO needs log p(x_i | theta), not log p(x_i | z_i, theta) with z_i drawn given x_i
        cat["ll"].update(
            _marginal_log_likelihood(model, args, kwargs, info, latent, chunk if vectorized else 1)
        )
    return Replay(cat["det"], cat["ll"], cat["pp"])


def _marginal_log_likelihood(
    model: Callable,
    args: tuple,
    kwargs: Mapping[str, Any],
    info: ModelInfo,
    latent: Mapping[str, np.ndarray],
    chunk: int,
) -> dict[str, np.ndarray]:
    """Observed sites' pointwise log likelihood with their local discrete sites summed out.

    The continuous draws are replayed under parallel enumeration of the discrete
    sites (:func:`vimodels.svi.marginal.marginal_pointwise` says which observed
    sites qualify); ``chunk`` draws at a time (1 for a model that does not
    vectorize over draws). Sites that do not qualify are absent.
    """
    cont = {k: v for k, v in latent.items() if k in info.continuous}
    n = len(next(iter(latent.values())))
    depth = info.max_plate_nesting
    enum_model = config_enumerate(model, default="parallel")
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start, stop in _chunks(n, chunk):
            m = stop - start
            fake = _fake_trace({k: v[start:stop] for k, v in cont.items()}, info, depth)
            fn = poutine.enum(
                _in_plate(poutine.replay(enum_model, trace=fake), m, depth),
                first_available_dim=-(depth + 2),
            )
            try:
                tr = _tolerant(lambda fn=fn: poutine.trace(fn).get_trace(*args, **kwargs))
                found = marginal_pointwise(tr, info.names(OBSERVED), info.discrete, depth)
                for name, lp in found.items():
                    site = info.sites[name]
                    batch = site.shape[: len(site.shape) - site.event_dim]
                    parts.setdefault(name, []).append(_as_draws(lp, m, batch))
            except (NotImplementedError, *_FALLBACK_ERRORS):  # cannot be enumerated: conditional
                return {}
    chunks = len(range(0, n, chunk))
    return {k: np.concatenate(v) for k, v in parts.items() if len(v) == chunks}
