"""A lean NUTS sampler on the flat unconstrained vector of a Pyro model.

Pyro's :class:`pyro.infer.NUTS` spends about 1 ms of Python per leapfrog step
building its trees out of dictionaries of tensors and Pyro sample sites; the
model's potential itself costs a tenth of that on the catalog's models. This
module runs the same algorithm with the bookkeeping in NumPy on one flat
vector, and only the potential and its gradient in torch (JIT-traced):

- the potential is Pyro's own (:func:`pyro.infer.mcmc.util.initialize_model`:
  unconstrained sites, log-Jacobians, discrete sites summed out by
  enumeration), so the target density is exactly the one Pyro's NUTS samples;
- the transition is Stan's multinomial NUTS (Betancourt 2017, "A conceptual
  introduction to Hamiltonian Monte Carlo", appendix A): biased progressive
  sampling between subtrees, uniform within them, the generalized no-U-turn
  criterion on ``rho`` (sum of momenta) including the checks across subtree
  boundaries that Stan added in 2.21, divergence at an energy error of 1000;
- warm-up: dual averaging of the step size (Stan's: gamma 0.05, t0 10,
  kappa 0.75) and an inverse metric, one of the four below. The diagonal
  metric adapts in Stan's doubling windows (75 / 25... / 50 iterations, or
  15% / 75% / 10% of a short warm-up: :class:`Windows`), with the step size
  searched again and its averaging restarted after each window. The dense and
  low-rank metrics adapt in nutpie's overlapping windows
  (:class:`SwitchingWindows`): they start from the diagonal the initial
  gradient suggests, are re-estimated every 10 draws from the tenth on
  (windows switching every 10 draws in the first 30% of the warm-up, then
  80 and doubling, the current one growing to the last 15%, which adapts the
  step size only), with the step size searched again after the first and the
  last estimate; Stan's 75-iteration buffer at a fixed metric cost deep
  trees on badly scaled posteriors (``pdb_gp_pois_regr``: most of the run).
  The metrics:

  - ``"diag"``: the variances, regularized towards 1e-3 as in Stan's
    ``diag_e`` (``n / (n + 5) * var + 1e-3 * 5 / (n + 5)``);
  - ``"dense"``: the covariance as Stan's ``dense_e`` estimates it, with
    Stan's regularization made relative to each coordinate's variance
    below 1 (``n / (n + 5) * cov + 1e-3 * 5 / (n + 5) * diag(min(var, 1))``,
    :meth:`Welford.relative_covariance`): Stan's absolute
    ``1e-3 * 5 / (n + 5) * I`` dominates the narrowest directions of a
    posterior whose variances are below about 1e-4 and collapses the step
    size there;
  - ``"low_rank"``: nutpie's metric (Seyboldt et al. 2023, "Preconditioning
    Hamiltonian Monte Carlo by minimizing Fisher divergence"): a diagonal
    from the draws' and the gradients' variances, ``sqrt(var(z) / var(grad))``,
    times a low-rank correction along the eigenvectors, in the diagonally
    scaled space, of the geometric mean of the draws' covariance and the
    gradients' inverse covariance whose eigenvalues lie outside [1/2, 2]
    (:func:`low_rank_metric`, :class:`LowRankMetric`): O(D k) per leapfrog
    step for rank k, against O(D^2) for the dense metric;
  - ``"auto"``: dense or low-rank up to 64 dimensions, diagonal above
    (:func:`resolve_metric`).

  A dense or low-rank window spent on the chain's way into the typical set
  (its potential falls by more than ten of its typical sds, :func:`is_transient`)
  is not used (a metric from such draws, or the initial gradient's kept
  unchanged, can freeze the chain there: ``pdb_arma11`` from a start with
  potential 3e36 ran for minutes): the metric is the diagonal the gradient
  at the chain's current point suggests (the unit metric, used before,
  collapsed ``pdb_gp_pois_regr``'s step size to 0.003 and its trees to 1023
  steps).
- an energy that overflows (a step into a region where the potential or the
  kinetic energy is not finite) is a divergence, without NumPy warnings.

Each kept draw records ArviZ's ``sample_stats`` names: ``diverging``,
``step_size``, ``tree_depth``, ``n_steps``, ``lp``, ``acceptance_rate``,
``energy`` (the Hamiltonian at the selected point), ``energy_error`` (its
difference to the initial point's) and ``max_energy_error`` (the signed
error of largest magnitude in the whole trajectory).

The public entry point is :func:`sample_chain`; :mod:`diagnostics.nuts.chains`
calls it in the chain worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
from pyro.infer.mcmc.util import initialize_model

from diagnostics.nuts.progress import ChainStatus
from vimodels.compile.record import ValueRead, freeze, record, simplify_graph
from vimodels.compile.units import private_units
from vimodels.errors import IncompatibleError

T = TypeVar("T")
Reply = tuple[float, np.ndarray]
Steps = Generator[np.ndarray, Reply, T]  # yields positions, receives (u, grad), returns T
STAT_NAMES = (
    "diverging",
    "step_size",
    "tree_depth",
    "n_steps",
    "lp",
    "acceptance_rate",
    "energy",
    "energy_error",
    "max_energy_error",
)
METRICS = ("diag", "dense", "low_rank", "auto")
# metric="auto" up to this many dimensions: dense where the last warm-up window holds at
# least AUTO_DRAWS_PER_DIM draws per dimension, else low-rank; diagonal above (resolve_metric)
AUTO_DENSE_MAX_DIM = 64
AUTO_DRAWS_PER_DIM = 5
# the low-rank metric (nutpie's defaults): regularization of the scaled covariances and the
# eigenvalue cutoff (eigenvalues in [1 / cutoff, cutoff] are left to the diagonal)
LOW_RANK_GAMMA = 1e-5
LOW_RANK_CUTOFF = 2.0
# the dense and low-rank metrics' warm-up schedule (SwitchingWindows, nutpie's, Seyboldt et al.
# 2023): the first EARLY_WINDOW of the warm-up switches windows every EARLY_SWITCH draws, then
# windows of LATE_SWITCH draws that double; the last STEP_SIZE_WINDOW adapts the step size only;
# the metric is re-estimated from the current window every METRIC_UPDATE_EVERY draws
EARLY_WINDOW = 0.3
STEP_SIZE_WINDOW = 0.15
EARLY_SWITCH = 10
LATE_SWITCH = 80
METRIC_UPDATE_EVERY = 10
# the dense metric is the draws' covariance from this many draws per dimension (and at least
# DENSE_MIN_DRAWS) in the current window; before, the low-rank estimate, which learns from the
# gradients too and so needs fewer draws
DENSE_DRAWS_PER_DIM = 2
DENSE_MIN_DRAWS = 20
# versions the warm-up and transition algorithm: part of the reference cache key, bumped with
# every change that changes the draws of a seed (1: Stan's windows for every metric; 2: the
# dense and low-rank metrics adapt in SwitchingWindows)
ALGORITHM_VERSION = 2
MAX_DELTA_H = 1000.0  # energy error that marks a divergence (Stan's value)
LOG_08 = math.log(0.8)
# the step-size search gives up above this (2**512, about 1.3e154): a Gaussian of that
# scale cannot be evaluated in float64 (its variance overflows), so a potential that one
# leapfrog step of this size leaves unchanged is flat, not wide
MAX_STEP_SIZE = 2.0**512
# a warm-up window whose potential fell by more than this many times sqrt(D / 2) (the sd of
# the potential of a D-dimensional Gaussian) between its first and last quarters was spent
# in a transient (the chain still on its way to the typical set), not in the posterior
TRANSIENT_DROP = 10.0
LOG_2 = math.log(2.0)


# ----------------------------------------------------------------------------- potential


class FlatPotential:
    """Potential energy ``-log p(z, x)`` and its gradient on a flat unconstrained vector.

    With ``jit`` the value and gradient are traced together, once, into one
    graph of ATen operations (the forward pass and ``torch.autograd.grad`` as
    :func:`vimodels.compile.record.record` records them, else ``make_fx``; with
    Pyro's and torch's argument validation off so no value-dependent checks
    are frozen into it), simplified (:func:`vimodels.compile.record.simplify_graph`:
    constants folded, identities and autograd's bookkeeping dropped), which
    TorchScript then runs without the autograd engine: two to four times
    faster than Pyro's traced potential plus ``backward``, and a small model's
    gradient in about a third of the operations that autograd dispatched.
    Where that fails, the potential alone is traced and
    differentiated by autograd; where that fails too, Python runs it.
    :attr:`mode` says which ran (``"fx"``, ``"jit"`` or ``"python"``).

    Parameters
    ----------
    potential_fn : callable
        Pyro's potential: dict of unconstrained site values -> scalar tensor.
    shapes : dict of str to tuple
        Unconstrained shape of each site, in the order of the flat vector.
    dtype : torch.dtype
        The model's floating dtype.
    jit : bool
        Compile as above.
    z0 : ndarray, shape (D,)
        The point to trace at.
    """

    def __init__(
        self,
        potential_fn: Callable[[dict], torch.Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        jit: bool,
        z0: np.ndarray,
    ) -> None:
        self.shapes = dict(shapes)
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes.values()]
        self.dtype = dtype
        self._potential_fn = potential_fn
        self.mode = "python"
        self.note: str | None = None
        self.graph: torch.fx.GraphModule | None = None  # the traced value-and-gradient
        self._value_and_grad: Callable | None = None
        self._fn: Callable = self.python_potential
        if not jit:
            return
        example = torch.as_tensor(z0, dtype=dtype)
        errors = []
        try:
            self.graph, self._value_and_grad = _trace_value_and_grad(self.python_potential, example)
            self.mode = "fx"
            return
        except ValueRead as exc:  # torch.jit.trace would freeze the branch too
            self.note = f"JIT unavailable ({exc}); ran the Python potential"
            return
        except Exception as exc:  # tracing failures vary widely
            errors.append(type(exc).__name__)
        try:
            self._fn = _trace_potential(self.python_potential, example)
            self.mode = "jit"
            return
        except Exception as exc:
            errors.append(type(exc).__name__)
        self.note = f"JIT unavailable ({', '.join(errors)}); ran the Python potential"

    @property
    def dim(self) -> int:
        """Length ``D`` of the flat vector."""
        return int(sum(self.sizes))

    @property
    def jit(self) -> bool:
        """Whether a traced potential ran."""
        return self.mode != "python"

    def unflatten(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat tensor (..., D) into the sites' unconstrained tensors."""
        out = {}
        start = 0
        batch = z.shape[:-1]
        for (name, shape), size in zip(self.shapes.items(), self.sizes):
            out[name] = z[..., start : start + size].reshape(batch + tuple(shape))
            start += size
        return out

    def python_potential(self, z: torch.Tensor) -> torch.Tensor:
        """Pyro's potential at a flat tensor ``z`` (D,)."""
        return self._potential_fn(self.unflatten(z))

    def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """Potential (float) and its gradient (float64, shape (D,)) at ``z``."""
        if self._value_and_grad is not None:
            with torch.no_grad():
                g, u = self._value_and_grad(torch.from_numpy(z).to(self.dtype))
            return float(u), g.numpy().astype(np.float64)
        t = torch.tensor(z, dtype=self.dtype, requires_grad=True)
        try:
            with _validation_off():
                u = self._fn(t)
                (g,) = torch.autograd.grad(u, t)
        except ValueError:  # a point where the model cannot be evaluated: no mass there
            return math.inf, np.zeros_like(z)
        return float(u.detach()), g.numpy().astype(np.float64)


def _inference(frozen: bool) -> contextlib.AbstractContextManager:
    """``torch.inference_mode`` around the calls of a frozen graph (no autograd needed).

    Each operation then skips autograd's bookkeeping: a quarter of a small
    model's gradient call. Not where the potential is differentiated by autograd.
    """
    return torch.inference_mode() if frozen else contextlib.nullcontext()


@contextlib.contextmanager
def _validation_off() -> Iterator[None]:
    """Pyro's and torch.distributions' argument validation off (restored after)."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().double(), b.detach().double()
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (1.0 + float(b.abs().max()))))


def _value_and_grad_fn(fn: Callable) -> Callable:
    """``z -> (grad, value)`` by ``torch.autograd.grad`` (whose operations the tracers record).

    Not ``torch.func.grad_and_value``: Pyro's enumeration uses autograd
    Functions (``safe_log``) that functorch transforms reject.
    """

    def value_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            u = fn(z)
            (g,) = torch.autograd.grad(u, z)
        return g, u.detach()

    return value_and_grad


def _trace_value_and_grad(
    fn: Callable, example: torch.Tensor
) -> tuple[torch.fx.GraphModule, Callable]:
    """``z -> (grad, value)`` of ``fn`` as an FX graph of ATen operations and frozen TorchScript.

    Recorded by :func:`vimodels.compile.record.record`, else by ``make_fx``;
    simplified; checked against autograd at a second point.
    """
    errors: list[Exception] = []
    for tracer in _TRACERS:
        try:
            with warnings.catch_warnings(), pyro.util.ignore_jit_warnings():
                warnings.simplefilter("ignore")
                with _validation_off():
                    graph = tracer(_value_and_grad_fn(fn), example)
                graph, compiled = _simplified_and_frozen(graph, example)
            # the graph holds whatever Python control flow did at `example`: it must
            # agree with the model elsewhere
            z1 = example + 0.1
            g1, u1 = compiled(z1)
            t = z1.clone().requires_grad_(True)
            u = fn(t)
            (g,) = torch.autograd.grad(u, t)
            if not (_agrees(u1, u) and _agrees(g1, g)):
                raise RuntimeError(
                    "the traced potential differs from the model away from the trace point"
                )
            return graph, compiled
        except ValueRead:  # a value-dependent branch: no tracer may freeze it
            raise
        except Exception as exc:  # tracing failures vary widely
            errors.append(exc)
    raise errors[-1]


def _record(fn: Callable, example: torch.Tensor) -> torch.fx.GraphModule:
    return record(fn, example)


def _make_fx(fn: Callable, example: torch.Tensor) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(example)


# the first that gives a graph that agrees with the model wins
_TRACERS: tuple[Callable[[Callable, torch.Tensor], torch.fx.GraphModule], ...] = (
    _record,
    _make_fx,
)


def _simplified_and_frozen(
    graph: torch.fx.GraphModule, example: torch.Tensor
) -> tuple[torch.fx.GraphModule, Callable]:
    """The simplified graph and its frozen TorchScript; the graph as traced where that fails."""
    simple = _simplified(graph, example)
    if simple is not graph:
        try:
            return simple, _freeze(simple, example)
        except Exception:  # an operation TorchScript cannot take: freeze the traced graph
            pass
    return graph, _freeze(graph, example)


def _freeze(graph: torch.fx.GraphModule, example: torch.Tensor) -> Callable:
    """Frozen TorchScript of an FX graph, traced at ``example``."""
    return freeze(graph, example)


def _simplified(graph: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """``graph`` with fewer operations (:func:`vimodels.compile.record.simplify_graph`).

    The simplified graph must give what ``graph`` gives at a second point;
    where it does not, or the pass fails, ``graph`` is kept.
    """
    try:
        simple = simplify_graph(graph, example)
        if simple is graph:
            return graph
        shift = torch.arange(example.numel(), dtype=torch.float64).cos().reshape(example.shape)
        z1 = example + 0.1 * shift.to(example.dtype)
        with torch.no_grad():
            ours, theirs = simple(z1), graph(z1)
        if len(ours) == len(theirs) and all(
            torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True) for a, b in zip(ours, theirs)
        ):
            return simple
    except Exception:  # an operation the pass does not know: keep the graph as traced
        pass
    return graph


def _trace_potential(fn: Callable, example: torch.Tensor) -> Callable:
    """``torch.jit.trace`` of the potential alone (checked at a second point).

    Traced with validation off, so that any tensor-to-Python conversion left is
    the model's own control flow: its TracerWarning rejects the trace.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _validation_off():
            traced = torch.jit.trace(fn, (example,), check_trace=False)
    frozen = [
        w
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning)
        and "Converting a tensor to a Python" in str(w.message)
    ]
    if frozen:
        raise RuntimeError(f"value-dependent Python in the model: {frozen[0].message}")
    z1 = example + 0.1
    if not _agrees(traced(z1), fn(z1)):
        raise RuntimeError("the traced potential differs from the model away from the trace point")
    return traced


class BatchedPotential:
    """The potential and its gradient at K positions at once, for chains run in lockstep.

    Where the :class:`FlatPotential` is an FX graph of ATen operations (mode
    ``"fx"``), ``torch.func.vmap`` of that graph is recorded again (as the
    graph was) at a ``(K, D)`` example, simplified and frozen with
    TorchScript: one call dispatches about as many operations as one chain's
    gradient does. It is
    checked row by row against the unbatched potential at a second point.
    Where that cannot be done (a model traced otherwise or not at all, a
    vmap or check failure), the rows are evaluated one by one with the
    unbatched potential. :attr:`mode` says which (``"vmap"`` or ``"rows"``),
    :attr:`note` why rows ran where vmap was tried.

    Parameters
    ----------
    potential : FlatPotential
    example : ndarray, shape (K, D)
        Positions to trace at (the chains' initial points).
    vectorize : bool
        Try vmap; else evaluate rows one by one.
    """

    def __init__(self, potential: FlatPotential, example: np.ndarray, vectorize: bool = True):
        self.potential = potential
        self.size = int(example.shape[0])
        self.mode = "rows"
        self.note: str | None = None
        self._batched: Callable | None = None
        self._forward: Callable | None = None
        try:
            self._np_dtype: np.dtype | None = torch.empty((), dtype=potential.dtype).numpy().dtype
        except TypeError:  # a dtype NumPy lacks
            self._np_dtype = None
        if not vectorize or potential.graph is None:
            return
        try:
            self._batched = _trace_batched(
                potential, torch.as_tensor(example, dtype=potential.dtype)
            )
            # the frozen module's compiled method itself (the module kept alongside): a
            # module call adds nn.Module's hook dispatch, ~4 us a call (5% of eight
            # schools' batched gradient)
            self._forward = getattr(self._batched, "forward", self._batched)
            self.mode = "vmap"
        except Exception as exc:  # vmap and tracing failures vary widely
            self.note = (
                f"batched potential unavailable ({type(exc).__name__}); "
                "the chains' potentials ran one by one"
            )

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Potentials (K,) and gradients (K, D), float64, at positions ``z`` (K, D)."""
        if self._batched is not None:
            # a frozen graph of inputs that need no gradient builds no autograd graph:
            # no torch.no_grad() needed; the cast to the model's dtype rounds as torch's does
            if self._np_dtype is not None:
                x = torch.from_numpy(z.astype(self._np_dtype, copy=False))
            else:
                x = torch.from_numpy(z).to(self.potential.dtype)
            g, u = self._forward(x)
            return u.numpy().astype(np.float64), g.numpy().astype(np.float64)
        rows = [self.potential(row) for row in z]
        return np.array([u for u, _ in rows]), np.stack([g for _, g in rows])


@contextlib.contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    """Silence functorch's "performance drop" message for operations vmap loops over.

    The loop is traced into the graph like any other operation; the message
    (printed by C++, not a Python warning) would only alarm the user.
    """
    switch = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    if switch is not None:
        switch(False)
    try:
        yield
    finally:
        if switch is not None:
            switch(True)


def _trace_batched(potential: FlatPotential, example: torch.Tensor) -> Callable:
    """Frozen TorchScript of ``vmap`` of the potential's FX graph at ``example`` (K, D).

    Checked row by row against the unbatched potential at a second point.
    """
    errors: list[Exception] = []
    for tracer in _TRACERS:
        try:
            return _trace_batched_with(tracer, potential, example)
        except Exception as exc:  # vmap and tracing failures vary widely
            errors.append(exc)
    raise errors[-1]


def _trace_batched_with(
    tracer: Callable[[Callable, torch.Tensor], torch.fx.GraphModule],
    potential: FlatPotential,
    example: torch.Tensor,
) -> Callable:
    with warnings.catch_warnings(), pyro.util.ignore_jit_warnings(), _quiet_vmap_fallback():
        warnings.simplefilter("ignore")
        graph = tracer(torch.func.vmap(potential.graph), example)
        _, compiled = _simplified_and_frozen(graph, example)
    shift = 0.1 * torch.arange(1, example.shape[0] + 1, dtype=example.dtype)[:, None]
    z1 = example + shift
    with torch.no_grad():
        g1, u1 = compiled(z1)
    if tuple(g1.shape) != tuple(example.shape) or tuple(u1.shape) != (example.shape[0],):
        raise RuntimeError(f"the batched potential has shapes {tuple(g1.shape)}, {tuple(u1.shape)}")
    for k, row in enumerate(z1.double().numpy()):
        u, g = potential(row)
        if not (_agrees(u1[k], torch.tensor(u)) and _agrees(g1[k], torch.from_numpy(g))):
            raise RuntimeError(f"the batched potential differs from the model in row {k}")
    return compiled


# ----------------------------------------------------------------------------- adaptation


@dataclass
class DualAveraging:
    """Nesterov dual averaging of ``log(step size)`` (Hoffman and Gelman 2014; Stan's constants)."""

    target: float
    mu: float = math.log(10.0)
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75
    counter: int = 0
    s_bar: float = 0.0
    x_bar: float = 0.0

    def restart(self, step_size: float) -> None:
        """Start over around ``10 * step_size``."""
        self.mu = math.log(10.0 * step_size)
        self.counter = 0
        self.s_bar = 0.0
        self.x_bar = 0.0

    def update(self, accept_stat: float) -> float:
        """Learn from one transition's mean acceptance; returns the next step size."""
        self.counter += 1
        accept_stat = min(1.0, accept_stat)
        eta = 1.0 / (self.counter + self.t0)
        self.s_bar = (1.0 - eta) * self.s_bar + eta * (self.target - accept_stat)
        x = self.mu - self.s_bar * math.sqrt(self.counter) / self.gamma
        x_eta = self.counter ** (-self.kappa)
        self.x_bar = (1.0 - x_eta) * self.x_bar + x_eta * x
        return math.exp(x)

    @property
    def final(self) -> float:
        """The averaged step size used after warm-up."""
        return math.exp(self.x_bar)


@dataclass
class Windows:
    """Stan's warm-up schedule: fast buffer, doubling slow windows, terminal buffer."""

    num_warmup: int
    init_buffer: int = 75
    term_buffer: int = 50
    base_window: int = 25
    counter: int = 0
    window_size: int = 0
    next_window: int = 0
    adapt_metric: bool = True

    def __post_init__(self) -> None:
        w = self.num_warmup
        if w < 20:
            self.adapt_metric = False
            return
        if self.init_buffer + self.base_window + self.term_buffer > w:
            self.init_buffer = int(0.15 * w)
            self.term_buffer = int(0.1 * w)
            self.base_window = w - (self.init_buffer + self.term_buffer)
        self.window_size = self.base_window
        self.next_window = self.init_buffer + self.window_size - 1

    def in_window(self) -> bool:
        """Whether the current iteration's draw feeds the variance estimate."""
        w = self.num_warmup
        return (
            self.adapt_metric
            and self.init_buffer <= self.counter < w - self.term_buffer
            and self.counter != w
        )

    def end_of_window(self) -> bool:
        """Whether the current iteration closes a slow window."""
        return (
            self.adapt_metric
            and self.counter == self.next_window
            and self.counter != self.num_warmup
        )

    def advance(self) -> None:
        """Move to the next window after one closed."""
        last = self.num_warmup - self.term_buffer - 1
        if self.next_window == last:
            return
        self.window_size *= 2
        self.next_window = self.counter + self.window_size
        if self.next_window != last and self.next_window + 2 * self.window_size >= last + 1:
            self.next_window = last


@dataclass
class SwitchingWindows:
    """nutpie's warm-up schedule for the dense and low-rank metrics: windows that overlap.

    Every warm-up draw before :attr:`final_start` joins two windows, the
    *current* one (the metric is estimated from it) and the *next* one; a
    switch makes the next window current and starts a new one. In the first
    ``EARLY_WINDOW`` (30 %) of the warm-up a switch comes every
    ``EARLY_SWITCH`` (10) draws, so the metric follows the chain from its
    tenth draw on and forgets its way in within 10 to 20 draws; after it, the
    next window must hold ``LATE_SWITCH`` (80) draws, then twice the previous
    window's (doubling, as Stan's windows), and the current window grows until
    :attr:`final_start` where no later switch would fill its window. The last
    ``STEP_SIZE_WINDOW`` (15 %) adapts the step size only (Stan's terminal
    buffer). A warm-up under 20 iterations adapts no metric.

    Attributes
    ----------
    num_warmup : int
    early_end : int
        First iteration of the late phase.
    final_start : int
        First iteration of the step-size-only window.
    adapt_metric : bool
    """

    num_warmup: int
    early_end: int = 0
    final_start: int = 0
    adapt_metric: bool = True

    def __post_init__(self) -> None:
        w = self.num_warmup
        self.adapt_metric = w >= 20
        self.early_end = int(EARLY_WINDOW * w)
        self.final_start = w - int(STEP_SIZE_WINDOW * w)

    def switches(self, i: int, next_size: int, current_size: int) -> bool:
        """Whether iteration ``i``, whose draw the windows hold, ends with a switch.

        Parameters
        ----------
        i : int
            The warm-up iteration (0-based).
        next_size : int
            Draws in the next window (this one's included).
        current_size : int
            Draws in the current window that the next one lacks (the previous
            window's length).
        """
        if not self.adapt_metric or i >= self.final_start:
            return False
        if i < self.early_end:
            return next_size >= EARLY_SWITCH
        if next_size < max(LATE_SWITCH, 2 * current_size):
            return False
        # as Stan's windows: where the window after this one would not fill before the
        # step-size-only window, the current one grows to it instead
        return i + 1 + max(LATE_SWITCH, 2 * next_size) <= self.final_start

    def final_window(self) -> int:
        """Draws in the current window when the metric adaptation ends (the final metric's)."""
        if not self.adapt_metric:
            return 0
        current = nxt = 0  # start indices
        for i in range(self.final_start):
            if self.switches(i, i + 1 - nxt, nxt - current):
                current, nxt = nxt, i + 1
        return self.final_start - current


@dataclass
class Welford:
    """Running mean and variance (``dense=False``) or covariance (``dense=True``) of vectors.

    Welford's update, as Stan's ``welford_var_estimator`` and
    ``welford_covar_estimator``; the diagonal of the dense estimate equals the
    diagonal one.

    Attributes
    ----------
    dim : int
        Length of the vectors.
    dense : bool
        Keep the full ``(dim, dim)`` matrix of cross products, else its diagonal.
    n : int
        Samples added since the last :meth:`restart`.
    mean : ndarray, shape (dim,)
    m2 : ndarray, shape (dim,) or (dim, dim)
        Sum of (cross) products of deviations from the running mean.
    """

    dim: int
    dense: bool = False
    n: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget every sample."""
        self.n = 0
        self.mean = np.zeros(self.dim)
        self.m2 = np.zeros((self.dim, self.dim) if self.dense else self.dim)

    def add(self, x: np.ndarray) -> None:
        """Add one sample."""
        self.n += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.n
        if self.dense:
            self.m2 += np.outer(x - self.mean, delta)
        else:
            self.m2 = self.m2 + delta * (x - self.mean)

    def regularized(self) -> np.ndarray:
        """The sample (co)variance shrunk towards ``1e-3 I`` with weight ``5 / (n + 5)`` (Stan).

        Returns
        -------
        ndarray
            ``n / (n + 5) * var + 1e-3 * 5 / (n + 5)``, shape ``(dim,)`` (Stan's
            ``diag_e``), or the same with the covariance, made symmetric, and
            ``1e-3 * 5 / (n + 5) * I``, shape ``(dim, dim)`` (``dense_e``).
        """
        n = self.n
        var = self.m2 / max(n - 1, 1)
        if self.dense:
            var = 0.5 * (var + var.T)
        out = (n / (n + 5.0)) * var
        if self.dense:
            out[np.diag_indices(self.dim)] += 1e-3 * (5.0 / (n + 5.0))
            return out
        return out + 1e-3 * (5.0 / (n + 5.0))

    def relative_covariance(self) -> np.ndarray:
        """``n / (n + 5) * cov + 1e-3 * 5 / (n + 5) * diag(min(var, 1))``: Stan's, made relative.

        :meth:`regularized` (Stan's ``dense_e``) where every variance is at
        least 1; below, the regularization of a coordinate shrinks with its
        variance (Stan's applied to the correlations), where Stan's absolute
        ``1e-3 * I`` swamps variances below about 1e-4 and collapses the step
        size. Positive definite where every variance is
        positive; a variance that is zero or not finite (a coordinate that
        never moved in the window) is taken as 1e-3 (and its covariances as 0).
        """
        n = self.n
        cov = self.m2 / max(n - 1, 1)
        cov = 0.5 * (cov + cov.T)
        var = np.diag(cov).copy()
        bad = ~(np.isfinite(var) & (var > 0.0))
        if bad.any():
            var[bad] = 1e-3
            cov[bad, :] = 0.0
            cov[:, bad] = 0.0
        out = (n / (n + 5.0)) * cov
        out[np.diag_indices(self.dim)] = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0)) * (
            np.minimum(var, 1.0)
        )
        return out


@dataclass
class DrawsAndGradients:
    """The draws and potential gradients of a warm-up window (for :func:`low_rank_metric`)."""

    dim: int
    draws: list[np.ndarray] = field(default_factory=list)
    grads: list[np.ndarray] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of draws held."""
        return len(self.draws)

    def add(self, z: np.ndarray, g: np.ndarray) -> None:
        """Add one draw and the gradient there."""
        self.draws.append(z)
        self.grads.append(g)

    def restart(self) -> None:
        """Forget every draw."""
        self.draws, self.grads = [], []

    def metric(self) -> LowRankMetric:
        """:func:`low_rank_metric` of the window."""
        return low_rank_metric(np.asarray(self.draws), np.asarray(self.grads))


@dataclass
class LowRankMetric:
    """Inverse metric ``diag(s) (I + U (diag(lam) - 1) U^T) diag(s)``, ``U`` orthonormal (D, k).

    The representation of nutpie's low-rank modified mass matrix: ``s`` the
    diagonal scales, ``U`` and ``lam`` the eigenvectors and eigenvalues kept
    in the scaled space. Products with it and draws of the momentum cost
    O(D k).
    """

    stds: np.ndarray  # (D,)
    vecs: np.ndarray  # (D, k)
    vals: np.ndarray  # (k,)

    def __post_init__(self) -> None:
        self.stds = np.asarray(self.stds, dtype=np.float64)
        self.vecs = np.ascontiguousarray(self.vecs, dtype=np.float64).reshape(len(self.stds), -1)
        self.vals = np.asarray(self.vals, dtype=np.float64).reshape(-1)
        self._vals_m1 = self.vals - 1.0
        self._sqrt_inv_m1 = self.vals**-0.5 - 1.0

    @property
    def rank(self) -> int:
        """``k``, the number of eigenvectors kept."""
        return int(self.vals.shape[0])

    def velocity(self, r: np.ndarray) -> np.ndarray:
        """``M^-1 r`` (a new array)."""
        y = self.stds * r
        if self.rank:
            y += self.vecs @ (self._vals_m1 * (self.vecs.T @ y))
        y *= self.stds
        return y

    def momentum(self, xi: np.ndarray) -> np.ndarray:
        """A draw of ``N(0, M)`` from a standard normal ``xi`` (D,)."""
        y = xi.copy()
        if self.rank:
            y += self.vecs @ (self._sqrt_inv_m1 * (self.vecs.T @ xi))
        return y / self.stds

    def dense(self) -> np.ndarray:
        """The inverse metric as a (D, D) matrix."""
        inner = np.eye(len(self.stds)) + (self.vecs * self._vals_m1) @ self.vecs.T
        return self.stds[:, None] * inner * self.stds[None, :]


def metric_from_gradient(grad: np.ndarray) -> LowRankMetric:
    """The first metric nutpie takes: variances ``1 / |grad|`` (1 where it is 0), clipped."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        stds = np.abs(np.asarray(grad, dtype=np.float64)) ** -0.5
    stds = np.where(np.isfinite(stds), stds, 1.0)
    stds = np.clip(stds, 1e-10, 1e10)
    return LowRankMetric(stds, np.zeros((len(stds), 0)), np.zeros(0))


def _spd_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The matrix ``S`` with ``S b S = a`` (the geometric mean of ``a`` and ``b^-1``), both SPD."""
    w, v = np.linalg.eigh(b)
    w = np.maximum(w, 1e-300)
    b_half = (v * np.sqrt(w)) @ v.T
    b_inv_half = (v / np.sqrt(w)) @ v.T
    w2, v2 = np.linalg.eigh(b_half @ a @ b_half)
    middle = (v2 * np.sqrt(np.maximum(w2, 0.0))) @ v2.T
    return b_inv_half @ middle @ b_inv_half


def low_rank_metric(
    draws: np.ndarray,
    grads: np.ndarray,
    gamma: float = LOW_RANK_GAMMA,
    cutoff: float = LOW_RANK_CUTOFF,
) -> LowRankMetric:
    """The low-rank modified inverse metric of nutpie from a window's draws and gradients.

    1. Diagonal scales ``s = (var(draws) / var(grads))^(1/4)``: the diagonal
       metric that minimizes the Fisher divergence (exact for a Gaussian with
       independent coordinates).
    2. In the scaled space (draws ``(z - mean) / s``, gradients ``(g - mean) * s``),
       the span of both sets (orthonormalized, ``Q``), the covariances of the
       draws and of the gradients there, each plus ``gamma * I``, and their
       geometric mean ``S`` (``S C_grad S = C_draws``: for a Gaussian, its
       covariance in that span).
    3. The eigenvectors of ``S`` whose eigenvalues lie outside ``[1 / cutoff,
       cutoff]``, mapped back by ``Q``: where the posterior is wider or
       narrower than the diagonal says by more than the cutoff.

    A coordinate whose draws or gradients did not vary keeps its draws' variance
    (or 1e-3 where that is zero too), without a low-rank part.

    Parameters
    ----------
    draws, grads : ndarray, shape (n, D)
    gamma, cutoff : float
        nutpie's defaults (1e-5 and 2).
    """
    draws = np.asarray(draws, dtype=np.float64)
    grads = np.asarray(grads, dtype=np.float64)
    n, dim = draws.shape
    if n < 3:
        return LowRankMetric(np.ones(dim), np.zeros((dim, 0)), np.zeros(0))
    var_x = draws.var(axis=0)
    var_g = grads.var(axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        stds = (var_x / var_g) ** 0.25
    bad = ~(np.isfinite(stds) & (stds > 0.0))
    if bad.any():
        fallback = np.where(np.isfinite(var_x) & (var_x > 0.0), var_x, 1e-3)
        stds[bad] = np.sqrt(fallback[bad])
    x = (draws - draws.mean(axis=0)) / stds
    g = (grads - grads.mean(axis=0)) * stds
    if bad.any() or not (np.isfinite(x).all() and np.isfinite(g).all()):
        return LowRankMetric(stds, np.zeros((dim, 0)), np.zeros(0))
    u_x = np.linalg.svd(x.T, full_matrices=False)[0]
    u_g = np.linalg.svd(g.T, full_matrices=False)[0]
    q = np.linalg.qr(np.hstack([u_x, u_g]))[0]
    q = q[:, : min(q.shape[1], dim)]
    px, pg = x @ q, g @ q
    eye = np.eye(q.shape[1])
    c_x = px.T @ px / n + gamma * eye
    c_g = pg.T @ pg / n + gamma * eye
    vals, vecs = np.linalg.eigh(_spd_mean(c_x, c_g))
    keep = (vals >= cutoff) | (vals <= 1.0 / cutoff)
    return LowRankMetric(stds, q @ vecs[:, keep], vals[keep])


def is_transient(potentials: Sequence[float], dim: int) -> bool:
    """Whether a warm-up window's potentials show a chain still on its way in.

    True where the mean potential of the window's first quarter exceeds that of
    its last quarter by more than ``TRANSIENT_DROP * sqrt(dim / 2)`` (a
    10-sigma fall for a chain in the typical set of a Gaussian, whose potential
    has sd ``sqrt(D / 2)``), or where a potential is not finite.
    """
    u = np.asarray(potentials, dtype=np.float64)
    q = len(u) // 4
    if q < 1:
        return False
    if not np.isfinite(u).all():
        return True
    drop = float(u[:q].mean() - u[-q:].mean())
    return drop > TRANSIENT_DROP * math.sqrt(dim / 2.0)


def last_window(num_warmup: int) -> int:
    """Draws in the last slow window of Stan's warm-up schedule (the final metric's)."""
    w = Windows(num_warmup)
    start, size = w.init_buffer, 0
    for i in range(num_warmup):
        if w.end_of_window():
            size = i + 1 - start
            start = i + 1
            w.advance()
        w.counter += 1
    return size


def resolve_metric(metric: str, dim: int, num_warmup: int) -> str:
    """The metric a chain adapts: ``"diag"``, ``"dense"`` or ``"low_rank"``.

    ``"auto"``, up to ``AUTO_DENSE_MAX_DIM`` (64) dimensions, is ``"dense"``
    where the warm-up's last window (:func:`last_window`) holds at least
    ``AUTO_DRAWS_PER_DIM * dim`` draws (5 per dimension), else ``"low_rank"``
    (which learns from the gradients too, so needs fewer draws); above 64
    dimensions it is ``"diag"``.
    Measured (benchmarks/README.md, benchmark 3): on the ill-conditioned
    regression (26 dimensions, 50 draws in the last window) the low-rank
    metric needs 7 gradients per draw where NumPyro's diagonal needs 930;
    on the radon entries (89 to 175 dimensions, hierarchical, little
    correlation) a low-rank estimate from so few draws is noisier than the
    diagonal and loses to it. Measured before (benchmark 3b): a dense product costs
    2-4x a diagonal one per leapfrog step, small next to the step's
    Python up to about 64 dimensions and growing as D^2 above; and a
    covariance estimated from too few draws per dimension is noisy enough
    to make trees deeper than the diagonal metric's (sleepstudy, 45
    dimensions, 100 draws in the last window: 19 against 12.5 gradients
    per draw), while with enough draws it cuts them on correlated
    posteriors.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if metric == "auto":
        enough = SwitchingWindows(num_warmup).final_window() >= AUTO_DRAWS_PER_DIM * dim
        if dim > AUTO_DENSE_MAX_DIM:
            return "diag"
        return "dense" if enough else "low_rank"
    return metric


# ----------------------------------------------------------------------------- NUTS


@dataclass(slots=True)
class _Point:
    """A phase-space point: position, momentum, potential, gradient."""

    z: np.ndarray
    r: np.ndarray
    u: float
    g: np.ndarray
    h: float = math.nan  # the Hamiltonian, where computed


@dataclass(slots=True)
class _Subtree:
    """What a (sub)tree hands back to the level above it."""

    end: _Point  # the last point built (where a following subtree starts)
    prop: _Point  # the multinomial proposal within the subtree
    log_w: float  # log of the summed weights exp(H0 - H)
    rho: np.ndarray  # sum of momenta
    p_beg: np.ndarray  # momentum at the first point built
    ps_beg: np.ndarray  # M^-1 p there
    p_end: np.ndarray
    ps_end: np.ndarray
    valid: bool


def _logaddexp(x: float, y: float) -> float:
    """``numpy.logaddexp`` of two floats, as NumPy computes it, without a ufunc call."""
    if x == y:
        return x + LOG_2
    d = x - y
    if d > 0:
        return x + math.log1p(math.exp(-d))
    if d <= 0:
        return y + math.log1p(math.exp(d))
    return d  # nan


def _persist(ps_minus: np.ndarray, ps_plus: np.ndarray, rho: np.ndarray) -> bool:
    """Generalized no-U-turn criterion: both ends still move along ``rho``."""
    # ndarray.dot: the BLAS dot product `@` calls, without the ufunc dispatch (2.5x
    # faster on 13 elements; the same bits)
    return float(ps_plus.dot(rho)) > 0.0 and float(ps_minus.dot(rho)) > 0.0


def _flat_potential_error(step_size: float) -> IncompatibleError:
    """The step-size search found the potential constant up to ``step_size``: improper."""
    return IncompatibleError(
        "NUTS found no step size: the log density took one value at every point that "
        f"leapfrog steps smaller than {step_size:.3g} reached, so it is flat (an improper "
        "posterior: a parameter with a flat prior that the data do not inform, or none at "
        "all); give every parameter a proper prior"
    )


def _rough_potential_error() -> IncompatibleError:
    """The step-size search halved to 0: no step, however small, is accepted."""
    return IncompatibleError(
        "NUTS found no step size: even the smallest leapfrog step changes the energy by "
        "more than log(1/0.8), so the log density or its gradient is not finite or not "
        "smooth at the chain's position (a NaN gradient, a discontinuity or a kink); make "
        "the density smooth and finite over the support (guard log, sqrt, abs and branches)"
    )


class NUTSChain:
    """One NUTS chain, written as generators that ask for the potential.

    Every method that needs the potential and its gradient exists as a
    generator (``*_steps``) that yields the flat position ``z`` and receives
    ``(u, grad)`` back (``yield from`` through the tree's recursion), so that
    one algorithm serves both a chain driven alone (:func:`drive`) and chains
    driven together with one batched gradient per leapfrog step
    (:func:`drive_lockstep`). :meth:`transition`, :meth:`find_reasonable_step_size`
    and :meth:`_leapfrog` drive their generator with :attr:`potential`.

    Parameters
    ----------
    potential : callable or None
        ``z -> (u, grad)``; needed by the synchronous methods, and to evaluate
        ``z0`` when ``start`` is not given.
    z0 : ndarray, shape (D,)
        Initial unconstrained position.
    rng : numpy.random.Generator
    target_accept_prob : float
    max_tree_depth : int
        At most ``2**max_tree_depth - 1`` leapfrog steps per transition.
    start : tuple of (float, ndarray), optional
        The potential and its gradient at ``z0``, if already known.

    Attributes
    ----------
    inv_mass : ndarray
        The inverse metric: shape (D,) (diagonal) or (D, D) (dense); setting it
        switches between the two.
    """

    def __init__(
        self,
        potential: Callable[[np.ndarray], Reply] | None,
        z0: np.ndarray,
        rng: np.random.Generator,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        *,
        start: Reply | None = None,
    ) -> None:
        self.potential = potential
        self.rng = rng
        self.target = float(target_accept_prob)
        self.max_depth = int(max_tree_depth)
        if start is None:
            start = self._require_potential()(z0)
        u, g = start
        if not math.isfinite(u):
            raise ValueError("the potential is not finite at the initial point")
        self.z, self.u, self.g = np.asarray(z0, dtype=np.float64), u, g
        self.dim = self.z.shape[0]
        self._dense = False
        self._low_rank: LowRankMetric | None = None
        self._momentum_factor: np.ndarray | None = None
        self.inv_mass = np.ones(self.dim)
        self.step_size = 1.0
        # per-transition counters
        self.n_leapfrog = 0
        self.sum_metro = 0.0
        self.divergent = False
        self.max_error = 0.0

    @property
    def inv_mass(self) -> np.ndarray | LowRankMetric:
        """The inverse metric, (D,) diagonal, (D, D) dense or a :class:`LowRankMetric`."""
        return self._inv_mass

    @inv_mass.setter
    def inv_mass(self, value: np.ndarray | LowRankMetric) -> None:
        if isinstance(value, LowRankMetric):
            self._low_rank = value
            self._dense = False
            self._momentum_factor = None
            self._inv_mass = value
            self._velocity = value.velocity
            return
        self._low_rank = None
        value = np.asarray(value, dtype=np.float64)
        self._dense = value.ndim == 2
        if self._dense:
            # momentum ~ N(0, M) with M = inv_mass^-1 = L^-T L^-1: r = L^-T xi
            chol = np.linalg.cholesky(value)
            self._momentum_factor = np.ascontiguousarray(np.linalg.inv(chol).T)
        else:
            self._momentum_factor = None
        self._inv_mass = value
        # ``M^-1 r`` (a new array), bound once: ndarray.dot is the BLAS product `@` calls
        self._velocity = value.dot if self._dense else functools.partial(np.multiply, value)

    def _require_potential(self) -> Callable[[np.ndarray], Reply]:
        if self.potential is None:
            raise RuntimeError("this chain has no potential of its own: drive its generators")
        return self.potential

    # --- Hamiltonian pieces
    def _momentum(self) -> np.ndarray:
        if self._dense:
            return self._momentum_factor @ self.rng.standard_normal(self.dim)
        if self._low_rank is not None:
            return self._low_rank.momentum(self.rng.standard_normal(self.dim))
        return self.rng.standard_normal(self.dim) / np.sqrt(self._inv_mass)

    _velocity: Callable[[np.ndarray], np.ndarray]  # ``M^-1 r`` (a new array), set with inv_mass

    def _energy(self, u: float, r: np.ndarray) -> float:
        return u + 0.5 * float(r.dot(self._velocity(r)))

    def _drift(self, p: _Point, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """The first half of a leapfrog step: half a kick, then the drift; ``(z, r)``."""
        # r = p.r - 0.5 * eps * p.g; z = p.z + eps * (M^-1 r), with fewer temporaries
        # (the same roundings: a - b is a + (-b), and sums and products commute)
        r = p.g * (-0.5 * eps)
        r += p.r
        z = self._velocity(r)
        z *= eps
        z += p.z
        return z, r

    def leapfrog_steps(self, p: _Point, eps: float) -> Steps[_Point]:
        """One leapfrog step from ``p`` (asks for the potential once)."""
        z, r = self._drift(p, eps)
        u, g = yield z
        r -= g * (0.5 * eps)
        return _Point(z, r, u, g)

    def _leapfrog(self, p: _Point, eps: float) -> _Point:
        return drive(self.leapfrog_steps(p, eps), self._require_potential())

    # --- step size
    def find_step_size_steps(self) -> Steps[None]:
        """Stan's heuristic: double or halve until one leapfrog step crosses acceptance 0.8.

        Unlike Stan's, no bound of 1e7 on the step size: with the unit metric of the
        first search, a proper posterior whose scale in the unconstrained space is
        ``s`` needs a step size of about ``s``, and ``Normal(0, 1e8)`` is a vague prior
        some models use. The search gives up at :data:`MAX_STEP_SIZE`, where no
        proper density can still be flat (a Gaussian of that scale cannot be evaluated
        in float64), when the potential stayed constant until it overflowed, or when
        halving reaches 0.

        Raises
        ------
        IncompatibleError
            The potential is flat (an improper posterior), or not smooth or finite
            around the current point (no step, however small, is accepted).
        """
        start = _Point(self.z, None, self.u, self.g)  # type: ignore[arg-type]
        direction = 0
        flat = True  # every point reached so far had the potential of the start
        while True:
            r = self._momentum()
            h0 = self._energy(self.u, r)
            start.r = r
            q = yield from self.leapfrog_steps(start, self.step_size)
            with np.errstate(over="ignore", invalid="ignore"):  # a step far too large: h = inf
                h = self._energy(q.u, q.r)
            delta = h0 - h if math.isfinite(h) else -math.inf
            if direction == 0:
                direction = 1 if delta > LOG_08 else -1
            if direction == 1 and not delta > LOG_08:
                if flat and not math.isfinite(h):
                    # a constant potential until its arithmetic overflowed (a float32
                    # potential at |z| ~ 1e19): no step size, not a crossing
                    raise _flat_potential_error(self.step_size)
                return
            if direction == -1 and not delta < LOG_08:
                return
            flat = flat and q.u == self.u
            self.step_size = self.step_size * 2.0 if direction == 1 else self.step_size * 0.5
            if self.step_size > MAX_STEP_SIZE:
                raise _flat_potential_error(self.step_size)
            if self.step_size == 0.0:
                raise _rough_potential_error()

    def find_reasonable_step_size(self) -> None:
        """:meth:`find_step_size_steps` driven by :attr:`potential`."""
        drive(self.find_step_size_steps(), self._require_potential())

    # --- tree
    def _leaf(
        self, z: np.ndarray, r: np.ndarray, u: float, g: np.ndarray, eps: float, h0: float
    ) -> _Subtree:
        """The one-point subtree at the end of a leapfrog step (``r`` still half-kicked)."""
        r -= g * (0.5 * eps)
        q = _Point(z, r, u, g)
        self.n_leapfrog += 1
        ps = self._velocity(r)
        h = u + 0.5 * float(r.dot(ps))
        if not math.isfinite(h):
            h = math.inf
        q.h = h
        delta = h0 - h
        if abs(delta) > abs(self.max_error):
            self.max_error = -delta
        if -delta > MAX_DELTA_H:
            self.divergent = True
        self.sum_metro += 1.0 if delta > 0 else math.exp(delta)
        return _Subtree(q, q, delta, r, r, ps, r, ps, not self.divergent)

    def _leaf_steps(self, start: _Point, eps: float, h0: float) -> Steps[_Subtree]:
        z, r = self._drift(start, eps)
        u, g = yield z
        return self._leaf(z, r, u, g, eps, h0)

    def build_steps(self, start: _Point, depth: int, eps: float, h0: float) -> Steps[_Subtree]:
        """A subtree of ``2**depth`` leapfrog steps from ``start`` (Stan's ``build_tree``).

        Stan's recursion unrolled: the leaves are built in order and, after leaf
        ``i``, the pending left subtrees are merged with it as many times as ``i``
        has trailing one bits (the post-order of the recursion: the same merges,
        random numbers and early exits), without a generator per subtree or a
        ``yield from`` chain as deep as the tree for every leapfrog step.
        """
        pending: list[_Subtree] = []  # left subtrees waiting for their right halves
        point = start
        for i in range(1 << depth):
            z, r = self._drift(point, eps)
            u, g = yield z
            sub = self._leaf(z, r, u, g, eps, h0)
            if not sub.valid:
                return sub
            level = 0
            while i & 1:
                level += 1
                sub = self._merge(pending.pop(), sub, level)
                if not sub.valid:
                    return sub
                i >>= 1
            pending.append(sub)
            point = sub.end
        return pending[0]

    def _merge(self, init: _Subtree, final: _Subtree, depth: int) -> _Subtree:
        """The subtree of depth ``depth`` made of two valid halves built one after the other."""
        log_w = _logaddexp(init.log_w, final.log_w)
        prop = init.prop
        if self.rng.random() < math.exp(final.log_w - log_w):
            prop = final.prop
        rho = init.rho + final.rho
        if depth == 1:
            # two leaves: rho is also init.rho + final.p_beg and final.rho + init.p_end,
            # and each leaf's two ends are one point: Stan's three checks are one
            valid = _persist(init.ps_beg, final.ps_end, rho)
        else:
            valid = (
                _persist(init.ps_beg, final.ps_end, rho)
                and _persist(init.ps_beg, final.ps_beg, init.rho + final.p_beg)
                and _persist(init.ps_end, final.ps_end, final.rho + init.p_end)
            )
        return _Subtree(
            final.end, prop, log_w, rho, init.p_beg, init.ps_beg, final.p_end, final.ps_end, valid
        )

    def transition_steps(self) -> Steps[dict[str, float]]:
        """One NUTS transition from the current point; returns its statistics."""
        eps = self.step_size
        r0 = self._momentum()
        here = _Point(self.z, r0, self.u, self.g)
        h0 = self._energy(self.u, r0)
        here.h = h0
        ps0 = self._velocity(r0)
        left = right = here
        p_left = p_right = r0
        ps_left = ps_right = ps0
        rho = r0.copy()
        sample = here
        log_sum_w = 0.0
        self.n_leapfrog, self.sum_metro, self.divergent = 0, 0.0, False
        self.max_error = 0.0
        depth = 0
        doublings = 0
        while depth < self.max_depth:
            doublings += 1
            forward = self.rng.random() > 0.5
            sub = yield from self.build_steps(
                right if forward else left, depth, eps if forward else -eps, h0
            )
            if not sub.valid:
                break
            depth += 1
            if sub.log_w > log_sum_w or self.rng.random() < math.exp(sub.log_w - log_sum_w):
                sample = sub.prop
            log_sum_w = _logaddexp(log_sum_w, sub.log_w)
            if forward:
                near_p, near_ps, far_ps = p_right, ps_right, ps_left
            else:
                near_p, near_ps, far_ps = p_left, ps_left, ps_right
            old_rho = rho
            rho = old_rho + sub.rho
            persist = (
                _persist(far_ps, sub.ps_end, rho)
                and _persist(far_ps, sub.ps_beg, old_rho + sub.p_beg)
                and _persist(near_ps, sub.ps_end, sub.rho + near_p)
            )
            if forward:
                right, p_right, ps_right = sub.end, sub.p_end, sub.ps_end
            else:
                left, p_left, ps_left = sub.end, sub.p_end, sub.ps_end
            if not persist:
                break
        self.z, self.u, self.g = sample.z, sample.u, sample.g
        accept = self.sum_metro / max(self.n_leapfrog, 1)
        return {
            "diverging": self.divergent,
            "step_size": eps,
            "tree_depth": doublings,
            "n_steps": self.n_leapfrog,
            "lp": -self.u,
            "acceptance_rate": accept,
            "energy": sample.h,
            "energy_error": sample.h - h0,
            "max_energy_error": self.max_error,
        }

    def transition(self) -> dict[str, float]:
        """:meth:`transition_steps` driven by :attr:`potential`."""
        return drive(self.transition_steps(), self._require_potential())


# ----------------------------------------------------------------------------- drivers


def drive(steps: Steps[T], potential: Callable[[np.ndarray], Reply]) -> T:
    """Run a generator of :class:`NUTSChain` to its end, answering it with ``potential``.

    Parameters
    ----------
    steps : generator
        Yields positions ``z`` (D,), receives ``potential(z)``.
    potential : callable
        ``z -> (u, grad)``.

    Returns
    -------
    The generator's return value.
    """
    # an overflow (a step into a region where the potential or the kinetic energy is
    # not finite) makes the energy infinite: a divergence, counted, not a warning
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            z = next(steps)
            while True:
                z = steps.send(potential(z))
        except StopIteration as stop:
            return stop.value


def drive_lockstep(
    programs: Sequence[Steps[T]],
    batched: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    dim: int,
) -> list[T]:
    """Run several generators together with one batched potential call per round.

    Each round stacks the positions the live generators asked for into a
    ``(K, D)`` array, evaluates ``batched`` once, and sends each generator its
    row. A generator that has finished keeps its last position as a dummy row,
    so the batch keeps its shape (the traced graph has static shapes).

    Parameters
    ----------
    programs : sequence of generators
        As for :func:`drive`; they start with a yield (all :class:`NUTSChain`
        generators and :func:`chain_steps` do).
    batched : callable
        ``Z (K, D) -> (U (K,), G (K, D))``.
    dim : int
        ``D``.

    Returns
    -------
    list
        The generators' return values, in order.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflows are divergences (drive)
        return _drive_lockstep(programs, batched, dim)


def _drive_lockstep(
    programs: Sequence[Steps[T]],
    batched: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    dim: int,
) -> list[T]:
    k_all = len(programs)
    z = np.zeros((k_all, dim))
    results: list[Any] = [None] * k_all
    for k, program in enumerate(programs):
        z[k] = next(program)
    live = list(range(k_all))
    while live:
        u, g = batched(z)
        values = np.asarray(u).tolist()  # Python floats, as float(u[k]) gives them
        rows = list(g)
        still = []
        for k in live:
            try:
                z[k] = programs[k].send((values[k], rows[k]))
                still.append(k)
            except StopIteration as stop:
                results[k] = stop.value
        live = still
    return results


def chain_steps(
    z0: np.ndarray,
    rng: np.random.Generator,
    *,
    num_warmup: int,
    num_samples: int,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    metric: str = "diag",
    status: ChainStatus | None = None,
) -> Steps[dict[str, Any]]:
    """A whole chain (Stan's warm-up, then the kept draws) as one generator.

    Parameters
    ----------
    z0 : ndarray, shape (D,)
        Initial unconstrained position (the first position asked for).
    rng : numpy.random.Generator
        The chain's own random stream.
    num_warmup, num_samples, target_accept_prob, max_tree_depth, metric
        As for :func:`sample_chain`.
    status : ChainStatus, optional
        Updated after every transition (live progress).

    Returns
    -------
    dict
        ``draws`` (num_samples, D) unconstrained, ``stats`` (lists per kept
        draw), ``warmup_steps``, ``step_size``, ``inv_mass`` ((D,) or (D, D))
        and ``metric`` (the one adapted).
    """
    z0 = np.asarray(z0, dtype=np.float64)
    start = yield z0
    chain = NUTSChain(
        None,
        z0,
        rng,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        start=start,
    )
    used = resolve_metric(metric, chain.dim, num_warmup)
    if used == "diag":
        warmup_steps = yield from _warmup_steps(chain, num_warmup, used, status)
    else:
        warmup_steps = yield from _switching_warmup_steps(chain, num_warmup, used, status)
    draws = np.empty((num_samples, chain.dim))
    stats: dict[str, list] = {k: [] for k in STAT_NAMES}
    for i in range(num_samples):
        info = yield from chain.transition_steps()
        draws[i] = chain.z
        for k, v in info.items():
            stats[k].append(v)
        if status is not None:
            status.record(info, warmup=False)
    return {
        "draws": draws,
        "stats": {k: np.asarray(v) for k, v in stats.items()},
        "warmup_steps": warmup_steps,
        "step_size": chain.step_size,
        "inv_mass": chain.inv_mass,
        "metric": used,
    }


def window_metric(draws: np.ndarray, grads: np.ndarray, metric: str) -> LowRankMetric | np.ndarray:
    """The inverse metric estimated from a window's draws and gradients, ``(n, D)`` each.

    ``"low_rank"``: :func:`low_rank_metric`. ``"dense"``: the draws' covariance
    regularized as :meth:`Welford.relative_covariance` from ``DENSE_DRAWS_PER_DIM``
    (2) draws per dimension and at least ``DENSE_MIN_DRAWS`` (20) on; from fewer,
    where a covariance is singular or nearly, :func:`low_rank_metric`.
    """
    n, dim = draws.shape
    if metric == "dense" and n >= max(DENSE_DRAWS_PER_DIM * dim, DENSE_MIN_DRAWS):
        welford = Welford(dim, dense=True)
        welford.n = n
        welford.mean = draws.mean(axis=0)
        dev = draws - welford.mean
        welford.m2 = dev.T @ dev
        return welford.relative_covariance()
    return low_rank_metric(draws, grads)


def _initial_metric(grad: np.ndarray, metric: str) -> LowRankMetric | np.ndarray:
    """:func:`metric_from_gradient`, as a diagonal for the dense metric."""
    start = metric_from_gradient(grad)
    return start.stds**2 if metric == "dense" else start


def _switching_warmup_steps(
    chain: NUTSChain, num_warmup: int, metric: str, status: ChainStatus | None = None
) -> Steps[int]:
    """The warm-up of ``chain`` with a ``"dense"`` or ``"low_rank"`` metric (nutpie's schedule).

    The metric starts from the diagonal the initial gradient suggests
    (:func:`metric_from_gradient`) and is re-estimated from the current window
    of :class:`SwitchingWindows` (:func:`window_metric`) every
    ``METRIC_UPDATE_EVERY`` (10) draws from the first switch on, the last time
    at the start of the step-size-only window. A current window spent on the
    chain's way into the typical set (:func:`is_transient`) gives the unit
    metric instead. The step size is searched again (Stan's heuristic) and its
    dual averaging restarted after the first estimate and after the last one;
    in between, the averaging follows the metric's updates (as nutpie's). A
    transient current window is dropped where the next one holds
    ``EARLY_SWITCH`` draws (a switch), so that a short warm-up, whose current
    window would otherwise start at its tenth draw, forgets the way in too.
    Returns the warm-up's leapfrog steps.
    """
    chain.inv_mass = _initial_metric(chain.g, metric)
    yield from chain.find_step_size_steps()
    averaging = DualAveraging(target=chain.target)
    averaging.restart(chain.step_size)
    windows = SwitchingWindows(num_warmup)
    draws: list[np.ndarray] = []
    grads: list[np.ndarray] = []
    potentials: list[float] = []
    current = following = 0  # where the current and the next window start in draws
    estimated = False
    warmup_steps = 0
    for i in range(num_warmup):
        info = yield from chain.transition_steps()
        if status is not None:
            status.record(info, warmup=True)
        warmup_steps += info["n_steps"]
        chain.step_size = averaging.update(info["acceptance_rate"])
        if not windows.adapt_metric or i >= windows.final_start:
            continue
        draws.append(chain.z)
        grads.append(chain.g)
        potentials.append(chain.u)
        if windows.switches(i, len(draws) - following, following - current):
            current, following = following, len(draws)
        last = i == windows.final_start - 1
        if not (last or (following > 0 and len(draws) % METRIC_UPDATE_EVERY == 0)):
            continue
        if is_transient(potentials[current:], chain.dim) and len(draws) - following >= EARLY_SWITCH:
            current, following = following, len(draws)  # forget the way in
        if is_transient(potentials[current:], chain.dim):
            # the window's draws followed the chain's way in, not the posterior: a
            # metric from them can freeze the chain where it is (variances far below
            # the posterior's along the coordinates that barely moved); the diagonal
            # the gradient suggests where the chain is now until a window is not
            chain.inv_mass = _initial_metric(chain.g, metric)
        else:
            chain.inv_mass = window_metric(
                np.asarray(draws[current:]), np.asarray(grads[current:]), metric
            )
        if last or not estimated:
            estimated = True
            yield from chain.find_step_size_steps()
            averaging.restart(chain.step_size)
    if num_warmup > 0:
        chain.step_size = averaging.final
    return warmup_steps


def _warmup_steps(
    chain: NUTSChain, num_warmup: int, metric: str = "diag", status: ChainStatus | None = None
) -> Steps[int]:
    """Stan's warm-up of ``chain`` with a ``"diag"``, ``"dense"`` or ``"low_rank"`` metric.

    Returns its leapfrog steps. The dense and low-rank metrics start, as
    nutpie's does, from the diagonal the initial gradient suggests
    (:func:`metric_from_gradient`) instead of the identity: on a badly scaled
    posterior the first buffer's trees are then short. (The diagonal metric
    starts from the identity, as Stan's ``diag_e``.)
    """
    if metric == "low_rank":
        chain.inv_mass = metric_from_gradient(chain.g)
    elif metric == "dense":
        chain.inv_mass = metric_from_gradient(chain.g).stds ** 2
    yield from chain.find_step_size_steps()
    averaging = DualAveraging(target=chain.target)
    averaging.restart(chain.step_size)
    windows = Windows(num_warmup)
    welford: Welford | DrawsAndGradients
    if metric == "low_rank":
        welford = DrawsAndGradients(chain.dim)
    else:
        welford = Welford(chain.dim, dense=metric == "dense")
    potentials: list[float] = []
    warmup_steps = 0
    for _ in range(num_warmup):
        info = yield from chain.transition_steps()
        if status is not None:
            status.record(info, warmup=True)
        warmup_steps += info["n_steps"]
        chain.step_size = averaging.update(info["acceptance_rate"])
        if windows.in_window():
            if isinstance(welford, DrawsAndGradients):
                welford.add(chain.z, chain.g)
            else:
                welford.add(chain.z)
            if metric != "diag":
                potentials.append(chain.u)
        if windows.end_of_window():
            windows.advance()
            if metric != "diag" and is_transient(potentials, chain.dim):
                # the window's draws followed the chain's way in, not the posterior: a
                # metric from them (or from the initial gradient) can freeze the chain
                # where it is (variances far below the posterior's along the coordinates
                # that barely moved); start again from Stan's unit metric
                chain.inv_mass = np.ones(chain.dim)
            elif isinstance(welford, DrawsAndGradients):
                chain.inv_mass = welford.metric()
            elif welford.dense:
                chain.inv_mass = welford.relative_covariance()
            else:
                chain.inv_mass = welford.regularized()
            welford.restart()
            potentials = []
            yield from chain.find_step_size_steps()
            averaging.restart(chain.step_size)
        windows.counter += 1
    if num_warmup > 0:
        chain.step_size = averaging.final
    return warmup_steps


# ----------------------------------------------------------------------------- chain


@dataclass
class _Setup:
    """A model's flat potential, the chains' initial points and the transforms back."""

    potential: FlatPotential
    z0: list[np.ndarray]
    transforms: Mapping
    dtype: torch.dtype


def _setup(
    model: Callable,
    data: Mapping[str, Any],
    seeds: Sequence[int],
    max_plate_nesting: int | None,
    jit: bool,
) -> _Setup:
    """Pyro's potential (traced once) and each seed's initial point (``init_to_uniform``)."""
    z0, first = [], None
    for seed in seeds:
        pyro.set_rng_seed(seed % (2**32))
        # validation off: a NaN density at a random initial point is retried by Pyro
        # (up to 100 points) instead of raising from the distribution's constructor
        with warnings.catch_warnings(), _validation_off():
            warnings.simplefilter("ignore")
            try:
                params, potential_fn, transforms, _ = initialize_model(
                    model, model_kwargs=dict(data), max_plate_nesting=max_plate_nesting
                )
            except (RuntimeError, ValueError) as exc:  # Pyro's words vary by version
                if "initial param" not in str(exc):
                    raise
                raise IncompatibleError(
                    "NUTS found no initial point where the model's log density and its "
                    "gradient are finite (100 random points, unconstrained values in (-2, 2)); "
                    "make the density finite over the support (guard log, sqrt, division "
                    "and NaN-producing branches) or check the data"
                ) from None
        names = list(params)
        z0.append(np.concatenate([params[k].detach().reshape(-1).double().numpy() for k in names]))
        if first is None:
            shapes = {k: tuple(params[k].shape) for k in names}
            dtype = params[names[0]].dtype if names else torch.get_default_dtype()
            first = (potential_fn, shapes, dtype, transforms)
    potential_fn, shapes, dtype, transforms = first
    potential = FlatPotential(potential_fn, shapes, dtype, jit, z0[0])
    return _Setup(potential, z0, transforms, dtype)


@private_units()  # the chain's traced potential is freed with it (vimodels.compile.units)
def sample_chain(
    model: Callable,
    data: Mapping[str, Any],
    *,
    num_warmup: int,
    num_samples: int,
    seed: int,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    max_plate_nesting: int | None = None,
    jit: bool = True,
    metric: str = "diag",
    status: ChainStatus | None = None,
) -> dict[str, Any]:
    """Run one NUTS chain on a Pyro model called as ``model(**data)``.

    Parameters
    ----------
    model : callable
        Pyro model; discrete sites with finite support are summed out.
    data : dict
        Keyword arguments of the model.
    num_warmup, num_samples : int
        Adapted warm-up iterations (discarded) and kept draws.
    seed : int
        Seeds the initial point (Pyro's ``init_to_uniform``) and the sampler.
    target_accept_prob, max_tree_depth : float, int
        As in Stan and Pyro.
    max_plate_nesting : int, optional
    jit : bool
        Trace the potential.
    metric : str
        ``"diag"`` (Stan's default), ``"dense"``, ``"low_rank"`` or ``"auto"``
        (:func:`resolve_metric`).
    status : ChainStatus, optional
        Updated after every transition (live progress).

    Returns
    -------
    dict
        ``samples``: site -> ndarray (num_samples, *site shape), constrained,
        float64; ``stats``: per kept draw ``diverging``, ``step_size``,
        ``tree_depth`` (doublings tried), ``n_steps`` (leapfrog steps),
        ``lp`` (log density on the unconstrained space),
        ``acceptance_rate``, ``energy``, ``energy_error`` and
        ``max_energy_error``; ``warmup_steps`` (leapfrog steps in warm-up);
        ``metric`` (the one adapted), ``inv_mass``, ``jit`` and ``note``.
    """
    setup = _setup(model, data, [seed], max_plate_nesting, jit)
    program = chain_steps(
        setup.z0[0],
        np.random.default_rng(seed),
        num_warmup=num_warmup,
        num_samples=num_samples,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        metric=metric,
        status=status,
    )
    with _inference(setup.potential.mode == "fx"):
        run = drive(program, setup.potential)
    return _chain_result(run, setup)


@private_units()  # the chains' traced potentials are freed with them
def sample_chains(
    model: Callable,
    data: Mapping[str, Any],
    *,
    num_warmup: int,
    num_samples: int,
    seeds: Sequence[int],
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    max_plate_nesting: int | None = None,
    jit: bool = True,
    batch: bool = True,
    metric: str = "diag",
    statuses: Sequence[ChainStatus] | None = None,
) -> list[dict[str, Any]]:
    """Run one NUTS chain per seed, all in this thread, in lockstep.

    Every chain is the generator of :func:`chain_steps` with its own
    ``numpy.random.Generator`` and initial point, seeded as
    :func:`sample_chain` seeds them; :func:`drive_lockstep` evaluates the
    positions they ask for together, with one call of a
    :class:`BatchedPotential` per leapfrog step of all chains.

    Parameters
    ----------
    model, data, num_warmup, num_samples, target_accept_prob, max_tree_depth, max_plate_nesting
        As for :func:`sample_chain`.
    jit, metric
        As for :func:`sample_chain`.
    seeds : sequence of int
        One per chain.
    batch : bool
        Vectorize the potential over the chains (``vmap`` of the traced
        gradient); else evaluate it row by row, which gives exactly the draws
        of :func:`sample_chain`.
    statuses : sequence of ChainStatus, optional
        One per seed, updated after every transition (live progress).

    Returns
    -------
    list of dict
        One per seed, as :func:`sample_chain` returns, plus ``batch`` (the
        :attr:`BatchedPotential.mode` that ran).
    """
    setup = _setup(model, data, seeds, max_plate_nesting, jit)
    batched = BatchedPotential(setup.potential, np.stack(setup.z0), vectorize=batch)
    programs = [
        chain_steps(
            z0,
            np.random.default_rng(seed),
            num_warmup=num_warmup,
            num_samples=num_samples,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            metric=metric,
            status=statuses[k] if statuses is not None else None,
        )
        for k, (z0, seed) in enumerate(zip(setup.z0, seeds))
    ]
    with _inference(setup.potential.mode == "fx"):
        runs = drive_lockstep(programs, batched, setup.potential.dim)
    out = []
    for run in runs:
        result = _chain_result(run, setup)
        result["batch"] = batched.mode
        if batched.note:
            result["note"] = "; ".join(n for n in (result["note"], batched.note) if n)
        out.append(result)
    return out


def _chain_result(run: Mapping[str, Any], setup: _Setup) -> dict[str, Any]:
    potential = setup.potential
    return {
        "samples": _constrain(run["draws"], potential, setup.transforms, setup.dtype),
        "stats": run["stats"],
        "warmup_steps": run["warmup_steps"],
        "step_size": run["step_size"],
        "inv_mass": run["inv_mass"],
        "metric": run["metric"],
        "jit": potential.jit,
        "potential": potential.mode,
        "note": potential.note,
    }


def _constrain(
    draws: np.ndarray, potential: FlatPotential, transforms: Mapping, dtype: torch.dtype
) -> dict[str, np.ndarray]:
    """Map unconstrained draws (S, D) to each site's support: site -> (S, *shape)."""
    sites = potential.unflatten(torch.as_tensor(draws, dtype=dtype))
    out = {}
    with torch.no_grad():
        for name, value in sites.items():
            t = transforms.get(name)
            out[name] = (t.inv(value) if t is not None else value).double().numpy()
    return out
