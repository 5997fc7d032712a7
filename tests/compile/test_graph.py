"""Simplification of the traced potential graphs (vimodels.compile.record)."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from diagnostics.nuts import kernel as _nuts
from vimodels.catalog.registry import get_model
from vimodels.compile.record import UnsupportedTrace, count_ops, record, simplify_graph

aten = torch.ops.aten


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _catalog_potential(name: str) -> tuple[_nuts.FlatPotential, np.ndarray, torch.fx.GraphModule]:
    """The model's flat potential and its value-and-gradient graph as ``make_fx`` traces it."""
    entry = get_model(name)
    pyro.set_rng_seed(0)
    setup = _nuts._setup(entry.model, entry.data(), [0], entry.max_plate_nesting, True)
    potential = setup.potential
    example = torch.as_tensor(setup.z0[0], dtype=potential.dtype)
    with warnings.catch_warnings(), _nuts._validation_off():
        warnings.simplefilter("ignore")
        raw = make_fx(_nuts._value_and_grad_fn(potential.python_potential))(example)
    return potential, setup.z0[0], raw


@pytest.mark.parametrize(
    "name", ["eight_schools_noncentered", "galaxies_gaussian_mixture"], ids=["plain", "enumerated"]
)
def test_simplified_graph_gives_the_traced_value_and_gradient(name):
    potential, z0, raw = _catalog_potential(name)
    example = torch.as_tensor(z0, dtype=potential.dtype)
    simple = simplify_graph(raw, example)
    assert count_ops(simple) < count_ops(raw)
    # the graph the sampler runs is the simplified one
    assert potential.mode == "fx" and count_ops(potential.graph) == count_ops(simple)
    rng = np.random.default_rng(2)
    for _ in range(3):
        z = torch.as_tensor(z0 + 0.5 * rng.normal(size=z0.shape), dtype=potential.dtype)
        with torch.no_grad():
            g_raw, u_raw = raw(z)
            g, u = simple(z)
        torch.testing.assert_close(u, u_raw, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, g_raw, rtol=1e-6, atol=1e-6)
        # and autograd agrees with both
        t = z.clone().requires_grad_(True)
        with _nuts._validation_off():
            u_ref = potential.python_potential(t)
        (g_ref,) = torch.autograd.grad(u_ref, t)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["eight_schools_noncentered", "galaxies_gaussian_mixture"], ids=["plain", "enumerated"]
)
def test_simplified_batched_graph_gives_the_vmapped_one(name):
    potential, z0, _ = _catalog_potential(name)
    rng = np.random.default_rng(3)
    example = torch.as_tensor(z0 + rng.normal(size=(4, z0.size)), dtype=potential.dtype)
    with warnings.catch_warnings(), _nuts._quiet_vmap_fallback():
        warnings.simplefilter("ignore")
        raw = make_fx(torch.func.vmap(potential.graph))(example)
    simple = simplify_graph(raw, example)
    assert count_ops(simple) < count_ops(raw)
    z = example + 0.3
    with torch.no_grad():
        for a, b in zip(simple(z), raw(z)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_identities_constants_and_gradient_pieces_are_removed():
    c = torch.tensor([2.0, 3.0])

    def f(z):
        a = z[0:2] * 1 + 0.0  # identities
        b = (c.log() * 2.0).exp()  # constant
        y = (a * b).sum() - torch.zeros_like(a).sum()
        ones = torch.ones_like(y)  # the gradient's seed: a constant
        g0 = aten.slice_backward(ones.expand(2) * b * a, [3], 0, 0, 2, 1)
        g1 = aten.slice_backward(z[2:3] ** 1.0, [3], 0, 2, 3, 1)
        return g0 + g1, y

    z = torch.tensor([0.5, -1.0, 2.0])
    raw = make_fx(f)(z)
    simple = simplify_graph(raw, z)
    targets = _targets(simple)
    assert aten.slice_backward.default not in targets and aten.cat.default in targets
    for op in (aten.log.default, aten.exp.default, aten.ones_like.default, aten.pow.Tensor_Scalar):
        assert op not in targets, op
    assert count_ops(simple) <= 6
    for point in (z, torch.tensor([-3.0, 0.25, 7.0])):
        for a, b in zip(simple(point), f(point)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_power_one_of_a_strided_view_is_dropped_before_pointwise_users():
    """``pow(x, 1.0)`` (the backward of ``x ** 2``) of a strided slice returns a contiguous
    copy: dropped all the same where its users are pointwise and give the same bits and
    layout reading the slice (the GP's Cholesky diagonal, issue 17); kept before a view."""

    def f(z):
        d = torch.diagonal(z, 0, 1, 2)[:, 0:3]  # strided: not the layout pow returns
        return (d**1.0 * 2.0 + z.sum(),)

    def g(z):
        d = torch.diagonal(z, 0, 1, 2)[:, 0:3]
        return ((d**1.0).view(12) * 2.0,)  # a view needs the contiguous copy

    z = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    simple = simplify_graph(make_fx(f)(z), z)
    assert aten.pow.Tensor_Scalar not in _targets(simple)
    kept = simplify_graph(make_fx(g)(z), z)
    assert aten.pow.Tensor_Scalar in _targets(kept)
    for point in (z, z.exp()):
        assert torch.equal(simple(point)[0], f(point)[0])
        assert torch.equal(kept(point)[0], g(point)[0])


def test_gap_between_gradient_pieces_is_zero():
    def f(z):
        g0 = aten.slice_backward(z[0:1] * 2.0, [4], 0, 0, 1, 1)
        g1 = aten.slice_backward(z[3:4] * 3.0, [4], 0, 3, 4, 1)
        return (g0 + g1,)

    z = torch.tensor([1.0, 2.0, 3.0, 4.0])
    simple = simplify_graph(make_fx(f)(z), z)
    assert aten.cat.default in _targets(simple)
    torch.testing.assert_close(simple(z)[0], torch.tensor([2.0, 0.0, 0.0, 12.0]))


def test_mutation_of_a_fresh_tensor_becomes_out_of_place_and_is_not_folded():
    def f(z):
        fresh = torch.ones(3)  # constant, then mutated where z < 0
        fresh.masked_fill_(z < 0, 5.0)
        return (fresh * 1.0 + z,)

    z = torch.tensor([1.0, -1.0, 2.0])
    simple = simplify_graph(make_fx(f)(z), z)
    assert not any(str(t).split(".")[-2].endswith("_") for t in _targets(simple))
    for point in (z, torch.tensor([-1.0, 1.0, -2.0]), z):  # twice: nothing kept between calls
        torch.testing.assert_close(simple(point)[0], f(point)[0])


def test_mutation_through_a_view_keeps_the_graph_as_traced():
    def f(z):
        y = z * 2.0
        y[0:1].mul_(3.0)
        return (y * 1,)

    z = torch.tensor([1.0, 2.0])
    raw = make_fx(f)(z)
    assert simplify_graph(raw, z) is raw


def test_random_operations_are_not_folded():
    def f(z):
        return (z + torch.rand(2),)

    z = torch.zeros(2)
    simple = simplify_graph(make_fx(f)(z), z)
    assert any("rand" in str(t) for t in _targets(simple))


def test_signs_and_doublings_move_into_constants_bit_for_bit():
    c = torch.tensor([0.3, -1.7, 2.9])

    def f(z):
        a = -(z**2) / c  # div(neg(y), c)
        b = -(c * z)  # neg(mul(c, y))
        d = c * (2.0 * z)  # mul(c, mul(y, 2))
        e = -torch.where(z > 0, c, torch.zeros_like(c)).masked_fill(z < -1, 0.0)
        return (a - (-b) + d + e,)

    z = torch.tensor([0.5, -1.5, 2.0])
    raw = make_fx(f)(z)
    simple = simplify_graph(raw, z)
    assert aten.neg.default not in _targets(simple)
    assert count_ops(simple) < count_ops(raw)
    rng = np.random.default_rng(4)
    for _ in range(20):
        point = torch.as_tensor(rng.normal(scale=3.0, size=3), dtype=torch.float32)
        assert torch.equal(simple(point)[0], f(point)[0])


def test_recorded_graph_runs_what_make_fx_traces():
    potential, z0, traced = _catalog_potential("eight_schools_noncentered")
    example = torch.as_tensor(z0, dtype=potential.dtype)
    with _nuts._validation_off():
        recorded = record(_nuts._value_and_grad_fn(potential.python_potential), example)
    # the same operations, give or take the views and copies each tracer adds
    simple, simple_traced = simplify_graph(recorded, example), simplify_graph(traced, example)
    assert count_ops(simple) == count_ops(simple_traced)
    z = example + 0.7
    with torch.no_grad():
        for a, b in zip(recorded(z), traced(z)):
            assert torch.equal(a, b)


def test_value_read_into_python_is_not_recorded():
    def f(z):
        return (z * 2.0 if bool(z.sum() > 0) else z,)

    with pytest.raises(UnsupportedTrace):
        record(f, torch.ones(2))
    # a value of a constant is no such branch
    c = torch.tensor([1.0, -1.0])
    gm = record(lambda z: (z * 2.0 if bool(c.sum() == 0) else z,), torch.ones(2))
    torch.testing.assert_close(gm(torch.tensor([3.0, 4.0]))[0], torch.tensor([6.0, 8.0]))


def test_writing_into_a_constant_is_not_recorded():
    c = torch.zeros(2)

    def f(z):
        c.add_(1.0)
        return (z + c,)

    with pytest.raises(UnsupportedTrace):
        record(f, torch.ones(2))


def test_make_fx_traces_where_the_recorder_fails(monkeypatch):
    def broken(fn, example):
        raise UnsupportedTrace("no")

    monkeypatch.setattr(_nuts, "_TRACERS", (broken, _nuts._make_fx))
    kw = {"num_warmup": 30, "num_samples": 10}
    runs = _nuts.sample_chains(_positive_model, {}, seeds=[1, 2], **kw)
    assert runs[0]["potential"] == "fx" and runs[0]["batch"] == "vmap"
    monkeypatch.undo()
    again = _nuts.sample_chains(_positive_model, {}, seeds=[1, 2], **kw)
    for a, b in zip(runs, again):
        np.testing.assert_array_equal(a["samples"]["s"], b["samples"]["s"])


def _positive_model():
    pyro.sample(
        "s",
        pyro.distributions.LogNormal(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.25])).to_event(
            1
        ),
    )


def test_graph_with_a_shape_that_depends_on_values_is_left_as_traced():
    def f(z):
        kept = z[z > 0]  # as many elements as are positive
        return (torch.zeros_like(kept).sum() + kept.sum() * 1,)

    z = torch.tensor([1.0, -2.0, 3.0])
    raw = make_fx(f)(z)
    assert simplify_graph(raw, z) is raw


def test_fill_of_a_fresh_tensor_is_folded_and_the_graph_freezes():
    c = torch.tensor([0.25, 0.5])

    def f(z):
        ones = torch.empty_like(c).fill_(1.0)  # fill_ on a fresh tensor: a constant
        return ((ones - c) * z,)

    z = torch.tensor([2.0, 4.0])
    simple = simplify_graph(make_fx(f)(z), z)
    assert all("fill" not in str(t) for t in _targets(simple))
    frozen = _nuts._freeze(simple, z)
    torch.testing.assert_close(frozen(z)[0], f(z)[0], rtol=0, atol=0)


def test_constant_boolean_mask_keeps_shapes_static():
    mask = torch.tensor([True, False, True])

    def f(z):
        return ((z * 1.0)[mask].sum() + torch.zeros_like(z).sum(),)

    z = torch.tensor([1.0, -2.0, 3.0])
    raw = make_fx(f)(z)
    simple = simplify_graph(raw, z)
    assert count_ops(simple) < count_ops(raw)
    torch.testing.assert_close(simple(-z)[0], f(-z)[0])
