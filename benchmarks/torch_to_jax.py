"""The project's potential of a Pyro model as a JAX function, for NumPyro's NUTS (benchmark 3).

So that NumPyro samples *exactly* the density the project's sampler does
(Pyro's potential on the flat unconstrained vector: the same transforms,
log-Jacobians, enumerated discrete sites), without a hand translation of
each model: the potential is recorded by ``make_fx`` as a graph of ATen
operations (functionalized, decomposed to the core set), and each operation
is replayed with ``jax.numpy``. JAX differentiates and compiles the result;
NumPyro's ``NUTS(potential_fn=...)`` then runs its default algorithm on it
(diagonal metric, Stan's windows). Checked against torch at two points.

Needs the ``bench`` extra (JAX); imported only by the benchmarks.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.special as jsp
import numpy as np
import torch
from torch.fx.experimental.proxy_tensor import make_fx

jax.config.update("jax_enable_x64", True)

aten = torch.ops.aten


def _dtype(dt: torch.dtype | None) -> Any:
    if dt is None:
        return None
    return {
        torch.float64: jnp.float64,
        torch.float32: jnp.float32,
        torch.int64: jnp.int64,
        torch.int32: jnp.int32,
        torch.bool: jnp.bool_,
    }[dt]


def _sum(x, dims=None, keepdim=False, dtype=None):
    axis = None if dims is None or len(dims) == 0 else tuple(dims)
    return jnp.sum(x, axis=axis, keepdims=keepdim, dtype=_dtype(dtype))


def _view(x, shape):
    return jnp.reshape(x, tuple(shape))


def _expand(x, shape, implicit=False):
    shape = list(shape)
    lead = len(shape) - x.ndim
    out = [s if s != -1 else x.shape[i - lead] for i, s in enumerate(shape)]
    return jnp.broadcast_to(x, tuple(out))


def _slice(x, dim=0, start=None, end=None, step=1):
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None or end > n else end
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def _select(x, dim, index):
    return jnp.take(x, index, axis=dim)


def _index(x, indices):
    idx = tuple(slice(None) if i is None else i for i in indices)
    return x[idx]


def _index_put(x, indices, values, accumulate=False):
    idx = tuple(slice(None) if i is None else i for i in indices)
    return x.at[idx].add(values) if accumulate else x.at[idx].set(values)


def _full(size, value, dtype=None, **unused):
    return jnp.full(tuple(size), value, dtype=_dtype(dtype) or jnp.float64)


def _arange(*args, dtype=None, **unused):
    return jnp.arange(*args, dtype=_dtype(dtype))


def _scatter(x, dim, index, src):
    idx = list(jnp.indices(index.shape, sparse=True))
    idx[dim] = index
    return x.at[tuple(idx)].set(src)


def _cholesky_ex(a, upper=False, check_errors=False):
    low = jnp.linalg.cholesky(a)
    return (jnp.swapaxes(low, -1, -2) if upper else low), jnp.zeros(a.shape[:-2], jnp.int32)


def _solve_triangular(a, b, upper, left=True, unitriangular=False):
    if not left:
        raise NotImplementedError("right triangular solve")
    return jsl.solve_triangular(a, b, lower=not upper, unit_diagonal=unitriangular)


def _diagonal(x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset, dim1, dim2)


def _pad(x, pad, value=0.0):
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return jnp.pad(x, widths, constant_values=value)


def _cum(fn):
    def run(x, dim, dtype=None):
        return fn(x, axis=dim, dtype=_dtype(dtype))

    return run


def _max_dim(x, dim, keepdim=False):
    return jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)


def _amax(x, dims=(), keepdim=False):
    return jnp.max(x, axis=tuple(dims) if dims else None, keepdims=keepdim)


def _clamp(x, lo=None, hi=None):
    return jnp.clip(x, lo, hi)


def _convert(x, dtype=None, **unused):
    return x if dtype is None else x.astype(_dtype(dtype))


def _logsumexp(x, dims, keepdim=False):
    return jsp.logsumexp(x, axis=tuple(dims), keepdims=keepdim)


def _log_sigmoid_forward(x):
    return jax.nn.log_sigmoid(x), jnp.zeros(0)


def _mvlgamma(x, p):
    return jsp.multigammaln(x, p)


def _split(x, size, dim=0):
    n = x.shape[dim]
    return [_slice(x, dim, i, min(i + size, n)) for i in range(0, n, size)]


def _unbind(x, dim=0):
    return [jnp.take(x, i, axis=dim) for i in range(x.shape[dim])]


def _var(x, dims=None, correction=1, keepdim=False):
    axis = None if dims is None else tuple(dims)
    return jnp.var(x, axis=axis, ddof=correction or 0, keepdims=keepdim)


OPS: dict[Any, Callable] = {
    aten.add.Tensor: lambda a, b, alpha=1: a + alpha * b,
    aten.add.Scalar: lambda a, b, alpha=1: a + alpha * b,
    aten.sub.Tensor: lambda a, b, alpha=1: a - alpha * b,
    aten.sub.Scalar: lambda a, b, alpha=1: a - alpha * b,
    aten.rsub.Scalar: lambda a, b, alpha=1: b - alpha * a,
    aten.rsub.Tensor: lambda a, b, alpha=1: b - alpha * a,
    aten.mul.Tensor: operator.mul,
    aten.mul.Scalar: operator.mul,
    aten.div.Tensor: operator.truediv,
    aten.div.Scalar: operator.truediv,
    aten.neg.default: operator.neg,
    aten.reciprocal.default: lambda x: 1.0 / x,
    aten.pow.Tensor_Scalar: jnp.power,
    aten.pow.Tensor_Tensor: jnp.power,
    aten.pow.Scalar: jnp.power,
    aten.exp.default: jnp.exp,
    aten.expm1.default: jnp.expm1,
    aten.log.default: jnp.log,
    aten.log1p.default: jnp.log1p,
    aten.sqrt.default: jnp.sqrt,
    aten.rsqrt.default: jax.lax.rsqrt,
    aten.abs.default: jnp.abs,
    aten.sign.default: jnp.sign,
    aten.tanh.default: jnp.tanh,
    aten.sigmoid.default: jax.nn.sigmoid,
    aten.softplus.default: lambda x, beta=1, threshold=20: jax.nn.softplus(beta * x) / beta,
    aten.log_sigmoid_forward.default: _log_sigmoid_forward,
    aten.lgamma.default: jsp.gammaln,
    aten.digamma.default: jsp.digamma,
    aten.erf.default: jsp.erf,
    aten.erfc.default: jsp.erfc,
    aten.mvlgamma.default: _mvlgamma,
    aten.xlogy.Tensor: jsp.xlogy,
    aten.logsumexp.default: _logsumexp,
    aten.maximum.default: jnp.maximum,
    aten.minimum.default: jnp.minimum,
    aten.clamp.default: _clamp,
    aten.clamp.Tensor: _clamp,
    aten.clamp_min.default: lambda x, lo: jnp.maximum(x, lo),
    aten.clamp_max.default: lambda x, hi: jnp.minimum(x, hi),
    aten.where.self: jnp.where,
    aten.eq.Scalar: operator.eq,
    aten.eq.Tensor: operator.eq,
    aten.ne.Scalar: operator.ne,
    aten.ne.Tensor: operator.ne,
    aten.lt.Scalar: operator.lt,
    aten.lt.Tensor: operator.lt,
    aten.le.Scalar: operator.le,
    aten.le.Tensor: operator.le,
    aten.gt.Scalar: operator.gt,
    aten.gt.Tensor: operator.gt,
    aten.ge.Scalar: operator.ge,
    aten.ge.Tensor: operator.ge,
    aten.logical_not.default: jnp.logical_not,
    aten.logical_and.default: jnp.logical_and,
    aten.logical_or.default: jnp.logical_or,
    aten.bitwise_and.Tensor: jnp.logical_and,
    aten.bitwise_or.Tensor: jnp.logical_or,
    aten.bitwise_not.default: jnp.logical_not,
    aten.isnan.default: jnp.isnan,
    aten.sum.default: lambda x, dtype=None: jnp.sum(x, dtype=_dtype(dtype)),
    aten.sum.dim_IntList: _sum,
    aten.mean.dim: lambda x, dims, keepdim=False, dtype=None: jnp.mean(
        x, axis=tuple(dims), keepdims=keepdim
    ),
    aten.var.correction: _var,
    aten.prod.default: jnp.prod,
    aten.amax.default: _amax,
    aten.max.dim: _max_dim,
    aten.max.default: jnp.max,
    aten.argmax.default: lambda x, dim=None, keepdim=False: jnp.argmax(
        x, axis=dim, keepdims=keepdim
    ),
    aten.cumsum.default: _cum(jnp.cumsum),
    aten.cumprod.default: _cum(jnp.cumprod),
    aten.mm.default: jnp.matmul,
    aten.bmm.default: jnp.matmul,
    aten.mv.default: jnp.matmul,
    aten.matmul.default: jnp.matmul,
    aten.addmm.default: lambda c, a, b, beta=1, alpha=1: beta * c + alpha * (a @ b),
    aten.dot.default: jnp.dot,
    aten.view.default: _view,
    aten.reshape.default: _view,
    aten._unsafe_view.default: _view,
    aten.expand.default: _expand,
    aten.permute.default: lambda x, dims: jnp.transpose(x, tuple(dims)),
    aten.t.default: lambda x: x.T,
    aten.transpose.int: lambda x, a, b: jnp.swapaxes(x, a, b),
    aten.unsqueeze.default: jnp.expand_dims,
    aten.squeeze.dim: lambda x, d: jnp.squeeze(x, d) if x.shape[d] == 1 else x,
    aten.squeeze.dims: lambda x, ds: jnp.squeeze(x, tuple(d for d in ds if x.shape[d] == 1)),
    aten.squeeze.default: jnp.squeeze,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.index.Tensor: _index,
    aten.index_put.default: _index_put,
    aten.index_select.default: lambda x, dim, idx: jnp.take(x, idx, axis=dim),
    aten.gather.default: lambda x, dim, idx: jnp.take_along_axis(x, idx, axis=dim),
    aten.scatter.src: _scatter,
    aten.scatter.value: lambda x, dim, index, v: _scatter(x, dim, index, jnp.full(index.shape, v)),
    aten.cat.default: lambda xs, dim=0: jnp.concatenate(xs, axis=dim),
    aten.stack.default: lambda xs, dim=0: jnp.stack(xs, axis=dim),
    aten.split.Tensor: _split,
    aten.unbind.int: _unbind,
    aten.flip.default: lambda x, dims: jnp.flip(x, tuple(dims)),
    aten.diagonal.default: _diagonal,
    aten.diagonal_copy.default: _diagonal,
    aten.constant_pad_nd.default: _pad,
    aten.clone.default: lambda x, **unused: x,
    aten.alias.default: lambda x: x,
    aten.lift_fresh_copy.default: lambda x: x,
    aten.lift_fresh.default: lambda x: x,
    aten.detach.default: jax.lax.stop_gradient,
    aten._to_copy.default: _convert,
    aten.full.default: _full,
    aten.full_like.default: lambda x, v, dtype=None, **unused: jnp.full_like(
        x, v, dtype=_dtype(dtype)
    ),
    aten.zeros.default: lambda size, dtype=None, **unused: jnp.zeros(
        tuple(size), _dtype(dtype) or jnp.float64
    ),
    aten.zeros_like.default: lambda x, dtype=None, **unused: jnp.zeros_like(x, _dtype(dtype)),
    aten.ones_like.default: lambda x, dtype=None, **unused: jnp.ones_like(x, _dtype(dtype)),
    aten.new_zeros.default: lambda x, size, dtype=None, **unused: jnp.zeros(
        tuple(size), _dtype(dtype) or x.dtype
    ),
    aten.new_ones.default: lambda x, size, dtype=None, **unused: jnp.ones(
        tuple(size), _dtype(dtype) or x.dtype
    ),
    aten.new_full.default: lambda x, size, v, dtype=None, **unused: jnp.full(
        tuple(size), v, _dtype(dtype) or x.dtype
    ),
    aten.scalar_tensor.default: lambda v, dtype=None, **unused: jnp.asarray(
        v, _dtype(dtype) or jnp.float64
    ),
    aten.arange.default: _arange,
    aten.arange.start: _arange,
    aten.arange.start_step: _arange,
    aten.eye.default: lambda n, dtype=None, **unused: jnp.eye(n, dtype=_dtype(dtype)),
    aten.linalg_cholesky_ex.default: _cholesky_ex,
    aten.linalg_solve_triangular.default: _solve_triangular,
    aten._linalg_check_errors.default: lambda *a, **k: None,
    aten.masked_fill.Scalar: lambda x, m, v: jnp.where(m, v, x),
    aten.masked_fill.Tensor: lambda x, m, v: jnp.where(m, v, x),
    aten.copy.default: lambda dst, src, non_blocking=False: jnp.broadcast_to(src, dst.shape).astype(
        dst.dtype
    ),
    operator.getitem: operator.getitem,
}


def record(
    fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor
) -> torch.fx.GraphModule:
    """``fn`` as an FX graph of ATen operations, simplified as the project's sampler's.

    :func:`vimodels.compile.record.record` (else ``make_fx``), then
    :func:`vimodels.compile.record.simplify_graph`: whatever does not depend
    on the input (masks, data, in-place writes on fresh tensors) is folded
    into constants.
    """
    from pyro.util import ignore_jit_warnings

    from vimodels.compile.record import record as record_aten
    from vimodels.compile.record import simplify_graph

    with warnings.catch_warnings(), ignore_jit_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = record_aten(fn, example)
        except Exception:  # the project's recorder failed: make_fx
            gm = make_fx(fn)(example)
        return simplify_graph(gm, example)


def to_jax(graph: torch.fx.GraphModule) -> Callable:
    """A JAX function replaying ``graph`` (one tensor in, one tensor out)."""
    consts: dict[str, Any] = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            t = getattr(graph, node.target)
            consts[node.name] = jnp.asarray(t.detach().numpy())
    missing = {
        str(n.target)
        for n in graph.graph.nodes
        if n.op == "call_function" and n.target not in OPS and n.target not in INPLACE
    }
    if missing:
        raise NotImplementedError(f"ATen operations without a JAX twin: {sorted(missing)}")
    nodes = list(graph.graph.nodes)

    def run(x):
        env: dict[str, Any] = dict(consts)

        def val(a):
            if isinstance(a, torch.fx.Node):
                return env[a.name]
            if isinstance(a, (list, tuple)):
                return type(a)(val(b) for b in a)
            if isinstance(a, torch.dtype):
                return a
            if isinstance(a, torch.device | torch.layout | torch.memory_format):
                return None
            return a

        out = None
        for node in nodes:
            if node.op == "placeholder":
                env[node.name] = x
            elif node.op == "call_function":
                args = [val(a) for a in node.args]
                kwargs = {
                    k: val(v)
                    for k, v in node.kwargs.items()
                    if k not in ("device", "layout", "pin_memory", "memory_format")
                }
                if node.target in INPLACE:
                    _inplace(node, args, env)
                else:
                    env[node.name] = OPS[node.target](*args, **kwargs)
            elif node.op == "output":
                out = val(node.args[0])
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out

    return run


# in-place operations: on a fresh tensor, or on a select/slice view of one (what Pyro's
# models do: ``first = zeros_like(y); first[0] = 1.0``), replayed as a functional update
INPLACE = {
    aten.copy_.default: lambda dst, src, non_blocking=False: jnp.broadcast_to(
        src, dst.shape
    ).astype(dst.dtype),
    aten.masked_fill_.Scalar: lambda x, m, v: jnp.where(m, v, x),
    aten.masked_fill_.Tensor: lambda x, m, v: jnp.where(m, v, x),
    aten.clamp_.default: _clamp,
    aten.fill_.Scalar: lambda x, v: jnp.full_like(x, v),
}


def _inplace(node: torch.fx.Node, args: list, env: dict) -> None:
    target = node.args[0]
    new = INPLACE[node.target](*args)
    env[target.name] = new
    env[node.name] = new
    view = target
    while view.op == "call_function" and view.target in (aten.select.int, aten.slice.Tensor):
        base = view.args[0]
        b = env[base.name]
        idx = [slice(None)] * b.ndim
        if view.target is aten.select.int:
            idx[view.args[1]] = view.args[2]
        else:
            dim, start, end = (list(view.args[1:4]) + [None, None, None])[:3]
            step = view.args[4] if len(view.args) > 4 else 1
            idx[dim or 0] = slice(start, end, step)
        new = b.at[tuple(idx)].set(new)
        env[base.name] = new
        view = base


def jax_potential(potential: Any, example: np.ndarray) -> Callable:
    """The :class:`diagnostics.nuts.kernel.FlatPotential`'s potential as a JAX function.

    Checked against torch (value and gradient) at ``example`` and one point
    beside it.
    """
    from diagnostics.nuts.kernel import _validation_off

    dtype = potential.dtype

    def fn(z: torch.Tensor) -> torch.Tensor:
        return potential.python_potential(z)

    with _validation_off():
        graph = record(fn, torch.as_tensor(example, dtype=dtype))
    jfn = to_jax(graph)
    value_and_grad = jax.jit(jax.value_and_grad(lambda z: jnp.sum(jfn(z))))
    for z in (np.asarray(example, float), np.asarray(example, float) + 0.1):
        u_j, g_j = value_and_grad(jnp.asarray(z))
        t = torch.tensor(z, dtype=dtype, requires_grad=True)
        with _validation_off():
            u_t = potential.python_potential(t)
        (g_t,) = torch.autograd.grad(u_t, t)
        scale = 1.0 + abs(float(u_t))
        if not math.isclose(float(u_j), float(u_t), rel_tol=1e-4, abs_tol=1e-4 * scale):
            raise RuntimeError(f"JAX potential {float(u_j)} != torch {float(u_t)}")
        if not np.allclose(np.asarray(g_j), g_t.numpy(), rtol=1e-3, atol=1e-3 * scale):
            raise RuntimeError("JAX gradient differs from torch's")
    return lambda z: jnp.sum(jfn(z))
