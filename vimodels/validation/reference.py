"""posteriordb's reference posteriors as draws keyed by the Pyro sites.

posteriordb ran Stan's NUTS with 10 chains x 1000 kept draws (after 10 000
warm-up iterations, thinned by 10 from 10 000 iterations per chain: see each
``reference.json``'s ``reference_method``) and ships, per parameter, the
mean, sd and 5/50/95 % quantiles over all 10 000 draws, and every 10th draw
(``thinned_draws_every_10th``, chain-major: 10 chains x 100).

How much the reference's mean can be trusted (its MCSE) is computed here from
what is shipped, honestly: ESS (ArviZ's rank-normalised bulk ESS) of the 10
chains x 100 thinned draws, and ``mcse = sd / sqrt(ESS)`` with the sd of those
draws (ArviZ's ``mcse(method="mean")``), for the *mean of the thinned draws*,
which is the mean this module reports and compares. The mean over all
10 000 draws (``mean_full``) is more precise than that, but its ESS cannot
be computed from what is shipped; it is reported alongside, not used.

:func:`reference_draws` gives the thinned draws as ``{site: (10, 100, *shape)}``
(Stan's ``beta[1]`` is ``beta[..., 0]``); :func:`diagnostics.external.external_reference` wraps them
(with the latent sites the Stan program does not report, and the
deterministic sites and log likelihood replayed through the Pyro model) as a
:class:`diagnostics.Reference` of kind ``"external"``, which
:func:`vimodels.runs.compare.run_compare` and ``vimodels compare --reference external``
accept.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from vimodels.arviz_import import import_arviz
from vimodels.catalog.base import CatalogEntry
from vimodels.validation.models import read_json
from vimodels.validation.registry import get_spec

if TYPE_CHECKING:
    import pandas

EXTERNAL_KIND = "external"
_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([0-9,]+)\])?$")


def parse_stan_name(name: str) -> tuple[str, tuple[int, ...]]:
    """``"beta[3]" -> ("beta", (2,))``: Stan's 1-based element name as a site and 0-based index.

    Raises
    ------
    ValueError
        For a name that is not ``ident`` or ``ident[i,j,...]``.
    """
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"not a Stan parameter name: {name!r}")
    site, idx = match.groups()
    return site, tuple(int(i) - 1 for i in idx.split(",")) if idx else ()


def reference_json(name: str | CatalogEntry) -> dict[str, Any]:
    """The posteriordb ``reference.json`` of a validation entry (parsed once; do not mutate)."""
    return read_json(get_spec(name).posterior, "reference.json")


def site_shapes(name: str | CatalogEntry) -> dict[str, tuple[int, ...]]:
    """Shape of each site the reference reports, from the largest index of its elements."""
    shapes: dict[str, tuple[int, ...]] = {}
    for param in reference_json(name)["summary"]:
        site, idx = parse_stan_name(param)
        old = shapes.get(site, ())
        shapes[site] = tuple(max(a, b + 1) for a, b in zip(old or (0,) * len(idx), idx))
    return shapes


def reference_draws(name: str | CatalogEntry) -> dict[str, np.ndarray]:
    """The thinned reference draws of the reported sites, ``{site: (chain, draw, *shape)}``.

    Sites are the Stan program's parameters (and transformed parameters such as
    the GP's ``f``), named as the Pyro model names them.
    """
    ref = reference_json(name)
    chains = int(ref["num_chains"])
    thinned = ref["thinned_draws_every_10th"]
    shapes = site_shapes(name)
    n = len(next(iter(thinned.values())))
    out = {site: np.full((n,) + shape, np.nan) for site, shape in shapes.items()}
    for param, values in thinned.items():
        site, idx = parse_stan_name(param)
        out[site][(slice(None),) + idx] = np.asarray(values, dtype=float)
    return {k: v.reshape((chains, n // chains) + v.shape[1:]) for k, v in out.items()}


def reference_table(name: str | CatalogEntry) -> pandas.DataFrame:
    """One row per reference parameter: Stan name, site element, means, sd, ESS and MCSE.

    Columns: ``parameter`` (Stan's name), ``site``, ``element`` (``beta[0]``),
    ``mean`` and ``sd`` of the thinned draws, ``ess_bulk`` of the thinned draws
    (10 chains x 100), ``mcse_mean`` (ArviZ, of ``mean``), ``mean_full`` and
    ``sd_full`` (posteriordb's summary over all 10 000 draws).
    """
    az = import_arviz()
    import pandas as pd

    ref = reference_json(name)
    draws = reference_draws(name)
    rows = []
    for param, stats in ref["summary"].items():
        site, idx = parse_stan_name(param)
        x = draws[site][(slice(None), slice(None)) + idx]
        rows.append(
            {
                "parameter": param,
                "site": site,
                "element": site + (f"[{','.join(map(str, idx))}]" if idx else ""),
                "mean": float(x.mean()),
                "sd": float(x.std(ddof=1)),
                "ess_bulk": float(az.ess(x, method="bulk")),
                "mcse_mean": float(az.mcse(x, method="mean")),
                "mean_full": float(stats["mean"]),
                "sd_full": float(stats["sd"]),
            }
        )
    return pd.DataFrame(rows)


def flat_draws(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{site: (chains * draws, *shape)}`` from ``{site: (chains, draws, *shape)}``."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.items()}
