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


def _correlation_model(y):
    # the covariance [[1, r], [r, 1]], r = x / sqrt(1 + x^2) in (-1, 1): in float64 r rounds
    # to +-1 for |x| beyond about 1e8, where the model's own Cholesky raises (as a GP's
    # kernel matrix does far from the data); the prior never goes there
    import pyro
    import pyro.distributions as dist

    x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    r = x / torch.sqrt(1 + x * x)
    flip = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=y.dtype)
    cov = torch.eye(2, dtype=y.dtype) + r[..., None, None] * flip  # batches over x's draws
    scale_tril = torch.linalg.cholesky(cov)
    loc = torch.zeros(2, dtype=y.dtype)
    with pyro.plate("rows", y.shape[0]):
        pyro.sample("y", dist.MultivariateNormal(loc, scale_tril=scale_tril), obs=y)


def _correlation_mode(y: np.ndarray) -> float:
    """The mode of log p(x | y) by SciPy's Brent search (an independent optimizer)."""
    from scipy import optimize, stats

    def neg(x):
        r = x / np.sqrt(1 + x * x)
        cov = np.array([[1.0, r], [r, 1.0]])
        return -(stats.norm.logpdf(x) + stats.multivariate_normal(np.zeros(2), cov).logpdf(y).sum())

    return optimize.minimize_scalar(
        neg, bounds=(-20.0, 20.0), method="bounded", options={"xatol": 1e-10}
    ).x


_Y = np.random.default_rng(0).multivariate_normal([0, 0], [[1, 0.6], [0.6, 1]], size=20)


def test_a_point_where_the_models_linear_algebra_fails_has_log_density_minus_inf():
    # before: torch.linalg.LinAlgError out of the potential, so out of find_mode, Laplace and
    # Pathfinder whenever a start or a line-search trial landed there (pdb_gp_pois_regr's
    # auto_laplace and pathfinder raised it on seeds 1-3 of 0-3)
    pot = make_potential(_correlation_model, {"y": torch.as_tensor(_Y)}, dtype=torch.float64)
    bad = torch.tensor([1e9], dtype=torch.float64)  # r == 1.0 in float64
    assert float(pot.log_density(bad)) == -math.inf
    lp, g = pot.value_and_grad(bad)
    assert float(lp) == -math.inf and float(g[0]) == 0.0
    u = torch.tensor([[0.2], [1e9], [-0.4]], dtype=torch.float64)
    out = pot.log_density_batch(u)
    assert float(out[1]) == -math.inf
    for k in (0, 2):
        assert float(out[k]) == pytest.approx(float(pot.log_density(u[k])), rel=1e-12)
    assert pot._batch_ok is not False  # one failing row does not make later batches row-wise
    assert torch.equal(pot.log_density_batch(u[[0, 2]]), out[[0, 2]])


def test_find_mode_backs_off_from_where_the_models_linear_algebra_fails():
    # the first start is such a point: that run stops as non-finite, the others find the mode
    data = {"y": torch.as_tensor(_Y)}
    mode = find_mode(_correlation_model, data, init=np.array([1e9]))
    assert mode.report.runs[0].reason == "nonfinite"
    assert mode.values["x"] == pytest.approx(_correlation_mode(_Y), abs=1e-6)


@pytest.mark.slow  # ~10 s: three mode searches on a GP (eager potential)
def test_gp_laplace_and_pathfinder_do_not_raise_on_the_seeds_that_used_to():
    # pdb_gp_pois_regr's kernel matrix is not positive definite at some line-search trials:
    # auto_laplace and pathfinder raised LinAlgError on seeds 1-3; the modes must agree
    import vimodels
    from vimodels.mode.laplace import laplace

    modes = [laplace("pdb_gp_pois_regr", None, seed=s).loc for s in (0, 1)]
    assert torch.allclose(modes[0], modes[1], atol=1e-5)
    fit = vimodels.fit("pdb_gp_pois_regr", guide="pathfinder", seed=1, progress=False)
    assert np.isfinite(fit.elbo)
