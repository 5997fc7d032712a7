"""External references: posteriordb's Stan draws as a :class:`Reference` of kind ``external``.

The draws themselves come from :mod:`vimodels.validation.reference`; here
they get the latent sites the Stan program does not report, the
deterministic sites and the pointwise log likelihood (replayed through the
Pyro model), and the reference checks, so that ``compare`` and the report
take them like a NUTS reference.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np

from diagnostics.nuts.reference import Reference, run_checks
from vimodels.catalog.base import CatalogEntry
from vimodels.resolve import resolve_model
from vimodels.svi.draws import model_info, replay_model
from vimodels.validation.models import DATA_DIR
from vimodels.validation.reference import (
    EXTERNAL_KIND,
    flat_draws,
    reference_draws,
    reference_json,
)
from vimodels.validation.registry import get_spec
from vimodels.versions import versions


def external_reference(name: str | CatalogEntry) -> Any:
    """The posteriordb draws as a :class:`diagnostics.Reference` of kind ``"external"``.

    Latent sites the Stan program does not report are derived from its
    parameters (``ValidationSpec.latents_from_reference``); deterministic
    sites and the pointwise log likelihood are replayed through the Pyro
    model. The checks are the reference checks (split R-hat, bulk and tail
    ESS >= 400 on the thinned draws; no divergence check: posteriordb
    checked its own run).
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
    checks = run_checks(full, sites, None)
    ref = reference_json(entry)
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
