"""The one path from Pyro draws to ArviZ ``InferenceData``, and netcdf files.

Guide draws (:func:`fit_to_inference_data`) and reference draws
(:func:`reference_to_inference_data`) are both laid out by
:mod:`vimodels.svi.draws` and assembled by :func:`build_inference_data`:

``posterior``
    every latent and deterministic site, ``(chain, draw, *shape)``;
``sample_stats``
    NUTS, ArviZ's names: ``diverging``, ``step_size``, ``tree_depth``, ``lp``
    (log density in unconstrained space), ``acceptance_rate``, and from the
    project's sampler ``n_steps``, ``energy``, ``energy_error``,
    ``max_energy_error`` (``az.bfmi`` and ``az.plot_energy`` read ``energy``);
    VI: ``log_weight`` =
    ``log p(x, z) - log q(z)`` per draw (nats), one chain;
``log_likelihood``
    observed sites only, pointwise and unscaled (nats);
``observed_data``
    the observed values;
``posterior_predictive``
    on request.

Dimension names come from the model's plates (``schools``, ``data``) and
are ``<site>_dim_<i>`` otherwise. A plate's coordinates are ``0 .. size - 1``,
except for a fit whose model subsamples a plate: then every group of one
export refers to one batch of rows (the same for every draw and every group)
and the plate's coordinates are those rows' indices in the full data.
``az.from_pyro`` is not used: it files deterministic sites under
``log_likelihood``/``observed_data``, drops the log likelihood silently when
it fails and keeps only ``diverging``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro

from diagnostics import _arviz
from vimodels.errors import DataError, OptionError, check_option, check_seed, derive_seed
from vimodels.io import atomic_write
from vimodels.resolve import resolve_model
from vimodels.svi.draws import model_info, replay_model, sample_guide
from vimodels.svi.reparam import decentered_sites_of
from vimodels.svi.resample import POOL_FACTOR, resampled_draws
from vimodels.svi.scope import param_scope
from vimodels.svi.subsample import IndexSupplier

if TYPE_CHECKING:
    from diagnostics.nuts.reference import Reference

InferenceData = _arviz.InferenceData


def _attr(value: Any) -> str | int | float:
    """A netcdf-friendly attribute: numbers and strings stay, the rest becomes JSON."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def build_inference_data(
    posterior: Mapping[str, np.ndarray],
    *,
    dims: Mapping[str, Sequence[str]],
    sample_stats: Mapping[str, np.ndarray] | None = None,
    log_likelihood: Mapping[str, np.ndarray] | None = None,
    observed_data: Mapping[str, np.ndarray] | None = None,
    posterior_predictive: Mapping[str, np.ndarray] | None = None,
    plate_sizes: Mapping[str, int] | None = None,
    attrs: Mapping[str, Any] | None = None,
    plate_coords: Mapping[str, np.ndarray] | None = None,
) -> InferenceData:
    """Assemble InferenceData from ``(chain, draw, *shape)`` arrays.

    Parameters
    ----------
    posterior : dict of str to ndarray
        Latent and deterministic sites, shape ``(chain, draw, *site_shape)``.
    dims : dict of str to sequence of str
        Dimension names per site (without chain and draw).
    sample_stats, log_likelihood, posterior_predictive : dict, optional
        Arrays with leading ``(chain, draw)``.
    observed_data : dict, optional
        Observed values, in the site's shape.
    plate_sizes : dict of str to int, optional
        Named plate dimensions; coordinates are ``0 .. size - 1``.
    attrs : dict, optional
        Stored on every group; non-scalar values are written as JSON strings.
    plate_coords : dict of str to ndarray, optional
        Coordinate values of some plates (a subsampled plate: its rows' indices
        in the full data, shape ``(size,)``), in place of ``0 .. size - 1``.
    """
    groups = {
        "posterior": dict(posterior),
        "sample_stats": dict(sample_stats or {}),
        "log_likelihood": dict(log_likelihood or {}),
        "observed_data": dict(observed_data or {}),
        "posterior_predictive": dict(posterior_predictive or {}),
    }
    coords = {name: np.arange(size) for name, size in (plate_sizes or {}).items()}
    for name, values in (plate_coords or {}).items():
        values = np.asarray(values)
        if name in coords and len(values) != len(coords[name]):
            raise ValueError(
                f"plate {name!r} has {len(coords[name])} entries but {len(values)} coordinates"
            )
        coords[name] = values
    used = {n for g in groups.values() for n in g}
    dims_used = {n: tuple(d) for n, d in dims.items() if n in used}
    all_attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "creation_library": "vimodels",
    }
    all_attrs.update({k: _attr(v) for k, v in (attrs or {}).items()})
    return _arviz.from_dict(groups, dims_used, coords, all_attrs)


def fit_to_inference_data(
    result: Any,
    num_samples: int = 1000,
    seed: int | None = None,
    *,
    posterior_predictive: bool = False,
) -> InferenceData:
    """InferenceData of ``num_samples`` guide draws of a fit (one chain).

    Parameters
    ----------
    result : FitResult
    num_samples : int
        Number of guide draws.
    seed : int, optional
        Defaults to the fit's seed + 1.
    posterior_predictive : bool
        Add a ``posterior_predictive`` group.

    Returns
    -------
    InferenceData
        ``sample_stats.log_weight`` holds ``log p(x, z) - log q(z)`` of each draw.
        For a fit that resamples (``settings["resample"]``: ``pathfinder``,
        ``auto_laplace_is``) the posterior draws are PSIS-resampled from a pool of
        guide draws and ``log_weight`` holds the weights of ``num_samples``
        independent guide draws (the proposal's, for ELBO, IWAE and k-hat); the
        attrs ``resampled`` and ``resample_k_hat`` say so. For a decentered fit
        (``reparam="decenter"``) the attr ``decentered`` names the user's sites that
        come back as deterministic values of the ``<site>_decentered`` draws.

        For a model that subsamples its data (``result.subsample``) every group
        refers to ONE batch of rows per subsampled plate, drawn from the draws'
        seed (the rows of ``result.sample`` with the same seed, see
        ``result.rows``): the local latents in ``posterior``, ``log_likelihood``,
        ``observed_data`` and ``posterior_predictive`` are those rows, and the
        plate's coordinates are their indices in the full data (attr
        ``subsample_rows``). ``log_weight`` is evaluated on that same batch for
        every draw, its log density scaled by ``size / batch`` (an estimate of the
        full-data log weight from one batch; attr ``log_weight_note``): its
        spread over draws is that of q given the batch, without the
        batch-to-batch noise, so it is no full-data ELBO with a standard error
        (the fit's ``elbo``/``elbo_se`` are, from independent batches).
    """
    check_option("num_samples", num_samples, kind=int, low=1)
    resample = (getattr(result, "settings", None) or {}).get("resample")
    draws_seed = derive_seed(result.seed, 1) if seed is None else check_seed(seed)
    subsampled = getattr(result, "subsample", None) is not None
    # a subsampled plate takes one batch of rows for the whole export (model_info's trace, the
    # guide draws, the replay), drawn from the draws' seed as FitResult.sample draws it
    rows = IndexSupplier(draws_seed, "independent", hold=True) if subsampled else nullcontext()
    # the model runs in the fit's parameter scope (its pyro.param sites), as in FitResult.sample
    with param_scope(result), rows:
        info = model_info(result.model, result.args, {}, result.max_plate_nesting)
        pyro.set_rng_seed(draws_seed)
        if resample:  # Pathfinder, auto_laplace_is: PSIS-resampled from a pool of guide draws
            latent, log_w, k_hat = resampled_draws(
                result.model, result.guide, result.args, {}, info, num_samples,
                resample.get("pool_factor", POOL_FACTOR),
            )  # fmt: skip
        else:
            latent, log_w = sample_guide(
                result.model, result.guide, result.args, {}, info, num_samples
            )
        replay = replay_model(
            result.model, result.args, {}, info, latent, predictive=posterior_predictive
        )
    posterior = {**latent, **replay.deterministic}
    attrs = {
        "method": "vi",
        "model": result.model_name,
        "guide": result.guide_name,
        "elbo_name": result.elbo_name,
        "elbo": result.elbo,
        "elbo_se": result.elbo_se,
        "status": result.status,
        "converged": result.converged,
        "num_steps": result.num_steps,
        "seed": result.seed,
        "draws_seed": draws_seed,
        "settings": result.settings,
    }
    if info.plate_rows:  # a subsampled fit: the one batch every group refers to
        attrs["subsample_rows"] = {
            name: {"size": info.plate_full_sizes[name], "batch": len(r)}
            for name, r in info.plate_rows.items()
        }
        attrs["log_weight_note"] = (
            "log p(x, z) - log q(z) on one batch of rows (the subsampled plates' coordinates), "
            "the same for every draw, scaled by size / batch: not the full-data log weight; "
            "its spread leaves out the batch-to-batch noise"
        )
    if resample:
        attrs["resampled"] = "psis"
        attrs["resample_k_hat"] = k_hat
    if decentered_sites_of(result):  # fitted decentered: the posterior has the user's sites too
        attrs["decentered"] = ", ".join(decentered_sites_of(result))
    return build_inference_data(
        {k: v[None] for k, v in posterior.items()},
        dims=info.dims,
        sample_stats={"log_weight": log_w[None]},
        log_likelihood={k: v[None] for k, v in replay.log_likelihood.items()},
        observed_data=info.observed_values,
        posterior_predictive={k: v[None] for k, v in replay.posterior_predictive.items()},
        plate_sizes=info.plate_sizes,
        attrs=attrs,
        plate_coords=info.plate_rows,
    )


def reference_to_inference_data(
    ref: Reference,
    *,
    posterior_predictive: bool = False,
    model: Any = None,
    data: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> InferenceData:
    """InferenceData of a reference (NUTS or exact draws), with its checks in ``attrs``.

    Parameters
    ----------
    ref : Reference
    posterior_predictive : bool
        Add a ``posterior_predictive`` group (replays the model on the draws).
    model, data : optional
        The model (catalog name, entry or function) and data for the predictive
        draws; default: the catalog entry named by the reference.
    seed : int
        Seed of the predictive draws.
    """
    groups: dict[str, dict[str, np.ndarray]] = {"posterior_predictive": {}}
    if posterior_predictive:
        entry, fn, data_dict, _ = resolve_model(
            model if model is not None else ref.model_name, data
        )
        depth = entry.max_plate_nesting if entry is not None else None
        info = model_info(fn, (), data_dict, depth)
        flat = {k: ref.flat(k) for k in info.latent}
        pyro.set_rng_seed(seed)
        replay = replay_model(fn, (), data_dict, info, flat, predictive=True)
        shape = (ref.num_chains, ref.num_draws)
        groups["posterior_predictive"] = {
            k: v.reshape(shape + v.shape[1:]) for k, v in replay.posterior_predictive.items()
        }
    attrs = {
        "method": ref.kind,
        "model": ref.model_name,
        "trusted": ref.trusted,
        "checks": [c.as_dict() for c in ref.checks],
        "settings": ref.settings,
        "versions": ref.versions,
        "cache_key": ref.cache_key,
        "wall_time_s": ref.wall_time,
    }
    if ref.reference_from:  # draws of another form of the model: say so in the file
        attrs["reference_from"] = ref.reference_from
    return build_inference_data(
        ref.draws,
        dims=ref.dims,
        sample_stats=ref.sample_stats,
        log_likelihood=ref.log_likelihood,
        observed_data=ref.observed_data,
        posterior_predictive=groups["posterior_predictive"],
        plate_sizes=ref.plate_sizes,
        attrs=attrs,
    )


def save_netcdf(idata: InferenceData, path: str | os.PathLike) -> Path:
    """Write ``idata`` to ``path`` (h5netcdf) atomically; return the path."""
    path = Path(path)
    if path.suffix != ".nc":
        raise OptionError(f"netcdf file name must end in .nc, got {path.name!r}")
    return atomic_write(path, lambda tmp: _arviz.to_netcdf(idata, tmp))


def load_netcdf(path: str | os.PathLike) -> InferenceData:
    """Read an InferenceData netcdf file fully into memory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no netcdf file at {str(path)!r}")
    try:
        return _arviz.from_netcdf(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(path)!r} as InferenceData netcdf: {exc}") from exc


def group_arrays(idata: InferenceData, group: str) -> dict[str, np.ndarray]:
    """Variables of one group of ``idata`` as numpy arrays (empty when absent)."""
    return _arviz.group_arrays(idata, group)


def group_names(idata: InferenceData) -> list[str]:
    """Groups present in ``idata``."""
    return _arviz.group_names(idata)
