"""Recording and simplification of a graph of ATen operations before TorchScript freezes it.

:func:`record` (or ``make_fx``) captures every operation that autograd and
Pyro dispatched while the potential and its gradient were computed at one
point, and ``vmap`` adds its own bookkeeping on top: detaches and fresh copies
of constants, the seed of the gradient (``ones_like``), sums of
``zeros_like``, ``mul(x, 1)``, ``add(x, 0)``, ``pow(x, 1.0)``, views and
expands to the shape a tensor already has, and one ``slice_backward`` plus an
``add`` per site to assemble the flat gradient. On the catalog's small models
each such operation costs about as much as a useful one (the dispatch, not the
arithmetic), so :func:`simplify_graph` removes them:

- in-place operations on fresh tensors (not views, with no view of them taken
  before) become out-of-place (a graph with any other mutation is left as it is);
- every operation whose inputs do not depend on the graph's input (or only
  through their static shape: ``ones_like`` and kin) is evaluated once and
  becomes a constant;
- identities are dropped: ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``,
  ``x ** 1``, ``-(-x)``, detaches, copies to the same dtype, views and
  expands to the same shape, a ``masked_fill`` whose mask is all false, sums
  over dimensions of size one; chains of reshaping views collapse to one view;
- negations and scalings by powers of two move into constants
  (``-y / c == y / (-c)``, ``y - (-x) == y + x``, ``c * (2 * x) == (2c) * x``);
- ``slice_backward`` pieces added together into the flat gradient become one
  ``cat``;
- common subexpressions are merged and dead code removed.

Every rewrite keeps the value of each element bit for bit (up to the sign of
a zero); the callers compare the simplified graph with the traced one, and
check it against autograd at a second point, as they check the traced one.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from vimodels.compile.units import private_units

try:  # generates the module's Python code when it is first run, not when it is built
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - a torch without it: code generated at once
    _LazyGraphModule = torch.fx.GraphModule

aten = torch.ops.aten

# operations whose output depends on their tensor input only through its static shape
_SHAPE_ONLY = {
    aten.ones_like.default,
    aten.zeros_like.default,
    aten.full_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.fill.Scalar,  # what an in-place fill_ becomes
}
# uninitialized memory: never folded
_UNINITIALIZED = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.empty_strided.default,
    aten.new_empty_strided.default,
}
# views that only reshape: on a contiguous input, a contiguous output in the same order
_RESHAPES = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
}
# the identity, whatever their arguments (when shape, dtype and strides agree)
_ALIASES = {
    aten.detach.default,
    aten.alias.default,
    aten.lift_fresh_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
}


class UnsupportedTrace(RuntimeError):
    """:func:`record` met something it does not record faithfully."""


class ValueRead(UnsupportedTrace):
    """The function reads a value that depends on its inputs into Python memory.

    ``.numpy()``, ``.tolist()``, ``np.asarray()`` read the memory directly, past
    torch's dispatch: whatever Python does with the value is decided at the
    example point only, and no other tracer sees it either (``make_fx`` with
    real tensors and ``torch.jit.trace`` would keep the example's branch
    everywhere): run the function eagerly. Reads through dispatch (``bool()``,
    ``.item()``) raise a plain :class:`UnsupportedTrace`: ``make_fx`` fails on
    those branches by itself and records error checks (``linalg.cholesky``'s).
    """


#: Tensor methods that read memory without going through dispatch.
_DIRECT_READS = ("numpy", "tolist")


def record(fn: Callable, *example: torch.Tensor) -> torch.fx.GraphModule:
    """The ATen operations ``fn(*example)`` runs, as an FX graph (autograd's backward included).

    What ``make_fx`` does with real tensors, without its machinery: a
    :class:`~torch.utils._python_dispatch.TorchDispatchMode` runs each
    operation as it comes and appends it to the graph; tensors that no
    recorded operation made (data, constants) become attributes of the
    module. ``make_fx`` imports ``torch._dynamo`` on its first call, about as
    long as a short NUTS run on a small model; this does not. Python
    branches on values are frozen as ``make_fx`` freezes them (the callers
    check the graph at a second point).

    Parameters
    ----------
    fn : callable
        Tensors -> tensor or tuple of tensors.
    *example : Tensor
        The inputs to run it at (the graph's placeholders).

    Returns
    -------
    torch.fx.GraphModule
        Its Python code is generated when it is first run (or its ``code`` read),
        not here: :func:`simplify_graph` reads only the graph, and generating the
        code of a graph nobody runs cost as much as a pass of the simplification.

    Raises
    ------
    UnsupportedTrace
        When an operation writes into a constant, or an output is not a tensor.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    root = torch.nn.Module()
    graph = torch.fx.Graph()
    nodes: dict[int, torch.fx.Node] = {}
    keep: list[torch.Tensor] = []  # alive, so that no id is reused while recording
    constants: set[torch.fx.Node] = set()
    dynamic: set[torch.fx.Node] = set()  # the nodes that depend on the inputs

    def bind(t: torch.Tensor, node: torch.fx.Node) -> None:
        nodes[id(t)] = node
        keep.append(t)

    def node_of(t: torch.Tensor) -> torch.fx.Node:
        node = nodes.get(id(t))
        if node is None:
            name = f"_constant_{len(constants)}"
            root.register_buffer(name, t.detach().clone())
            node = graph.get_attr(name)
            constants.add(node)
            bind(t, node)
        return node

    class Recorder(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # torch wraps a mode's handler in dynamo.disable unless told otherwise, and
            # that imports torch._dynamo on the first call; nothing compiles this one
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)

            inputs: list[torch.fx.Node] = []
            node_args = _tensors_to_nodes(args, node_of, inputs)
            node_kwargs = _tensors_to_nodes(kwargs, node_of, inputs)
            for i, name in _written(func):
                value = node_args[i] if i < len(node_args) else node_kwargs.get(name)
                if isinstance(value, torch.fx.Node) and value in constants:
                    raise UnsupportedTrace(f"{func} writes into a constant")
            varies = any(n in dynamic for n in inputs)
            if varies and not _all_tensors(out):
                # a value read into Python (bool(), item()): what follows was decided
                # at this point only
                # (an error check such as linalg.cholesky's reads its info this way: make_fx
                # may still record it, as it fails on a value-dependent branch itself)
                raise UnsupportedTrace(f"{func} reads a value that depends on the input")
            node = graph.call_function(func, node_args, node_kwargs)
            if varies:
                dynamic.add(node)
            if isinstance(out, torch.Tensor):
                bind(out, node)
            elif isinstance(out, (tuple, list)):
                for i, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        item = graph.call_function(operator.getitem, (node, i))
                        bind(o, item)
                        if varies:
                            dynamic.add(item)
            return out

    for i, t in enumerate(example):
        bind(t, graph.placeholder(f"arg{i}"))
        dynamic.add(nodes[id(t)])
    originals = {name: getattr(torch.Tensor, name) for name in _DIRECT_READS}
    own = {name for name in _DIRECT_READS if name in vars(torch.Tensor)}  # else inherited

    def guarded(name: str) -> Callable:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            node = nodes.get(id(self))
            if node is not None and node in dynamic:
                raise ValueRead(f"Tensor.{name}() reads a value that depends on the input")
            return original(self, *args, **kwargs)

        return read

    try:
        for name in _DIRECT_READS:
            setattr(torch.Tensor, name, guarded(name))
        with Recorder():
            result = fn(*example)
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)
    outputs = result if isinstance(result, tuple) else (result,)
    if not all(isinstance(t, torch.Tensor) for t in outputs):
        raise UnsupportedTrace("the function returns something other than tensors")
    out_nodes = tuple(node_of(t) for t in outputs)
    graph.output(out_nodes if isinstance(result, tuple) else out_nodes[0])
    return _LazyGraphModule(root, graph)


def _tensors_to_nodes(x: Any, node_of: Callable, found: list) -> Any:
    """``x`` with each tensor (in tuples, lists and dicts) replaced by its node, kept in ``found``.

    What ``torch.utils._pytree.tree_map`` gives on an operation's arguments, at a
    fraction of its cost.
    """
    if isinstance(x, torch.Tensor):
        node = node_of(x)
        found.append(node)
        return node
    kind = type(x)
    if kind is tuple or kind is list:
        return kind(_tensors_to_nodes(v, node_of, found) for v in x)
    if kind is torch.Size:  # pytree gives a plain tuple
        return tuple(x)
    if kind is dict:
        return {k: _tensors_to_nodes(v, node_of, found) for k, v in x.items()}
    return x


# operator -> (index, name) of the arguments it writes into
_WRITES: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written(func: Any) -> tuple[tuple[int, str], ...]:
    written = _WRITES.get(func)
    if written is None:
        schema = getattr(func, "_schema", None)
        arguments = schema.arguments if schema is not None else ()
        written = tuple(
            (i, a.name)
            for i, a in enumerate(arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
        _WRITES[func] = written
    return written


def _all_tensors(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    if isinstance(out, (tuple, list)):
        return all(isinstance(o, torch.Tensor) for o in out)
    return False


def reads_value(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph read a tensor's value into Python (a branch the graph froze)."""
    return any("_local_scalar_dense" in str(n.target) for n in gm.graph.nodes)


def has_random(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph draws random numbers (not a function of its inputs alone)."""
    return any(n.op == "call_function" and _is_random(n) for n in gm.graph.nodes)


def freeze(gm: torch.fx.GraphModule, *example: torch.Tensor) -> Callable:
    """Frozen TorchScript of ``gm`` traced at ``example``, in a compilation unit of its own.

    The unit is freed with the returned module (torch's process-wide one is never
    emptied: :mod:`vimodels.compile.units`).
    """
    _compiled(gm)
    with torch.no_grad(), private_units():
        return torch.jit.freeze(torch.jit.trace(gm, example, check_trace=False).eval())


def _compiled(gm: torch.fx.GraphModule) -> None:
    """Generate the Python code of a lazily compiled module now (tracing runs it)."""
    real = getattr(gm, "real_recompile", None)
    if real is not None:
        real()


def count_ops(gm: torch.fx.GraphModule) -> int:
    """Number of operations (``call_function`` nodes) in a graph."""
    return _count_ops(gm.graph)


def _count_ops(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function")


def simplify_graph(gm: torch.fx.GraphModule, *example: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of ``gm`` (an FX graph of ATen operations) with fewer operations.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        As ``make_fx`` returns it, with static shapes.
    *example : Tensor
        Inputs to evaluate it at (shapes, dtypes and constants come from there).

    Returns
    -------
    torch.fx.GraphModule
        The simplified graph; ``gm`` itself when it mutates tensors in a way the
        pass does not undo, or when the pass would not remove anything.
    """
    # the passes work on a copy of the graph and a plain module holding its constants;
    # the Python code is generated once, for the result (the passes run no code)
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    if any(n.op == "call_module" for n in graph.nodes) or not _functionalize(graph):
        return gm
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op == "get_attr":
            _copy_attr(gm, root, node.target)
    values = _evaluate(graph, root, example)
    varying = _varying(graph)
    if any(_dynamic_shape(n, values, varying) for n in graph.nodes):
        return gm  # shapes seen at `example` may not hold elsewhere
    _fold_constants(graph, root, values)
    for _ in range(4):
        changed = _drop_identities(graph, values)
        changed |= _fold_signs(graph, root, values)
        changed |= _slices_to_cat(graph, root, values)
        changed |= _merge_common(graph)
        changed |= _dead_code(graph)
        if not changed:
            break
    graph.lint()
    if _count_ops(graph) >= count_ops(gm):
        return gm
    return torch.fx.GraphModule(root, graph)  # copies the attributes the graph still reads


# ----------------------------------------------------------------------------- helpers


def _varying(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes whose values depend on the graph's inputs."""
    out: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(i in out for i in _nodes_in((node.args, node.kwargs))):
            out.add(node)
    return out


def _dynamic_shape(node: torch.fx.Node, values: dict, varying: set[torch.fx.Node]) -> bool:
    """Whether the shape of ``node``'s output can change with the values of the inputs."""
    if node.op != "call_function" or node not in varying:
        return False
    if torch.Tag.dynamic_output_shape not in getattr(node.target, "tags", ()):
        return False
    if node.target is aten.index.Tensor:  # only boolean masks that vary select a varying number
        indices = node.args[1] if len(node.args) > 1 else []
        return any(
            isinstance(i, torch.fx.Node)
            and i in varying
            and isinstance(values.get(i), torch.Tensor)
            and values[i].dtype in (torch.bool, torch.uint8)
            for i in indices
        )
    return any(i in varying for i in _nodes_in((node.args, node.kwargs)))


def _schema(node: torch.fx.Node) -> Any:
    return getattr(node.target, "_schema", None)


def _mutates(node: torch.fx.Node) -> bool:
    schema = _schema(node)
    if schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _is_view(node: torch.fx.Node) -> bool:
    schema = _schema(node)
    if schema is None:
        return False
    return any(r.alias_info is not None for r in schema.returns)


def _functional_variant(node: torch.fx.Node) -> Callable | None:
    """``aten.foo.overload`` for an in-place ``aten.foo_.overload``."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return None
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    functional = getattr(aten, name[:-1], None)
    if functional is None:
        return None
    return getattr(functional, target._overloadname, None)


def _functionalize(graph: torch.fx.Graph) -> bool:
    """Make in-place operations on fresh tensors out-of-place; False if others remain.

    ``op_(a, ...)`` becomes ``op(a, ...)`` where ``a`` is the output of an
    operation that is not a view, and no view of ``a`` was taken before: the
    users of ``a`` after it then read the new node instead.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or not _mutates(node):
            continue
        functional = _functional_variant(node)
        target = node.args[0] if node.args else None
        schema = _schema(node)
        if (
            functional is None
            or not isinstance(target, torch.fx.Node)
            or target.op != "call_function"
            or _is_view(target)
            or _mutates(target)
            or schema is None
            or any(  # only the first argument is written to
                a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[1:]
            )
        ):
            return False
        later = []
        for user in target.users:
            if user is node:
                continue
            if order[user] < order[node]:
                if user.op != "call_function" or _is_view(user) or _mutates(user):
                    return False  # an alias that would see the change
            else:
                later.append(user)
        node.target = functional
        for user in later:
            user.replace_input_with(target, node)
    return True


def _copy_attr(source: torch.nn.Module, root: torch.nn.Module, target: str) -> None:
    """Put ``source``'s attribute ``target`` (dotted) on ``root`` as ``GraphModule`` copies it."""
    *prefix, field = target.split(".")
    for item in prefix:
        inner = getattr(source, item)
        mine = getattr(root, item, None)
        if mine is inner:
            return
        if mine is None:
            mine = torch.nn.Module()
            setattr(root, item, mine)
        source, root = inner, mine
    value = getattr(source, field)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        root.register_buffer(field, value)
    else:
        setattr(root, field, value)


def _fetch(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for item in target.split("."):
        value = getattr(value, item)
    return value


def _evaluate(graph: torch.fx.Graph, root: torch.nn.Module, example: tuple) -> dict:
    """The value of every node at ``example`` (what ``torch.fx.Interpreter`` computes)."""
    values: dict[torch.fx.Node, Any] = {}
    inputs = iter(example)
    get = values.__getitem__
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "placeholder":
                values[node] = next(inputs)
            elif node.op == "get_attr":
                values[node] = _fetch(root, node.target)
            elif node.op == "call_function":
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), get)
                values[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                (obj, *args), kwargs = torch.fx.node.map_arg((node.args, node.kwargs), get)
                values[node] = getattr(obj, node.target)(*args, **kwargs)
            elif node.op == "output":
                values[node] = torch.fx.node.map_arg(node.args[0], get)
            else:
                raise UnsupportedTrace(f"cannot evaluate a {node.op} node")
    return values


def _nodes_in(args: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, found.append)
    return found


def _is_random(node: torch.fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _fold_constants(graph: torch.fx.Graph, root: torch.nn.Module, values: dict) -> None:
    """Replace each operation that does not depend on the inputs by a constant attribute."""
    const: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op == "call_function":
            if node.target in _UNINITIALIZED or _is_random(node) or _mutates(node):
                continue
            if node.target in _SHAPE_ONLY:
                inputs = _nodes_in((node.args[1:], node.kwargs))
            else:
                inputs = _nodes_in((node.args, node.kwargs))
            if all(i in const for i in inputs):
                const.add(node)
    count = 0
    for node in list(graph.nodes):
        if node not in const or node.op == "get_attr":
            continue
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            continue
        if all(u in const for u in node.users):
            continue
        name = f"_folded_{count}"
        count += 1
        while hasattr(root, name):
            name += "_"
        root.register_buffer(name, value.detach())
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta = dict(node.meta)
        values[attr] = value
        node.replace_all_uses_with(attr)
        const.add(attr)


def _same_layout(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.layout == b.layout
        and a.stride() == b.stride()
    )


def _constant_value(arg: Any, values: dict) -> Any:
    """The value of a Python number or of a constant tensor attribute; None otherwise."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return values.get(arg)
    return None


def _is_all(arg: Any, number: float, values: dict) -> bool:
    v = _constant_value(arg, values)
    if v is None:
        return False
    if isinstance(v, torch.Tensor):
        if v.numel() == 0 or v.is_complex() or v.dtype == torch.bool:
            return False
        return bool((v == number).all())
    return v == number


def _identity_of(node: torch.fx.Node, values: dict, layout: bool = True) -> torch.fx.Node | None:
    """The input that ``node`` merely passes on, if any.

    With ``layout=False`` the input may have other strides than ``node``'s
    output (``pow(x, 1.0)`` of a strided slice gives a contiguous copy): the
    caller then checks that the users do not see the difference.
    """
    target = node.target
    args = node.args
    out = values.get(node)
    candidate: Any = None
    if target in _ALIASES:
        kwargs = dict(node.kwargs)
        if target is aten.clone.default or target is aten.contiguous.default:
            fmt = kwargs.pop("memory_format", None)
            if fmt not in (None, torch.preserve_format, torch.contiguous_format):
                return None
        candidate = args[0]
    elif target is aten._to_copy.default:
        kwargs = dict(node.kwargs)
        kwargs.pop("dtype", None)
        kwargs.pop("device", None)
        kwargs.pop("layout", None)
        kwargs.pop("memory_format", None)
        if kwargs.pop("non_blocking", False) or kwargs.pop("pin_memory", None) or kwargs:
            return None
        candidate = args[0]
    elif target in (aten.mul.Tensor, aten.mul.Scalar):
        if _is_all(args[1], 1, values):
            candidate = args[0]
        elif _is_all(args[0], 1, values):
            candidate = args[1]
    elif target in (aten.div.Tensor, aten.div.Scalar):
        if not node.kwargs.get("rounding_mode") and _is_all(args[1], 1, values):
            candidate = args[0]
    elif target in (aten.add.Tensor, aten.add.Scalar):
        if _is_all(args[1], 0, values):
            candidate = args[0]
        elif _is_all(args[0], 0, values) and _alpha(node) == 1:
            candidate = args[1]
    elif target in (aten.sub.Tensor, aten.sub.Scalar):
        if _is_all(args[1], 0, values):
            candidate = args[0]
    elif target is aten.pow.Tensor_Scalar:
        if _is_all(args[1], 1, values):
            candidate = args[0]
    elif target is aten.neg.default:
        inner = args[0]
        if isinstance(inner, torch.fx.Node) and inner.target is aten.neg.default:
            candidate = inner.args[0]
    elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        mask = _constant_value(args[1], values)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and not bool(mask.any()):
            candidate = args[0]
    if not isinstance(candidate, torch.fx.Node) or candidate.op == "output":
        return None
    if layout and not _same_layout(values.get(candidate), out):
        return None
    seen = values.get(candidate)
    if not isinstance(seen, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if seen.shape != out.shape or seen.dtype != out.dtype or seen.device != out.device:
        return None
    return candidate


def _users_blind_to_layout(node: torch.fx.Node, same: torch.fx.Node, values: dict) -> bool:
    """Whether every user of ``node`` gives the same bits and layout reading ``same`` instead.

    Only pointwise operations qualify (their values do not depend on their
    inputs' strides); each is re-run at the example to check its output's
    layout and bits.
    """
    for user in node.users:
        if user.op != "call_function" or torch.Tag.pointwise not in getattr(
            user.target, "tags", ()
        ):
            return False
        args, kwargs = torch.fx.node.map_arg(
            (user.args, user.kwargs), lambda n: values[same] if n is node else values[n]
        )
        with torch.no_grad():
            value = user.target(*args, **kwargs)
        old = values.get(user)
        if not _same_layout(value, old) or not torch.equal(value, old):
            return False
    return True


def _alpha(node: torch.fx.Node) -> Any:
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("alpha", 1)


def _contiguous(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_contiguous()


def _drop_identities(graph: torch.fx.Graph, values: dict) -> bool:
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        out = values.get(node)
        # a sum over dimensions of size one only reshapes
        if (
            node.target in (aten.sum.dim_IntList, aten.sum.default)
            and isinstance(out, torch.Tensor)
            and node.kwargs.get("dtype") is None
            and _contiguous(values.get(node.args[0]))
            and values[node.args[0]].dtype == out.dtype
            and values[node.args[0]].numel() == out.numel()
        ):
            with graph.inserting_before(node):
                view = graph.call_function(aten.view.default, (node.args[0], list(out.shape)))
            view.meta = dict(node.meta)
            values[view] = values[node.args[0]].view(out.shape)
            node.replace_all_uses_with(view)
            changed = True
            continue
        # a reshape of a reshape of a contiguous tensor: one view of the first input
        if node.target in _RESHAPES and _contiguous(out):
            source = node.args[0]
            base = source
            while (
                isinstance(base, torch.fx.Node)
                and base.op == "call_function"
                and base.target in _RESHAPES
                and _contiguous(values.get(base.args[0]))
            ):
                base = base.args[0]
            if base is not source and isinstance(base, torch.fx.Node):
                with graph.inserting_before(node):
                    view = graph.call_function(aten.view.default, (base, list(out.shape)))
                view.meta = dict(node.meta)
                values[view] = values[base].view(out.shape)
                node.replace_all_uses_with(view)
                changed = True
                continue
        same = _identity_of(node, values)
        if same is None:
            same = _identity_of(node, values, layout=False)
            if same is not None and not _users_blind_to_layout(node, same, values):
                same = None
        if same is not None:
            node.replace_all_uses_with(same)
            changed = True
    return changed


def _power_of_two(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x == 0 or not math.isfinite(x):
        return False
    return abs(math.frexp(x)[0]) == 0.5


def _fold_signs(graph: torch.fx.Graph, root: torch.nn.Module, values: dict) -> bool:
    """Negations and doublings moved into constants, where IEEE rounding gives the same bits.

    Round-to-nearest is symmetric and scaling by a power of two is exact, so
    ``-y / c == y / (-c)``, ``-(c * y) == (-c) * y``, ``y - (-x) == y + x``,
    ``c * (2 * x) == (2 * c) * x`` (short of overflow), and
    ``-masked_fill(c, m, v) == masked_fill(-c, m, -v)``.
    """
    changed = False

    def const(arg: Any) -> bool:
        return _constant_value(arg, values) is not None

    def constant(value: Any, like: torch.fx.Node) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        name = f"_signed_{len(values)}"
        while hasattr(root, name):
            name += "_"
        root.register_buffer(name, value)
        with graph.inserting_before(like):
            node = graph.get_attr(name)
        values[node] = value
        return node

    def single(arg: Any, target: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.target is target and len(arg.users) == 1

    def replace(node: torch.fx.Node, target: Any, args: tuple) -> None:
        nonlocal changed
        args_values = torch.fx.node.map_arg(args, lambda n: values[n])
        with torch.no_grad():
            value = target(*args_values)
        if not _same_layout(value, values.get(node)):
            return
        with graph.inserting_before(node):
            new = graph.call_function(target, args)
        new.meta = dict(node.meta)
        values[new] = value
        node.replace_all_uses_with(new)
        changed = True

    neg = aten.neg.default
    muls = (aten.mul.Tensor, aten.mul.Scalar)
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users or node.kwargs:
            continue
        t, args = node.target, node.args
        if t in (aten.div.Tensor, aten.div.Scalar) and single(args[0], neg) and const(args[1]):
            c = _constant_value(args[1], values)
            replace(node, t, (args[0].args[0], constant(-c, node)))
        elif t in muls and single(args[0], neg) and const(args[1]):
            c = _constant_value(args[1], values)
            replace(node, t, (args[0].args[0], constant(-c, node)))
        elif t is aten.mul.Tensor and const(args[0]) and single(args[1], neg):
            c = _constant_value(args[0], values)
            replace(node, t, (constant(-c, node), args[1].args[0]))
        elif t is neg and isinstance(args[0], torch.fx.Node) and len(args[0].users) == 1:
            inner = args[0]
            a = inner.args
            if inner.kwargs or inner.op != "call_function":
                continue
            if inner.target in muls and const(a[1]):
                c = _constant_value(a[1], values)
                replace(node, inner.target, (a[0], constant(-c, node)))
            elif inner.target is aten.mul.Tensor and const(a[0]):
                c = _constant_value(a[0], values)
                replace(node, inner.target, (constant(-c, node), a[1]))
            elif inner.target in (aten.div.Tensor, aten.div.Scalar) and const(a[1]):
                c = _constant_value(a[1], values)
                replace(node, inner.target, (a[0], constant(-c, node)))
            elif (
                inner.target is aten.masked_fill.Scalar
                and const(a[0])
                and isinstance(a[2], (int, float))
                and not isinstance(a[2], bool)
            ):
                c = _constant_value(a[0], values)
                replace(node, inner.target, (constant(-c, node), a[1], -a[2]))
        elif t is aten.sub.Tensor and len(args) == 2 and _is_neg(args[1]):
            replace(node, aten.add.Tensor, (args[0], args[1].args[0]))
        elif t is aten.add.Tensor and len(args) == 2 and _is_neg(args[1]):
            replace(node, aten.sub.Tensor, (args[0], args[1].args[0]))
        elif t is aten.add.Tensor and len(args) == 2 and _is_neg(args[0]):
            replace(node, aten.sub.Tensor, (args[1], args[0].args[0]))
        elif t is aten.mul.Tensor and len(args) == 2:
            for i in (0, 1):
                c, x = args[i], args[1 - i]
                if (
                    const(c)
                    and single(x, aten.mul.Scalar)
                    and not x.kwargs
                    and _power_of_two(x.args[1])
                ):
                    scaled = _constant_value(c, values) * x.args[1]
                    replace(node, t, (constant(scaled, node), x.args[0]))
                    break
    return changed


def _is_neg(arg: Any) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.target is aten.neg.default


def _slices_to_cat(graph: torch.fx.Graph, root: torch.nn.Module, values: dict) -> bool:
    """``slice_backward`` pieces summed into one tensor -> one ``cat`` (gaps filled with zeros)."""
    adds = (aten.add.Tensor,)

    def leaves(node: torch.fx.Node, root: bool) -> list[torch.fx.Node] | None:
        if node.op != "call_function":
            return None
        if node.target is aten.slice_backward.default:
            return [node] if root or len(node.users) == 1 else None
        if node.target in adds and (root or len(node.users) == 1):
            if _alpha(node) != 1 or len(node.args) != 2:
                return None
            a, b = node.args
            if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
                return None
            la, lb = leaves(a, False), leaves(b, False)
            if la is None or lb is None:
                return None
            return la + lb
        return None

    changed = False
    done: set[torch.fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if node.target not in adds or not node.users or node in done:
            continue
        pieces = leaves(node, True)
        if not pieces or len(pieces) < 2:
            continue
        out = values.get(node)
        first = pieces[0].args
        sizes, dim = list(first[1]), first[2]
        if not isinstance(out, torch.Tensor) or list(out.shape) != sizes:
            continue
        dim = dim % len(sizes)
        spans = []
        for p in pieces:
            _, p_sizes, p_dim, start, end, step = p.args
            grad = values.get(p.args[0])
            if (
                list(p_sizes) != sizes
                or p_dim % len(sizes) != dim
                or step != 1
                or not isinstance(grad, torch.Tensor)
                or grad.dtype != out.dtype
            ):
                spans = None
                break
            start, end = _clip(start, sizes[dim]), _clip(end, sizes[dim])
            if grad.shape[dim] != end - start:
                spans = None
                break
            spans.append((start, end, p.args[0]))
        if not spans:
            continue
        spans.sort(key=lambda s: s[0])
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            continue  # overlapping pieces add up
        parts: list[torch.fx.Node] = []
        at = 0
        for start, end, grad in spans + [(sizes[dim], sizes[dim], None)]:
            if start > at:
                shape = list(sizes)
                shape[dim] = start - at
                name = f"_zeros_{len(values)}"
                while hasattr(root, name):
                    name += "_"
                root.register_buffer(name, torch.zeros(shape, dtype=out.dtype, device=out.device))
                with graph.inserting_before(node):
                    zeros = graph.get_attr(name)
                values[zeros] = getattr(root, name)
                parts.append(zeros)
            if grad is not None:
                parts.append(grad)
            at = end
        with graph.inserting_before(node):
            cat = graph.call_function(aten.cat.default, (parts, dim))
        cat.meta = dict(node.meta)
        values[cat] = torch.cat([values[p] for p in parts], dim)
        if not _same_layout(values[cat], out):
            continue  # left for dead code removal
        node.replace_all_uses_with(cat)
        done.update(_tree(node))
        changed = True
    return changed


def _tree(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node`` and the adds below it (the nodes a ``cat`` replaced)."""
    out = [node]
    if node.target is aten.add.Tensor:
        for a in node.args[:2]:
            if isinstance(a, torch.fx.Node):
                out += _tree(a)
    return out


def _clip(index: int, size: int) -> int:
    if index < 0:
        index += size
    return max(0, min(index, size))


def _key(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return ("node", arg.name)
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__,) + tuple(_key(a) for a in arg)
    if isinstance(arg, dict):
        return ("dict",) + tuple(sorted((k, _key(v)) for k, v in arg.items()))
    if isinstance(arg, float):
        return ("float", repr(arg))
    if isinstance(arg, (int, bool, str, type(None))):
        return (type(arg).__name__, arg)
    return (type(arg).__name__, repr(arg))


def _merge_common(graph: torch.fx.Graph) -> bool:
    seen: dict[Any, torch.fx.Node] = {}
    changed = False
    for node in list(graph.nodes):
        if node.op == "get_attr":
            key = ("get_attr", node.target)
        elif node.op == "call_function" and not _is_random(node) and not _mutates(node):
            if node.target is operator.getitem:
                key = ("getitem", _key(node.args))
            else:
                key = (str(node.target), _key(node.args), _key(node.kwargs))
        else:
            continue
        other = seen.get(key)
        if other is None:
            seen[key] = node
        elif node.users:
            node.replace_all_uses_with(other)
            changed = True
    return changed


def _dead_code(graph: torch.fx.Graph) -> bool:
    changed = False
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users and not _mutates(node):
            graph.erase_node(node)
            changed = True
    return changed
