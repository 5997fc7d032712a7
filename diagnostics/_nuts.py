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
- warm-up is Stan's: dual averaging of the step size (gamma 0.05, t0 10,
  kappa 0.75) and a diagonal inverse metric from Welford variances in doubling
  windows (75 / 25... / 50 iterations, or 15% / 75% / 10% of a short warm-up),
  regularized towards 1e-3 as in Stan.

The public entry point is :func:`sample_chain`; :mod:`diagnostics._chain`
calls it in the chain worker processes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer.mcmc.util import initialize_model

MAX_DELTA_H = 1000.0  # energy error that marks a divergence (Stan's value)
LOG_08 = math.log(0.8)


# ----------------------------------------------------------------------------- potential


class FlatPotential:
    """Potential energy ``-log p(z, x)`` and its gradient on a flat unconstrained vector.

    With ``jit`` the value and gradient are traced together, once, into one
    graph of ATen operations (``make_fx`` of ``torch.func.grad_and_value``,
    with Pyro's and torch's argument validation off so no value-dependent
    checks are frozen into it), which TorchScript then runs without the
    autograd engine: two to four times faster than Pyro's traced potential
    plus ``backward``. Where that fails, the potential alone is traced and
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
        self._value_and_grad: Callable | None = None
        self._fn: Callable = self.python_potential
        if not jit:
            return
        example = torch.as_tensor(z0, dtype=dtype)
        errors = []
        try:
            self._value_and_grad = _trace_value_and_grad(self.python_potential, example)
            self.mode = "fx"
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
    """``z -> (grad, value)`` by ``torch.autograd.grad`` (which ``make_fx`` records).

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


def _trace_value_and_grad(fn: Callable, example: torch.Tensor) -> Callable:
    """``z -> (grad, value)`` of ``fn`` as one frozen TorchScript graph.

    Checked against autograd at a second point.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings(), pyro.util.ignore_jit_warnings():
        warnings.simplefilter("ignore")
        with _validation_off():
            graph = make_fx(_value_and_grad_fn(fn))(example)
        with torch.no_grad():
            compiled = torch.jit.freeze(
                torch.jit.trace(graph, (example,), check_trace=False).eval()
            )
    # the graph holds whatever Python control flow did at `example`: it must
    # agree with the model elsewhere
    z1 = example + 0.1
    g1, u1 = compiled(z1)
    t = z1.clone().requires_grad_(True)
    u = fn(t)
    (g,) = torch.autograd.grad(u, t)
    if not (_agrees(u1, u) and _agrees(g1, g)):
        raise RuntimeError("the traced potential differs from the model away from the trace point")
    return compiled


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
class Welford:
    """Running mean and variance of vectors."""

    dim: int
    n: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget every sample."""
        self.n = 0
        self.mean = np.zeros(self.dim)
        self.m2 = np.zeros(self.dim)

    def add(self, x: np.ndarray) -> None:
        """Add one sample."""
        self.n += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.n
        self.m2 = self.m2 + delta * (x - self.mean)

    def regularized_variance(self) -> np.ndarray:
        """Sample variance shrunk towards 1e-3 with weight 5 / (n + 5) (Stan)."""
        n = self.n
        var = self.m2 / max(n - 1, 1)
        return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))


# ----------------------------------------------------------------------------- NUTS


@dataclass
class _Point:
    """A phase-space point: position, momentum, potential, gradient."""

    z: np.ndarray
    r: np.ndarray
    u: float
    g: np.ndarray


@dataclass
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


def _persist(ps_minus: np.ndarray, ps_plus: np.ndarray, rho: np.ndarray) -> bool:
    """Generalized no-U-turn criterion: both ends still move along ``rho``."""
    return float(ps_plus @ rho) > 0.0 and float(ps_minus @ rho) > 0.0


class NUTSChain:
    """One NUTS chain on a :class:`FlatPotential`.

    Parameters
    ----------
    potential : FlatPotential
    z0 : ndarray, shape (D,)
        Initial unconstrained position.
    rng : numpy.random.Generator
    target_accept_prob : float
    max_tree_depth : int
        At most ``2**max_tree_depth - 1`` leapfrog steps per transition.
    """

    def __init__(
        self,
        potential: FlatPotential,
        z0: np.ndarray,
        rng: np.random.Generator,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
    ) -> None:
        self.potential = potential
        self.rng = rng
        self.target = float(target_accept_prob)
        self.max_depth = int(max_tree_depth)
        u, g = potential(z0)
        if not math.isfinite(u):
            raise ValueError("the potential is not finite at the initial point")
        self.z, self.u, self.g = np.asarray(z0, dtype=np.float64), u, g
        self.dim = self.z.shape[0]
        self.inv_mass = np.ones(self.dim)
        self.step_size = 1.0
        # per-transition counters
        self.n_leapfrog = 0
        self.sum_metro = 0.0
        self.divergent = False

    # --- Hamiltonian pieces
    def _momentum(self) -> np.ndarray:
        return self.rng.standard_normal(self.dim) / np.sqrt(self.inv_mass)

    def _energy(self, u: float, r: np.ndarray) -> float:
        return u + 0.5 * float(r @ (self.inv_mass * r))

    def _leapfrog(self, p: _Point, eps: float) -> _Point:
        r = p.r - 0.5 * eps * p.g
        z = p.z + eps * (self.inv_mass * r)
        u, g = self.potential(z)
        r = r - 0.5 * eps * g
        return _Point(z, r, u, g)

    # --- step size
    def find_reasonable_step_size(self) -> None:
        """Stan's heuristic: double or halve until one leapfrog step crosses acceptance 0.8."""
        start = _Point(self.z, None, self.u, self.g)  # type: ignore[arg-type]
        direction = 0
        for _ in range(100):
            r = self._momentum()
            h0 = self._energy(self.u, r)
            start.r = r
            q = self._leapfrog(start, self.step_size)
            h = self._energy(q.u, q.r)
            delta = h0 - h if math.isfinite(h) else -math.inf
            if direction == 0:
                direction = 1 if delta > LOG_08 else -1
            if direction == 1 and not delta > LOG_08:
                break
            if direction == -1 and not delta < LOG_08:
                break
            self.step_size = self.step_size * 2.0 if direction == 1 else self.step_size * 0.5
            if self.step_size > 1e7 or self.step_size == 0.0:
                raise ValueError(
                    f"no reasonable step size (reached {self.step_size:g}); the "
                    "posterior is improper or the potential is not smooth"
                )

    # --- tree
    def _build(self, start: _Point, depth: int, eps: float, h0: float) -> _Subtree:
        if depth == 0:
            q = self._leapfrog(start, eps)
            self.n_leapfrog += 1
            h = self._energy(q.u, q.r)
            if not math.isfinite(h):
                h = math.inf
            delta = h0 - h
            if -delta > MAX_DELTA_H:
                self.divergent = True
            self.sum_metro += 1.0 if delta > 0 else math.exp(delta)
            ps = self.inv_mass * q.r
            return _Subtree(q, q, delta, q.r, q.r, ps, q.r, ps, not self.divergent)
        init = self._build(start, depth - 1, eps, h0)
        if not init.valid:
            return init
        final = self._build(init.end, depth - 1, eps, h0)
        if not final.valid:
            return final
        log_w = float(np.logaddexp(init.log_w, final.log_w))
        prop = init.prop
        if self.rng.random() < math.exp(final.log_w - log_w):
            prop = final.prop
        rho = init.rho + final.rho
        valid = (
            _persist(init.ps_beg, final.ps_end, rho)
            and _persist(init.ps_beg, final.ps_beg, init.rho + final.p_beg)
            and _persist(init.ps_end, final.ps_end, final.rho + init.p_end)
        )
        return _Subtree(
            final.end, prop, log_w, rho, init.p_beg, init.ps_beg, final.p_end, final.ps_end, valid
        )

    def transition(self) -> dict[str, float]:
        """One NUTS transition from the current point; returns its statistics."""
        eps = self.step_size
        r0 = self._momentum()
        here = _Point(self.z, r0, self.u, self.g)
        h0 = self._energy(self.u, r0)
        ps0 = self.inv_mass * r0
        left = right = here
        p_left = p_right = r0
        ps_left = ps_right = ps0
        rho = r0.copy()
        sample = here
        log_sum_w = 0.0
        self.n_leapfrog, self.sum_metro, self.divergent = 0, 0.0, False
        depth = 0
        doublings = 0
        while depth < self.max_depth:
            doublings += 1
            forward = self.rng.random() > 0.5
            sub = self._build(right if forward else left, depth, eps if forward else -eps, h0)
            if not sub.valid:
                break
            depth += 1
            if sub.log_w > log_sum_w or self.rng.random() < math.exp(sub.log_w - log_sum_w):
                sample = sub.prop
            log_sum_w = float(np.logaddexp(log_sum_w, sub.log_w))
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
            "num_steps": self.n_leapfrog,
            "lp": -self.u,
            "acceptance_rate": accept,
        }


# ----------------------------------------------------------------------------- chain


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

    Returns
    -------
    dict
        ``samples``: site -> ndarray (num_samples, *site shape), constrained,
        float64; ``stats``: per kept draw ``diverging``, ``step_size``,
        ``tree_depth`` (doublings tried), ``num_steps`` (leapfrog steps),
        ``lp`` (log density on the unconstrained space) and
        ``acceptance_rate``; ``warmup_steps`` (leapfrog steps in warm-up);
        ``jit`` and ``note``.
    """
    pyro.set_rng_seed(seed % (2**32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, potential_fn, transforms, _ = initialize_model(
            model, model_kwargs=dict(data), max_plate_nesting=max_plate_nesting
        )
    names = list(params)
    shapes = {k: tuple(params[k].shape) for k in names}
    dtype = params[names[0]].dtype if names else torch.get_default_dtype()
    z0 = np.concatenate([params[k].detach().reshape(-1).double().numpy() for k in names])
    potential = FlatPotential(potential_fn, shapes, dtype, jit, z0)
    chain = NUTSChain(
        potential,
        z0,
        np.random.default_rng(seed),
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
    )
    chain.find_reasonable_step_size()
    averaging = DualAveraging(target=float(target_accept_prob))
    averaging.restart(chain.step_size)
    windows = Windows(num_warmup)
    welford = Welford(chain.dim)
    warmup_steps = 0
    for _ in range(num_warmup):
        info = chain.transition()
        warmup_steps += info["num_steps"]
        chain.step_size = averaging.update(info["acceptance_rate"])
        if windows.in_window():
            welford.add(chain.z)
        if windows.end_of_window():
            windows.advance()
            chain.inv_mass = welford.regularized_variance()
            welford.restart()
            chain.find_reasonable_step_size()
            averaging.restart(chain.step_size)
        windows.counter += 1
    if num_warmup > 0:
        chain.step_size = averaging.final
    draws = np.empty((num_samples, chain.dim))
    stats: dict[str, list] = {
        k: []
        for k in ("diverging", "step_size", "tree_depth", "num_steps", "lp", "acceptance_rate")
    }
    for i in range(num_samples):
        info = chain.transition()
        draws[i] = chain.z
        for k, v in info.items():
            stats[k].append(v)
    samples = _constrain(draws, potential, transforms, dtype)
    return {
        "samples": samples,
        "stats": {k: np.asarray(v) for k, v in stats.items()},
        "warmup_steps": warmup_steps,
        "step_size": chain.step_size,
        "inv_mass": chain.inv_mass,
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
