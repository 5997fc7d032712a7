"""compare() on approximations without a density or with draws outside the support.

Found by review: a point estimate (``auto_delta``) has equal log weights, which
PSIS read as a perfect proposal (k-hat -inf, "good", reliable), its gap was
printed as a finite KL (even a negative one), and the guide-IS estimate of
log p(x) preferred it as proposal (18.7 nats off); draws where log p = -inf were
dropped from the ELBO's mean; a decentered first fit kept bridge sampling off.
All of these tests fail on the code before the fix.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

from diagnostics.comparison import POINT_MASS, compare
from diagnostics.evidence import _guide_log_evidence
from diagnostics.nuts.reference import exact_reference, run_nuts
from vimodels.catalog.registry import MODELS
from vimodels.svi.fit import fit

CONJ = "conjugate_linear_regression"


@pytest.fixture(scope="module")
def delta_and_laplace():
    ref = exact_reference(CONJ, num_chains=2, num_draws=500, seed=0)
    fits = [
        fit(CONJ, guide="auto_delta", progress=False, num_eval=100),
        fit(CONJ, guide="auto_laplace", progress=False, num_eval=100),
    ]
    return fits, ref, compare(fits, ref, num_draws=500, iwae_k=10, num_evidence=500, seed=1)


def test_a_point_estimate_has_no_elbo_khat_or_gap_and_is_never_reliable(delta_and_laplace):
    _, _, c = delta_and_laplace
    s = c.summary.set_index("method")
    delta, laplace = s.loc["auto_delta/trace"], s.loc["auto_laplace/trace"]
    assert bool(delta["point_mass"]) and not bool(laplace["point_mass"])
    for column in ("elbo", "elbo_se", "iwae", "iwae_se", "khat", "gap", "iwae_gap"):
        assert math.isnan(delta[column]), column
    assert delta["khat_verdict"] == POINT_MASS
    assert not bool(delta["reliable"])
    assert delta["worst_sd_ratio"] == 0.0  # a collapsed element is the worst, not skipped
    assert any("auto_delta/trace: a point estimate" in f for f in c.flags)
    assert not any("auto_delta" in line and "reliable" in line for line in c.lessons)
    # the Gaussian posterior's Laplace approximation is exact: unaffected
    assert bool(laplace["reliable"]) and laplace["khat_verdict"] == "good"
    exact = MODELS[CONJ].exact_posterior()
    assert abs(laplace["gap"]) <= 5 * laplace["gap_se"] + 1e-4
    assert c.log_evidence.value == pytest.approx(exact.log_evidence)


def test_the_guide_is_estimate_of_log_evidence_never_takes_a_point_mass(delta_and_laplace):
    # a point mass's weights are all equal: k-hat -inf sorted first before the fix
    fits, _, _ = delta_and_laplace
    named = {"auto_delta/trace": fits[0], "auto_laplace/trace": fits[1]}
    summary = pd.DataFrame(
        {
            "method": list(named),
            "khat": [-np.inf, 0.2],
            "elbo": [fits[0].elbo, fits[1].elbo],
            "status": ["converged", "converged"],
            "failed": [False, False],
            "point_mass": [True, False],
        }
    )
    le = _guide_log_evidence(named, summary, 2000, 0, "no reference")
    assert le.diagnostics["proposal"] == "auto_laplace/trace"
    exact = MODELS[CONJ].exact_posterior()
    assert abs(le.value - exact.log_evidence) <= 5 * le.se + 1e-4


def _bounded(x):
    # x_i ~ Uniform(0, theta): log p = -inf where theta <= max(x)
    theta = pyro.sample("theta", dist.Gamma(4.0, 1.0))
    ok = theta > x.max()
    pyro.factor("lik", torch.where(ok, -x.shape[0] * torch.log(theta), -math.inf))


def test_draws_outside_the_support_make_the_elbo_minus_inf_not_the_mean_of_the_rest():
    data = {"x": torch.tensor([0.26, 0.71, 2.40, 1.75, 0.28])}
    settings = {"num_warmup": 100, "num_samples": 100, "num_chains": 2}
    ref = run_nuts(_bounded, data, settings=settings, seed=0, cache=False)
    # a guide centred at the support's edge: some of its draws fall below max(x)
    # (log 3.6 - log 2.4) / 0.17 = 2.4 sd: about 1 % of the draws
    start = {"init_loc_fn": init_to_value(values={"theta": torch.tensor(3.6)}), "init_scale": 0.17}
    r = fit(
        _bounded,
        data,
        guide="auto_normal",
        num_steps=5,
        lr=1e-9,
        progress=False,
        guide_options=start,
    )
    lw = r.log_weights(2000, seed=1)
    assert np.isneginf(lw).any() and np.isfinite(lw).any()
    c = compare([r], ref, num_draws=2000, iwae_k=10, num_evidence=500, seed=1)
    row = c.summary.iloc[0]
    assert row["elbo"] == -math.inf and row["iwae"] == -math.inf
    assert row["outside_support"] > 0 and row["gap"] == math.inf
    # the draws of weight 0 do not make k-hat infinite (ArviZ's psislw counts them as 0)
    assert np.isfinite(row["khat"])
    # converged or not, its own draws fall outside: no posterior's, never reliable
    done = dataclasses.replace(r, converged=True, status="converged")
    good_ref = dataclasses.replace(ref, trusted=True)  # (the short run is not: not the point)
    again = compare([done], good_ref, num_draws=2000, iwae_k=10, num_evidence=500, seed=1).summary
    assert again.iloc[0]["khat"] < 0.7 and not again.iloc[0]["reliable"]
    assert any("outside the posterior's support" in f for f in c.flags)


def _hierarchy(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_bridge_sampling_runs_when_the_first_fit_is_decentered():
    # before: bridge sampling evaluated the decentered model (latent theta_decentered),
    # which the reference's draws do not have, and fell back to guide importance sampling
    y = torch.tensor([1.2, -0.3, 2.5, 0.7, 1.9])
    data = {"y": y}
    ref = run_nuts(_hierarchy, data, settings={"num_warmup": 200, "num_samples": 300}, cache=False)
    r = fit(
        _hierarchy, data, guide="auto_normal", reparam="decenter", num_steps=300, progress=False
    )
    c = compare([r], ref, num_draws=500, iwae_k=10, num_evidence=1000, seed=1)
    assert c.log_evidence.method.startswith("bridge"), c.log_evidence.source
    # exact: y ~ N(0, 25 * 11' + (4 + 1) I)
    cov = 25.0 * np.ones((5, 5)) + 5.0 * np.eye(5)
    exact = torch.distributions.MultivariateNormal(torch.zeros(5), torch.as_tensor(cov).float())
    truth = float(exact.log_prob(y))
    assert abs(c.log_evidence.value - truth) <= 5 * c.log_evidence.se + 1e-3
