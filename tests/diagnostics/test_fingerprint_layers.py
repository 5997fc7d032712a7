"""The model fingerprint covers every layer a model is built from.

Each test builds two models that differ only in a value the model reads
through a route the fingerprint once missed (a ``functools.wraps`` decorator,
a class attribute, a submodule constant, an ``nn.Module`` attribute or
non-persistent buffer); their fingerprints must differ, else the NUTS cache
would serve the draws of the one for the other.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import sys
import textwrap
import typing

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam

from diagnostics.nuts.fingerprint import Unfingerprintable, fingerprint


def _base(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def tempered(t):
    def deco(f):
        @functools.wraps(f)
        def w(*args, **kwargs):
            with poutine.scale(scale=t):
                return f(*args, **kwargs)

        return w

    return deco


def test_a_wraps_decorator_argument_is_in_the_fingerprint():
    assert fingerprint(tempered(0.01)(_base)) != fingerprint(tempered(100.0)(_base))
    assert fingerprint(tempered(0.01)(_base)) == fingerprint(tempered(0.01)(_base))


def test_a_wraps_decorator_body_is_in_the_fingerprint():
    def sd1(f):
        @functools.wraps(f)
        def w(y):
            return f(y, 1.0)

        return w

    def sd5(f):
        @functools.wraps(f)
        def w(y):
            return f(y, 5.0)

        return w

    def model(y, sd):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, sd), obs=y)

    assert fingerprint(sd1(model)) != fingerprint(sd5(model))


def test_the_wrapped_function_is_in_the_fingerprint_even_when_not_in_the_closure():
    def other(y):
        pyro.sample("mu", dist.Normal(0.0, 5.0))

    a = functools.wraps(_base)(lambda y: None)
    b = functools.wraps(other)(lambda y: None)
    assert fingerprint(a) != fingerprint(b)


def _class_model(prior_sd):
    cls = type("Config", (), {"PRIOR_SD": prior_sd, "LOC": torch.tensor(prior_sd)})

    def model(y):
        mu = pyro.sample("mu", dist.Normal(cls.LOC, cls.PRIOR_SD))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return model


def test_class_attributes_are_in_the_fingerprint():
    assert fingerprint(_class_model(0.01)) != fingerprint(_class_model(10.0))
    assert fingerprint(_class_model(0.01)) == fingerprint(_class_model(0.01))


def test_an_inherited_class_attribute_is_in_the_fingerprint():
    def make(sd):
        base = type("Base", (), {"SD": sd})
        cls = type("Config", (base,), {})

        def model(y):
            pyro.sample("mu", dist.Normal(0.0, cls.SD))

        return model

    assert fingerprint(make(1.0)) != fingerprint(make(5.0))


class _Lik(torch.nn.Module):
    def __init__(self, sd, buffer=False):
        super().__init__()
        if buffer:
            self.register_buffer("sd", torch.tensor(sd), persistent=False)
        else:
            self.sd = sd

    def forward(self, mu, y):
        return pyro.sample("y", dist.Normal(mu, self.sd), obs=y)


def _module_model(lik):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        lik(mu, y)

    return model


@pytest.mark.parametrize("buffer", [False, True], ids=["plain attribute", "non-persistent buffer"])
def test_nn_module_attributes_and_buffers_are_in_the_fingerprint(buffer):
    a = fingerprint(_module_model(_Lik(1.0, buffer)))
    b = fingerprint(_module_model(_Lik(5.0, buffer)))
    assert a != b
    assert a == fingerprint(_module_model(_Lik(1.0, buffer)))


def test_a_submodule_attribute_is_in_the_fingerprint():
    outer = torch.nn.Sequential(torch.nn.Identity(), _Lik(1.0))
    other = torch.nn.Sequential(torch.nn.Identity(), _Lik(5.0))
    assert fingerprint(_module_model(outer)) != fingerprint(_module_model(other))


def test_an_unhashable_module_attribute_refuses_a_fingerprint():
    lik = _Lik(1.0)
    lik.helper = object()
    with pytest.raises(Unfingerprintable, match="helper"):
        fingerprint(_module_model(lik))


MODEL_PKG = """
import pyro, pyro.distributions as dist
import hpkg_fp.consts
import hmod_fp as h
def model(y):
    mu = pyro.sample('mu', dist.Normal(0., hpkg_fp.consts.SCALE * h.cfg.SCALE))
    pyro.sample('y', dist.Normal(mu, 1.), obs=y)
"""


def _fingerprint_of_files(tmp_path, monkeypatch, consts: str, hmod: str) -> str:
    (tmp_path / "hpkg_fp").mkdir(exist_ok=True)
    (tmp_path / "hpkg_fp" / "__init__.py").write_text("")
    (tmp_path / "hpkg_fp" / "consts.py").write_text(consts)
    (tmp_path / "hmod_fp.py").write_text(textwrap.dedent(hmod))
    (tmp_path / "model_fp.py").write_text(MODEL_PKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("hpkg_fp", "hmod_fp", "model_fp")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    return fingerprint(importlib.import_module("model_fp").model)


def test_constants_through_submodules_and_module_classes_are_in_the_fingerprint(
    tmp_path, monkeypatch
):
    base = _fingerprint_of_files(
        tmp_path, monkeypatch, "SCALE = 1.0\n", "class cfg:\n    SCALE = 1.0\n"
    )
    sub = _fingerprint_of_files(
        tmp_path, monkeypatch, "SCALE = 5.0\n", "class cfg:\n    SCALE = 1.0\n"
    )
    cls = _fingerprint_of_files(
        tmp_path, monkeypatch, "SCALE = 1.0\n", "class cfg:\n    SCALE = 5.0\n"
    )
    same = _fingerprint_of_files(
        tmp_path, monkeypatch, "SCALE = 1.0\n", "class cfg:\n    SCALE = 1.0\n"
    )
    assert len({base, sub, cls}) == 3
    assert base == same


def _named_tuple_model(default):
    class Priors(typing.NamedTuple):
        sd: float = default

    def model(y):
        pyro.sample("mu", dist.Normal(0.0, Priors().sd))

    return model


def test_common_class_kinds_are_fingerprinted_by_content():
    """Slots, NamedTuple, Enum and dataclass classes read by a model hash (not refused)."""

    class Slotted:
        __slots__ = ("a",)

    class Kind(enum.Enum):
        A = 1

    @dataclasses.dataclass(frozen=True)
    class Settings:
        sd: float = 2.0

    for cls in (Slotted, Kind, Kind.A, Settings):

        def model(y, c=cls):
            pyro.sample("mu", dist.Normal(0.0, 1.0))

        assert len(fingerprint(model)) == 64
    assert fingerprint(_named_tuple_model(1.0)) != fingerprint(_named_tuple_model(5.0))


def test_pyro_handlers_around_a_model_are_hashed_by_their_state():
    """poutine.scale / reparam around a model: their arguments are part of the model.

    (``poutine.reparam`` was unwrapped to the bare model: a reparameterized
    model shared the key of the model as written.)
    """
    assert fingerprint(poutine.scale(_base, scale=0.5)) != fingerprint(
        poutine.scale(_base, scale=2.0)
    )
    assert fingerprint(poutine.scale(_base, scale=0.5)) == fingerprint(
        poutine.scale(_base, scale=0.5)
    )
    decentered = poutine.reparam(_base, config={"mu": LocScaleReparam(0.0)})
    assert fingerprint(decentered) != fingerprint(_base)
    assert fingerprint(decentered) != fingerprint(
        poutine.reparam(_base, config={"mu": LocScaleReparam(1.0)})
    )


def test_a_deep_network_is_fingerprinted():
    """Submodules are hashed at their parent's depth: 30 nested levels are not refused."""

    def deep(last_sd):
        net = _Lik(last_sd)
        for _ in range(30):
            net = torch.nn.Sequential(net)
        return _module_model(net)

    assert fingerprint(deep(1.0)) != fingerprint(deep(5.0))


def _through_transform_to(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    sd = torch.distributions.transform_to(torch.distributions.constraints.positive)(mu)
    pyro.sample("y", dist.Normal(0.0, sd), obs=y)


_transform_registry = torch.distributions.constraint_registry.transform_to
_biject_registry = torch.distributions.constraint_registry.biject_to


def _reads_registry_a(x):
    return _transform_registry(torch.distributions.constraints.positive)(x)


def _reads_registry_b(x):
    return _biject_registry(torch.distributions.constraints.positive)(x)


class _Unnamed:
    pass


_user_instance = _Unnamed()


def _reads_user_instance(x):
    return _user_instance, x


def test_library_singletons_are_hashed_by_name_and_user_objects_still_refused():
    """A library's module-level instance (torch's ``transform_to`` registry) read as a
    global is keyed by its name: a model reading it was refused (and so never cached);
    two registries get different keys; a user's own object is still refused."""
    assert fingerprint(_reads_registry_a) == fingerprint(_reads_registry_a)
    assert fingerprint(_reads_registry_a) != fingerprint(_reads_registry_b)
    fingerprint(_through_transform_to)
    with pytest.raises(Unfingerprintable, match="_Unnamed"):
        fingerprint(_reads_user_instance)
