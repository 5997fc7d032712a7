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
  and the bound values.

A value it cannot hash faithfully (an arbitrary object) raises
:class:`Unfingerprintable`; the caller must then not cache, rather than risk
returning another model's draws.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MAX_DEPTH = 12
_MAX_ITEMS = 10_000
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


class _Hasher:
    def __init__(self, h: Any):
        self.h = h
        self.seen: dict[int, int] = {}  # id of a function being hashed -> its order
        self.items = 0

    def put(self, *parts: object) -> None:
        for part in parts:
            text = part if isinstance(part, bytes) else str(part).encode()
            self.h.update(len(text).to_bytes(8, "little") + text)

    def value(self, obj: Any, where: str, depth: int) -> None:  # noqa: C901 - one dispatch
        self.items += 1
        if depth > _MAX_DEPTH or self.items > _MAX_ITEMS:
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
            a = np.ascontiguousarray(obj)
            if a.dtype.hasobject:
                raise Unfingerprintable(f"{where} is an array of Python objects")
            self.put("ndarray", a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).hexdigest())
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
            self.put("nn.Module")
            self.cls(type(obj), where, depth + 1)
            self.value(dict(obj.state_dict()), f"{where}.state_dict()", depth + 1)
            self.value(obj.training, f"{where}.training", depth + 1)
        elif callable(obj) and _is_library(obj) and hasattr(obj, "__qualname__"):
            # built-in functions and other library callables (torch.exp, math.sqrt ...)
            self.put("callable", getattr(obj, "__module__", ""), obj.__qualname__)
        elif hasattr(obj, "__wrapped__"):
            self.value(inspect.unwrap(obj), where, depth + 1)
        elif type(obj).__module__ == "builtins" and type(obj).__name__ in ("ellipsis", "range"):
            self.put(repr(obj))
        else:
            raise Unfingerprintable(
                f"{where} is a {type(obj).__module__}.{type(obj).__qualname__} object, whose "
                "content cannot be fingerprinted"
            )

    def cls(self, cls: type, where: str, depth: int) -> None:
        self.put("class", cls.__module__, cls.__qualname__)
        if _is_library(cls) or id(cls) in self.seen:
            return
        self.seen[id(cls)] = len(self.seen)
        for name, member in sorted(vars(cls).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                member = member.fget
            if isinstance(member, types.FunctionType):
                self.put(name)
                self.function(member, f"{where}.{name}", depth + 1)

    def function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        fn = inspect.unwrap(fn)
        if not isinstance(fn, types.FunctionType):
            self.value(fn, where, depth + 1)
            return
        self.put("function", fn.__module__, fn.__qualname__)
        if _is_library(fn):
            return
        if id(fn) in self.seen:  # recursion: the function itself is being hashed
            self.put("recursive", self.seen[id(fn)])
            return
        self.seen[id(fn)] = len(self.seen)
        names = self.code(fn.__code__)
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
        self.globals_read(fn.__globals__, names, where, depth)

    def globals_read(self, space: dict, names: list[str], where: str, depth: int) -> None:
        modules = []
        for name in sorted(set(names)):
            if name in space:
                value = space[name]
                self.put("global", name)
                self.value(value, f"{where} global {name!r}", depth + 1)
                if isinstance(value, types.ModuleType) and not _is_library(value):
                    modules.append(value)
        for module in modules:  # attributes of the project's own modules: mod.CONSTANT
            for name in sorted(set(names)):
                if name in vars(module) and not isinstance(vars(module)[name], types.ModuleType):
                    self.put("attribute", module.__name__, name)
                    self.value(vars(module)[name], f"{where} {module.__name__}.{name}", depth + 1)

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


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().tobytes()
