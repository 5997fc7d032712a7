"""Each step of the fit pipeline on its own: options, binding, objective, loop, finish."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from fit_models import nan_guide, nan_model, normal_model

from vimodels.errors import IncompatibleError, OptionError, UnknownNameError
from vimodels.resolve import resolve_model
from vimodels.svi.binding import Binding, bind
from vimodels.svi.convergence import ConvergenceRule
from vimodels.svi.fit import build_objective, check_fit_options, finish, torch_threads
from vimodels.svi.loop import LoopSettings, Objective, run_loop
from vimodels.svi.result import MAX_STEPS, NONFINITE, FitResult

X = {"x": torch.linspace(-1.0, 3.0, 20)}


def _options(**kw):
    base = dict(
        num_steps=100,
        lr=0.05,
        seed=0,
        num_eval=10,
        lr_decay=None,
        num_particles=None,
        num_threads=1,
        callback=None,
        convergence=None,
        elbo="trace",
    )
    base.update(kw)
    return check_fit_options(**base)


def _settings(num_steps=60, **kw):
    base = dict(
        num_steps=num_steps,
        lr=0.05,
        lr_decay=None,
        seed=0,
        rule=ConvergenceRule(early_stop=False),
        jit=False,
        validate_first_step=True,
        average=True,
        progress=False,
        compile_key=None,
        label="test",
    )
    base.update(kw)
    return LoopSettings(**base)


def _objective(binding: Binding, guide="auto_normal") -> callable:
    def build(jit_now: bool) -> Objective:
        return build_objective(
            binding, guide, "trace", {}, {}, num_particles=None, vectorize_particles=True, jit=False
        )

    return build


def test_check_fit_options_defaults_and_errors():
    rule, spec = _options()
    assert isinstance(rule, ConvergenceRule) and spec.name == "trace"
    with pytest.raises(OptionError, match="num_steps"):
        _options(num_steps=0)
    with pytest.raises(OptionError, match="lr"):
        _options(lr=-1.0)
    with pytest.raises(OptionError, match="callback"):
        _options(callback=3)
    with pytest.raises(UnknownNameError, match="trace"):
        _options(elbo="nope")


def test_resolve_model_by_name_entry_and_function():
    entry, fn, data, name = resolve_model("eight_schools_noncentered")
    assert entry is not None and name == "eight_schools_noncentered" and set(data) >= {"y"}
    assert resolve_model(entry)[3] == name
    e2, fn2, data2, name2 = resolve_model(normal_model, X)
    assert e2 is None and fn2 is normal_model and name2 == "normal_model"
    with pytest.raises(OptionError, match="catalog name"):
        resolve_model(3.0)


def test_bind_user_model_sites_depth_and_shapes():
    b = bind(normal_model, X, discrete_ok=False)
    assert b.sites == ("mu",) and b.depth == 1 and b.hidden == ()
    assert b.site_shapes["mu"] == () and b.site_shapes["obs"] == (20,)
    assert b.args[0] is b.data["x"] and b.family is None


def test_bind_catalog_entry_uses_its_sites():
    b = bind("eight_schools_noncentered", None, discrete_ok=False)
    assert b.sites == b.entry.sites and b.family == "eight_schools_noncentered"


def test_bind_refuses_discrete_sites_without_enumeration():
    def mixture(y):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(z * 3.0, 1.0), obs=y)

    with pytest.raises(IncompatibleError, match="enum"):
        bind(mixture, {"y": torch.tensor(1.0)}, discrete_ok=False)
    assert bind(mixture, {"y": torch.tensor(1.0)}, discrete_ok=True).hidden == ("z",)


def test_build_objective_by_registry_name():
    b = bind(normal_model, X, discrete_ok=False)
    obj = _objective(b)(False)
    assert obj.name == "auto_normal" and type(obj.loss).__name__ == "Trace_ELBO"
    assert obj.jit is False


def test_run_loop_runs_all_steps_and_averages():
    b = bind(normal_model, X, discrete_ok=False)
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(0)
        out = run_loop(b, _objective(b), _settings(num_steps=60))
    assert out.status == MAX_STEPS and len(out.losses) == 60
    assert np.isfinite(out.losses).all() and out.averaged is not None
    assert "ran all 60 steps" in out.message


def test_run_loop_stops_on_a_nonfinite_step_with_its_number():
    b = bind(nan_model, {"x": torch.full((5,), 10.0)}, discrete_ok=False)

    def build(jit_now: bool) -> Objective:
        return build_objective(
            b, nan_guide, "trace", {}, {}, num_particles=None, vectorize_particles=True, jit=False
        )

    with pyro.get_param_store().scope():
        out = run_loop(b, build, _settings(num_steps=2000, lr=0.5))
    assert out.status == NONFINITE
    k = len(out.losses)
    assert f"stopped at step {k}" in out.message and 0 < k < 2000


def test_finish_builds_a_result_with_an_elbo_estimate():
    b = bind(normal_model, X, discrete_ok=False)
    s = _settings(num_steps=200)
    with pyro.get_param_store().scope() as state:
        pyro.set_rng_seed(0)
        out = run_loop(b, _objective(b), s)
        r = finish(b, out, s, state, "trace", {}, {}, num_eval=200)
    assert isinstance(r, FitResult) and r.num_steps == 200 and r.status == MAX_STEPS
    assert math.isfinite(r.elbo) and r.elbo_se > 0
    assert r.settings["elbo_class"] == "Trace_ELBO" and r.settings["optimizer"] == "Adam"
    assert set(r.sample(50)) == {"mu"}


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
