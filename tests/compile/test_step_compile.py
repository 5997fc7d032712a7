"""The compiled SVI step: same loss and gradients as Pyro's ELBO, fallbacks, fit semantics."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from fit_models import nan_guide, nan_model
from pyro.infer import JitTrace_ELBO, Trace_ELBO

import vimodels
from vimodels.compile.step import StepCompileError, compile_step, reference_loss_and_grads

fit_module = importlib.import_module("vimodels.svi.loop")


@pytest.fixture
def short_fits_compile(monkeypatch):
    monkeypatch.setattr(fit_module, "COMPILE_MIN_STEPS", 2)


def _fitted(model, guide, **kw):
    """A fit of a few steps: its model, guide, data and parameter state."""
    kw = dict(num_steps=3, num_eval=10, progress=False, **kw)
    return vimodels.fit(model, guide=guide, **kw)


def _close(a, b):
    a, b = a.detach().double(), b.detach().double()
    np.testing.assert_allclose(
        a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max()))
    )


CASES = [
    ("eight_schools_noncentered", "mean_field", 1),
    ("eight_schools_noncentered", "structured", 1),
    ("eight_schools_noncentered", "auto_normal", 1),
    ("eight_schools_noncentered", "full_rank", 4),
    ("radon_contextual", "structured", 1),
]


@pytest.mark.parametrize("model,guide,particles", CASES)
def test_compiled_step_matches_pyro_elbo_for_the_same_draws(model, guide, particles):
    r = _fitted(model, guide)
    elbo = dict(
        num_particles=particles,
        vectorize_particles=particles > 1,
        max_plate_nesting=r.max_plate_nesting,
    )
    with pyro.get_param_store().scope(r.param_state):
        step = compile_step(JitTrace_ELBO(**elbo), r.model, r.guide, r.args)
        assert len(step.used) == len(step.names)
        saved = [p.detach().clone() for p in step.params]
        jit_elbo = JitTrace_ELBO(ignore_jit_warnings=True, **elbo)
        jit_elbo.loss_and_grads(r.model, r.guide, *r.args)  # its first call traces
        for p in step.params:
            p.grad = None
        for shift, seed in ((0.0, 1), (0.0, 2), (-0.3, 3)):
            with torch.no_grad():
                for p, s in zip(step.params, saved):
                    p.copy_(s + shift)
            torch.manual_seed(seed)
            loss, finite, *grads = step(*step.params)
            assert bool(finite)
            torch.manual_seed(seed)
            ref_loss, ref_grads = reference_loss_and_grads(
                Trace_ELBO(**elbo), r.model, r.guide, r.args, step.params
            )
            _close(loss, ref_loss)
            for g, ref in zip(grads, ref_grads):
                _close(g, ref)
            # and the JIT ELBO the fit would otherwise run
            torch.manual_seed(seed)
            jit_loss = jit_elbo.loss_and_grads(r.model, r.guide, *r.args)
            assert float(loss) == pytest.approx(jit_loss, rel=1e-4, abs=1e-4)
            for p, g, ref in zip(step.params, grads, ref_grads):
                # float32 rounding differs between the JIT's surrogate and Pyro's
                # Python ELBO (by up to a few percent on the full-rank scale_tril):
                # the compiled step must be as close to the JIT as Python is
                jit_g = p.grad.double()
                gap = float((g.double() - jit_g).abs().max())
                python_gap = float((ref.double() - jit_g).abs().max())
                assert gap <= 2 * python_gap + 1e-4 * (1 + float(jit_g.abs().max()))
                p.grad = None
        # draws come from torch's global generator: a new seed, a new loss
        torch.manual_seed(10)
        a = float(step(*step.params)[0])
        torch.manual_seed(11)
        assert float(step(*step.params)[0]) != a


@pytest.mark.parametrize("guide", ["structured", "mean_field"])
def test_compiled_and_jit_fits_agree_statistically(guide):
    kw = dict(guide=guide, num_steps=1000, num_eval=1000, progress=False)
    fx = [vimodels.fit("eight_schools_noncentered", seed=s, **kw) for s in (0, 1)]
    assert all(r.settings["step_compiler"] == "fx" for r in fx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "COMPILE_MIN_STEPS", 10**9)
        plain = [vimodels.fit("eight_schools_noncentered", seed=s, **kw) for s in (0, 1)]
    assert all(r.settings["step_compiler"] == "jit" for r in plain)
    # same seed: the same draws, so the same fit up to rounding
    np.testing.assert_allclose(fx[0].losses, plain[0].losses, rtol=1e-3, atol=1e-3)
    # different seeds: the final ELBOs agree within their standard errors
    a, b = fx[0], plain[1]
    assert abs(a.elbo - b.elbo) < 4 * math.hypot(a.elbo_se, b.elbo_se) + 0.1


def test_same_seed_same_losses_with_the_compiled_step(short_fits_compile):
    kw = dict(guide="structured", num_steps=60, num_eval=50, progress=False)
    a = vimodels.fit("eight_schools_noncentered", seed=3, **kw)
    b = vimodels.fit("eight_schools_noncentered", seed=3, **kw)
    c = vimodels.fit("eight_schools_noncentered", seed=4, **kw)
    assert a.settings["step_compiler"] == "fx" and a.settings["jit"] is True
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.elbo == b.elbo
    assert not np.array_equal(a.losses, c.losses)


def branching_model():
    # Python control flow on a value: a trace taken at one draw is wrong at others
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    if bool(x.detach() > 0):
        pyro.factor("kink", -x)


def test_value_dependent_branch_falls_back(short_fits_compile):
    r = vimodels.fit(
        branching_model, guide="auto_normal", num_steps=20, num_eval=20, progress=False
    )
    assert r.settings["step_compiler"] in ("jit", "python")
    assert "compiled step unavailable" in r.settings["step_compiler_note"]
    assert np.isfinite(r.losses).all()


def test_value_dependent_branch_is_refused():
    r = _fitted(branching_model, "auto_normal")
    with pyro.get_param_store().scope(r.param_state), pytest.raises(StepCompileError):
        compile_step(Trace_ELBO(max_plate_nesting=0), r.model, r.guide, r.args)


def score_function_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def score_function_guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    # not reparameterized: the gradient needs a score-function term
    pyro.sample("mu", dist.Normal(loc, 1.0).has_rsample_(False))


def subsampled_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0], subsample_size=3) as idx:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x[idx])


@pytest.mark.parametrize(
    "model,guide",
    [(score_function_model, score_function_guide), (subsampled_model, "auto_normal")],
)
def test_score_function_and_subsampling_keep_the_jit_elbo(short_fits_compile, model, guide):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = vimodels.fit(
            model, data={"x": np.ones(6)}, guide=guide, num_steps=10, num_eval=10, progress=False
        )
    assert r.settings["step_compiler"] != "fx"
    if model is subsampled_model:  # indices drawn per step: no JIT, no compiled step
        assert r.settings["jit"] is False
        assert "compiled step are off" in r.settings["subsample"]["note"]
    else:
        assert "reparameterized" in r.settings["step_compiler_note"]


def test_short_fits_and_other_elbos_do_not_compile():
    r = vimodels.fit("eight_schools_noncentered", num_steps=20, num_eval=10, progress=False)
    assert r.settings["step_compiler"] == "jit" and "fewer than" in r.settings["step_compiler_note"]
    r = vimodels.fit(
        "eight_schools_noncentered", num_steps=20, num_eval=10, progress=False, jit=False
    )
    assert r.settings["step_compiler"] == "python"


def test_compiled_step_stops_at_a_nan_and_keeps_last_good_parameters(short_fits_compile):
    kw = dict(
        data={"x": np.full(10, 10.0)},
        guide=nan_guide,
        lr=0.1,
        lr_decay=None,
        progress=False,
        num_eval=20,
        seed=5,
    )
    r = vimodels.fit(nan_model, num_steps=500, **kw)
    assert r.settings["step_compiler"] == "fx"
    assert r.status == "nonfinite" and r.partial
    k = r.num_steps
    assert 1 < k < 500 and f"stopped at step {k}" in r.message
    assert np.isfinite(r.params["loc"]) and r.params["loc"] < 3.5
    again = vimodels.fit(nan_model, num_steps=k, **kw)
    assert again.status != "nonfinite"
    np.testing.assert_array_equal(again.params["loc"], r.params["loc"])


def test_callback_and_averaging_with_the_compiled_step(short_fits_compile):
    seen = []
    r = vimodels.fit(
        "eight_schools_noncentered",
        guide="structured",
        num_steps=200,
        num_eval=50,
        progress=False,
        callback=lambda p: seen.append((p.step, p.loss)),
    )
    assert r.settings["step_compiler"] == "fx"
    assert [s for s, _ in seen] == list(range(1, 201))
    np.testing.assert_array_equal([x for _, x in seen], r.losses)
    assert r.settings["averaged"] is not None and math.isfinite(r.elbo)


def test_a_second_fit_reuses_the_checked_graph(short_fits_compile):
    from vimodels.compile import step as step_compile

    step_compile._CACHE.clear()
    kw = dict(guide="structured", num_steps=50, num_eval=20, progress=False)
    a = vimodels.fit("eight_schools_noncentered", seed=1, **kw)
    assert len(step_compile._CACHE) == 1
    b = vimodels.fit("eight_schools_noncentered", seed=1, **kw)
    assert len(step_compile._CACHE) == 1
    assert a.settings["step_compiler"] == b.settings["step_compiler"] == "fx"
    np.testing.assert_array_equal(a.losses, b.losses)
    # other data: another graph (the data are constants of the graph)
    y = vimodels.catalog.registry.get_model("eight_schools_noncentered").data()["y"] + 1.0
    c = vimodels.fit("eight_schools_noncentered", data={"y": y}, seed=1, **kw)
    assert c.settings["step_compiler"] == "fx" and len(step_compile._CACHE) == 2
    assert not np.allclose(a.losses, c.losses)


@pytest.mark.parametrize("guide", ["mean_field", "auto_normal"])
def test_mean_field_elbo_compiles_with_analytic_kl(guide):
    from pyro.infer import TraceMeanField_ELBO

    r = _fitted("eight_schools_noncentered", guide)
    elbo = dict(num_particles=1, max_plate_nesting=r.max_plate_nesting)
    with pyro.get_param_store().scope(r.param_state):
        step = compile_step(TraceMeanField_ELBO(**elbo), r.model, r.guide, r.args)
        for seed in (1, 2):
            torch.manual_seed(seed)
            loss, finite, *grads = step(*step.params)
            torch.manual_seed(seed)
            ref_loss, ref_grads = reference_loss_and_grads(
                TraceMeanField_ELBO(**elbo), r.model, r.guide, r.args, step.params
            )
            _close(loss, ref_loss)
            for g, ref in zip(grads, ref_grads):
                _close(g, ref)
            # analytic KL: not the Monte Carlo ELBO of the same draws
            torch.manual_seed(seed)
            mc_loss, _ = reference_loss_and_grads(
                Trace_ELBO(**elbo), r.model, r.guide, r.args, step.params
            )
            assert float(mc_loss) != pytest.approx(float(loss), rel=1e-6)


def test_meanfield_fit_runs_the_compiled_step(short_fits_compile):
    kw = dict(guide="mean_field", elbo="meanfield", num_steps=50, num_eval=20, progress=False)
    a = vimodels.fit("eight_schools_noncentered", seed=2, **kw)
    assert a.settings["step_compiler"] == "fx" and a.settings["jit"] is False
    b = vimodels.fit("eight_schools_noncentered", seed=2, jit=False, **kw)
    assert b.settings["step_compiler"] == "python"
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4, atol=1e-3)
