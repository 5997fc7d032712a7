"""The potential's value and gradient as one frozen graph, for L-BFGS.

Every evaluation of :meth:`~vimodels.mode.potential.Potential.log_density`
runs the model under Pyro's tracing and then autograd's backward: on the
posteriordb regressions (3-5 parameters) about 5 ms, of which the arithmetic
is a few percent (benchmarks/README.md, section 4b, "Where the fixed costs
go"). :func:`compiled_value_and_grad` records the ATen operations of one
evaluation and its gradient with the project's recorder
(:mod:`vimodels.compile.record`, as the compiled SVI step does), simplifies
them and freezes them with TorchScript: 0.3-0.7 ms per evaluation there,
for about 0.2 s of recording once per potential.

The graph is used only where it is valid: no value read back into Python
(a value-dependent branch), no random operation (a subsampled plate), and
the same value and gradient as the eager potential at the start point and
at a second point. Anything else returns None and the caller evaluates the
potential eagerly, as before.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from vimodels.compile.record import freeze, has_random, reads_value, record, simplify_graph
from vimodels.mode.potential import Potential

#: False: always evaluate eagerly (for benchmarks of the difference)
ENABLED = True

#: relative agreement the frozen graph must show with the eager potential
RTOL = 1e-9


def _eager_value_and_grad(potential: Potential, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.enable_grad():
        x = u.detach().clone().requires_grad_(True)
        lp = potential.log_density(x)
        (g,) = torch.autograd.grad(lp, x, allow_unused=True)
    if g is None:
        g = torch.zeros_like(x)
    return lp.detach(), g.detach()


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().double(), b.detach().double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return False
    scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=RTOL, atol=RTOL * scale))


def _build(potential: Potential) -> Callable | None:
    u0 = potential.init_values.detach().clone().to(potential.dtype)
    evals = potential.num_evals
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = record(lambda u: _eager_value_and_grad(potential, u), u0)
            if reads_value(graph):
                return None  # the model reads a value into Python: a branch the graph freezes
            if has_random(graph):
                return None  # random operations (subsampling): not a function of u alone
            frozen = freeze(simplify_graph(graph, u0), u0)
            # a second point: the prior median moved by a fixed, uneven pattern
            shift = torch.linspace(-0.5, 0.7, potential.dim, dtype=u0.dtype)
            for u in (u0, u0 + shift):
                ref = _eager_value_and_grad(potential, u)
                if not math.isfinite(float(ref[0])):
                    continue
                with torch.no_grad():
                    got = frozen(u)
                if not (_agree(got[0], ref[0]) and _agree(got[1], ref[1])):
                    return None
    except Exception:  # noqa: BLE001 - anything the recorder cannot follow: stay eager
        return None
    finally:
        potential.num_evals = evals

    def value_and_grad(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        potential.num_evals += 1
        with torch.no_grad():
            lp, g = frozen(u.detach().to(potential.dtype))
        return lp, g

    return value_and_grad


def _build_batch(potential: Potential, n: int) -> Callable | None:
    gen = torch.Generator().manual_seed(0)
    u0 = potential.init_values.detach().to(potential.dtype)
    example = u0 + 0.3 * torch.randn(n, potential.dim, generator=gen, dtype=u0.dtype)
    evals = potential.num_evals
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ref = potential.log_density_batch(example)  # also checks batching once
            if not potential._batch_ok:
                return None
            graph = record(potential._batched, example)
            if reads_value(graph) or has_random(graph):
                return None
            frozen = freeze(simplify_graph(graph, example), example)
            other = u0 + 0.5 * torch.randn(n, potential.dim, generator=gen, dtype=u0.dtype)
            for x, r in ((example, ref), (other, potential._batched(other))):
                got = frozen(x)
                ok = torch.isfinite(r)
                if not (bool(ok.any()) and _agree(got[ok], r[ok])):
                    return None
    except Exception:  # noqa: BLE001 - anything the recorder cannot follow: stay eager
        return None
    finally:
        potential.num_evals = evals

    def log_density_batch(u: torch.Tensor) -> torch.Tensor:
        potential.num_evals += n
        with torch.no_grad():
            return frozen(u.detach().to(potential.dtype))

    return log_density_batch


def compiled_log_density_batch(potential: Potential, n: int) -> Callable:
    """``u (n, dim) -> log p`` per row from a frozen graph for this ``n``; else the eager method.

    As :meth:`~vimodels.mode.potential.Potential.log_density_batch`, without gradients;
    used for Pathfinder's ELBO draws (the same ``n`` at every iterate of a path).
    """
    if not ENABLED:
        return potential.log_density_batch
    cache = getattr(potential, "_compiled_batch", None)
    if cache is None:
        cache = potential._compiled_batch = {}
    if n not in cache:
        cache[n] = _build_batch(potential, n) or False
    return cache[n] or potential.log_density_batch


def compiled_value_and_grad(potential: Potential) -> Callable | None:
    """``u -> (log p(u), d log p / du)`` from a frozen graph, or None where it is not valid.

    Built once per potential (kept on it). ``u`` has shape ``(dim,)``; both outputs
    are detached tensors in the potential's dtype.
    """
    if not ENABLED:
        return None
    cached = getattr(potential, "_compiled_vg", None)
    if cached is None:
        cached = _build(potential) or False
        potential._compiled_vg = cached
    return cached or None


def frozen_log_density_batch(potential: Potential, n: int, build: bool = True) -> Callable | None:
    """The frozen graph of :func:`compiled_log_density_batch` for ``n`` rows, or None.

    None where the graph is not valid for this potential (the eager method is
    then the only one), where :data:`ENABLED` is False, or where none is built
    for ``n`` yet and ``build`` is False.
    """
    if not ENABLED:
        return None
    cache = getattr(potential, "_compiled_batch", None) or {}
    if n not in cache and not build:
        return None
    compiled_log_density_batch(potential, n)
    return potential._compiled_batch[n] or None


def frozen_batch_sizes(potential: Potential) -> tuple[int, ...]:
    """The row counts for which a valid frozen batched graph is already built."""
    cache = getattr(potential, "_compiled_batch", None) or {}
    return tuple(n for n, f in cache.items() if f)
