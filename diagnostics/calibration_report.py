"""Figures and the HTML / Markdown / CSV / JSON report of a calibration run.

No fitting happens here: everything comes from the calibration record
(:class:`vimodels.runs.calibrate.Calibration`; read through its attributes
``model methods sims num_draws alpha ranks elements sites summary failures
settings wall_time partial executed reused`` and ``to_json()``).
:func:`write_calibration_report` writes into a folder

- ``report.html``: self-contained (figures embedded as base64 PNG),
- ``report.md`` with the figures next to it in ``figures/``,
- ``summary.csv`` (one row per method), ``sites.csv`` (verdict per method
  and site), ``elements.csv`` (tests per element), ``failures.csv`` (failed
  and non-converged fits with their seeds), ``ranks.csv`` (every rank),
- ``calibration.json`` (all of it).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from diagnostics import calibration as stats
from diagnostics.report import CSS, html_table, json_plain, md_table, write_figures
from vimodels.io import atomic_write_json, atomic_write_text, ensure_dir, safe_name

MAX_PANELS = 16
HIST_BINS = 20

HOW_TO_READ = (
    "Each simulation draws parameters from the prior and data from the model, fits each "
    "method to the data, and ranks the true value of every parameter element among L draws of "
    "the approximation. If the approximation were the exact posterior, the ranks would be "
    "uniform (SBC, Talts et al. 2018): the ECDF-difference curves would stay inside the grey "
    "simultaneous band (Sailynoja, Burkner & Vehtari 2022) and the histogram bars inside the "
    "pointwise 99% binomial band. A U-shaped histogram (ECDF difference rising at the left "
    "end, falling through the middle, rising again at the right end) means the approximation "
    "is too narrow (under-dispersed); a hump in the middle (the mirror image), too wide "
    "(over-dispersed); mass piled on the left (truth below most draws; ECDF difference a "
    "positive arch) means the draws sit too high (biased up), on the right (a negative arch), "
    "too low (biased down). "
    "p-values are Holm-corrected over the elements of each method. VSBC (Yao et al. 2018) "
    "tests the symmetry of the quantiles about 1/2, which holds for an unbiased approximation."
)
CANNOT_TELL = (
    "What this cannot tell: it averages over the prior, so a method can pass while failing "
    "for the data set you care about (and fail only in prior regions of no interest); uniform "
    "ranks are necessary, not sufficient (an approximation equal to the prior passes); each "
    "element is checked alone, so wrong correlations go unseen; a pass at this number of "
    "simulations only bounds how badly calibrated a method can be, it does not prove it exact."
)


def _method_elements(cal: Any, method: str) -> list[str]:
    return list(cal.ranks.get(method, {}))[:MAX_PANELS]


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return (n + cols - 1) // cols, cols


def figure_ecdf(cal: Any, method: str) -> Figure | None:
    """ECDF of the fractional ranks minus the uniform CDF, with the simultaneous band."""
    labels = _method_elements(cal, method)
    if not labels:
        return None
    num_ranks = cal.num_draws + 1
    rows, cols = _grid(len(labels))
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    verdicts = _element_verdicts(cal, method)
    for ax, label in zip(axes.flat, labels):
        r = cal.ranks[method][label]
        z, lo, hi = stats.ecdf_band(len(r), num_ranks, cal.alpha)
        ax.fill_between(z, lo - z, hi - z, color="0.85", step="mid", lw=0)
        ax.plot(z, stats.ecdf(r, num_ranks, z) - z, color="C0", lw=1.2)
        ax.axhline(0.0, color="0.5", lw=0.6)
        ax.set_title(f"{label}: {verdicts.get(label, '')}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{method}: ECDF difference of the ranks, {int(100 * (1 - cal.alpha))}% simultaneous band",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def figure_histograms(cal: Any, method: str) -> Figure | None:
    """Rank histograms with the pointwise 99% binomial band."""
    labels = _method_elements(cal, method)
    if not labels:
        return None
    num_ranks = cal.num_draws + 1
    bins = min(HIST_BINS, num_ranks)
    rows, cols = _grid(len(labels))
    fig = Figure(figsize=(3.0 * cols, 2.1 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, label in zip(axes.flat, labels):
        r = cal.ranks[method][label]
        counts = stats.histogram(r, num_ranks, bins)
        lo, hi = stats.histogram_band(len(r), num_ranks, bins)
        x = np.arange(bins)
        ax.fill_between(x, lo, hi, color="0.85", step="mid", lw=0)
        ax.bar(x, counts, width=0.9, color="C0", alpha=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{method}: rank histograms ({bins} bins), 99% binomial band", fontsize=10)
    fig.tight_layout()
    return fig


def _element_verdicts(cal: Any, method: str) -> dict[str, str]:
    el = cal.elements
    if el.empty:
        return {}
    g = el[el["method"] == method]
    return dict(zip(g["element"], g["verdict"]))


def make_figures(cal: Any) -> dict[str, bytes]:
    """PNG bytes by name: ``ecdf__<method>`` and ``hist__<method>``."""
    out = {}
    for method in cal.methods:
        stem = safe_name(method.replace("/", "__").replace(" ", "_"))
        for kind, build in (("ecdf", figure_ecdf), ("hist", figure_histograms)):
            fig = build(cal, method)
            if fig is None:
                continue
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            out[f"{kind}__{stem}"] = buf.getvalue()
    return out


SUMMARY_COLUMNS = (
    ("method", "method"),
    ("sims", "simulations"),
    ("ranked", "ranked"),
    ("failed", "failed"),
    ("not_converged", "not converged"),
    ("sites_calibrated", "sites calibrated"),
    ("sites", "sites"),
    ("verdict", "verdict"),
    ("median_fit_s", "median fit (s)"),
)
SITE_COLUMNS = (
    ("method", "method"),
    ("site", "site"),
    ("verdict", "verdict"),
    ("elements", "elements"),
    ("failing", "failing"),
    ("min_p_uniform_holm", "min p (ECDF, Holm)"),
    ("vsbc", "VSBC"),
    ("min_p_vsbc_holm", "min p (VSBC, Holm)"),
)
ELEMENT_COLUMNS = (
    ("method", "method"),
    ("element", "element"),
    ("n", "n"),
    ("mean_u", "mean rank"),
    ("sd_u", "sd rank (0.289)"),
    ("z_bias", "z bias"),
    ("z_spread", "z spread"),
    ("tail_low", "tail low"),
    ("tail_high", "tail high"),
    ("p_uniform", "p ECDF"),
    ("p_uniform_holm", "p ECDF Holm"),
    ("p_vsbc", "p VSBC"),
    ("p_vsbc_holm", "p VSBC Holm"),
    ("verdict", "verdict"),
)


def _select(df: pd.DataFrame, columns: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    cols = [(k, v) for k, v in columns if k in df]
    return df[[k for k, _ in cols]].rename(columns=dict(cols))


def _header_lines(cal: Any) -> list[str]:
    s = cal.settings
    lines = [
        f"{cal.sims} simulations of {cal.model}, {cal.num_draws} draws per approximation "
        f"(ranks 0..{cal.num_draws}), family-wise level {cal.alpha:g} (Holm over each "
        "method's elements)",
        f"fits: up to {s.get('steps')} steps, options {s.get('fit_options') or '{}'}; base "
        f"seed {s.get('seed')}; observed data simulated: "
        + ", ".join(f"{k} (site {v})" for k, v in (s.get("observed") or {}).items()),
        f"ran on {s.get('executor')}: {cal.executed} simulation(s) run, {cal.reused} reused, "
        f"{cal.wall_time:.1f} s",
    ]
    return lines


def _failure_table(cal: Any) -> pd.DataFrame:
    return cal.failures.rename(
        columns={"sim": "simulation", "sim_seed": "simulation seed", "fit_seed": "fit seed"}
    )


def render_html(cal: Any, figures: dict[str, bytes]) -> str:
    """The self-contained HTML report."""
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vimodels calibrate: "
        f"{e(cal.model)}</title><style>{CSS}</style></head><body>",
        f"<h1>Simulation-based calibration: {e(cal.model)}</h1>",
    ]
    if cal.partial:
        parts.append(
            "<div class='untrusted'>PARTIAL RESULT: interrupted; the tables cover the "
            "simulations that finished</div>"
        )
    parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in _header_lines(cal)) + "</ul>")
    parts.append("<h2>Methods</h2>" + html_table(_select(cal.summary, SUMMARY_COLUMNS), "summary"))
    if not cal.sites.empty:
        parts.append(
            "<h2>Verdicts per site</h2>" + html_table(_select(cal.sites, SITE_COLUMNS), "sites")
        )
    parts.append(f"<p>{e(HOW_TO_READ)}</p><p>{e(CANNOT_TELL)}</p>")
    parts.append("<h2>Failed or non-converged fits</h2>")
    if cal.failures.empty:
        parts.append("<p>None: every fit finished and converged.</p>")
    else:
        parts.append(
            "<p>Failed fits are left out of the ranks (and counted above); non-converged fits "
            "are kept. Reproduce one with its simulation seed and fit seed (the simulated data "
            "are stored in its sims/ record).</p>" + html_table(_failure_table(cal), "failures")
        )
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    if not cal.elements.empty:
        parts.append(
            "<h2>Elements</h2>" + html_table(_select(cal.elements, ELEMENT_COLUMNS), "elements")
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(cal: Any, figure_files: dict[str, str]) -> str:
    """The Markdown report; figures are linked from ``figure_files`` (relative paths)."""
    lines = [f"# Simulation-based calibration: {cal.model}", ""]
    if cal.partial:
        lines += [
            "**PARTIAL RESULT: interrupted; the tables cover the simulations that finished**",
            "",
        ]
    lines += [f"- {x}" for x in _header_lines(cal)] + [""]
    lines += ["## Methods", "", md_table(_select(cal.summary, SUMMARY_COLUMNS)), ""]
    if not cal.sites.empty:
        lines += ["## Verdicts per site", "", md_table(_select(cal.sites, SITE_COLUMNS)), ""]
    lines += [HOW_TO_READ, "", CANNOT_TELL, "", "## Failed or non-converged fits", ""]
    if cal.failures.empty:
        lines += ["None: every fit finished and converged.", ""]
    else:
        lines += [md_table(_failure_table(cal)), ""]
    for name, path in figure_files.items():
        lines += [f"![{name}]({path})", ""]
    if not cal.elements.empty:
        lines += ["## Elements", "", md_table(_select(cal.elements, ELEMENT_COLUMNS)), ""]
    return "\n".join(lines)


def ranks_frame(cal: Any) -> pd.DataFrame:
    """Long table of every rank: ``method element position rank``."""
    rows = [
        {"method": m, "element": label, "position": i, "rank": int(x)}
        for m, by_el in cal.ranks.items()
        for label, r in by_el.items()
        for i, x in enumerate(r)
    ]
    return pd.DataFrame(rows, columns=["method", "element", "position", "rank"])


def write_calibration_report(cal: Any, out: str | Path) -> dict[str, Path]:
    """Write the report files into ``out`` (created if needed).

    Returns
    -------
    dict of str to Path
        ``html``, ``markdown``, ``summary_csv``, ``sites_csv``, ``elements_csv``,
        ``failures_csv``, ``ranks_csv``, ``json`` and ``figure:<name>``.
    """
    out = ensure_dir(out)
    figures = make_figures(cal)
    files, rel = write_figures(figures, out)
    for key, name, df in (
        ("summary_csv", "summary.csv", cal.summary),
        ("sites_csv", "sites.csv", cal.sites),
        ("elements_csv", "elements.csv", cal.elements),
        ("failures_csv", "failures.csv", cal.failures),
        ("ranks_csv", "ranks.csv", ranks_frame(cal)),
    ):
        files[key] = atomic_write_text(out / name, df.to_csv(index=False))
    files["markdown"] = atomic_write_text(out / "report.md", render_markdown(cal, rel))
    files["html"] = atomic_write_text(out / "report.html", render_html(cal, figures))
    payload = cal.to_json()
    payload["files"] = {k: str(v.relative_to(out)) for k, v in files.items()}
    files["json"] = atomic_write_json(out / "calibration.json", json_plain(payload))
    return files


__all__ = ["make_figures", "render_html", "render_markdown", "write_calibration_report"]
