"""The combined report of a sweep: the compare tables across models and seeds.

No fitting happens here: everything comes from the :class:`~vimodels.runs.records.SweepRun`.
Files, in the sweep's output folder:

- ``summary.csv``: one row per model, seed and method (the compare summary columns);
- ``sites.csv``: one row per model, seed, method and site element;
- ``by_method.csv``: mean and sd over seeds per model and method;
- ``sweep.json``: the configuration, the executor, task counts, references,
  failures (with their inputs and tracebacks) and left-out cells;
- ``report.md`` and ``report.html``;
- ``reports/<model>/seed<k>/``: the full compare report of each model and seed
  (figures, per-site tables), unless the configuration turns them off.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from diagnostics.report import (
    CSS,
    SUMMARY_COLUMNS,
    evidence_line,
    html_table,
    json_plain,
    md_table,
    write_report,
)
from vimodels.io import atomic_write_json, atomic_write_text, ensure_dir, safe_name
from vimodels.runs.records import SweepRun

BY_METHOD_COLUMNS = (
    ("method", "method"),
    ("seeds", "seeds"),
    ("elbo_mean", "ELBO"),
    ("elbo_sd", "ELBO sd"),
    ("gap_mean", "gap"),
    ("khat_mean", "k-hat"),
    ("w1_mean_mean", "mean W1"),
    ("worst_sd_ratio_mean", "worst sd ratio"),
    ("coverage_min_mean", "min coverage90"),
    ("sliced_w2_mean", "sliced W2"),
    ("converged", "converged (share)"),
    ("reliable", "reliable (share)"),
    ("wall_time_s_mean", "wall time (s)"),
)


def _select(df: pd.DataFrame, columns: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    cols = [(k, v) for k, v in columns if k in df]
    return df[[k for k, _ in cols]].rename(columns=dict(cols))


def _summary_columns() -> tuple[tuple[str, str], ...]:
    return (("seed", "seed"),) + tuple(SUMMARY_COLUMNS)


def _counts(run: SweepRun) -> str:
    failed = sum(f.stage == "fit" for f in run.failures)
    return (
        f"{len(run.tasks)} fit(s): {len(run.executed)} run now, {len(run.reused)} reused "
        f"from earlier runs, {failed} failed; executor: {run.executor}; "
        f"{run.wall_time:.0f} s"
    )


def partial_line(run: SweepRun) -> str:
    """``interrupted: N fit(s) not run: ...`` (what Ctrl-C left out of the tables)."""
    line = f"interrupted: {len(run.not_run)} fit(s) not run" + (
        ": " + "; ".join(run.not_run) if run.not_run else ""
    )
    if not run.summary.empty and "status" in run.summary:
        stopped = run.summary[run.summary["status"] == "interrupted"]
        if len(stopped):
            names = "; ".join(f"{r.model} {r.method} seed={r.seed}" for r in stopped.itertuples())
            line += f"; stopped early (what they learned is kept): {names}"
    return line


def _reference_line(run: SweepRun, model: str) -> str:
    ref = run.references.get(model)
    if ref is None:
        return "no reference (see the failures): fit results only"
    return ref.describe()


def _sections(run: SweepRun) -> list[dict[str, Any]]:
    """Per model: reference, evidence, flags, tables, per-seed report links."""
    out = []
    for model in run.config.models:
        rows = run.summary[run.summary["model"] == model] if not run.summary.empty else None
        if rows is None or rows.empty:
            continue
        by = run.by_method[run.by_method["model"] == model]
        comps = {s: c for (m, s), c in run.comparisons.items() if m == model}
        first = next(iter(comps.values()), None)
        flags = [f"seed {s}: {flag}" for s, c in comps.items() for flag in c.flags]
        out.append(
            {
                "model": model,
                "reference": _reference_line(run, model),
                "evidence": evidence_line(first) if first is not None else "",
                "flags": flags,
                "by_method": _select(by, BY_METHOD_COLUMNS),
                "summary": _select(rows, _summary_columns()),
                "reports": {
                    s: f"reports/{safe_name(model)}/seed{s}/report.html"
                    for s in comps
                    if run.config.reports
                },
            }
        )
    return out


def render_markdown(run: SweepRun) -> str:
    """The combined Markdown report."""
    lines = [f"# Sweep {run.config.name}", "", _counts(run), ""]
    if run.partial:
        lines += [f"**PARTIAL RESULT: {partial_line(run)}**", ""]
    if run.failures:
        lines += ["## Failed tasks", ""]
        lines += [md_table(failures_table(run)), ""]
    if run.skipped:
        lines += ["Left out: " + "; ".join(run.skipped), ""]
    for sec in _sections(run):
        lines += [f"## {sec['model']}", "", f"Reference: {sec['reference']}", ""]
        if sec["evidence"]:
            lines += [sec["evidence"], ""]
        lines += [f"- **{f}**" for f in sec["flags"]] + ([""] if sec["flags"] else [])
        lines += ["Mean over seeds:", "", md_table(sec["by_method"]), ""]
        lines += ["Per seed:", "", md_table(sec["summary"]), ""]
        if sec["reports"]:
            links = ", ".join(f"[seed {s}]({p})" for s, p in sec["reports"].items())
            lines += [f"Full reports: {links}", ""]
    return "\n".join(lines)


def render_html(run: SweepRun) -> str:
    """The combined self-contained HTML report."""
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vimodels sweep: "
        f"{e(run.config.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Sweep {e(run.config.name)}</h1><p>{e(_counts(run))}</p>",
    ]
    if run.partial:
        parts.append(f"<div class='untrusted'>PARTIAL RESULT: {e(partial_line(run))}</div>")
    if run.failures:
        parts.append("<h2>Failed tasks</h2>" + html_table(failures_table(run), "failures"))
    if run.skipped:
        parts.append("<p>Left out: " + "; ".join(e(s) for s in run.skipped) + "</p>")
    for i, sec in enumerate(_sections(run)):
        parts.append(f"<h2>{e(sec['model'])}</h2><p>Reference: {e(sec['reference'])}</p>")
        if sec["evidence"]:
            parts.append(f"<p>{e(sec['evidence'])}</p>")
        parts += [f"<div class='flag'>{e(f)}</div>" for f in sec["flags"]]
        parts.append("<h3>Mean over seeds</h3>" + html_table(sec["by_method"], f"by_method{i}"))
        parts.append("<h3>Per seed</h3>" + html_table(sec["summary"], f"summary{i}"))
        if sec["reports"]:
            links = ", ".join(f"<a href='{e(p)}'>seed {s}</a>" for s, p in sec["reports"].items())
            parts.append(f"<p>Full reports: {links}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def failures_table(run: SweepRun) -> pd.DataFrame:
    """One row per failure: stage, model, guide, ELBO, seed, error."""
    cols = ["stage", "model", "guide", "elbo", "seed", "error"]
    return pd.DataFrame([{k: f.as_dict()[k] for k in cols} for f in run.failures], columns=cols)


def write_sweep_report(run: SweepRun) -> dict[str, Path]:
    """Write the combined report (and the per-model reports) into ``run.out``.

    Returns
    -------
    dict of str to Path
        ``summary_csv``, ``sites_csv``, ``by_method_csv``, ``json``,
        ``markdown``, ``html`` and ``report:<model>:<seed>``.
    """
    out = ensure_dir(run.out)
    files: dict[str, Path] = {}
    if run.config.reports:
        for (model, seed), c in run.comparisons.items():
            folder = out / "reports" / safe_name(model) / f"seed{seed}"
            files[f"report:{model}:{seed}"] = write_report(c, folder, netcdf=False)["html"]
    files["summary_csv"] = atomic_write_text(out / "summary.csv", run.summary.to_csv(index=False))
    files["sites_csv"] = atomic_write_text(out / "sites.csv", run.sites.to_csv(index=False))
    files["by_method_csv"] = atomic_write_text(
        out / "by_method.csv", run.by_method.to_csv(index=False)
    )
    files["markdown"] = atomic_write_text(out / "report.md", render_markdown(run))
    files["html"] = atomic_write_text(out / "report.html", render_html(run))
    payload = {
        "config": run.config.as_dict(),
        "executor": run.executor,
        "wall_time_s": run.wall_time,
        "tasks": len(run.tasks),
        "executed": [t.folder_name for t in run.executed],
        "reused": [t.folder_name for t in run.reused],
        "failures": [f.as_dict() for f in run.failures],
        "skipped": list(run.skipped),
        "partial": run.partial,
        "not_run": list(run.not_run),
        "references": {m: r.summary() for m, r in run.references.items()},
        "files": {k: str(v.relative_to(out)) for k, v in files.items()},
    }
    files["json"] = atomic_write_json(out / "sweep.json", json_plain(payload))
    return files
