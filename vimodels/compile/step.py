"""An SVI step's loss and gradients traced into one graph (``fit``'s fast path).

Pyro's ``JitTrace_ELBO`` traces the forward pass only: each step still runs
the autograd engine over the traced graph's backward, which for a small model
costs as much as the forward. Where the loss is a plain differentiable
function of reparameterized draws, :func:`compile_step` records the loss *and*
``torch.autograd.grad`` of it with respect to the unconstrained parameters as
one graph of ATen operations (the recorder of :mod:`vimodels.compile.record`,
which unlike ``make_fx`` does not import ``torch._dynamo``; ``make_fx`` with fake
tensors where the recorder cannot follow), which TorchScript then freezes and
runs without autograd. The random operations of the guide's draws stay random
operations of the graph, drawing from torch's global generator, so a seed still
fixes the fit.

The compiled step is used only where it is valid: ``Trace_ELBO`` (also
JIT-compiled) and ``TraceMeanField_ELBO``, with no score-function term (every
guide site reparameterized), no enumerated site and no data subsampling,
traced without any value read back into Python, and matching Pyro's own
ELBO (loss and gradients, same draws) at the current parameters and at a
second point. Anything else raises :class:`StepCompileError` and the caller
keeps its ELBO.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence, transform_to

from vimodels.compile.record import UnsupportedTrace, freeze, reads_value, record

SUPPORTED = (Trace_ELBO, JitTrace_ELBO, TraceMeanField_ELBO)
RTOL = 1e-4
CACHE_SIZE = 8
_CACHE: OrderedDict = OrderedDict()  # full key -> (used, graph, frozen module)


class StepCompileError(RuntimeError):
    """The step cannot be compiled (or the compiled step disagrees with the ELBO)."""


class CompiledStep:
    """``()`` -> loss, finiteness and gradients of the parameters, from one frozen graph.

    Attributes
    ----------
    names : list of str
        Parameter names, in the order of the graph's inputs.
    params : list of Tensor
        The parameter store's unconstrained tensors (updated in place by the optimizer).
    used : list of int
        Indices of the parameters the loss depends on (the graph returns their gradients).
    graph : torch.fx.GraphModule
        The traced loss and gradients.
    """

    def __init__(self, names, params, used, graph, compiled):
        self.names = names
        self.params = params
        self.used = used
        self.graph = graph
        self.compiled = compiled
        self._used_params = [params[i] for i in used]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(loss, finite, *grads of the used parameters)`` at ``inputs``."""
        with torch.no_grad():
            return self.compiled(*inputs)

    def step(
        self,
        optim: Callable[[list[torch.Tensor]], None],
        accept: Callable[[float], bool] | None = None,
    ) -> tuple[float, bool]:
        """One SVI step at the store's parameters: ``(loss, finite)``.

        The optimizer steps only when the step is finite and ``accept(loss)``
        (if given) is true.
        """
        loss, finite, *grads = self(*self.params)
        finite = bool(finite)
        loss = float(loss)
        if finite and (accept is None or accept(loss)):
            ps = self._used_params
            for p, g in zip(ps, grads):
                p.grad = g
            optim(ps)
            for p in ps:
                p.grad = None
        return loss, finite


def supports(loss_fn: Any) -> bool:
    """Whether ``loss_fn``'s class is one the compiled step reproduces."""
    return type(loss_fn) in SUPPORTED


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Validation off (torch's and Pyro's) and tracing warnings silenced."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def elbo_loss(elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple) -> torch.Tensor:
    """Negative ELBO as a differentiable tensor, without reading values back into Python.

    For a fully reparameterized guide this is also Pyro's surrogate loss (each
    site's entropy term is its log density), so its gradient is the step's.
    """
    mean_field = isinstance(elbo, TraceMeanField_ELBO)
    loss = 0.0
    for model_trace, guide_trace in elbo._get_traces(model, guide, args, {}):
        if mean_field:
            particle = _mean_field_elbo(model_trace, guide_trace)
        else:
            particle = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    particle = particle + site["log_prob_sum"]
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    particle = particle - site["log_prob_sum"]
        loss = loss - particle / elbo.num_particles
    return loss


def _mean_field_elbo(model_trace, guide_trace) -> torch.Tensor:
    """``TraceMeanField_ELBO``'s particle ELBO (analytic KL where known), as a tensor."""
    elbo = 0.0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            elbo = elbo + model_site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            entropy = guide_site["score_parts"].entropy_term
            elbo = elbo + model_site["log_prob_sum"] - entropy.sum()
            continue
        kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
        if torch.is_tensor(kl):
            elbo = elbo - kl.sum()
        else:
            elbo = elbo - kl * torch.Size(guide_site["fn"].batch_shape).numel()
    for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    return elbo


def _check_structure(elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple) -> list[str]:
    """Parameter names of a step; raises unless every draw is reparameterized and whole."""
    with poutine.block(), poutine.trace(param_only=True) as capture:
        for _, guide_trace in elbo._get_traces(model, guide, args, {}):
            for site in guide_trace.nodes.values():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                if site_is_subsample(site):
                    continue
                if site["infer"].get("enumerate"):
                    raise StepCompileError(f"enumerated site {site['name']!r}")
                if not is_identically_zero(site["score_parts"].score_function):
                    raise StepCompileError(f"site {site['name']!r} is not reparameterized")
        # the ELBO's traces lack the plates' subsample sites: trace them apart
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        for tr in (model_trace, guide_trace):
            for site in tr.nodes.values():
                if site_is_subsample(site) and _subsampled(site):
                    raise StepCompileError(f"plate {site['name']!r} subsamples the data")
    names = list(capture.trace.nodes)
    if not names:
        raise StepCompileError("no parameters")
    return names


def _subsampled(site: dict) -> bool:
    size, value = site["fn"].size, site["value"]
    return size is not None and isinstance(value, torch.Tensor) and value.numel() < size


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().double(), b.detach().double()
    scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=RTOL, atol=RTOL * scale))


def compile_step(
    loss_fn: Any,
    model: Callable,
    guide: Callable,
    args: tuple,
    key: Hashable | None = None,
    check_seed: int = 12345,
) -> CompiledStep:
    """Trace, freeze and check the step of ``loss_fn`` on ``model`` and ``guide``.

    The parameters must exist (run a step first). Torch's random state is
    restored afterwards, so compiling does not change the fit's draws.

    Parameters
    ----------
    key : hashable, optional
        What, besides the parameters' names, shapes and constraints, the ELBO's
        settings and the data's values, fixes the graph (the model and guide
        as built): with one, the frozen graph is kept for the next call with
        the same key in this process, which then only checks it (tracing
        costs about half a second).

    Raises
    ------
    StepCompileError
        Where the step cannot be compiled or the compiled step disagrees with
        Pyro's ELBO; any tracing error is re-raised as one.
    """
    if not supports(loss_fn):
        raise StepCompileError(f"{type(loss_fn).__name__} is not supported")
    rng = torch.get_rng_state()
    try:
        with _quiet():
            names = _check_structure(loss_fn, model, guide, args)
            store = pyro.get_param_store()
            params = [store._params[n] for n in names]
            full_key = None if key is None else _full_key(key, loss_fn, names, args)
            cached = _CACHE.get(full_key) if full_key is not None else None
            if cached is not None:
                step = CompiledStep(names, params, *cached)
                try:
                    _check(step, loss_fn, model, guide, args, check_seed)
                    _CACHE.move_to_end(full_key)
                    return step
                except StepCompileError:
                    del _CACHE[full_key]
            step = _trace(loss_fn, model, guide, args, names, params)
            _check(step, loss_fn, model, guide, args, check_seed)
            if full_key is not None:
                _CACHE[full_key] = (step.used, step.graph, step.compiled)
                while len(_CACHE) > CACHE_SIZE:
                    _CACHE.popitem(last=False)
            return step
    except StepCompileError:
        raise
    except Exception as exc:  # tracing failures vary widely
        raise StepCompileError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_rng_state(rng)


def _full_key(key: Hashable, loss_fn: Any, names: list[str], args: tuple) -> tuple:
    store = pyro.get_param_store()
    params = tuple(
        (n, tuple(store._params[n].shape), str(store._params[n].dtype), repr(store._constraints[n]))
        for n in names
    )
    data = []
    for a in args:
        if isinstance(a, torch.Tensor):
            t = a.detach().cpu().contiguous()
            digest = hashlib.sha1(t.numpy().tobytes()).hexdigest()
            data.append((tuple(t.shape), str(t.dtype), digest))
        else:
            data.append(repr(a))
    settings = (
        type(loss_fn).__name__,
        loss_fn.num_particles,
        bool(loss_fn.vectorize_particles),
        loss_fn.max_plate_nesting,
        str(torch.get_default_dtype()),
    )
    return (key, params, tuple(data), settings)


def _trace(loss_fn, model, guide, args, names, params) -> CompiledStep:
    from torch.fx.experimental.proxy_tensor import make_fx

    store = pyro.get_param_store()
    transforms = [transform_to(store._constraints[n]) for n in names]
    used: list[int] = []
    seen: set[str] = set()

    def value_and_grads(*unconstrained: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = [u.detach().requires_grad_(True) for u in unconstrained]
        with torch.enable_grad():
            constrained = {}
            for n, t, leaf in zip(names, transforms, leaves):
                value = t(leaf)
                value.unconstrained = weakref.ref(leaf)  # as the param store marks its values
                constrained[n] = value
            with poutine.trace(param_only=True) as capture:
                loss = elbo_loss(
                    loss_fn,
                    poutine.replay(model, params=constrained),
                    poutine.replay(guide, params=constrained),
                    args,
                )
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        seen.update(capture.trace.nodes)
        used[:] = [i for i, g in enumerate(grads) if g is not None]
        kept = [grads[i] for i in used]
        finite = torch.stack([torch.isfinite(loss)] + [torch.isfinite(g).all() for g in kept])
        return (loss.detach(), finite.all(), *kept)

    examples = tuple(p.detach().clone() for p in params)
    try:
        # the project's recorder: no torch._dynamo import (1.5 s once per process);
        # reading a value that depends on the parameters into Python fails it
        graph = record(value_and_grads, *examples)
    except UnsupportedTrace as exc:
        raise StepCompileError(str(exc)) from exc
    except Exception:  # noqa: BLE001 - anything the recorder cannot follow: make_fx decides
        seen.clear()
        # fake tensors: no numbers are computed while tracing, and reading a value
        # into Python (a value-dependent branch) fails the trace
        graph = make_fx(value_and_grads, tracing_mode="fake", _allow_non_fake_inputs=True)(
            *examples
        )
    if seen - set(names):
        raise StepCompileError(f"new parameters while tracing: {sorted(seen - set(names))}")
    if reads_value(graph):
        raise StepCompileError("the step reads a tensor's value into Python")
    if not used:
        raise StepCompileError("the loss depends on no parameter")
    compiled = freeze(graph, *examples)
    return CompiledStep(names, params, used, graph, compiled)


def _check(step: CompiledStep, loss_fn, model, guide, args, check_seed: int) -> None:
    """Raise unless ``step`` gives Pyro's loss and gradients, same draws, at two points."""
    reference = (TraceMeanField_ELBO if isinstance(loss_fn, TraceMeanField_ELBO) else Trace_ELBO)(
        num_particles=loss_fn.num_particles,
        vectorize_particles=loss_fn.vectorize_particles,
        max_plate_nesting=loss_fn.max_plate_nesting,
    )
    params, used = step.params, step.used
    saved = [p.detach().clone() for p in params]
    try:
        for shift in (0.0, 0.1):
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s + shift)
            torch.manual_seed(check_seed)
            loss, finite, *grads = step(*params)
            torch.manual_seed(check_seed)
            ref_loss, ref_grads = reference_loss_and_grads(reference, model, guide, args, params)
            ref_kept = [ref_grads[i] for i in used]
            if any(g is not None for i, g in enumerate(ref_grads) if i not in used):
                raise StepCompileError("the traced step misses a gradient")
            if not bool(finite) or not _agrees(loss, ref_loss):
                raise StepCompileError(
                    f"loss {float(loss)} differs from the ELBO's {float(ref_loss)}"
                )
            if not all(_agrees(g, r) for g, r in zip(grads, ref_kept)):
                raise StepCompileError("the gradients differ from the ELBO's")
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def reference_loss_and_grads(
    elbo: Any, model: Callable, guide: Callable, args: tuple, params: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Pyro's differentiable loss of ``elbo`` and its gradients with respect to ``params``."""
    with poutine.block():
        loss = elbo.differentiable_loss(model, guide, *args)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), list(grads)
