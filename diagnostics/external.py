"""External references: posteriordb's Stan draws as a :class:`Reference` of kind ``external``.

The draws themselves come from :mod:`vimodels.validation.reference`; here
they get the latent sites the Stan program does not report, the
deterministic sites and the pointwise log likelihood (replayed through the
Pyro model), and the reference checks, so that ``compare`` and the report
take them like a NUTS reference.

How an external reference is judged
-----------------------------------
posteriordb checked its own run, 10 chains x 1000 draws. The project holds
every 10th of them, 10 chains x 100 nearly independent draws, and checks
what it holds:

- **ESS**: bulk and tail ESS >= 400 on those draws, as for any reference.
- **R-hat below the noise bound of the shipped draws' shape.** Split R-hat on
  M = 20 half-chains of n = 50 draws is noisy even for perfectly mixed
  chains: for independent draws ``R-hat - 1 ~ (F - 1) / (2 n)`` with ``F ~
  F(M - 1, M (n - 1))``, a standard deviation of about 0.003, so the project's
  1.01 (:data:`~diagnostics.nuts.reference.RHAT_MAX`, made for chains whose
  noise is far below it) fails about one faultless 10-parameter reference in
  nine. The bound used, :func:`thinned_rhat_max`, is the R-hat that
  independent draws of the same shape exceed with probability 1 %
  family-wise over the P elements checked (max of bulk and folded R-hat: 2P
  statistics; never below 1.01): 1.013 for P = 4, 1.015 for P = 13. A chain
  shifted by one posterior sd gives R-hat ~1.04 and still fails.
- **summary**: the thinned draws' mean of every element lies within 5 MCSE of
  posteriordb's mean over all 10 000 draws (``reference.json``'s
  ``summary``): what is shipped is the run posteriordb summarised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

import numpy as np
from scipy import stats

from diagnostics import _arviz
from diagnostics.nuts.reference import RHAT_MAX, Check, Reference, run_checks
from vimodels.catalog.base import CatalogEntry
from vimodels.resolve import resolve_model
from vimodels.svi.draws import model_info, replay_model
from vimodels.validation.models import DATA_DIR
from vimodels.validation.reference import (
    EXTERNAL_KIND,
    flat_draws,
    parse_stan_name,
    reference_draws,
    reference_json,
)
from vimodels.validation.registry import get_spec
from vimodels.versions import versions

# family-wise probability that independent draws fail the R-hat bound of an external reference
RHAT_FALSE_ALARM = 0.01
# the thinned draws' mean must lie this many MCSE from posteriordb's mean over all draws
SUMMARY_Z_MAX = 5.0


def thinned_rhat_max(
    chains: int, draws: int, elements: int, alpha: float = RHAT_FALSE_ALARM
) -> float:
    """R-hat bound for ``chains x draws`` nearly independent draws of ``elements`` scalars.

    For independent draws split into ``M = 2 chains`` halves of ``n = draws // 2``,
    ``R-hat ~ 1 + (F - 1) / (2 n)`` with ``F ~ F(M - 1, M (n - 1))`` (the ratio of
    between- to within-chain variance). The bound is that of ``F``'s
    ``1 - alpha / (2 elements)`` quantile (bulk and folded R-hat of each element:
    ``alpha`` family-wise by Bonferroni), and never below :data:`RHAT_MAX`.

    Parameters
    ----------
    chains, draws : int
        Chains and draws per chain.
    elements : int
        Scalar quantities checked.
    alpha : float
        Probability that faultless independent draws fail.

    Returns
    -------
    float
    """
    m, n = 2 * int(chains), int(draws) // 2
    if chains < 2 or n < 2 or elements < 1:  # run_checks fails R-hat on one chain
        return RHAT_MAX
    f = float(stats.f.ppf(1.0 - alpha / (2 * elements), m - 1, m * (n - 1)))
    return max(RHAT_MAX, 1.0 + (f - 1.0) / (2 * n))


def summary_check(draws: dict[str, np.ndarray], summary: dict[str, dict]) -> Check:
    """``summary``: thinned means within :data:`SUMMARY_Z_MAX` MCSE of posteriordb's full means.

    Parameters
    ----------
    draws : dict of str to ndarray
        ``(chain, draw, *shape)`` per site, as :func:`reference_draws` gives them.
    summary : dict
        ``reference.json``'s ``summary`` (Stan names, ``mean`` over all draws).
    """
    worst_z, worst = 0.0, ""
    for param, row in summary.items():
        site, idx = parse_stan_name(param)
        x = np.asarray(draws[site], dtype=float)[(slice(None), slice(None)) + idx]
        if np.ptp(x) == 0:
            continue
        z = abs(float(x.mean()) - float(row["mean"])) / _arviz.mcse_mean(x)
        if not np.isfinite(z) or z > worst_z:
            worst_z, worst = (float("inf") if not np.isfinite(z) else z), param
    label = ""
    if worst:
        site, idx = parse_stan_name(worst)
        label = site + (f"[{','.join(map(str, idx))}]" if idx else "")
    return Check(
        "summary",
        worst_z <= SUMMARY_Z_MAX,
        worst_z,
        SUMMARY_Z_MAX,
        f"thinned draws' mean {worst_z:.2f} MCSE from posteriordb's mean over all draws"
        f"{' at ' + label if label else ''} (needs <= {SUMMARY_Z_MAX:g})",
    )


def external_reference(name: str | CatalogEntry) -> Any:
    """The posteriordb draws as a :class:`diagnostics.Reference` of kind ``"external"``.

    Latent sites the Stan program does not report are derived from its
    parameters (``ValidationSpec.latents_from_reference``); deterministic
    sites and the pointwise log likelihood are replayed through the Pyro
    model. The checks (see the module docstring): bulk and tail ESS >= 400
    and split R-hat below :func:`thinned_rhat_max` on the thinned draws, their
    means within 5 MCSE of posteriordb's over all draws (``summary``); no
    divergence check: posteriordb checked its own run.
    """
    spec = get_spec(name)
    entry = spec.entry
    t0 = time.perf_counter()
    _, fn, data, model_name = resolve_model(entry)
    info = model_info(fn, (), data, entry.max_plate_nesting)
    draws = reference_draws(entry)
    chains, per_chain = next(iter(draws.values())).shape[:2]
    flat = flat_draws(draws)
    if spec.latents_from_reference is not None:
        flat.update(
            {
                k: np.asarray(v, dtype=float)
                for k, v in spec.latents_from_reference(flat, data).items()
            }
        )
    missing = [k for k in info.latent if k not in flat]
    if missing:
        raise ValueError(f"the reference of {model_name} lacks latent site(s) {missing}")
    replay = replay_model(fn, (), data, info, flat)
    shape = (chains, per_chain)
    for k, v in replay.deterministic.items():
        flat.setdefault(k, v)
    full = {k: v.reshape(shape + v.shape[1:]) for k, v in flat.items()}
    log_lik = {k: v.reshape(shape + v.shape[1:]) for k, v in replay.log_likelihood.items()}
    sites = tuple(entry.sites)
    ref = reference_json(entry)
    elements = sum(int(np.prod(full[s].shape[2:], dtype=int)) for s in sites if s in full)
    rhat_max = thinned_rhat_max(chains, per_chain, elements)
    checks = tuple(
        dataclasses.replace(
            c,
            detail=f"{c.detail}: the 1 % noise bound of {chains} x {per_chain} thinned "
            f"draws, {elements} elements",
        )
        if c.name == "rhat"
        else c
        for c in run_checks(full, sites, None, rhat_max=rhat_max)
    ) + (summary_check(draws, ref["summary"]),)
    settings = {
        "sampler": "posteriordb reference (Stan NUTS), every 10th draw",
        "num_chains": int(chains),
        "num_samples": int(per_chain),
        "posterior": spec.posterior,
        "reference_method": ref["reference_method"],
        "licence": {"model": ref["model_licence"], "data": ref["data_licence"]},
    }
    digest = hashlib.sha256(
        (DATA_DIR / spec.posterior / "reference.json").read_bytes()
        + json.dumps(settings, sort_keys=True, default=str).encode()
    ).hexdigest()
    return Reference(
        model_name=model_name,
        kind=EXTERNAL_KIND,
        draws=full,
        sites=sites,
        latent_sites=tuple(info.latent),
        sample_stats={},
        log_likelihood=log_lik,
        observed_data=info.observed_values,
        dims=dict(info.dims),
        plate_sizes=info.plate_sizes,
        settings=settings,
        versions=versions(),
        checks=checks,
        trusted=all(c.ok for c in checks),
        wall_time=time.perf_counter() - t0,
        cache_key=digest,
        notes=(
            f"posteriordb {spec.posterior}: Stan NUTS, 10 chains x 1000 draws, every 10th kept",
        ),
    )
