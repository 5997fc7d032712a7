"""The flat potential and L-BFGS modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mode_models import as_tensors, correlated_gaussian, gaussian_model, positive_model
from pyro.infer.mcmc.util import initialize_model

from vimodels.catalog.registry import get_model
from vimodels.errors import IncompatibleError, OptionError
from vimodels.mode.lbfgs import find_mode, lbfgs_run
from vimodels.mode.potential import make_potential


def test_potential_matches_pyros_potential_energy():
    """log density (Jacobian included) = -Pyro's potential_fn, at random points; batched too."""
    entry = get_model("eight_schools_noncentered")
    data = entry.data()
    pot = make_potential(entry.model, data, dtype=torch.float64)
    _, potential_fn, _, _ = initialize_model(entry.model, model_kwargs=pot.data)
    u = pot.random_inits(6, seed=1)
    mine = pot.log_density_batch(u)
    for row, value in zip(u, mine):
        params = {k: v for k, v in pot.unpack(row).items()}
        expected = -potential_fn(params)
        # Pyro's potential makes some constants in float32: agreement to ~1e-8 relative
        assert float(value) == pytest.approx(float(expected), rel=1e-7)
        assert float(pot.log_density(row)) == pytest.approx(float(value), rel=1e-12)
    assert pot.site_names() == ("mu", "tau", "theta_tilde")
    assert pot.describe(4) == "theta_tilde[2]"


def test_discrete_models_are_refused():
    with pytest.raises(IncompatibleError, match="discrete latent site"):
        make_potential(
            get_model("galaxies_gaussian_mixture").model,
            get_model("galaxies_gaussian_mixture").data(),
        )


def test_lbfgs_reaches_the_mode_where_adam_with_as_many_gradients_does_not():
    """50-dim Gaussian, sds over 4 decades, correlation 0.9: the mode to 1e-6 relative."""
    mean, cov = correlated_gaussian()
    loc, tril = as_tensors(mean, np.linalg.cholesky(cov))
    pot = make_potential(gaussian_model, {"mean": loc, "scale_tril": tril})
    path = lbfgs_run(pot, torch.zeros(50, dtype=torch.float64), max_iters=2000, gtol=1e-12)
    u = path.positions[-1].numpy()
    rel = np.abs(u - mean) / np.abs(mean)
    assert path.converged, path.reason
    assert rel.max() < 1e-6
    budget = path.num_evals  # the Hessian-diagonal passes of the preconditioner count too
    # without the diagonal preconditioner plain L-BFGS stalls on this condition number (1e9)
    plain = lbfgs_run(
        pot, torch.zeros(50, dtype=torch.float64), max_iters=budget, gtol=1e-12, precondition=False
    )
    assert np.abs(plain.positions[-1].numpy() - mean).max() > 1e-3 * np.abs(mean).min()
    # Adam, same number of gradient evaluations, best of three learning rates
    best = math.inf
    for lr in (0.02, 0.3, 3.0):
        x = torch.zeros(50, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(budget):
            opt.zero_grad()
            (-pot.log_density(x)).backward()
            opt.step()
        best = min(best, float((np.abs(x.detach().numpy() - mean) / np.abs(mean)).max()))
    assert best > 1e-2, f"Adam reached {best:.2g} relative in {budget} gradients"


def test_find_mode_report_and_constrained_values():
    y = torch.tensor([1.5, -2.0, 0.7, 3.1, -0.4])
    m = find_mode(positive_model, {"y": y}, num_inits=3, seed=2)
    assert m.report.converged
    assert len(m.report.runs) == 3
    assert "3 of 3 start(s) reached it" in m.report.message
    # the unconstrained mode of log s: d/du [log p(y|e^u) + log HalfNormal(e^u) + u] = 0
    s = float(m.values["s"])
    n, ss = len(y), float((y.double() ** 2).sum())
    grad = -n + ss / s**2 - s**2 / 4.0 + 1.0
    assert abs(grad) < 1e-6
    # the constrained MAP (no Jacobian) differs by the Jacobian's pull
    m0 = find_mode(positive_model, {"y": y}, jacobian=False, num_inits=1)
    s0 = float(m0.values["s"])
    assert abs(-n + ss / s0**2 - s0**2 / 4.0) < 1e-6


def test_find_mode_checks_options():
    with pytest.raises(OptionError, match="num_inits"):
        find_mode("conjugate_linear_regression", num_inits=0)
    with pytest.raises(OptionError, match=r"init must have shape \(3,\)"):
        find_mode("conjugate_linear_regression", init=np.zeros(2))


def _path_checks(pot, path):
    """log p never falls along the path; recorded values and gradients are the potential's."""
    lps = path.log_densities.numpy()
    assert np.all(np.diff(lps) >= 0.0), np.diff(lps).min()
    for u, lp, g in zip(path.positions, path.log_densities, path.grads, strict=True):
        x = u.clone().requires_grad_(True)
        value = pot.log_density(x)
        (expected,) = torch.autograd.grad(value, x)
        # the frozen graph agrees with the eager potential to 1e-9 (vimodels.mode.fast.RTOL)
        assert float(lp) == pytest.approx(float(value.detach()), rel=1e-9, abs=1e-9)
        assert torch.allclose(g, expected, rtol=1e-9, atol=1e-9 * (1 + float(expected.abs().max())))


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "eager"])
def test_recorded_path_is_monotone_with_autograds_gradients(frozen, monkeypatch):
    """Each recorded iterate's log p and gradient are those at its position (Pathfinder)."""
    import vimodels.mode.lbfgs as lbfgs

    if not frozen:
        monkeypatch.setattr(lbfgs, "compiled_value_and_grad", lambda potential: None)
    pot = make_potential(
        get_model("eight_schools_noncentered").model, get_model("eight_schools_noncentered").data()
    )
    start = pot.random_inits(1, seed=3)[0]
    path = lbfgs_run(pot, start, history_size=5)
    assert path.converged and path.num_iters > 10, (path.reason, path.num_iters)
    _path_checks(pot, path)


def test_no_point_is_evaluated_twice(monkeypatch):
    """A step's start was its previous line search's last point: served, not evaluated again."""
    import vimodels.mode.lbfgs as lbfgs

    real = lbfgs.compiled_value_and_grad
    points: list[bytes] = []

    def recording(potential):
        fn = real(potential)

        def value_and_grad(u):
            points.append(u.detach().numpy().tobytes())
            return fn(u)

        return value_and_grad

    monkeypatch.setattr(lbfgs, "compiled_value_and_grad", recording)
    idx = np.arange(10)
    sd = np.linspace(1.0, 3.0, 10)
    cov = 0.5 ** np.abs(idx[:, None] - idx[None, :]) * sd[:, None] * sd[None, :]
    loc, tril = as_tensors(np.linspace(-4.0, 5.0, 10), np.linalg.cholesky(cov))
    pot = make_potential(gaussian_model, {"mean": loc, "scale_tril": tril})
    path = lbfgs_run(pot, torch.zeros(10, dtype=torch.float64), precondition=False)
    assert path.converged
    assert len(points) == len(set(points)) == path.num_evals
    # about one evaluation per iteration (the old driver made two or more)
    assert path.num_evals < 1.5 * path.num_iters + 5, (path.num_evals, path.num_iters)
