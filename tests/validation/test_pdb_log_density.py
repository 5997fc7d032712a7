"""The Pyro translations compute the Stan programs' log densities.

Each Stan program's ``target`` (model block, constrained parameters, no
Jacobian; Stan drops constants) is written here again, independently of the
Pyro code, with numpy and scipy.stats from the raw ``data.json``. The Pyro
model's log joint (``poutine.trace(...).log_prob_sum()`` with every latent
site conditioned on constrained values) must differ from it by the same
constant at two points (posteriordb reference draws): differences between the
points agree. Where the Pyro model samples a reparameterised latent (GARCH's
``beta1_raw``, the twins' ``theta``), the log-Jacobian of the change of
variables is subtracted, as stated per case (the GP twin's partly centered
``f_innov`` included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import linalg, special, stats

from vimodels.catalog.registry import get_model
from vimodels.validation import reference_draws
from vimodels.validation.models import stan_data

POINTS = (0, 537)  # flat indices of two reference draws (chain-major)


def _point(name: str, i: int) -> dict[str, np.ndarray]:
    draws = reference_draws(name)
    return {k: v.reshape((-1,) + v.shape[2:])[i] for k, v in draws.items()}


def _pyro_log_joint(name: str, latents: dict[str, np.ndarray]) -> float:
    entry = get_model(name)
    data = entry.data()
    cond = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in latents.items()}
    tr = poutine.trace(poutine.condition(entry.model, data=cond)).get_trace(**data)
    latent = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    assert set(latent) <= set(cond), f"unconditioned latent site(s) {set(latent) - set(cond)}"
    return float(tr.log_prob_sum())


# ----------------------------------------------------------------------------- Stan targets


def _regression_target(y, X, beta, sigma, cauchy_scale=None):
    lp = stats.norm.logpdf(y, X @ beta, sigma).sum()
    if cauchy_scale is not None:
        lp += stats.cauchy.logpdf(sigma, 0.0, cauchy_scale)
    return lp


def stan_kidiq(p):
    d = stan_data("kidiq-kidscore_interaction")
    hs, iq = np.asarray(d["mom_hs"], float), np.asarray(d["mom_iq"], float)
    X = np.column_stack([np.ones_like(hs), hs, iq, hs * iq])
    return _regression_target(np.asarray(d["kid_score"], float), X, p["beta"], p["sigma"], 2.5)


def stan_mesquite(p):
    d = stan_data("mesquite-logmesquite_logvolume")
    lv = np.log(np.asarray(d["diam1"]) * np.asarray(d["diam2"]) * np.asarray(d["canopy_height"]))
    X = np.column_stack([np.ones_like(lv), lv])
    return _regression_target(np.log(np.asarray(d["weight"], float)), X, p["beta"], p["sigma"])


def stan_earnings(p):
    d = stan_data("earnings-logearn_interaction")
    h, m = np.asarray(d["height"], float), np.asarray(d["male"], float)
    X = np.column_stack([np.ones_like(h), h, m, h * m])
    return _regression_target(np.log(np.asarray(d["earn"], float)), X, p["beta"], p["sigma"])


def stan_nes(p):
    d = stan_data("nes1972-nes")
    age = np.asarray(d["age_discrete"])
    b = p["beta"]
    mean = (
        b[0]
        + b[1] * np.asarray(d["real_ideo"])
        + b[2] * np.asarray(d["race_adj"])
        + b[3] * (age == 2)
        + b[4] * (age == 3)
        + b[5] * (age == 4)
        + b[6] * np.asarray(d["educ1"])
        + b[7] * np.asarray(d["gender"])
        + b[8] * np.asarray(d["income"])
    )
    return stats.norm.logpdf(np.asarray(d["partyid7"], float), mean, p["sigma"]).sum()


def stan_ark(p):
    d = stan_data("arK-arK")
    K, T, y = int(d["K"]), int(d["T"]), np.asarray(d["y"], float)
    lp = stats.norm.logpdf(p["alpha"], 0, 10) + stats.norm.logpdf(p["beta"], 0, 10).sum()
    lp += stats.cauchy.logpdf(p["sigma"], 0, 2.5)
    for t in range(K, T):  # Stan's t in (K + 1):T, 0-based
        mu = p["alpha"]
        for k in range(1, K + 1):
            mu = mu + p["beta"][k - 1] * y[t - k]
        lp += stats.norm.logpdf(y[t], mu, p["sigma"])
    return lp


def stan_arma(p):
    y = np.asarray(stan_data("arma-arma11")["y"], float)
    mu, phi, theta, sigma = p["mu"], p["phi"], p["theta"], p["sigma"]
    lp = stats.norm.logpdf(mu, 0, 10) + stats.norm.logpdf(phi, 0, 2)
    lp += stats.norm.logpdf(theta, 0, 2) + stats.cauchy.logpdf(sigma, 0, 2.5)
    err = np.zeros(len(y))
    nu = mu + phi * mu
    err[0] = y[0] - nu
    for t in range(1, len(y)):
        nu = mu + phi * y[t - 1] + theta * err[t - 1]
        err[t] = y[t] - nu
    return lp + stats.norm.logpdf(err, 0, sigma).sum()


def stan_garch(p):
    d = stan_data("garch-garch11")
    y = np.asarray(d["y"], float)
    mu, a0, a1, b1 = p["mu"], p["alpha0"], p["alpha1"], p["beta1"]
    sigma = np.zeros(len(y))
    sigma[0] = d["sigma1"]
    for t in range(1, len(y)):
        sigma[t] = np.sqrt(a0 + a1 * (y[t - 1] - mu) ** 2 + b1 * sigma[t - 1] ** 2)
    return stats.norm.logpdf(y, mu, sigma).sum()  # flat priors: nothing else


def _gp_cholesky(p):
    x = np.asarray(stan_data("gp_pois_regr-gp_pois_regr")["x"], float)
    cov = p["alpha"] ** 2 * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / p["rho"] ** 2)
    return np.linalg.cholesky(cov + 1e-10 * np.eye(len(x)))


def stan_gp(p):
    k = np.asarray(stan_data("gp_pois_regr-gp_pois_regr")["k"])
    f = _gp_cholesky(p) @ p["f_tilde"]
    lp = stats.gamma.logpdf(p["rho"], 25, scale=1 / 4) + stats.norm.logpdf(p["alpha"], 0, 2)
    lp += stats.norm.logpdf(p["f_tilde"]).sum()
    return lp + stats.poisson.logpmf(k, np.exp(f)).sum()


def stan_hmm(p):
    y = np.asarray(stan_data("hmm_example-hmm_example")["y"], float)
    theta = np.stack([p["theta1"], p["theta2"]])  # theta[j, k]: from j to k
    mu = p["mu"]
    lp = stats.norm.logpdf(mu[0], 3, 1) + stats.norm.logpdf(mu[1], 10, 1)
    gamma = np.array([stats.norm.logpdf(y[0], mu[k], 1) for k in range(2)])
    for t in range(1, len(y)):
        acc = gamma[:, None] + np.log(theta) + stats.norm.logpdf(y[t], mu[None, :], 1)
        gamma = special.logsumexp(acc, axis=0)
    return lp + special.logsumexp(gamma)


# ----------------------------------------------------------------------------- latents


def _same(p):
    return dict(p), 0.0


def _garch_latents(p):
    """Pyro samples beta1_raw = beta1 / (1 - alpha1): log-Jacobian log(1 - alpha1)."""
    q = {k: v for k, v in p.items() if k != "beta1"}
    q["beta1_raw"] = p["beta1"] / (1 - p["alpha1"])
    return q, np.log(1 - p["alpha1"])


def _gp_latents(p):
    q = {k: v for k, v in p.items() if k != "f"}
    q["f_tilde"] = linalg.solve_triangular(_gp_cholesky(p), p["f"], lower=True)
    return q, 0.0


def _gp_pc_latents(p):
    """The twin samples f_innov = L[j, j] f_tilde[j] (j < 3): log-Jacobian -sum log L[j, j]."""
    q, _ = _gp_latents(p)
    scale = np.diag(_gp_cholesky(p))[:3]
    q["f_innov"] = q["f_tilde"][:3] * scale
    q["f_tilde_rest"] = q["f_tilde"][3:]
    return q, -np.log(scale).sum()


def _qr_latents(name):
    def convert(p):
        R = np.linalg.inv(get_model(name).data()["R_inv"].numpy())
        return {"theta": R @ p["beta"], "sigma": p["sigma"]}, 0.0  # flat on both: same target

    return convert


def _arma_scaled_latents(p):
    q = {k: v for k, v in p.items() if k != "theta"}
    q["theta_raw"] = p["theta"] / 0.4
    return q, np.log(0.4)


CASES = {
    "pdb_kidiq_interaction": (stan_kidiq, _same),
    "pdb_kidiq_interaction_qr": (stan_kidiq, _qr_latents("pdb_kidiq_interaction_qr")),
    "pdb_mesquite_logvolume": (stan_mesquite, _same),
    "pdb_earnings_logearn_interaction": (stan_earnings, _same),
    "pdb_earnings_logearn_interaction_qr": (
        stan_earnings,
        _qr_latents("pdb_earnings_logearn_interaction_qr"),
    ),
    "pdb_nes1972": (stan_nes, _same),
    "pdb_nes1972_qr": (stan_nes, _qr_latents("pdb_nes1972_qr")),
    "pdb_ark": (stan_ark, _same),
    "pdb_arma11": (stan_arma, _same),
    "pdb_arma11_scaled": (stan_arma, _arma_scaled_latents),
    "pdb_garch11": (stan_garch, _garch_latents),
    "pdb_gp_pois_regr": (stan_gp, _gp_latents),
    "pdb_gp_pois_regr_pc": (stan_gp, _gp_pc_latents),
    "pdb_hmm_example": (stan_hmm, _same),
}


def test_every_entry_has_a_case():
    from vimodels.validation import VALIDATION_MODELS

    assert set(CASES) == set(VALIDATION_MODELS)


@pytest.mark.parametrize("name", list(CASES))
def test_log_density_matches_the_stan_program(name):
    stan_target, to_latents = CASES[name]
    diffs = []
    for i in POINTS:
        p = _point(name, i)
        latents, log_jac = to_latents(p)
        if name.startswith("pdb_gp_pois_regr"):  # Stan's target is in (rho, alpha, f_tilde)
            p = latents
        pyro_lp = _pyro_log_joint(name, latents) - log_jac
        diffs.append((pyro_lp, stan_target(p)))
    (a0, s0), (a1, s1) = diffs
    assert np.isfinite([a0, s0, a1, s1]).all()
    assert abs(s1 - s0) > 1e-3, "the two points must differ in log density"
    np.testing.assert_allclose(a1 - a0, s1 - s0, rtol=1e-8, atol=1e-7)
    # the constants Stan drops: log 2 per half-Cauchy / half-normal prior, HMM's -log 2
    # start, normal constants where Stan writes `~`; the same at both points
    assert np.isfinite(a0 - s0)


def test_flat_priors_are_flat_and_truncations_unnormalised():
    """GARCH: beta1 uniform on (0, 1 - alpha1) *unnormalised*: the density of (alpha1,
    beta1) is constant on the triangle, so alpha1 = 0.9 and 0.1 weigh the same."""
    name = "pdb_garch11"
    base = _point(name, 0)
    out = []
    for a1 in (0.1, 0.9):
        p = dict(base, alpha1=np.float64(a1), beta1=np.float64(0.05))
        latents, log_jac = _garch_latents(p)
        out.append(_pyro_log_joint(name, latents) - log_jac - stan_garch(p))
    assert abs(out[0] - out[1]) < 1e-8
