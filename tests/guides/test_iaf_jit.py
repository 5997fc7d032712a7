"""auto_iaf_normal runs under the JIT ELBO (no aliased parameter; Pyro issue 3132)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, JitTrace_ELBO

from guides.auto import AutoIAFNormal
from vimodels import fit


def _model():
    pyro.sample("m", dist.Normal(torch.zeros(3), 1.0).to_event(1))


def test_iaf_registers_each_parameter_once():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoIAFNormal(_model)
    guide()
    store = pyro.get_param_store()
    values = list(store._params.values())
    assert len({id(v) for v in values}) == len(values), list(store.keys())
    assert not any(k.endswith("_prototype_tensor") for k in store.keys())
    assert guide._prototype_tensor.dtype == values[0].dtype
    pyro.clear_param_store()


def test_iaf_jit_trace_elbo_steps():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(_model, AutoIAFNormal(_model), pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert np.isfinite(losses).all()
    pyro.clear_param_store()


def test_iaf_fit_uses_jit_on_sleepstudy():
    r = fit(
        "sleepstudy_random_slopes",
        guide="auto_iaf_normal",
        num_steps=3,
        num_eval=4,
        progress=False,
    )
    assert r.settings["jit"] and r.settings["jit_note"] is None, r.settings["jit_note"]
    assert r.settings["step_compiler"] != "python"
    assert np.isfinite(r.losses).all()


def _model64(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 10.0).to_event(1))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def test_iaf_takes_a_float64_models_dtype():
    # the flow's networks were float32 whatever the model: a float64 model's first step
    # raised "expected m1 and m2 to have the same dtype" (every posteriordb entry is float64)
    y = torch.linspace(-1.0, 1.0, 20, dtype=torch.float64).reshape(10, 2)
    r = fit(_model64, {"y": y}, guide="auto_iaf_normal", num_steps=5, num_eval=4, progress=False)
    assert np.isfinite(r.losses).all()
    assert {p.dtype for p in r.guide.parameters()} == {torch.float64}
