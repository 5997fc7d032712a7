"""The fixes made for users' models, exercised on posteriors the project did not write.

- **Log evidence** (:func:`diagnostics.evidence.reference_log_evidence`, bridge
  sampling on reference draws): on two posteriordb regressions whose
  evidence has a closed form (mesquite: flat priors, ``beta`` and ``sigma``
  integrate out exactly) or a 1-D quadrature (kidiq: ``beta`` in closed form,
  ``sigma`` under its half-Cauchy prior by quadrature), from posteriordb's
  own draws.
- **ImproperUniform sites with pyro.factor priors** (:mod:`vimodels.adapt`):
  the HMM's ``positive_ordered`` means written the way users translate Stan's
  ``positive_ordered[2] mu; mu ~ normal(...)`` go through ``adapt_model`` and
  give the registry model's log density, evidence and a NUTS run.
- **E-BFMI** is checked on every validation NUTS reference
  (``tests/validation/test_pdb_nuts.py`` asserts the check is there).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from diagnostics import get_reference
from diagnostics.evidence import UnconstrainedDensity, reference_log_evidence
from vimodels.adapt import unsampleable_sites
from vimodels.catalog.registry import get_model
from vimodels.resolve import resolve_model


def _flat_regression_log_evidence(X: np.ndarray, y: np.ndarray, cauchy_scale: float) -> float:
    """``log int N(y | X beta, sigma) p(sigma) dbeta dsigma`` (flat beta) of the pdb regressions.

    ``beta`` integrates out exactly; ``sigma`` too under a flat prior
    (``m = N - D``: ``(1/2) Gamma((m-1)/2) (RSS/2)^(-(m-1)/2)``), else by the
    trapezoid rule over ``log sigma`` (+-1.5 around the estimate: +-40
    posterior sd for these N).
    """
    n, d = X.shape
    m = n - d
    xtx = X.T @ X
    beta = np.linalg.solve(xtx, X.T @ y)
    rss = float(((y - X @ beta) ** 2).sum())
    base = -0.5 * m * math.log(2 * math.pi) - 0.5 * np.linalg.slogdet(xtx)[1]
    if cauchy_scale == 0:
        return base + math.log(0.5) + math.lgamma((m - 1) / 2) - (m - 1) / 2 * math.log(rss / 2)
    centre = 0.5 * math.log(rss / n)
    s = np.linspace(centre - 1.5, centre + 1.5, 20001)
    sigma = np.exp(s)
    log_f = (
        math.log(2 / (math.pi * cauchy_scale))
        - np.log1p((sigma / cauchy_scale) ** 2)
        - m * s
        - rss / (2 * sigma**2)
        + s  # d sigma = sigma d log sigma
    )
    top = float(log_f.max())
    return base + top + math.log(np.trapezoid(np.exp(log_f - top), s))


@pytest.mark.parametrize("name", ["pdb_mesquite_logvolume", "pdb_kidiq_interaction"])
def test_bridge_sampling_matches_the_closed_form_evidence(name):
    entry = get_model(name)
    data = entry.data()
    truth = _flat_regression_log_evidence(
        data["X"].numpy(), data["y"].numpy(), data.get("sigma_cauchy_scale", 0.0)
    )
    ref = get_reference(name, kind="external")
    le = reference_log_evidence(
        partial(entry.model, **data), (), ref, max_plate_nesting=entry.max_plate_nesting, seed=0
    )
    assert le.method == "bridge sampling" and "external" in le.source
    assert 0 < le.se < 0.05
    assert abs(le.value - truth) <= 3 * le.se, (le.value, le.se, truth)
    # the importance-sampling cross-check with the same proposal agrees
    assert le.diagnostics["importance"]["z"] <= 3


def hmm_user(y: torch.Tensor) -> None:
    """posteriordb's hmm_example as a user writes it: ImproperUniform + pyro.factor for mu."""
    ones = y.new_ones(2)
    theta1 = pyro.sample("theta1", dist.Dirichlet(ones))
    theta2 = pyro.sample("theta2", dist.Dirichlet(ones))
    mu = pyro.sample(
        "mu", dist.ImproperUniform(constraints.positive_ordered_vector, (), (2,))
    )  # positive_ordered[2] mu;
    pyro.factor("mu_prior", dist.Normal(y.new_tensor([3.0, 10.0]), 1.0).log_prob(mu).sum(-1))
    log_theta = torch.stack([theta1, theta2], -2).log()
    steps = y.shape[-1]
    first = torch.zeros_like(log_theta).unsqueeze(-3)  # the first state uniform
    rest = log_theta.unsqueeze(-3).expand(log_theta.shape[:-2] + (steps - 1, 2, 2))
    emission = dist.Normal(mu.unsqueeze(-2), y.new_ones(()))
    hmm = dist.DiscreteHMM(y.new_zeros(2), torch.cat([first, rest], -3), emission, duration=steps)
    pyro.sample("y", hmm, obs=y)


def test_ordered_hmm_written_as_users_do_goes_through_adapt():
    entry = get_model("pdb_hmm_example")
    data = entry.data()
    assert unsampleable_sites(hmm_user, data) == ("mu",)
    _, adapted, checked, _ = resolve_model(hmm_user, {"y": data["y"]})
    assert adapted is not hmm_user and adapted.unsampleable_sites == ("mu",)
    ref = get_reference("pdb_hmm_example", kind="external")
    user = UnconstrainedDensity(partial(adapted, **checked), (), {}, 0)
    ours = UnconstrainedDensity(partial(entry.model, **data), (), {}, 0)
    assert user.names == ours.names
    u = ours.unconstrain(ref.draws, 2)[::10]
    # the same potential as the registry's model (whose NUTS matches posteriordb's), so the
    # same posterior and evidence
    np.testing.assert_allclose(user(u), ours(u), rtol=1e-12, atol=1e-9)


@pytest.mark.slow
def test_nuts_and_fit_take_the_users_ordered_hmm(tmp_path):
    from diagnostics import run_nuts
    from vimodels import fit

    data = {"y": get_model("pdb_hmm_example").data()["y"]}
    ref = run_nuts(
        hmm_user,
        data,
        settings={"num_chains": 2, "num_warmup": 60, "num_samples": 60},
        seed=1,
        cache_dir=tmp_path,
        num_workers=1,
    )
    mu = ref.draws["mu"]
    assert mu.shape == (2, 60, 2) and np.all((mu[..., 0] > 0) & (mu[..., 1] > mu[..., 0]))
    # posteriordb's means are mu = (3.02, 8.83) (posterior sd ~0.2): a short run lands near
    assert np.all(np.abs(mu.mean((0, 1)) - [3.02, 8.83]) < 0.5)
    result = fit(hmm_user, data, guide="auto_normal", num_steps=300, seed=0, progress=False)
    assert np.all(np.isfinite(result.losses))
