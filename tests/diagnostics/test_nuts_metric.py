"""The project's NUTS: dense metric, ArviZ's sample_stats, E-BFMI, live progress."""

from __future__ import annotations

import io
import math
import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from diagnostics.nuts import kernel as _nuts
from diagnostics.nuts.kernel import (
    LowRankMetric,
    NUTSChain,
    Welford,
    low_rank_metric,
    resolve_metric,
    sample_chain,
)
from diagnostics.nuts.progress import ChainStatus, LiveProgress, format_status, live_progress
from diagnostics.nuts.reference import EBFMI_MIN, ebfmi, run_checks, run_nuts

matplotlib.use("Agg")

ARVIZ_STATS = {
    "diverging",
    "step_size",
    "tree_depth",
    "n_steps",
    "lp",
    "acceptance_rate",
    "energy",
    "energy_error",
    "max_energy_error",
}


# ----------------------------------------------------------------------------- targets


def _ar2_correlation(dim: int, r1: float = 0.99, r2: float = 0.965) -> np.ndarray:
    """Stationary AR(2) correlations with lag-1 0.99 and lag-2 0.965 (condition ~3e4 at 50)."""
    phi1 = r1 * (1 - r2) / (1 - r1**2)
    phi2 = (r2 - r1**2) / (1 - r1**2)
    rho = [1.0, r1]
    for _ in range(2, dim):
        rho.append(phi1 * rho[-1] + phi2 * rho[-2])
    i = np.arange(dim)
    return np.asarray(rho)[np.abs(i[:, None] - i[None, :])]


DIM = 50
CORR = _ar2_correlation(DIM)
# three decades; above Stan's regularization 1e-3 * 5 / (n + 5) of the metric, which on
# smaller scales (the covariance's smallest eigenvalue is ~7e-4 of the smallest variance)
# would dominate the metric's narrowest directions and with them the step size
SCALES50 = np.logspace(0, 3, DIM)
MEANS50 = np.linspace(-1.0, 1.0, DIM)
TRIL50 = torch.tensor(np.linalg.cholesky(CORR * np.outer(SCALES50, SCALES50)))
# three decades below 1: sds down to 1e-3, where Stan's absolute regularization of the
# dense metric (1e-3 * 5 / (n + 5) added to variances of 1e-6) swamped the narrow directions
TINY50 = np.logspace(-3, 0, DIM)


def correlated_model():
    pyro.sample("x", dist.MultivariateNormal(torch.tensor(MEANS50), scale_tril=TRIL50))


def small_correlated_model():
    cov = torch.tensor([[1.0, 0.95, 0.0], [0.95, 1.0, 0.0], [0.0, 0.0, 0.04]])
    pyro.sample("x", dist.MultivariateNormal(torch.tensor([1.0, -1.0, 0.5]), cov))


# ----------------------------------------------------------------------------- dense metric


@pytest.mark.parametrize("dense", [False, True])
def test_welford_is_the_sample_variance_or_covariance_regularized_as_stan(dense):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 2.0, 0.1], [0.0, 0.0, 0.3]])
    x += np.array([1e3, -5.0, 0.0])  # a large mean: the running update must not lose the spread
    w = Welford(3, dense=dense)
    for _ in range(2):  # restart forgets the first pass
        for row in x[::-1]:
            w.add(row)
        w.restart()
    for row in x:
        w.add(row)
    n = len(x)
    cov = np.cov(x.T) if dense else np.var(x, axis=0, ddof=1)
    reg = 1e-3 * 5 / (n + 5) * (np.eye(3) if dense else np.ones(3))
    np.testing.assert_allclose(w.regularized(), n / (n + 5) * cov + reg, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(w.mean, x.mean(axis=0), rtol=1e-14)
    if dense:
        out = w.regularized()
        assert np.array_equal(out, out.T)
        diag = Welford(3)
        for row in x:
            diag.add(row)
        np.testing.assert_allclose(np.diag(out), diag.regularized(), rtol=1e-12)


def test_relative_covariance_is_stans_above_unit_variance_and_scale_free_below():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3)) * np.array([3.0, 1e-3, 0.5]) + np.array([0.0, 5.0, -1.0])
    x[:, 2] += 0.2 * x[:, 0]
    w = Welford(3, dense=True)
    for row in x:
        w.add(row)
    n, cov = len(x), np.cov(x.T)
    expected = n / (n + 5) * cov + 1e-3 * 5 / (n + 5) * np.diag(np.minimum(np.diag(cov), 1.0))
    got = w.relative_covariance()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-18)
    # the 1e-3 sd coordinate keeps its scale (Stan's adds 7.7e-5 to its variance of 1e-6)
    assert got[1, 1] / cov[1, 1] < 1.0 and w.regularized()[1, 1] / cov[1, 1] > 50
    # scale-free below unit variance: rescaling the draws rescales the metric
    w1, w2 = Welford(3, dense=True), Welford(3, dense=True)
    for row in x:
        w1.add(row * 0.1)
        w2.add(row * 1e-3)
    np.testing.assert_allclose(w2.relative_covariance(), 1e-4 * w1.relative_covariance(), rtol=1e-9)
    stuck = Welford(2, dense=True)
    for _ in range(10):
        stuck.add(np.array([1.0, 2.0]))
    n = 10  # a variance of 0 is taken as 1e-3, then regularized
    np.testing.assert_allclose(
        stuck.relative_covariance(), (n / (n + 5) + 1e-3 * 5 / (n + 5)) * 1e-3 * np.eye(2)
    )


def _gaussian_draws_and_gradients(cov: np.ndarray, n: int, seed: int) -> tuple:
    """Draws of N(0, cov) and the potential's exact gradients there (cov^-1 x)."""
    x = np.random.default_rng(seed).multivariate_normal(np.zeros(len(cov)), cov, size=n)
    return x, np.linalg.solve(cov, x.T).T


def test_low_rank_metric_is_the_covariance_from_exact_gradients():
    # S C_grad S = C_draws has the exact solution S = cov when grad = cov^-1 x,
    # whatever the sampling noise of the draws: with every eigenvalue kept, the metric
    # is the covariance up to gamma (1e-5 in the scaled space)
    cov = CORR[:12, :12] * np.outer(TINY50[:12], TINY50[:12]) * 1e4
    x, g = _gaussian_draws_and_gradients(cov, 200, 0)
    full = low_rank_metric(x, g, cutoff=1.0)
    assert full.rank == 12
    np.testing.assert_allclose(full.dense(), cov, rtol=1e-3, atol=1e-3 * np.abs(cov).max())
    # nutpie's cutoff 2: the posterior seen through the metric has every variance in [1/2, 2]
    m = low_rank_metric(x, g)
    assert 0 < m.rank < 12
    chol = np.linalg.cholesky(cov)
    inv_chol = np.linalg.inv(chol)
    seen = np.linalg.eigvalsh(inv_chol @ m.dense() @ inv_chol.T)
    assert seen.min() >= 0.5 - 1e-6 and seen.max() <= 2.0 + 1e-6, seen
    # too few draws, or a coordinate that never moved: a diagonal, no low-rank part
    assert low_rank_metric(x[:2], g[:2]).rank == 0
    x[:, 3] = 1.0
    stuck = low_rank_metric(x, g)
    assert stuck.rank == 0 and np.all(np.isfinite(stuck.stds))


def test_low_rank_velocity_and_momentum_match_the_dense_matrix():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    m = LowRankMetric(np.array([1.0, 2.0, 0.5, 1e-3, 3.0, 1.0]), q, np.array([9.0, 0.2]))
    inv = m.dense()
    r = rng.normal(size=6)
    np.testing.assert_allclose(m.velocity(r), inv @ r, rtol=1e-12)
    xi = rng.normal(size=(20000, 6))
    p = np.stack([m.momentum(row) for row in xi])
    mass = np.linalg.inv(inv)
    scale = np.sqrt(np.outer(np.diag(mass), np.diag(mass)))  # se of a covariance ~ scale sqrt(2/n)
    assert np.abs((np.cov(p.T) - mass) / scale).max() <= 5 * np.sqrt(2 / 20000)
    chain = NUTSChain(lambda z: (0.5 * float(z @ z), z.copy()), np.zeros(6), rng)
    chain.inv_mass = m
    assert chain.inv_mass is m
    np.testing.assert_allclose(chain._velocity(r), inv @ r, rtol=1e-12)
    chain.inv_mass = np.ones(6)  # back to diagonal
    np.testing.assert_array_equal(chain._velocity(r), r)


def test_dense_momentum_has_the_metric_as_covariance_and_leapfrog_conserves_energy():
    pyro.set_rng_seed(0)
    params, potential_fn, _, _ = pyro.infer.mcmc.util.initialize_model(small_correlated_model)
    z0 = params["x"].detach().double().numpy()
    potential = _nuts.FlatPotential(potential_fn, {"x": (3,)}, torch.float32, True, z0)
    z1 = np.array([1.5, -0.5, 0.6])  # about one sd from the mean: energy O(D)
    chain = NUTSChain(potential, z1, np.random.default_rng(1))
    inv = np.array([[1.0, 0.95, 0.0], [0.95, 1.0, 0.0], [0.0, 0.0, 0.04]])
    chain.inv_mass = inv
    r = np.stack([chain._momentum() for _ in range(20000)])
    # momentum ~ N(0, M), M = inv^-1: within sampling noise (se ~ M_ij sqrt(2 / n))
    mass = np.linalg.inv(inv)
    np.testing.assert_allclose(np.cov(r.T), mass, atol=5 * np.sqrt(2 / 20000) * np.abs(mass).max())
    start = _nuts._Point(chain.z, r[0] / 3.0, chain.u, chain.g)
    p = start
    for _ in range(20):
        p = chain._leapfrog(p, 0.1)
    # with the exact covariance as metric the target is isotropic: step 0.1 is small
    assert abs(chain._energy(p.u, p.r) - chain._energy(start.u, start.r)) < 0.01
    p.r = -p.r
    for _ in range(20):
        p = chain._leapfrog(p, 0.1)
    np.testing.assert_allclose(p.z, start.z, atol=1e-4)


def test_auto_metric_is_dense_for_few_dimensions_and_enough_warmup():
    # Stan's windows: 1000 warm-up iterations end with a window of 500 draws, 300 with 100
    assert _nuts.last_window(1000) == 500 and _nuts.last_window(300) == 100
    assert _nuts.last_window(500) == 200 and _nuts.last_window(10) == 0
    limit = _nuts.AUTO_DENSE_MAX_DIM
    assert resolve_metric("auto", limit, 2000) == "dense"  # last window 1100 >= 5 * 64
    assert resolve_metric("auto", limit + 1, 5000) == "diag"
    assert resolve_metric("auto", 45, 300) == "low_rank"  # 100 draws for 45 dimensions: too few
    assert resolve_metric("auto", 10, 300) == "dense"
    assert resolve_metric("diag", 3, 500) == "diag" and resolve_metric("dense", 500, 10) == "dense"
    assert resolve_metric("low_rank", 3, 500) == "low_rank"
    with pytest.raises(ValueError, match="unknown metric"):
        resolve_metric("full", 3, 500)


def test_dense_lockstep_chains_draw_what_each_chain_draws_alone():
    kw = {"num_warmup": 60, "num_samples": 15, "metric": "dense"}
    alone = [sample_chain(small_correlated_model, {}, seed=s, **kw) for s in (3, 4)]
    together = _nuts.sample_chains(small_correlated_model, {}, seeds=[3, 4], batch=False, **kw)
    for a, b in zip(alone, together):
        assert a["metric"] == b["metric"] == "dense" and a["inv_mass"].shape == (3, 3)
        np.testing.assert_array_equal(a["samples"]["x"], b["samples"]["x"])


@pytest.mark.slow
def test_dense_metric_samples_a_correlated_50d_gaussian_in_short_trees():
    # correlations up to 0.99 (condition number ~3e4) and scales over three decades
    runs = _nuts.sample_chains(
        correlated_model,
        {},
        seeds=[11, 12],
        num_warmup=600,
        num_samples=300,
        max_tree_depth=7,  # caps the cost of the first windows (unit, then rough metrics)
        metric="dense",
    )
    _check_gaussian(runs, MEANS50, SCALES50, "dense")


def _check_gaussian(runs: list, means: np.ndarray, sds: np.ndarray, metric: str) -> None:
    draws = np.stack([r["samples"]["x"] for r in runs])  # (chains, draws, D)
    for k in range(draws.shape[-1]):
        x = draws[..., k]
        assert az.rhat(x) < 1.05, k  # converged (the accuracy is checked below)
        m_se, s_se = float(az.mcse(x, method="mean")), float(az.mcse(x, method="sd"))
        assert abs(x.mean() - means[k]) <= 5 * m_se, (k, x.mean(), m_se)
        assert abs(x.std() - sds[k]) <= 5 * s_se, (k, x.std(), s_se)
    for r in runs:
        assert r["metric"] == metric and not r["stats"]["diverging"].any()
        assert r["stats"]["tree_depth"].mean() <= 4.0, r["stats"]["tree_depth"].mean()


@pytest.mark.slow
def test_low_rank_metric_samples_the_correlated_50d_gaussian_in_short_trees():
    kw = {"num_warmup": 600, "num_samples": 300, "max_tree_depth": 7}
    runs = _nuts.sample_chains(correlated_model, {}, seeds=[11, 12], metric="low_rank", **kw)
    assert isinstance(runs[0]["inv_mass"], LowRankMetric) and runs[0]["inv_mass"].rank > 0
    _check_gaussian(runs, MEANS50, SCALES50, "low_rank")


# 14 s at load 2.4 under -n 2 (the nutpie import included)
@pytest.mark.slow
def test_nutpie_samples_the_correlated_50d_gaussian_in_short_trees():
    s = {"sampler": "nutpie", "num_chains": 2, "num_warmup": 400, "num_samples": 200}
    ref = run_nuts(correlated_model, settings={**s, "max_tree_depth": 7}, seed=11, cache=False)
    assert ref.settings["sampler_used"] == "nutpie"
    runs = [
        {
            "samples": {"x": ref.draws["x"][c]},
            "stats": {k: v[c] for k, v in ref.sample_stats.items()},
            "metric": ref.settings["metric_used"][0],
        }
        for c in range(2)
    ]
    _check_gaussian(runs, MEANS50, SCALES50, "low_rank (nutpie)")
    # nutpie counts the tree's doublings as the project's sampler does: at most 2^depth steps
    assert np.all(ref.sample_stats["n_steps"] <= 2 ** ref.sample_stats["tree_depth"])


def _gaussian_chain(cov: np.ndarray, mean: np.ndarray, seed: int, metric: str) -> dict:
    """One chain of :func:`chain_steps` on N(mean, cov) (NumPy potential), started at the mean."""
    prec = np.linalg.inv(cov)

    def potential(z):
        d = z - mean
        g = prec @ d
        return 0.5 * float(d @ g), g

    program = _nuts.chain_steps(
        mean.copy(),
        np.random.default_rng(seed),
        num_warmup=600,
        num_samples=300,
        max_tree_depth=7,
        metric=metric,
    )
    run = _nuts.drive(program, potential)
    return {"samples": {"x": run["draws"]}, "stats": run["stats"], "metric": run["metric"]}


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["dense", "low_rank"])
def test_metrics_keep_short_trees_where_sds_go_down_to_1e_3(metric):
    # Stan's absolute regularization made the dense metric's narrow directions (variances
    # down to 1e-6, plus 1e-3 * 5 / (n + 5)) tens of times too wide, the step size several
    # times too small and the trees deeper; started at the mean (the test is the metric, not
    # the journey from a random start thousands of sds away)
    cov = CORR * np.outer(TINY50, TINY50)
    runs = [_gaussian_chain(cov, MEANS50, seed, metric) for seed in (11, 12)]
    _check_gaussian(runs, MEANS50, TINY50, metric)


@pytest.mark.slow
def test_diagonal_metric_needs_deep_trees_on_the_same_gaussian():
    run = sample_chain(
        correlated_model, {}, seed=11, num_warmup=100, num_samples=20, max_tree_depth=8
    )
    assert run["metric"] == "diag" and run["inv_mass"].shape == (DIM,)
    assert run["stats"]["tree_depth"].mean() >= 7.0, run["stats"]["tree_depth"].mean()


# ----------------------------------------------------------------------------- sample stats


def test_kernel_records_arviz_sample_stats_consistently():
    run = sample_chain(small_correlated_model, {}, seed=5, num_warmup=60, num_samples=40)
    st = run["stats"]
    assert set(st) == ARVIZ_STATS
    assert all(v.shape == (40,) for v in st.values())
    # the Hamiltonian is the potential plus a non-negative kinetic energy
    assert np.all(st["energy"] >= -st["lp"] - 1e-9)
    assert np.all(np.abs(st["energy_error"]) <= np.abs(st["max_energy_error"]) + 1e-12)
    assert np.all(st["n_steps"] >= 1) and np.all(st["n_steps"] <= 2 ** st["tree_depth"] - 1)


def test_ebfmi_check_fails_on_energy_that_moves_slowly():
    rng = np.random.default_rng(0)
    draws = {"x": rng.normal(size=(2, 1000))}
    fresh = rng.normal(size=(2, 1000))
    sticky = np.cumsum(rng.normal(size=(2, 1000)), axis=1)  # a random walk: E-BFMI ~ 0
    np.testing.assert_allclose(ebfmi(fresh), az.bfmi(fresh))
    ok = {c.name: c for c in run_checks(draws, ("x",), 0, fresh)}["ebfmi"]
    assert ok.ok and ok.value > 1.5
    bad = {c.name: c for c in run_checks(draws, ("x",), 0, sticky)}["ebfmi"]
    assert not bad.ok and bad.value < EBFMI_MIN and "E-BFMI" in bad.detail
    assert "ebfmi" not in {c.name for c in run_checks(draws, ("x",), 0)}


def test_reference_inference_data_works_with_arviz(tiny_nuts_eight_schools, tmp_path):
    import matplotlib.pyplot as plt

    from diagnostics.convert import load_netcdf, reference_to_inference_data, save_netcdf

    ref = tiny_nuts_eight_schools
    nutpie = ref.settings["sampler_used"] == "nutpie"  # with sampler="auto" (10 dimensions)
    assert set(ref.sample_stats) == ARVIZ_STATS - ({"max_energy_error"} if nutpie else set())
    assert "ebfmi" in {c.name for c in ref.checks}
    idata = reference_to_inference_data(ref)
    summary = az.summary(idata, var_names=["mu", "tau"])
    assert list(summary.index) == ["mu", "tau"]
    np.testing.assert_allclose(az.bfmi(idata), ebfmi(ref.sample_stats["energy"]))
    az.plot_energy(idata)
    az.plot_trace(idata, var_names=["mu"], divergences="bottom")
    plt.close("all")
    path = save_netcdf(idata, tmp_path / "ref.nc")
    back = load_netcdf(path)
    for name in ref.sample_stats:
        np.testing.assert_array_equal(
            back.sample_stats[name].values, idata.sample_stats[name].values
        )
    np.testing.assert_array_equal(back.posterior["mu"].values, idata.posterior["mu"].values)


# ----------------------------------------------------------------------------- progress


def test_progress_line_shows_phase_rate_divergences_step_depth_and_time_left():
    s = ChainStatus(chain=2, num_warmup=300, num_samples=700, started=100.0)
    info = {"diverging": False, "step_size": 0.1234, "tree_depth": 3, "n_steps": 7}
    for i in range(400):
        s.record(dict(info, diverging=i in (10, 350)), warmup=i < 300)
    line = format_status(s, now=110.0)  # 400 draws in 10 s: 40 draws/s, 600 left: 15 s
    assert line == (
        "chain 2: warm-up 300/300, sampling 100/700 | 40.0 draws/s | 1 divergent "
        "(+1 in warm-up) | step 0.123 | depth 3, 7.0 grad/draw | 15 s left"
    )
    for _ in range(600):
        s.record(info, warmup=False)
    assert format_status(s, now=3700.0).endswith("| done")
    fresh = ChainStatus(chain=0, num_warmup=10, num_samples=10, started=0.0)
    assert format_status(fresh, now=0.0).endswith("| ? left")


def test_live_progress_redraws_in_place_at_most_twice_a_second():
    now = [0.0]
    out = io.StringIO()
    live = LiveProgress(out, clock=lambda: now[0])
    a, b = live.add(0, 5, 5), live.add(1, 5, 5)
    info = {"diverging": False, "step_size": 0.5, "tree_depth": 2, "n_steps": 3}
    a.record(info, warmup=True)  # first redraw
    now[0] = 0.1
    b.record(info, warmup=True)  # too soon: nothing
    assert out.getvalue().count("\n") == 2 and "\x1b[2F" not in out.getvalue()
    now[0] = 0.7
    b.record(info, warmup=True)
    text = out.getvalue()
    assert text.count("\x1b[2F") == 1 and text.count("chain 1: warm-up 2/5") == 1
    live.close()
    assert live.statuses == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal(capfd, tmp_path, monkeypatch):
    assert live_progress(True, io.StringIO()) is None
    assert live_progress(False, _Terminal()) is None
    assert isinstance(live_progress(True, _Terminal()), LiveProgress)
    tiny = {"num_chains": 2, "num_warmup": 20, "num_samples": 10}
    for sampler in ("nutpie", "vimodels"):  # nutpie's own bar writes to file descriptor 2
        settings = {**tiny, "sampler": sampler}
        run_nuts("eight_schools_noncentered", settings=settings, cache=False, progress=True)
        err = capfd.readouterr().err
        assert "NUTS on eight_schools_noncentered" in err  # the plain lines stay
        assert "draws/s" not in err and "\x1b" not in err and "\r" not in err
    tiny["sampler"] = "vimodels"  # the project's sampler's live lines
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run_nuts("eight_schools_noncentered", settings=tiny, cache=False, progress=True)
    shown = term.getvalue()
    assert "chain 0: warm-up 20/20, sampling 10/10" in shown and "chain 1:" in shown
    assert "draws/s" in shown and "grad/draw" in shown


def _steep(z: np.ndarray) -> tuple[float, np.ndarray]:
    """``sum(exp(z^2))``: overflows to inf beyond |z| of about 26.6, as an explosive model does."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(z * z)
        return float(e.sum()), 2.0 * z * e


def test_an_overflowing_step_is_a_divergence_not_a_warning():
    chain = NUTSChain(_steep, np.array([0.5, -0.3]), np.random.default_rng(0))
    chain.step_size = 50.0  # the first leapfrog step lands where exp(z^2) overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = _nuts.drive(chain.transition_steps(), _steep)
    assert info["diverging"] and info["n_steps"] == 1
    np.testing.assert_array_equal(chain.z, [0.5, -0.3])  # the chain stays where it was
    assert math.isinf(info["max_energy_error"])


@pytest.mark.parametrize("metric", ["dense", "low_rank"])
def test_a_chain_started_far_in_the_tail_finds_the_posterior_without_warnings(metric):
    # exp(z^2) starting at z = 6 (potential 4e15 per coordinate): the first window's draws
    # follow the chain's way in; estimated from them, a dense or low-rank metric used to
    # freeze the chain there (deep trees, minutes; pdb_arma11 in benchmark 3d); now 21
    # gradients per draw (the diagonal metric: 6)
    z0 = np.array([6.0, -5.5, 0.1])
    programs = [
        _nuts.chain_steps(
            z0, np.random.default_rng(1), num_warmup=150, num_samples=50, metric=metric
        )
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = next(programs[0])
        run = _nuts.drive(_continue(programs[0], first), _steep)
    draws = run["draws"]
    assert np.abs(draws).max() < 3.0  # exp(z^2) puts essentially no mass beyond |z| = 3
    assert run["stats"]["n_steps"].mean() < 50  # 322 (dense) and 352 (low-rank) before


def _continue(program, first):
    """The generator ``program`` whose first yield (``first``) was already taken."""
    reply = yield first
    while True:
        try:
            z = program.send(reply)
        except StopIteration as stop:
            return stop.value
        reply = yield z


def test_a_window_whose_potential_falls_steeply_is_a_transient():
    rng = np.random.default_rng(0)
    stationary = 5.0 + rng.standard_normal(100) * np.sqrt(2.0)  # D = 4: sd sqrt(2)
    assert not _nuts.is_transient(stationary, 4)
    falling = stationary + np.linspace(40.0, 0.0, 100)
    assert _nuts.is_transient(falling, 4)
    assert _nuts.is_transient([1.0, 2.0, np.inf, 1.0], 4)
    assert not _nuts.is_transient([1e9, 1.0], 4)  # too short to say


# ----------------------------------------------------------------------------- warm-up schedule


def test_switching_windows_follow_nutpies_schedule_and_end_with_a_long_window():
    w = _nuts.SwitchingWindows(300)
    assert (w.early_end, w.final_start) == (90, 255)
    current = following = 0
    switches = []
    for i in range(300):
        if w.switches(i, i + 1 - following, following - current):
            current, following = following, i + 1
            switches.append(i)
    # every 10 draws in the first 30 %; the late window after the first 80 draws (160)
    # would not fill before the step-size-only window, so the current one grows to it
    # (Stan's rule for its last window)
    assert switches == list(range(9, 90, 10))
    assert w.final_window() == 255 - 80 == 175
    assert _nuts.SwitchingWindows(1000).final_window() >= 400  # doubling late windows
    assert not _nuts.SwitchingWindows(19).adapt_metric


class _Steps(ChainStatus):
    """A chain status that keeps every transition's leapfrog steps."""

    def __init__(self, num_warmup, num_samples):
        super().__init__(chain=0, num_warmup=num_warmup, num_samples=num_samples)
        self.steps = []

    def record(self, info, warmup):
        self.steps.append(info["n_steps"])
        super().record(info, warmup)


@pytest.mark.parametrize("metric", ["dense", "low_rank"])
def test_metric_is_estimated_early_in_the_warmup_and_samples_correctly(metric):
    # a correlated (AR(2), lag-1 0.99) and badly scaled (sds 0.1 to 10) Gaussian started off
    # its mean: under a diagonal metric the trees are deep; the metric is estimated from the
    # tenth warm-up draw on (nutpie's schedule), so that iterations 30 to 100 already run
    # short trees: 6-14 steps per draw, against 180 (dense) and 169 (low-rank) with Stan's
    # windows, which estimated it first at iteration 135 of 150; about 3 s for both
    dim = 10
    sds = np.logspace(-1, 1, dim)
    cov = _ar2_correlation(dim) * np.outer(sds, sds)
    mean = np.linspace(-1.0, 1.0, dim)
    prec = np.linalg.inv(cov)

    def potential(z):
        d = z - mean
        g = prec @ d
        return 0.5 * float(d @ g), g

    runs = []
    for seed in (5, 6):
        status = _Steps(150, 300)
        program = _nuts.chain_steps(
            mean + 3.0 * sds,
            np.random.default_rng(seed),
            num_warmup=150,
            num_samples=300,
            max_tree_depth=8,
            metric=metric,
            status=status,
        )
        run = _nuts.drive(program, potential)
        assert np.mean(status.steps[30:100]) <= 30.0, np.mean(status.steps[30:100])
        runs.append({"samples": {"x": run["draws"]}, "stats": run["stats"], "metric": metric})
    _check_gaussian(runs, mean, sds, metric)


def _correlated_pair():
    z = pyro.sample(
        "z", dist.MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, 0.95], [0.95, 1.0]]))
    )
    return z


def test_a_user_model_gets_metric_auto_and_every_entry_names_its_metric(tmp_path):
    # a model without its own settings (a user's) runs "auto" (dense here: 2 dimensions);
    # the catalog's and validation entries keep the metric their references were checked with
    from vimodels.catalog.base import CatalogEntry, NutsSettings
    from vimodels.catalog.registry import MODELS
    from vimodels.validation import registry as validation

    assert NutsSettings().metric == "auto"
    ref = run_nuts(
        _correlated_pair,
        {},
        settings={"num_warmup": 60, "num_samples": 20, "num_chains": 1},
        cache=False,
    )
    assert ref.settings["metric"] == "auto"
    assert ref.settings["metric_used"] == ["dense"]
    entries = list(MODELS.values()) + [
        e for e in vars(validation).values() if isinstance(e, CatalogEntry)
    ]
    dense = {"pdb_ark", "pdb_garch11", "pdb_hmm_example"}
    for entry in entries:
        assert entry.nuts.metric == ("dense" if entry.name in dense else "diag"), entry.name
