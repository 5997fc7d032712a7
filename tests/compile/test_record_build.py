"""The graph build (record, simplify_graph, freeze): the same numbers, one code generation."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import vimodels
from diagnostics.nuts import kernel as _nuts
from vimodels.catalog.registry import get_model
from vimodels.compile import record as rec
from vimodels.compile import step as step_module
from vimodels.compile.record import count_ops, freeze, record, simplify_graph


def _same_bits(a, b) -> bool:
    """Equal element by element (NaN to NaN; -0.0 to 0.0, the one freedom the pass takes)."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all())
        for x, y in zip(a, b)
    )


def _mode(name):
    from vimodels.mode.fast import _eager_value_and_grad
    from vimodels.mode.lbfgs import potential_for

    potential = potential_for(name, None)
    u0 = potential.init_values.detach().clone().to(potential.dtype)
    return (lambda u: _eager_value_and_grad(potential, u)), (u0,), None


def _nuts_case(name):
    entry = get_model(name)
    pyro.set_rng_seed(0)
    setup = _nuts._setup(entry.model, entry.data(), [0], entry.max_plate_nesting, jit=False)
    z0 = torch.as_tensor(setup.z0[0], dtype=setup.dtype)
    return _nuts._value_and_grad_fn(setup.potential.python_potential), (z0,), None


def _step(name):
    fit = vimodels.fit(name, guide="mean_field", num_steps=3, num_eval=10, progress=False)
    seen = {}
    original = step_module.record

    def capture(fn, *example):
        seen["fn"], seen["example"] = fn, example
        return original(fn, *example)

    step_module.record = capture
    try:
        with pyro.get_param_store().scope(fit.param_state):
            step_module.compile_step(
                Trace_ELBO(max_plate_nesting=fit.max_plate_nesting), fit.model, fit.guide, fit.args
            )
    finally:
        step_module.record = original
    return seen["fn"], seen["example"], fit.param_state


CASES = {
    "mesquite": lambda: _mode("pdb_mesquite_logvolume"),
    "earnings": lambda: _mode("pdb_earnings_logearn_interaction"),
    "radon": lambda: _nuts_case("radon_contextual"),
    "eight_schools_step": lambda: _step("eight_schools_noncentered"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_simplified_and_frozen_graphs_give_the_recorded_numbers_bit_for_bit(case):
    fn, example, state = CASES[case]()
    scope = pyro.get_param_store().scope(state) if state is not None else _nothing()
    with scope, warnings.catch_warnings(), _nuts._validation_off():
        warnings.simplefilter("ignore")
        raw = record(fn, *example)
        simple = simplify_graph(raw, *example)
        frozen = freeze(simple, *example)
        assert count_ops(simple) <= count_ops(raw)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            z = tuple(e + 0.3 * torch.randn(e.shape, generator=gen, dtype=e.dtype) for e in example)
            got = []
            for g in (raw, simple, frozen):
                torch.manual_seed(1)  # the step's draws: the same for each
                with torch.no_grad():
                    got.append(g(*z))
            assert _same_bits(got[0], got[1]) and _same_bits(got[1], got[2])


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_the_build_generates_python_code_once(monkeypatch):
    """record + simplify_graph + freeze: the code of the simplified graph only (was 4 times)."""
    generated = []
    original = torch.fx.Graph.python_code

    def counting(self, *args, **kwargs):
        generated.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Graph, "python_code", counting)

    def f(z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            u = (z.exp() * torch.tensor([1.0, 2.0, 3.0])).sum() * 1.0
            (g,) = torch.autograd.grad(u, z)
        return g, u.detach()

    z0 = torch.tensor([0.1, -0.2, 0.3])
    raw = record(f, z0)
    simple = simplify_graph(raw, z0)
    assert simple is not raw and count_ops(simple) < count_ops(raw)
    frozen = freeze(simple, z0)
    assert len(generated) == 1 and generated[0] is simple.graph
    # the recorded module still runs (its code generated on first use) and agrees
    z = torch.tensor([0.4, 0.5, -0.6])
    with torch.no_grad():
        assert _same_bits(raw(z), frozen(z)) and _same_bits(raw(z), f(z))
    assert "def forward" in raw.code


def test_arguments_map_to_nodes_as_pytree_maps_them():
    from torch.utils._pytree import tree_map

    graph = torch.fx.Graph()
    t1, t2 = torch.ones(2), torch.zeros(3)
    nodes = {id(t1): graph.placeholder("a"), id(t2): graph.placeholder("b")}

    def node_of(t):
        return nodes[id(t)]

    args = (t1, [t2, None, 3], torch.Size([2, 3]), 1.5, (t1,), {"k": t2, "j": [1, t1]})
    found = []
    ours = rec._tensors_to_nodes(args, node_of, found)
    theirs = tree_map(lambda x: node_of(x) if isinstance(x, torch.Tensor) else x, args)
    assert ours == theirs and [type(a) for a in ours] == [type(a) for a in theirs]
    assert found == [nodes[id(t)] for t in (t1, t2, t1, t2, t1)]
    assert rec._written(torch.ops.aten.add_.Tensor) == ((0, "self"),)
    assert rec._written(torch.ops.aten.add.Tensor) == ()
