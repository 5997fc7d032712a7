"""What a model function computes, as a hash: the cache key's model part.

A model's source text does not say what it computes: a model made by a
factory (``make_model(loc)``) has the same source for every ``loc``, and a
model reading a module-level constant has the same source whatever the
constant's value. :func:`fingerprint` hashes what produced the function
instead:

- its code object (bytecode, constants, names; nested code objects
  recursively; file names and line numbers left out, so moving code around
  keeps the key);
- the contents of its closure cells and its default arguments;
- the values of the globals its code reads (numbers, strings, containers,
  tensors and arrays by content, functions of the project or the user by their
  own fingerprint, library functions, classes and modules by name: the library
  versions are part of the cache key);
- for ``functools.partial`` objects and bound methods, the wrapped function
  and the bound values;
- every layer of a decorated function (each ``functools.wraps`` wrapper's code,
  closure and defaults, then the function it wraps);
- the attributes of the user's classes (and their bases), of the user's modules
  read through attribute chains (``pkg.sub.CONSTANT``, ``mod.Config.X``), and of
  ``nn.Module`` objects: parameters, all buffers, hooks, plain attributes, and
  submodules likewise.

A value it cannot hash faithfully (an arbitrary object) raises
:class:`Unfingerprintable`; the caller must then not cache, rather than risk
returning another model's draws.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.infer.reparam.reparam import Reparam
from pyro.poutine.messenger import Messenger

from vimodels.data import RowArray

_MAX_DEPTH = 12
_MAX_ITEMS = 10_000
_MAX_DATA_ITEMS = 10_000_000  # data: long lists of numbers are still hashed by content
_CHUNK_BYTES = 1 << 26  # memory-mapped and row-read arrays: hashed 64 MiB of rows at a time
_LIBRARY_ROOTS = tuple(
    str(Path(p).resolve())
    for p in {
        sysconfig.get_paths().get(k)
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
        if sysconfig.get_paths().get(k)
    }
)
_LIBRARY_PACKAGES = frozenset(
    {"torch", "pyro", "numpy", "scipy", "pandas", "math", "builtins", "functools", "operator"}
)
# this project's packages: always hashed by content, wherever they are installed
_FIRST_PARTY = frozenset({"vimodels", "diagnostics", "guides"})


# library objects hashed by their class and attributes (plain values, functions: anything
# else in them is refused): Pyro's effect handlers and reparameterizers, torch's grad modes
_STATE_CLASSES = (Messenger, Reparam)
_STATE_MODULES = frozenset({"torch.autograd.grad_mode"})
# what every nn.Module holds (hooks apart, hashed when set): not the user's attributes
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def _class_internal(name: str, member: Any) -> bool:
    """Class members that are Python's bookkeeping, not values the model reads."""
    if name.startswith("__") and name.endswith("__"):
        return True
    return name.startswith("_abc_")  # abc's registry


class Unfingerprintable(Exception):
    """A value the model depends on that cannot be hashed faithfully (the message says which)."""


def fingerprint(fn: Callable) -> str:
    """SHA-256 hex digest of what ``fn`` computes (code, closure, defaults, globals read).

    Raises
    ------
    Unfingerprintable
        When ``fn`` depends on a value that cannot be hashed faithfully.
    """
    h = hashlib.sha256()
    _Hasher(h).value(fn, "model", 0)
    return h.hexdigest()


def data_fingerprint(data: Any) -> str:
    """SHA-256 hex digest of a data set's content (the cache key's data part).

    Every value by content, recursively through dicts, lists and tuples:
    tensors and arrays by dtype, shape and bytes (memory-mapped arrays and
    :class:`~vimodels.data.RowArray` read in chunks of rows, never whole),
    numbers and strings by type and exact ``repr``.

    Raises
    ------
    Unfingerprintable
        When a value cannot be hashed by content (an arbitrary object).
    """
    h = hashlib.sha256()
    _Hasher(h, max_items=_MAX_DATA_ITEMS).value(data, "data", 0)
    return h.hexdigest()


def _is_library(obj: Any) -> bool:
    """True for functions, classes and modules of the standard library or installed packages."""
    module = getattr(obj, "__module__", None) if not isinstance(obj, types.ModuleType) else None
    name = obj.__name__ if isinstance(obj, types.ModuleType) else module
    if name and name.split(".")[0] in _FIRST_PARTY:
        return False
    if name and name.split(".")[0] in _LIBRARY_PACKAGES:
        return True
    if name == "__main__":
        return False
    mod = obj if isinstance(obj, types.ModuleType) else sys.modules.get(name or "")
    path = getattr(mod, "__file__", None)
    if mod is not None and path is None:
        return True  # built-in module
    if path is None:
        return False
    resolved = str(Path(path).resolve())
    return any(resolved.startswith(root) for root in _LIBRARY_ROOTS)


def _library_singleton(obj: Any) -> str | None:
    """``module.name`` when ``obj`` is a module-level instance defined by an installed library."""
    cls = type(obj)
    if not _is_library(cls):
        return None
    module = sys.modules.get(cls.__module__)
    for name, value in vars(module).items() if module is not None else ():
        if value is obj:
            return f"{cls.__module__}.{name}"
    return None


class _Hasher:
    def __init__(self, h: Any, max_items: int = _MAX_ITEMS):
        self.h = h
        self.seen: dict[int, int] = {}  # id of a function being hashed -> its order
        self.items = 0
        self.max_items = max_items

    def put(self, *parts: object) -> None:
        for part in parts:
            text = part if isinstance(part, bytes) else str(part).encode()
            self.h.update(len(text).to_bytes(8, "little") + text)

    def value(self, obj: Any, where: str, depth: int) -> None:  # noqa: C901 - one dispatch
        self.items += 1
        if depth > _MAX_DEPTH or self.items > self.max_items:
            raise Unfingerprintable(f"{where} is nested too deeply to fingerprint")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            self.put(type(obj).__name__, repr(obj))
        elif isinstance(obj, (torch.dtype, torch.device)):
            self.put(type(obj).__name__, repr(obj))
        elif isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            self.put(
                "tensor", t.dtype, tuple(t.shape), hashlib.sha256(_tensor_bytes(t)).hexdigest()
            )
        elif isinstance(obj, (np.ndarray, np.generic)):
            if obj.dtype.hasobject:
                raise Unfingerprintable(f"{where} is an array of Python objects")
            self.put("ndarray", obj.dtype.str, obj.shape, _array_digest(obj))
        elif isinstance(obj, RowArray):  # data read by rows: its content, not its repr
            dtype = np.dtype(obj.array.dtype)
            if dtype.hasobject:
                raise Unfingerprintable(f"{where} is an array of Python objects")
            self.put("ndarray", dtype.str, obj.shape, _array_digest(obj.array))
        elif isinstance(obj, (tuple, list, set, frozenset)):
            items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
            self.put(type(obj).__name__, len(items))
            for i, item in enumerate(items):
                self.value(item, f"{where}[{i}]", depth + 1)
        elif isinstance(obj, dict):
            self.put("dict", len(obj))
            for key in sorted(obj, key=repr):
                self.value(key, f"{where} key", depth + 1)
                self.value(obj[key], f"{where}[{key!r}]", depth + 1)
        elif isinstance(obj, types.ModuleType):
            self.put("module", obj.__name__)
        elif isinstance(obj, functools.partial):
            self.put("partial")
            self.value(obj.func, f"{where}.func", depth + 1)
            self.value(obj.args, f"{where}.args", depth + 1)
            self.value(obj.keywords, f"{where}.keywords", depth + 1)
        elif isinstance(obj, types.MethodType):
            self.put("method")
            self.value(obj.__func__, f"{where}.__func__", depth + 1)
            self.value(obj.__self__, f"{where}.__self__", depth + 1)
        elif isinstance(obj, types.FunctionType):
            self.function(obj, where, depth)
        elif isinstance(obj, type):
            self.cls(obj, where, depth)
        elif isinstance(obj, torch.nn.Module):
            self.module(obj, where, depth)
        elif isinstance(obj, _STATE_CLASSES) or type(obj).__module__ in _STATE_MODULES:
            # Pyro's handlers (poutine.scale(model, 0.5), config_enumerate, condition,
            # reparam), reparameterizers, torch.no_grad(): their class and their state
            self.put("handler")
            self.cls(type(obj), where, depth + 1)
            if not hasattr(obj, "__dict__"):
                raise Unfingerprintable(f"{where} is a {type(obj).__qualname__} without state")
            self.value(dict(vars(obj)), f"{where} attributes", depth + 1)
        elif isinstance(obj, torch.distributions.constraints.Constraint):
            # a distribution class's arg_constraints, support: its class and parameters
            self.cls(type(obj), where, depth + 1)
            self.value(dict(vars(obj)), f"{where} attributes", depth + 1)
        elif isinstance(obj, enum.Enum):
            self.cls(type(obj), where, depth + 1)
            self.put("enum", obj.name)
            self.value(obj.value, f"{where}.value", depth + 1)
        elif isinstance(obj, types.BuiltinFunctionType):  # tuple.__new__, math.exp, x.append
            owner = obj.__self__
            self.put("builtin", getattr(obj, "__module__", None), obj.__qualname__)
            if owner is not None and not isinstance(owner, (type, types.ModuleType)):
                self.value(owner, f"{where}.__self__", depth + 1)  # bound to a value
        elif isinstance(obj, (types.MemberDescriptorType, types.GetSetDescriptorType)):
            self.put("descriptor", type(obj).__name__, obj.__name__)  # __slots__ members
        elif type(obj).__name__ == "_tuplegetter":  # a NamedTuple's field: its index
            self.put("tuplegetter", obj.__reduce__()[1][0])
        elif callable(obj) and _is_library(obj) and hasattr(obj, "__qualname__"):
            # built-in functions and other library callables (torch.exp, math.sqrt ...)
            self.put("callable", getattr(obj, "__module__", ""), obj.__qualname__)
        elif hasattr(obj, "__wrapped__") and hasattr(obj, "__dict__"):
            # a callable object wrapping a function: its class and all its attributes
            # (the wrapped function among them), not the wrapped function alone
            self.put("wrapper object")
            self.cls(type(obj), where, depth + 1)
            self.value(dict(vars(obj)), f"{where} attributes", depth + 1)
        elif type(obj).__module__ == "builtins" and type(obj).__name__ in ("ellipsis", "range"):
            self.put(repr(obj))
        elif (name := _library_singleton(obj)) is not None:
            # a library's module-level instance (torch's transform_to, biject_to registries):
            # by its name, as library functions are (the library versions are in the key)
            self.put("library object", name)
        else:
            raise Unfingerprintable(
                f"{where} is a {type(obj).__module__}.{type(obj).__qualname__} object, whose "
                "content cannot be fingerprinted"
            )

    def cls(self, cls: type, where: str, depth: int) -> None:
        """Hash a class: its name; a user's or the project's also by its contents.

        Its bases, functions and attributes (``Config.PRIOR_SD``, a class-level
        tensor ...), recursively (each class once, to ``_MAX_DEPTH``).
        """
        self.put("class", cls.__module__, cls.__qualname__)
        if _is_library(cls) or id(cls) in self.seen:
            return
        if depth > _MAX_DEPTH:
            raise Unfingerprintable(f"{where} is nested too deeply to fingerprint")
        self.seen[id(cls)] = len(self.seen)
        for base in cls.__bases__:
            self.put("base")
            self.cls(base, f"{where} base {base.__qualname__}", depth + 1)
        for name, member in sorted(vars(cls).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                self.put("property", name)
                for accessor in (member.fget, member.fset, member.fdel):
                    self.value(accessor, f"{where}.{name}", depth + 1)
                continue
            if isinstance(member, functools.cached_property):
                member = member.func
            if isinstance(member, types.FunctionType):
                self.put(name)
                self.function(member, f"{where}.{name}", depth + 1)
            elif not _class_internal(name, member):
                self.put("class attribute", name)
                self.value(member, f"{where}.{name}", depth + 1)

    def module(self, obj: torch.nn.Module, where: str, depth: int) -> None:
        """Hash an ``nn.Module`` by its class and everything it holds.

        Its mode, parameters, all buffers (persistent or not), hooks and plain
        attributes (``self.sd = 2.0``), and its submodules likewise.
        """
        self.put("nn.Module")
        self.cls(type(obj), where, depth + 1)
        if id(obj) in self.seen:  # shared or recursive submodule
            self.put("recursive", self.seen[id(obj)])
            return
        self.seen[id(obj)] = len(self.seen)
        state = vars(obj)
        for name in sorted(state):
            value = state[name]
            if name == "_modules":  # at this depth: a deep network is not "nested too deeply"
                self.put(name, len(value))
                for child_name, child in value.items():
                    self.put("submodule", child_name)
                    if child is None:
                        self.put("None")
                    else:
                        self.module(child, f"{where}.{child_name}", depth)
            elif name in ("_parameters", "_buffers"):
                self.put(name)
                self.value(dict(value), f"{where}.{name}", depth + 1)
            elif name.endswith("hooks"):
                if value:  # a hook changes what the module computes
                    self.put(name)
                    self.value(dict(value), f"{where}.{name}", depth + 1)
            elif name in _MODULE_INTERNALS:
                continue
            else:
                self.put("attribute", name)
                self.value(value, f"{where}.{name}", depth + 1)

    def function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        """Hash a function: its code, defaults, closure, the globals it reads, what it wraps.

        Every function it wraps (``__wrapped__``, set by ``functools.wraps``) is
        hashed likewise: a decorator's wrapper is part of what the model computes.
        """
        self.put("function", fn.__module__, fn.__qualname__)
        if id(fn) in self.seen:  # recursion: the function itself is being hashed
            self.put("recursive", self.seen[id(fn)])
            return
        self.seen[id(fn)] = len(self.seen)
        if _is_library(fn):
            # by name (the library versions are in the key); one made at run time by a
            # library (a decorator's wrapper) also by what it closes over and wraps
            if fn.__closure__ or "__wrapped__" in vars(fn):
                self.closure(fn, where, depth)
                self.wrapped(fn, where, depth)
            return
        names = self.code(fn.__code__)
        self.closure(fn, where, depth)
        self.globals_read(fn.__globals__, names, where, depth)
        self.wrapped(fn, where, depth)

    def closure(self, fn: types.FunctionType, where: str, depth: int) -> None:
        """Hash a function's default arguments and the contents of its closure cells."""
        self.value(fn.__defaults__, f"{where} defaults", depth + 1)
        self.value(fn.__kwdefaults__, f"{where} keyword defaults", depth + 1)
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                self.put("empty cell", var)
                continue
            self.put("cell", var)
            self.value(content, f"{where} closure variable {var!r}", depth + 1)

    def wrapped(self, fn: types.FunctionType, where: str, depth: int) -> None:
        """Hash the function ``fn`` wraps (``functools.wraps``), if any: the next layer."""
        if "__wrapped__" in vars(fn):
            self.put("wraps")
            self.value(vars(fn)["__wrapped__"], f"{where}.__wrapped__", depth + 1)

    def globals_read(self, space: dict, names: list[str], where: str, depth: int) -> None:
        """Hash the globals the code reads and the module attributes it reads.

        Attributes of the user's and the project's modules are followed through
        chains (``pkg.sub.CONSTANT``, ``mod.Class.X``), each module once.
        """
        wanted = sorted(set(names))
        modules = []
        for name in wanted:
            if name in space:
                value = space[name]
                self.put("global", name)
                self.value(value, f"{where} global {name!r}", depth + 1)
                if isinstance(value, types.ModuleType) and not _is_library(value):
                    modules.append(value)
        visited: set[int] = set()
        while modules:  # attributes of those modules, and of their submodules in turn
            module = modules.pop(0)
            if id(module) in visited:
                continue
            visited.add(id(module))
            for name in wanted:
                if name not in vars(module):
                    continue
                value = vars(module)[name]
                self.put("attribute", module.__name__, name)
                self.value(value, f"{where} {module.__name__}.{name}", depth + 1)
                if isinstance(value, types.ModuleType) and not _is_library(value):
                    modules.append(value)

    def code(self, code: types.CodeType) -> list[str]:
        """Hash a code object (without file name and line numbers); return the names it reads."""
        self.put(
            "code",
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
            code.co_code,
            code.co_names,
            code.co_varnames,
            code.co_freevars,
            code.co_cellvars,
        )
        names = list(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names += self.code(const)
            else:
                self.put(type(const).__name__, repr(const))
        return names


def _array_digest(array: Any) -> str:
    """SHA-256 of an array's C-order bytes, read ``_CHUNK_BYTES`` of rows at a time.

    The digest equals ``sha256(np.ascontiguousarray(array).tobytes())``; a
    memory-mapped (or HDF5, zarr) array is streamed, never loaded whole.
    """
    h = hashlib.sha256()
    shape = tuple(int(n) for n in array.shape)
    if not shape:
        h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        h.update(np.ascontiguousarray(array[start : start + step]).tobytes())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().tobytes()
