"""Figures and the HTML / Markdown / CSV / JSON report of a :class:`Comparison`.

No fitting happens here: everything comes from the comparison record.
:func:`write_report` writes into a folder

- ``report.html``: self-contained (figures embedded as base64 PNG),
- ``report.md`` with the figures next to it in ``figures/``,
- ``summary.csv`` (one row per method) and ``sites.csv`` (one row per
  method and site element),
- ``diagnostics.json`` (everything but the draws),
- one netcdf per method (``<guide>__<elbo>.nc``) and ``reference.nc``.

Table cells in the HTML carry the full-precision value in ``data-value``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import gaussian_kde

from diagnostics import metrics
from diagnostics.comparison import Comparison
from diagnostics.convert import reference_to_inference_data, save_netcdf
from vimodels.io import atomic_write, atomic_write_json, atomic_write_text, ensure_dir, safe_name

MAX_PANELS = 16
SUMMARY_COLUMNS = (
    ("method", "method"),
    ("elbo", "ELBO"),
    ("elbo_se", "ELBO se"),
    ("iwae", "IWAE"),
    ("gap", "gap"),
    ("gap_se", "gap se"),
    ("khat", "k-hat"),
    ("khat_verdict", "k-hat verdict"),
    ("w1_mean", "mean W1 (sd)"),
    ("w1_max", "max W1 (sd)"),
    ("worst_sd_ratio", "worst sd ratio"),
    ("worst_sd_element", "at"),
    ("coverage_min", "min coverage90"),
    ("sliced_w2", "sliced W2"),
    ("w2", "W2"),
    ("energy", "energy"),
    ("corr_max_error", "max corr error"),
    ("converged", "converged"),
    ("wall_time_s", "wall time (s)"),
    ("reliable", "reliable"),
)
SITE_COLUMNS = (
    ("method", "method"),
    ("element", "element"),
    ("ref_mean", "ref mean"),
    ("ref_sd", "ref sd"),
    ("ref_mcse", "ref MCSE"),
    ("mean", "mean"),
    ("sd", "sd"),
    ("std_mean_error", "std mean error"),
    ("std_mcse", "std MCSE"),
    ("sd_ratio", "sd ratio"),
    ("coverage90", "coverage90"),
    ("w1", "W1"),
)
_COLORS = matplotlib.colormaps["tab10"].colors


def _color(i: int) -> tuple:
    return _COLORS[i % len(_COLORS)]


def fmt(value: Any, se: float | None = None) -> str:
    """How a table cell is printed: 4 significant digits for floats.

    With a finite positive standard error ``se``, a float is printed to the decimal
    of the se's second significant digit (at least 4 significant digits), so that
    an ELBO of -70.3218 +- 0.0043 and an IWAE of -70.3172 do not both read -70.32.
    """
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "nan"
        if se is not None and np.isfinite(se) and se > 0 and np.isfinite(value):
            decimals = 1 - math.floor(math.log10(float(se)))
            if value != 0:  # never fewer significant digits than 4
                decimals = max(decimals, 3 - math.floor(math.log10(abs(float(value)))))
            return f"{float(value):.{min(max(decimals, 0), 12)}f}"
        return f"{float(value):.4g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


# ----------------------------------------------------------------------------- figures


def _elements(c: Comparison) -> list[str]:
    return list(dict.fromkeys(c.sites["element"])) if not c.sites.empty else []


def _column(draws: Mapping[str, np.ndarray], label: str, sample_ndim: int) -> np.ndarray:
    site = label.split("[", 1)[0]
    x = np.asarray(draws[site], dtype=float)
    lead = int(np.prod(x.shape[:sample_ndim]))
    flat = x.reshape(lead, -1)
    labels = metrics.element_labels(site, x.shape[sample_ndim:])
    return flat[:, labels.index(label)]


def _kde(ax: Any, x: np.ndarray, lo: float, hi: float, **kw: Any) -> None:
    grid = np.linspace(lo, hi, 200)
    if np.ptp(x) > 0:
        if len(x) > 2000:  # a smooth curve needs no more; KDE cost is O(n * grid)
            x = np.random.default_rng(0).choice(x, 2000, replace=False)
        ax.plot(grid, gaussian_kde(x)(grid), **kw)


def figure_marginals(c: Comparison) -> Figure:
    """Marginal densities of each method over the reference, one panel per element."""
    elements = _elements(c)[:MAX_PANELS]
    ncol = min(4, max(1, len(elements)))
    nrow = int(np.ceil(len(elements) / ncol)) or 1
    fig = Figure(figsize=(3.2 * ncol, 2.4 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, label in zip(axes.ravel(), elements):
        ref = _column(c.reference.draws, label, 2)
        lo, hi = np.quantile(ref, [0.002, 0.998])
        for draws in c.draws.values():
            x = _column(draws, label, 1)
            lo, hi = min(lo, np.quantile(x, 0.002)), max(hi, np.quantile(x, 0.998))
        ax.hist(
            ref,
            bins=50,
            range=(lo, hi),
            density=True,
            color="0.75",
            label=f"{c.reference.kind} reference",
        )
        for i, (method, draws) in enumerate(c.draws.items()):
            _kde(ax, _column(draws, label, 1), lo, hi, color=_color(i), lw=1.4, label=method)
        ax.set_title(label, fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(elements) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if labels:  # none when every method failed and there is nothing to draw
        fig.legend(
            handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False
        )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def figure_forest(c: Comparison) -> Figure:
    """Mean and central 90% interval of every element for the reference and each method."""
    elements = _elements(c)
    series = [(f"{c.reference.kind} reference", c.reference.draws, 2, "black")]
    series += [(m, d, 1, _color(i)) for i, (m, d) in enumerate(c.draws.items())]
    fig = Figure(figsize=(7, 0.45 * len(elements) * max(1, len(series)) / 2 + 1.2))
    ax = fig.subplots()
    step = 0.8 / max(1, len(series))
    for k, (name, draws, nd, color) in enumerate(series):
        for j, label in enumerate(elements):
            x = _column(draws, label, nd)
            lo, hi = metrics.central_interval(x, 0.9)
            y = -j - k * step
            ax.plot([lo, hi], [y, y], color=color, lw=1.6)
            ax.plot([x.mean()], [y], "o", color=color, ms=3.5, label=name if j == 0 else None)
    ax.set_yticks([-j - 0.4 + step / 2 for j in range(len(elements))], elements, fontsize=8)
    ax.set_xlabel("mean and central 90% interval")
    _legend(ax, fontsize=8, loc="best", frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_pair(c: Comparison) -> Figure | None:
    """Scatter of the pair of elements with the largest bias, one panel per method."""
    if c.pair is None:
        return None
    a, b = c.pair
    n = len(c.draws)
    fig = Figure(figsize=(3.2 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)
    rng = np.random.default_rng(0)
    ra, rb = _column(c.reference.draws, a, 2), _column(c.reference.draws, b, 2)
    idx = rng.choice(len(ra), size=min(len(ra), 1500), replace=False)
    for i, (ax, (method, draws)) in enumerate(zip(axes[0], c.draws.items())):
        ax.scatter(ra[idx], rb[idx], s=3, color="0.6", alpha=0.5, label="reference")
        xa, xb = _column(draws, a, 1), _column(draws, b, 1)
        j = rng.choice(len(xa), size=min(len(xa), 1500), replace=False)
        ax.scatter(xa[j], xb[j], s=3, color=_color(i), alpha=0.5, label=method)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel(a)
        ax.tick_params(labelsize=7)
        for setter, ref in ((ax.set_xscale, ra), (ax.set_yscale, rb)):
            if ref.min() > 0 and ref.max() / ref.min() > 50:
                setter("log")
    axes[0][0].set_ylabel(b)
    fig.tight_layout()
    return fig


def _legend(ax: Any, **kw: Any) -> None:
    """A legend where something is labelled (every method failed: nothing to name)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def figure_losses(c: Comparison) -> Figure:
    """Smoothed ELBO per step (minus the loss) of each method, with the log evidence."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    lows, highs = [], []
    for i, (method, losses) in enumerate(c.losses.items()):
        if len(losses) == 0:
            continue
        elbo = -np.asarray(losses, dtype=float)
        w = max(1, len(elbo) // 50)
        smooth = np.convolve(elbo, np.ones(w) / w, mode="valid")
        steps = np.arange(len(smooth)) + w
        ax.plot(steps, smooth, color=_color(i), lw=1.2, label=method)
        tail = smooth[len(smooth) // 10 :]
        tail = tail[np.isfinite(tail)]
        if len(tail):
            lows.append(np.quantile(tail, 0.02))
            highs.append(tail.max())
    le = c.log_evidence
    if np.isfinite(le.value):
        ax.axhline(le.value, color="black", ls="--", lw=1, label=f"log p(x) ({le.kind})")
        highs.append(le.value)
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.1 * (hi - lo) + 1e-6
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO estimate (nats), moving average")
    _legend(ax, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def make_figures(c: Comparison) -> dict[str, bytes]:
    """PNG bytes of every figure, by name (``marginals``, ``forest``, ``pair``, ``losses``)."""
    out = {}
    for name, build in (
        ("marginals", figure_marginals),
        ("forest", figure_forest),
        ("pair", figure_pair),
        ("losses", figure_losses),
    ):
        fig = build(c)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        out[name] = buf.getvalue()
    return out


# ----------------------------------------------------------------------------- tables


#: Columns of the method table printed to the precision of a standard error (column
#: of ``Comparison.summary``), whether or not that se is a column of the table.
_SE_OF = {"elbo": "elbo_se", "iwae": "iwae_se", "gap": "gap_se"}


def summary_table(c: Comparison) -> pd.DataFrame:
    """The per-method table as shown (selected columns, display names).

    ``attrs["se"]`` maps a display column to the standard errors that set its
    printed precision (:func:`fmt`).
    """
    cols = [(k, v) for k, v in SUMMARY_COLUMNS if k in c.summary]
    out = c.summary[[k for k, _ in cols]].rename(columns=dict(cols))
    names = dict(cols)
    out.attrs["se"] = {
        names[k]: c.summary[se].to_numpy(dtype=float)
        for k, se in _SE_OF.items()
        if k in names and se in c.summary
    }
    return out


def _cell_se(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per display column, the standard errors its cells are printed to (see :func:`fmt`).

    ``attrs["se"]``, else a column named ``"<col> se"`` or ``"<col>_se"``.
    """
    out = dict(df.attrs.get("se", {}))
    for col in df.columns:
        for name in (f"{col} se", f"{col}_se"):
            if col not in out and name in df.columns:
                out[col] = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
    return {k: v for k, v in out.items() if len(v) == len(df)}


def _row_cells(df: pd.DataFrame) -> list[list[tuple[Any, str]]]:
    """Each row's ``(value, printed text)`` pairs."""
    se = _cell_se(df)
    rows = []
    for i, row in enumerate(df.itertuples(index=False)):
        rows.append(
            [(v, fmt(v, se[col][i] if col in se else None)) for col, v in zip(df.columns, row)]
        )
    return rows


def site_table(c: Comparison) -> pd.DataFrame:
    """The per-site table as shown."""
    cols = [(k, v) for k, v in SITE_COLUMNS if k in c.sites]
    return c.sites[[k for k, _ in cols]].rename(columns=dict(cols))


def html_table(df: pd.DataFrame, table_id: str) -> str:
    """``df`` as an HTML table with id ``table_id``, numbers formatted by :func:`fmt`."""
    head = "".join(f"<th>{html.escape(str(col))}</th>" for col in df.columns)
    body = []
    for row in _row_cells(df):
        cells = []
        for value, text in row:
            attr = ""
            if isinstance(value, (float, np.floating)) and not isinstance(value, bool):
                attr = f' data-value="{float(value)!r}"'
            cells.append(f"<td{attr}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def md_table(df: pd.DataFrame) -> str:
    """``df`` as a Markdown table, numbers formatted by :func:`fmt`."""
    lines = [
        "| " + " | ".join(str(c) for c in df.columns) + " |",
        "|" + "|".join("---" for _ in df.columns) + "|",
    ]
    for row in _row_cells(df):
        lines.append("| " + " | ".join(t.replace("|", "\\|") for _, t in row) + " |")
    return "\n".join(lines)


def _reference_lines(c: Comparison) -> list[str]:
    ref = c.reference
    lines = [
        ref.describe()
        + ("; loaded from cache" if ref.from_cache else f"; computed in {ref.wall_time:.1f} s")
    ]
    for check in ref.checks:
        lines.append(f"[{'ok' if check.ok else 'FAIL'}] {check.detail}")
    lines += list(ref.notes)
    settings = ref.settings
    if ref.kind == "nuts":
        lines.append(
            f"settings: {settings.get('num_chains')} chains x ({settings.get('num_warmup')} "
            f"warm-up + {settings.get('num_samples')}) draws, target accept "
            f"{settings.get('target_accept_prob')}, max tree depth "
            f"{settings.get('max_tree_depth')}, JIT {settings.get('jit_used')}, seed "
            f"{settings.get('seed')}"
        )
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in ref.versions.items()))
    return lines


def _floor_line(c: Comparison) -> str:
    floor = c.settings.get("joint_floor") or {}
    if not floor:
        return ""
    return (
        "Noise floor of the joint distances (two halves of the reference; with half the "
        "reference per side it slightly overstates the floor): "
        f"W2 {fmt(floor['w2'])}, sliced W2 {fmt(floor['sliced_w2'])}, energy "
        f"{fmt(floor['energy'])}, max corr error {fmt(floor['corr_max_error'])}; a perfect "
        "approximation scores about this."
    )


def evidence_line(c: Comparison) -> str:
    """One line on the log evidence the gaps are measured against: value, se, method."""
    le = c.log_evidence
    if le.kind == "unknown":
        return f"log p(x): unknown ({le.source}); gaps are not shown."
    exact = le.kind in ("exact", "given")
    se = "" if exact else f" +- {le.se:.2g}"
    how = f" by {le.method}" if le.kind == "estimated" and le.method else ""
    value = f"{le.value:.6g}" if exact else fmt(float(le.value), le.se)
    return f"log p(x) = {value}{se} nats, {le.kind}{how}: {le.source}."


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
.flag{background:#fde2e1;border:1px solid #e0a0a0;padding:0.6em 1em;margin:0.4em 0}
.untrusted{background:#c0392b;color:white;padding:0.8em 1em;font-weight:bold}
img{max-width:100%}code{background:#f3f3f3;padding:0 3px}
"""


def render_html(c: Comparison, figures: Mapping[str, bytes]) -> str:
    """The self-contained HTML report."""
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vimodels compare: "
        f"{e(c.model_name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Variational approximations vs. reference: {e(c.model_name)}</h1>",
    ]
    if c.partial:
        parts.append(
            f"<div class='untrusted'>PARTIAL RESULT: {e(c.interrupted_line() or '')}</div>"
        )
    if not c.reference.trusted:
        parts.append(
            "<div class='untrusted'>UNTRUSTED REFERENCE: it fails its own checks; "
            "the metrics below compare against draws that may be wrong.</div>"
        )
    parts.append(
        "<h2>Reference</h2><ul>"
        + "".join(f"<li>{e(x)}</li>" for x in _reference_lines(c))
        + "</ul>"
    )
    parts.append(f"<p>{e(evidence_line(c))}</p>")
    if c.flags:
        parts.append(
            "<h2>Unreliable results</h2>"
            + "".join(f"<div class='flag'>{e(f)}</div>" for f in c.flags)
        )
    if c.lessons:
        parts.append(
            "<h2>What this shows</h2><ul>"
            + "".join(f"<li>{e(x)}</li>" for x in c.lessons)
            + "</ul>"
        )
    parts.append("<h2>Methods</h2>" + html_table(summary_table(c), "summary"))
    parts.append(
        "<p>gap = log p(x) - ELBO (nats, = KL(q || p)); k-hat: PSIS Pareto k of "
        "log p(x, z) - log q(z) (good &lt; 0.5 &lt; ok &lt; 0.7 &lt; bad); W1: "
        "marginal 1-Wasserstein; W2, sliced W2, energy: joint distances in "
        "unconstrained space in reference sd units; coverage90: share of reference "
        "draws inside the method's central 90% interval (0.9 when right). "
        f"{e(_floor_line(c))}</p>"
    )
    if c.skipped:
        parts.append("<p>Skipped: " + "; ".join(e(s) for s in c.skipped) + "</p>")
    if _decentered_line(c):
        parts.append(f"<p>{e(_decentered_line(c))}</p>")
    captions = {
        "marginals": "Marginal densities over the reference",
        "forest": "Means and central 90% intervals",
        "pair": f"Pair plot of {' and '.join(c.pair or ())} (largest bias)",
        "losses": "Loss curves",
    }
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>{e(captions[name])}</h2><img alt='{name}' src='data:image/png;base64,{data}'>"
        )
    parts.append("<h2>Sites</h2>" + html_table(site_table(c), "sites"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _decentered_line(c: Comparison) -> str:
    """Which methods were fitted on the decentered model, on which sites ('' for none)."""
    decentered = c.settings.get("decentered") or {}
    if not decentered:
        return ""
    return (
        "Decentered (fit(reparam='decenter'), LocScaleReparam(centered=0)): "
        + "; ".join(f"{m} on {', '.join(sites)}" for m, sites in decentered.items())
        + ". Their sites are reported as the model's own."
    )


def render_markdown(c: Comparison, figure_files: Mapping[str, str]) -> str:
    """The Markdown report; figures are linked from ``figure_files`` (relative paths)."""
    lines = [f"# Variational approximations vs. reference: {c.model_name}", ""]
    if c.partial:
        lines += [f"**PARTIAL RESULT: {c.interrupted_line()}**", ""]
    if not c.reference.trusted:
        lines += [
            "**UNTRUSTED REFERENCE: it fails its own checks; the metrics below compare "
            "against draws that may be wrong.**",
            "",
        ]
    lines += ["## Reference", ""] + [f"- {x}" for x in _reference_lines(c)] + [""]
    lines += [evidence_line(c), ""]
    if c.flags:
        lines += ["## Unreliable results", ""] + [f"- **{f}**" for f in c.flags] + [""]
    if c.lessons:
        lines += ["## What this shows", ""] + [f"- {x}" for x in c.lessons] + [""]
    lines += ["## Methods", "", md_table(summary_table(c)), "", _floor_line(c), ""]
    if c.skipped:
        lines += ["Skipped: " + "; ".join(c.skipped), ""]
    if _decentered_line(c):
        lines += [_decentered_line(c), ""]
    for name, path in figure_files.items():
        lines += [f"![{name}]({path})", ""]
    lines += ["## Sites", "", md_table(site_table(c)), ""]
    return "\n".join(lines)


def write_figures(
    figures: Mapping[str, bytes], out: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """Write PNG figures into ``out/figures/`` atomically.

    Returns
    -------
    files : dict of str to Path
        ``figure:<name>`` -> the file written.
    rel : dict of str to str
        ``<name>`` -> its path relative to ``out`` (for Markdown links).
    """
    figs = ensure_dir(out / "figures")
    files: dict[str, Path] = {}
    rel: dict[str, str] = {}
    for name, png in figures.items():
        path = figs / f"{name}.png"
        atomic_write(path, lambda tmp, data=png: Path(tmp).write_bytes(data))
        files[f"figure:{name}"] = path
        rel[name] = f"figures/{name}.png"
    return files, rel


def write_report(c: Comparison, out: str | Path, *, netcdf: bool = True) -> dict[str, Path]:
    """Write the report files into ``out`` (created if needed).

    Returns
    -------
    dict of str to Path
        ``html``, ``markdown``, ``summary_csv``, ``sites_csv``, ``json``,
        ``figure:<name>``, ``netcdf:<method>`` and ``netcdf:reference``.
    """
    out = ensure_dir(out)
    figures = make_figures(c)
    files, rel = write_figures(figures, out)
    if netcdf:
        for method, idata in c.inference_data.items():
            stem = safe_name(method.replace("/", "__"))
            files[f"netcdf:{method}"] = save_netcdf(idata, out / f"{stem}.nc")
        files["netcdf:reference"] = save_netcdf(
            reference_to_inference_data(c.reference), out / "reference.nc"
        )
    files["summary_csv"] = atomic_write_text(out / "summary.csv", c.summary.to_csv(index=False))
    files["sites_csv"] = atomic_write_text(out / "sites.csv", c.sites.to_csv(index=False))
    files["markdown"] = atomic_write_text(out / "report.md", render_markdown(c, rel))
    files["html"] = atomic_write_text(out / "report.html", render_html(c, figures))
    payload = c.to_json()
    payload["files"] = {k: str(v.relative_to(out)) for k, v in files.items()}
    files["json"] = atomic_write_json(out / "diagnostics.json", json_plain(payload))
    return files


def json_plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars as Python numbers, infinities as strings (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and np.isinf(obj):
        return str(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [json_plain(v) for v in obj]
    return obj
