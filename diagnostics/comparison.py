"""Compare fitted approximations with a reference: the comparison table.

:func:`compare` takes fit results and a :class:`~diagnostics.nuts.reference.Reference`
and returns a :class:`Comparison`: one table row per method (ELBO, IWAE
bound, gap to the log evidence, PSIS k-hat, joint distances, worst sd ratio,
coverage, convergence, wall time), one row per method and site element, the
draws as ArviZ data, and the flags and lessons a report states.

:func:`vimodels.runs.compare.run_compare` is what ``vimodels compare`` runs: fit
the grid of guides x ELBOs, get the (cached) reference, compare, write the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.distributions import biject_to

from diagnostics import metrics
from diagnostics.convert import group_arrays
from diagnostics.evidence import (  # noqa: F401  (re-exported)
    ESTIMATED,
    EVIDENCE_SEED_OFFSET,
    EXACT,
    GIVEN,
    UNKNOWN,
    LogEvidence,
    _log_evidence,
    check_bounds,
    evidence_log_weights,
    subsampled,
    why_not_full_data,
)
from diagnostics.nuts.reference import Reference
from vimodels.data import RowArray
from vimodels.errors import IncompatibleError, OptionError, check_option
from vimodels.svi.draws import ModelInfo, model_info
from vimodels.svi.minibatch_eval import EVAL_BATCHES, group_sizes, grouped_estimate
from vimodels.svi.reparam import decentered_sites_of
from vimodels.svi.resample import khat_defined
from vimodels.svi.scope import param_scope
from vimodels.svi.subsample import full_data

if TYPE_CHECKING:
    from vimodels.svi.fit import FitResult


@dataclass(frozen=True, eq=False)
class Comparison:
    """Approximations compared with a reference.

    Attributes
    ----------
    model_name : str
    methods : tuple of str
        ``<guide>/<elbo>`` names, in grid order.
    summary : DataFrame
        One row per method (see :func:`compare` for the columns).
    sites : DataFrame
        One row per method and element of each site of interest.
    reference : Reference
    log_evidence : LogEvidence
    draws : dict of str to dict of str to ndarray
        Per method, the posterior draws ``(n, *shape)`` used by the metrics.
    inference_data : dict of str to InferenceData
        Per method, the same draws as ArviZ data (with log weights and log likelihood).
    losses : dict of str to ndarray
        Per method, the loss per step (nats).
    flags : tuple of str
        Results not to be trusted, one line each.
    lessons : tuple of str
        What the comparison shows, one line each.
    pair : tuple of str or None
        The two site elements shown in the pair plot.
    settings : dict
        Draws, IWAE K and seed used.
    skipped : tuple of str
        Grid cells that could not be fitted, with the reason.
    partial : bool
        True when the grid was interrupted (Ctrl-C): some fits are missing or stopped early.
    not_run : tuple of str
        Methods of the grid not run because of the interruption.
    """

    model_name: str
    methods: tuple[str, ...]
    summary: pd.DataFrame
    sites: pd.DataFrame
    reference: Reference
    log_evidence: LogEvidence
    draws: dict[str, dict[str, np.ndarray]] = field(repr=False)
    inference_data: dict[str, Any] = field(repr=False)
    losses: dict[str, np.ndarray] = field(repr=False)
    flags: tuple[str, ...] = ()
    lessons: tuple[str, ...] = ()
    pair: tuple[str, str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    partial: bool = False
    not_run: tuple[str, ...] = ()

    def interrupted_line(self) -> str | None:
        """``interrupted: methods not run: ...; stopped early: ...`` when partial, else None."""
        if not self.partial:
            return None
        line = "interrupted: methods not run: " + (", ".join(self.not_run) or "none")
        if "status" in self.summary:
            stopped = self.summary.loc[self.summary["status"] == "interrupted", "method"]
            if len(stopped):
                line += "; stopped early (what they learned is kept): " + ", ".join(stopped)
        return line

    def to_json(self) -> dict[str, Any]:
        """Everything but the draws, JSON-friendly (NaN as None by the writer)."""
        return {
            "model": self.model_name,
            "methods": list(self.methods),
            "reference": self.reference.summary(),
            "log_evidence": self.log_evidence.as_dict(),
            "summary": _records(self.summary),
            "sites": _records(self.sites),
            "flags": list(self.flags),
            "lessons": list(self.lessons),
            "pair": list(self.pair) if self.pair else None,
            "settings": self.settings,
            "skipped": list(self.skipped),
            "partial": self.partial,
            "not_run": list(self.not_run),
        }


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for row in df.to_dict(orient="records"):
        out.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
    return out


def method_name(result: FitResult) -> str:
    """``<guide>/<elbo>``: how a fit is named in tables and files.

    ``<guide>+decenter/<elbo>`` for a fit of the decentered model (``reparam="decenter"``).
    """
    decenter = "+decenter" if decentered_sites_of(result) else ""
    return f"{result.guide_name}{decenter}/{result.elbo_name}"


def _unconstrained(
    draws: Mapping[str, np.ndarray], info: ModelInfo, sites: Sequence[str], sample_ndim: int
) -> np.ndarray:
    """Draws of continuous latent ``sites`` mapped to unconstrained space, ``(n, D)``."""
    cols = []
    for name in sites:
        x = np.asarray(draws[name], dtype=float)
        lead = x.shape[:sample_ndim]
        x = x.reshape((int(np.prod(lead)),) + x.shape[sample_ndim:])
        support = info.sites[name].support
        with torch.no_grad():
            u = biject_to(support).inv(torch.as_tensor(x, dtype=torch.float64)).numpy()
        cols.append(u.reshape(len(u), -1))
    return np.concatenate(cols, axis=1) if cols else np.empty((0, 0))


def _worst_sd(rows: pd.DataFrame) -> tuple[float, str]:
    """The sd ratio farthest from 1 on a log scale (0, a collapsed element, is the farthest)."""
    ratios = rows["sd_ratio"].to_numpy(dtype=float)
    ok = np.isfinite(ratios) & (ratios >= 0)
    if not ok.any():
        return float("nan"), ""
    dist = np.where(ratios > 0, np.abs(np.log(np.where(ratios > 0, ratios, 1.0))), np.inf)
    k = int(np.argmax(np.where(ok, dist, -np.inf)))
    return float(ratios[k]), str(rows["element"].iloc[k])


def is_point_mass(draws: Mapping[str, np.ndarray]) -> bool:
    """Whether every draw of every site is the same (a point estimate such as ``auto_delta``).

    Its log weights are all equal, which PSIS reads as a perfect proposal
    (k-hat ``-inf``); its "ELBO" is ``log p(x, z)`` at the point, since a
    point mass has no density: its KL to a continuous posterior is infinite.
    """
    arrays = [np.asarray(v) for v in draws.values()]
    return bool(arrays) and all(a.shape[0] > 1 and np.ptp(a, axis=0).max() == 0 for a in arrays)


#: ``khat_verdict`` of a point estimate (``auto_delta``): no density, so no k-hat.
POINT_MASS = "point mass"
#: Fit statuses that make a method a failure in a comparison (a row, no metrics).
FAILED_STATUSES = ("nonfinite", "diverged")
#: ``khat_verdict`` of a subsampled fit whose log weights could not be had on the full data.
SUBSAMPLED = "not applicable (subsampled log weights)"
_METRIC_ERRORS = (ValueError, FloatingPointError, np.linalg.LinAlgError, RuntimeError, KeyError)
_METRIC_COLUMNS = (
    "elbo elbo_se iwae iwae_se iwae_k khat w1_mean w1_max max_abs_std_mean_error "
    "worst_sd_ratio coverage_min coverage_mean"
).split()


def _method_metrics(
    result: FitResult,
    reference: Reference,
    info: ModelInfo,
    sites: Sequence[str],
    joint_sites: Sequence[str],
    ref_unc: np.ndarray,
    ref_ok: np.ndarray | None,
    num_draws: int,
    iwae_k: int,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame, dict, Any, np.ndarray] | None:
    """One method's metrics, its marginal table, draws, InferenceData and log weights.

    None for a failed fit (``nonfinite`` or ``diverged``); raises one of
    ``_METRIC_ERRORS`` when its draws cannot be compared (none finite, say).
    """
    if result.status in FAILED_STATUSES:
        return None
    row: dict[str, Any] = {"log_weight_data": "full"}
    subsample = subsampled(result)
    why_not = why_not_full_data(result, subsample, num_draws) if subsample else None
    if subsample and why_not is None:
        # exact log weights: every subsampled plate on all its rows (a batch's estimate of a
        # log weight scaled by N / batch is noisy, and exp() of that noise inflates IWAE and k-hat)
        with full_data():
            idata = result.to_inference_data(num_draws, seed=seed)
        row["log_weight_data"] = "full (subsampled fit re-evaluated on all rows)"
    else:
        idata = result.to_inference_data(num_draws, seed=seed)
    post = {k: v[0] for k, v in group_arrays(idata, "posterior").items()}
    lw = group_arrays(idata, "sample_stats")["log_weight"][0]
    table = metrics.marginal_table(post, reference.draws, sites)
    finite = np.isfinite(lw)
    nan = float("nan")
    k = min(iwae_k, max(1, len(lw) // 2))
    row["iwae_k"] = k
    row["point_mass"] = is_point_mass(post)
    row["outside_support"] = int(np.sum(lw == -np.inf))
    if row["point_mass"]:
        # no density: ELBO, IWAE, gap and k-hat are undefined (not "perfect")
        row["elbo"] = row["elbo_se"] = row["iwae"] = row["iwae_se"] = row["khat"] = nan
        row["khat_verdict"] = POINT_MASS
    else:
        if finite.all():
            row["elbo"], row["elbo_se"] = metrics.elbo(lw) if len(lw) > 1 else (nan, nan)
            row["iwae"], row["iwae_se"] = metrics.iwae_bound(lw, k)
        elif np.isnan(lw).any() or (lw == np.inf).any():
            row["elbo"] = row["elbo_se"] = row["iwae"] = row["iwae_se"] = nan
        else:
            # draws where log p = -inf (outside the posterior's support): the expectations
            # are -inf, not the mean over the other draws
            row["elbo"] = row["iwae"] = -math.inf
            row["elbo_se"] = row["iwae_se"] = nan
        # a draw with log p = -inf is a weight of 0 (ArviZ's psislw keeps it so): it
        # cannot lengthen the tail k measures; NaN or +inf weights leave k undefined
        row["khat"] = metrics.psis_khat(lw) if khat_defined(lw) else float("inf")
        row["khat_verdict"] = metrics.khat_verdict(row["khat"])
        if why_not is not None:
            # one batch's log weights: their noise is not q's; IWAE and k-hat are not defined
            row["elbo"], row["elbo_se"] = _minibatch_elbo(result, subsample, num_draws, seed)
            row["iwae"] = row["iwae_se"] = row["khat"] = nan
            row["khat_verdict"] = SUBSAMPLED
            row["log_weight_data"] = f"subsampled ({why_not})"
    # in reference sds: elements of different sites have different units
    row["w1_mean"] = float(table["std_w1"].mean())
    row["w1_max"] = float(table["std_w1"].max())
    row["max_abs_std_mean_error"] = float(np.nanmax(np.abs(table["std_mean_error"])))
    row["worst_sd_ratio"], row["worst_sd_element"] = _worst_sd(table)
    row["coverage_min"] = float(table["coverage90"].min())
    row["coverage_mean"] = float(table["coverage90"].mean())
    if joint_sites:
        unc = _unconstrained(post, info, joint_sites, 1)
        ok = np.all(np.isfinite(unc), axis=1)
        if ok.sum() < 2:
            raise ValueError(f"{int(ok.sum())} of {len(ok)} guide draws are finite")
        row.update(metrics.joint_metrics(unc[ok], ref_unc[ref_ok], seed=seed))
        row["joint_dim"] = int(unc.shape[1])
    return row, table, post, idata, lw


def _minibatch_elbo(result: Any, subsample: dict, num: int, seed: int) -> tuple[float, float]:
    """The minibatch ELBO and its se (independent batches, as the fit's own estimate)."""
    if not hasattr(result, "log_weights"):
        return float("nan"), float("nan")
    lw = result.log_weights(num, seed=seed)
    sizes = group_sizes(num, subsample.get("eval_batches", EVAL_BATCHES))
    if not np.isfinite(lw).all():
        return float("nan"), float("nan")
    return grouped_estimate(lw, sizes)


#: Relative difference allowed between a fit's and a reference's observed value: float32's
#: machine epsilon (twice its rounding error), for data one side holds in float32.
DATA_RTOL = float(np.finfo(np.float32).eps)


def _observed_of(result: Any) -> tuple[dict[str, np.ndarray], ModelInfo]:
    """The observed values a fit's model conditions on, from one trace of it.

    A model that subsamples its data is traced on all its rows
    (:func:`~vimodels.svi.subsample.full_data`) unless its data are memory-mapped
    (reading every row is what the batches avoid): then on one batch, whose rows
    ``info.plate_rows`` names.
    """
    values = list(getattr(result, "args", ())) + list(
        (getattr(result, "data", None) or {}).values()
    )
    whole = subsampled(result) and not any(isinstance(v, RowArray) for v in values)
    with param_scope(result), full_data() if whole else nullcontext():
        info = model_info(result.model, result.args, {}, result.max_plate_nesting)
    return info.observed_values, info


def _rows_of(value: np.ndarray, info: ModelInfo, site: str) -> np.ndarray:
    """``value`` (a full-data observed value) at the rows of ``info``'s subsampled plates."""
    dims = info.sites[site].dims if site in info.sites else ()
    for axis, dim in enumerate(dims):
        if dim in info.plate_rows and axis < value.ndim:
            value = np.take(value, info.plate_rows[dim], axis=axis)
    return value


def data_mismatch(fit_value: Any, ref_value: Any) -> str | None:
    """How two observed values differ (None: equal, floats within float32 rounding)."""
    a, b = np.asarray(fit_value), np.asarray(ref_value)
    if a.shape != b.shape:
        return f"shape {a.shape} vs the reference's {b.shape}"
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a, b = a.astype(float), b.astype(float)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        same |= np.abs(a - b) <= DATA_RTOL * np.maximum(np.abs(a), np.abs(b))
    else:
        same = a == b
    bad = ~np.asarray(same, dtype=bool)
    if not bad.any():
        return None
    where = np.unravel_index(int(np.argmax(bad)), bad.shape) if bad.ndim else ()
    text = f"{int(bad.sum())} of {bad.size} values differ"
    if a.dtype.kind in "fc":
        diff = np.abs(a - b)[bad]
        text += f" (max |difference| {np.nanmax(diff) if np.isfinite(diff).any() else np.nan:.4g})"
    index = tuple(int(i) for i in where)
    return f"{text}; first at index {index}: {a[where].item()!r} vs {b[where].item()!r}"


def check_same_data(fits: Mapping[str, Any], reference: Reference) -> None:
    """Raise IncompatibleError unless every fit's observed data are the reference's.

    Each fit's model is traced once (fits sharing their data tensors once for all)
    and its observed values are compared with ``reference.observed_data``: equal,
    floats within float32 rounding (:data:`DATA_RTOL`). A decentered fit's model
    observes the same data; a subsampled fit's is traced on all its rows (or, for
    memory-mapped data, on one batch, compared with the same rows of the
    reference). A reference without observed data (nothing recorded) is not checked.

    Raises
    ------
    IncompatibleError
        Naming the fit, the observed site and how they differ, and the fix: the
        reference recomputed on the fits' data.
    """
    ref_obs = dict(reference.observed_data or {})
    if not ref_obs:
        return
    seen: set[tuple] = set()
    for name, result in fits.items():
        key = (
            tuple(id(a) for a in getattr(result, "args", ())),
            bool(subsampled(result)),
            type(result).__name__,
        )
        if key in seen:
            continue
        observed, info = _observed_of(result)
        problems = []
        for site in sorted(set(observed) | set(ref_obs)):
            if site not in observed or site not in ref_obs:
                where = "the reference" if site not in ref_obs else "the fit"
                problems.append(f"observed site {site!r} is missing from {where}")
                continue
            want = (
                _rows_of(np.asarray(ref_obs[site]), info, site)
                if info.plate_rows
                else ref_obs[site]
            )
            why = data_mismatch(observed[site], want)
            if why:
                problems.append(f"observed site {site!r}: {why}")
        if problems:
            raise IncompatibleError(
                f"fit {name!r} of {result.model_name!r} was made on other data than the "
                f"reference ({'; '.join(problems)}): its distances and gaps would be measured "
                "against another posterior. Recompute the reference on the fits' data "
                "(get_reference(model, data) with the data given to fit; on the command "
                "line, the same --data)"
            )
        seen.add(key)


def compare(
    results: Sequence[FitResult] | Mapping[str, FitResult],
    reference: Reference,
    *,
    num_draws: int = 4000,
    iwae_k: int = 50,
    num_evidence: int = 20000,
    seed: int = 0,
    log_evidence: float | None = None,
    sites: Sequence[str] | None = None,
) -> Comparison:
    """Compare fitted approximations with a reference.

    Parameters
    ----------
    results : sequence of FitResult, or dict of name to FitResult
        Fits of the reference's model; names default to ``<guide>/<elbo>``.
    reference : Reference
    num_draws : int
        Guide draws per method for the metrics (and its log weights).
    iwae_k : int
        Importance samples K of the IWAE bound (``num_draws // K`` groups).
    num_evidence : int
        Draws of the best proposal for the importance-sampling estimate of
        ``log p(x)`` when it is not known exactly.
    seed : int
        Seed of the guide draws and of the metric subsampling.
    log_evidence : float, optional
        A known ``log p(x)`` (nats); default: the catalog's exact value, else estimated.
    sites : sequence of str, optional
        Sites of interest; default the reference's.

    Returns
    -------
    Comparison
        ``summary`` columns: ``method guide elbo_name status converged num_steps
        wall_time_s elbo elbo_se iwae iwae_se iwae_k khat khat_verdict w1_mean
        w1_max max_abs_std_mean_error worst_sd_ratio worst_sd_element coverage_min
        coverage_mean w2 sliced_w2 energy corr_max_error corr_rms_error joint_dim
        log_evidence gap gap_se iwae_gap reliable point_mass outside_support
        log_weight_data`` (nats
        for ELBO, IWAE and gaps; ``w1_mean``/``w1_max`` over the site elements of
        the marginal W1 divided by the element's reference sd; joint distances in
        reference-sd units of the unconstrained space). A point estimate
        (``point_mass``: every draw the same, e.g. ``auto_delta``) has no density:
        its ELBO, IWAE, gap and k-hat are NaN, its k-hat verdict ``"point mass"``,
        and it is never ``reliable``. Where ``outside_support`` guide draws have
        ``log p = -inf``, the ELBO and IWAE are
        ``-inf`` (the mean over the other draws would overstate them) and k-hat
        counts them as weights of 0 (as ArviZ's ``psislw``); such a row is
        ``reliable`` only if its fit resamples (its own draws are then inside).
        A fit whose model subsamples its data (``settings["subsample"]``) has its
        draws and log weights evaluated on all the rows
        (:func:`vimodels.svi.subsample.full_data`; ``log_weight_data`` says so)
        while ``num_draws`` x rows stays within
        :data:`diagnostics.evidence.FULL_DATA_BUDGET` and the data
        are in memory; otherwise (memory-mapped data, stored draws, too many rows)
        its ELBO is the minibatch estimate from independent batches (NaN for
        stored draws, which cannot be re-evaluated), and IWAE and
        k-hat are NaN with the verdict ``SUBSAMPLED`` and a flag: one batch's log
        weights scaled by N / batch carry subsampling noise that would inflate
        both and be blamed on q.
    """
    check_option("num_draws", num_draws, kind=int, low=10)
    check_option("iwae_k", iwae_k, kind=int, low=1)
    check_option("num_evidence", num_evidence, kind=int, low=10)
    named = dict(results) if isinstance(results, Mapping) else {}
    if not named:
        for r in results:
            name = method_name(r)
            k = 2
            while name in named:
                name = f"{method_name(r)}#{k}"
                k += 1
            named[name] = r
    if not named:
        raise OptionError("compare needs at least one fit result")
    fits = list(named.values())
    wrong = sorted({r.model_name for r in fits} - {reference.model_name})
    if wrong:
        raise IncompatibleError(
            f"fits of {', '.join(wrong)} cannot be compared with a reference for "
            f"{reference.model_name!r}"
        )
    check_same_data(named, reference)
    first = fits[0]
    with param_scope(first):  # the model's pyro.param sites: the fit's, not the global store
        info = model_info(first.model, first.args, {}, first.max_plate_nesting)
    if sites:  # named by the user: every one compared, or a clear error
        unknown = [x for x in sites if x not in reference.draws]
        if unknown:
            raise OptionError(
                f"unknown site(s) {unknown}: the reference has draws of "
                f"{sorted(reference.draws)}; pass some of those as sites="
            )
        foreign = [x for x in sites if x not in info.sites]
        if foreign:
            raise IncompatibleError(
                f"site(s) {foreign} of the reference are not sites of the fits' model "
                f"(its latent and deterministic sites: {list(info.latent + info.deterministic)})"
            )
    sites = tuple(s for s in (sites or reference.sites) if s in reference.draws)
    # a decentered fit's model records the user's decentered sites as deterministic:
    # the joint metrics still compare them (real support: their unconstraining is the identity)
    continuous = tuple(dict.fromkeys(info.continuous + decentered_sites_of(first)))
    joint_sites = tuple(s for s in continuous if s in reference.draws)
    ref_unc = _unconstrained(reference.draws, info, joint_sites, 2)
    ref_ok = np.all(np.isfinite(ref_unc), axis=1) if ref_unc.size else None
    floor = metrics.joint_floor(ref_unc[ref_ok], seed=seed) if joint_sites else {}

    site_frames, rows, draws, idatas, log_ws = [], [], {}, {}, {}
    for name, result in named.items():
        row: dict[str, Any] = {
            "method": name,
            "guide": result.guide_name,
            "elbo_name": result.elbo_name,
            "status": result.status,
            "converged": bool(result.converged),
            "num_steps": int(result.num_steps),
            "wall_time_s": float(result.wall_time),
            "failed": result.status in FAILED_STATUSES,
            "failure": result.message if result.status in FAILED_STATUSES else "",
        }
        try:
            got = _method_metrics(
                result,
                reference,
                info,
                sites,
                joint_sites,
                ref_unc,
                ref_ok,
                num_draws,
                iwae_k,
                seed,
            )
        except _METRIC_ERRORS as exc:  # one failing method must not lose the report
            got = None
            row["failed"] = True
            row["failure"] = "; ".join(
                x for x in (row["failure"], f"its draws cannot be compared ({exc})") if x
            )[:500]
        if got is None:
            row.update(dict.fromkeys(_METRIC_COLUMNS, float("nan")))
            row["khat_verdict"], row["worst_sd_element"] = "failed", ""
            row["point_mass"], row["outside_support"] = False, 0
        else:
            metric_row, table, post, idata, lw = got
            row.update(metric_row)
            table.insert(0, "method", name)
            site_frames.append(table)
            draws[name], idatas[name], log_ws[name] = post, idata, lw
        rows.append(row)
    summary = pd.DataFrame(rows)

    le = _log_evidence(fits, named, summary, log_evidence, num_evidence, seed, reference)
    summary["log_evidence"] = le.value
    summary["gap"] = le.value - summary["elbo"]
    summary["gap_se"] = np.sqrt(summary["elbo_se"] ** 2 + (le.se**2 if np.isfinite(le.se) else 0))
    summary["iwae_gap"] = le.value - summary["iwae"]
    # which reference every row is measured against (summary.csv says where its draws came from)
    summary["reference"] = reference.kind + (
        f", {reference.reference_from}" if reference.reference_from else ""
    )
    # draws outside the support are weights of 0 to k-hat, but a guide's own draws there
    # are no posterior's (a resampling fit never returns them)
    resampled = summary["method"].map(lambda m: bool(named[m].settings.get("resample")))
    inside = summary["outside_support"].fillna(0).eq(0) | resampled
    summary["reliable"] = (
        summary["converged"]
        & (summary["khat"] < metrics.KHAT_BAD)
        & inside
        & ~summary["point_mass"].fillna(False).astype(bool)
        & ~summary["failed"]
        & reference.trusted
    )
    sites_df = pd.concat(site_frames, ignore_index=True) if site_frames else pd.DataFrame()
    flags = _flags(summary, reference, le)
    pair = _pick_pair(sites_df, reference, sites)
    lessons = _lessons(summary, sites_df, reference, le, draws, pair)
    return Comparison(
        model_name=reference.model_name,
        methods=tuple(named),
        summary=summary,
        sites=sites_df,
        reference=reference,
        log_evidence=le,
        draws=draws,
        inference_data=idatas,
        losses={n: np.asarray(r.losses) for n, r in named.items()},
        flags=tuple(flags),
        lessons=tuple(lessons),
        pair=pair,
        settings={
            "num_draws": num_draws,
            "iwae_k": iwae_k,
            "num_evidence": num_evidence,
            "seed": seed,
            "joint_sites": list(joint_sites),
            "sites": list(sites),
            "joint_floor": floor,
            # methods fitted on the decentered model (fit(reparam="decenter")): their sites
            "decentered": {
                n: list(decentered_sites_of(r)) for n, r in named.items() if decentered_sites_of(r)
            },
        },
    )


def _flags(summary: pd.DataFrame, reference: Reference, le: LogEvidence) -> list[str]:
    flags = []
    if not reference.trusted:
        failing = "; ".join(c.detail for c in reference.checks if not c.ok)
        flags.append(
            f"UNTRUSTED REFERENCE: the {reference.kind} reference fails its checks "
            f"({failing}); every metric below compares against draws that may be "
            "wrong"
        )
    for row in summary.itertuples():
        if getattr(row, "point_mass", False) is True:
            flags.append(
                f"{row.method}: a point estimate (every draw the same): ELBO, IWAE, gap and "
                "k-hat are not defined for it (a point mass has no density; its KL to the "
                "posterior is infinite), and its sds are 0; the fit's own 'ELBO' is "
                "log p(x, z) at the point"
            )
        if getattr(row, "outside_support", 0):
            flags.append(
                f"{row.method}: {row.outside_support} guide draw(s) fall where log p(x, z) = "
                "-inf (outside the posterior's support): its ELBO and IWAE are -inf; "
                "its k-hat counts them as weights of 0"
            )
        data = getattr(row, "log_weight_data", "full")
        if isinstance(data, str) and data.startswith("subsampled"):
            flags.append(
                f"{row.method}: its model subsamples the data and its log weights could not "
                f"be evaluated on the full data ({data[len('subsampled (') : -1]}): IWAE and "
                "k-hat are not given (a batch's log weight scaled by N / batch is noisy and "
                "that noise, not q, would inflate them); the ELBO is the minibatch estimate "
                "from independent batches"
            )
        if row.khat >= metrics.KHAT_BAD:
            flags.append(
                f"{row.method}: PSIS k-hat {row.khat:.2f} > {metrics.KHAT_BAD}: q "
                "misses posterior mass; its importance-weighted estimates (IWAE, "
                "log evidence) are unreliable"
            )
        if row.failed:
            flags.append(f"{row.method}: FAILED ({row.status}): {row.failure}")
        elif row.status == "nonfinite":
            flags.append(f"{row.method}: the fit stopped on a non-finite loss")
        elif not row.converged:
            flags.append(
                f"{row.method}: not converged ({row.status}, {row.num_steps} steps): "
                "its metrics mix optimisation error with the family's bias"
            )
    if le.kind == ESTIMATED and ("(bad)" in le.source or "DISAGREES" in le.source):
        flags.append(f"log evidence estimate unreliable: {le.source}")
    if le.kind == UNKNOWN:
        flags.append(f"log evidence unknown, gaps not shown: {le.source}")
    flags.extend(check_bounds(summary, le))
    return flags


def _pick_pair(
    sites_df: pd.DataFrame, reference: Reference, sites: Sequence[str]
) -> tuple[str, str] | None:
    """The element with the largest bias, and the element most correlated with it."""
    if sites_df.empty:
        return None
    score = sites_df["std_mean_error"].abs().fillna(0) + np.abs(
        np.log(sites_df["sd_ratio"].clip(lower=1e-12))
    ).fillna(0)
    by_element = score.groupby(sites_df["element"]).max()
    matrix, labels = metrics.flatten(reference.draws, sites, sample_ndim=2)
    if len(labels) < 2:
        return None
    first = str(by_element.idxmax())
    i = labels.index(first)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(matrix, rowvar=False)[i]
    corr = np.nan_to_num(np.abs(corr))
    corr[i] = -1.0
    return first, labels[int(np.argmax(corr))]


def _lessons(
    summary: pd.DataFrame,
    sites_df: pd.DataFrame,
    reference: Reference,
    le: LogEvidence,
    draws: Mapping[str, Mapping[str, np.ndarray]],
    pair: tuple[str, str] | None,
) -> list[str]:
    out = []
    if le.kind != UNKNOWN and np.isfinite(le.value):
        gaps = ", ".join(
            f"{r.method} {r.gap:.3g} +- {r.gap_se:.2g}"
            for r in summary.itertuples()
            if not np.isnan(r.gap)
        )
        out.append(
            f"The ELBO is a lower bound on log p(x) = {le.value:.4g} nats ({le.kind}); the gap "
            f"log p(x) - ELBO = KL(q || p) is what each method leaves on the table: {gaps}. "
            "A higher ELBO means a smaller KL to the posterior, not a correct posterior."
        )
    if not sites_df.empty:
        for row in summary.itertuples():
            table = sites_df[sites_df["method"] == row.method]
            narrow = table[table["sd_ratio"] < 0.8]
            if len(narrow):
                worst = narrow.loc[narrow["sd_ratio"].idxmin()]
                out.append(
                    f"{row.method} is too narrow: sd ratio {worst['sd_ratio']:.2f} at "
                    f"{worst['element']}, and its central 90% interval covers only "
                    f"{worst['coverage90']:.0%} of the reference draws there "
                    f"({len(narrow)} of {len(table)} elements have sd ratio < 0.8)."
                )
            biased = table[table["std_mean_error"].abs() > 0.5]
            if len(biased):
                worst = biased.loc[biased["std_mean_error"].abs().idxmax()]
                out.append(
                    f"{row.method} shifts the mean of {worst['element']} by "
                    f"{worst['std_mean_error']:+.2f} reference sd."
                )
    if pair is not None:
        ref_corr = _pair_corr(reference.draws, pair, 2)
        if np.isfinite(ref_corr) and abs(ref_corr) >= 0.3:
            lost = []
            for method, post in draws.items():
                c = _pair_corr(post, pair, 1)
                if np.isfinite(c) and abs(c - ref_corr) >= 0.2:
                    lost.append(f"{method} {c:+.2f}")
            if lost:
                out.append(
                    f"Correlation between {pair[0]} and {pair[1]} is {ref_corr:+.2f} "
                    f"under the reference but {', '.join(lost)}: these approximations lose "
                    "the dependence (a factorized family cannot represent it at all)."
                )
    bad = summary[summary["khat"] >= metrics.KHAT_BAD]
    if len(bad):
        out.append(
            "PSIS k-hat above 0.7 (" + ", ".join(bad["method"]) + ") means the "
            "approximation misses regions the posterior puts mass on; importance "
            "weighting cannot repair it."
        )
    good = summary[summary["khat"] < metrics.KHAT_GOOD]
    if len(good):
        out.append(
            "PSIS k-hat below 0.5 (" + ", ".join(good["method"]) + "): importance "
            "sampling with these approximations as proposals is reliable."
        )
    if not reference.trusted:
        out.append(
            "The reference itself failed its checks, so none of the above is "
            "established; rerun NUTS with more draws or a higher target acceptance, or "
            "reparameterize the model."
        )
    return out


def _pair_corr(draws: Mapping[str, np.ndarray], pair: tuple[str, str], sample_ndim: int) -> float:
    sites = []
    for label in pair:
        site = label.split("[", 1)[0]
        if site not in sites:
            sites.append(site)
    if any(s not in draws for s in sites):
        return float("nan")
    matrix, labels = metrics.flatten(draws, sites, sample_ndim)
    a, b = matrix[:, labels.index(pair[0])], matrix[:, labels.index(pair[1])]
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
