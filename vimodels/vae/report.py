"""Figures and a self-contained HTML report for VAE runs.

Pure functions of arrays (no fitting, no model code): each figure function
returns a Matplotlib figure; :func:`write_report` embeds them as base64 PNGs
with a results table, one row per objective, in a single HTML file.

The inputs per objective are the ``summary`` dict written by ``vimodels vae``
(training and evaluation numbers) and its arrays: ``inputs`` and ``recon``
(n, 64) test images and reconstruction probabilities, ``samples`` (m, 64)
prior-sample pixel means, ``latents`` (n, D) encoder means and ``labels`` (n,),
``train_loss`` and ``val_bound`` per epoch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimodels.io import atomic_write_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, ncol: int, side: int = 8, gap: float = 0.25) -> np.ndarray:
    """Tile ``images`` (n, side*side) into one array with 1-pixel gaps of value ``gap``."""
    images = np.asarray(images, dtype=float).reshape(-1, side, side)
    n = len(images)
    nrow = max(1, math.ceil(n / ncol))
    out = np.full((nrow * (side + 1) + 1, ncol * (side + 1) + 1), gap)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[
            1 + r * (side + 1) : 1 + r * (side + 1) + side,
            1 + c * (side + 1) : 1 + c * (side + 1) + side,
        ] = img  # noqa: E501
    return out


def reconstructions_figure(inputs: np.ndarray, recon: np.ndarray, title: str = ""):
    """Test images (top row) and the decoder's pixel probabilities at the encoder mean (below)."""
    plt = _pyplot()
    n = min(len(inputs), 16)
    fig, axes = plt.subplots(2, 1, figsize=(0.55 * n + 0.5, 1.6))
    for ax, imgs, label in zip(axes, (inputs[:n], recon[:n]), ("data", "reconstruction")):
        ax.imshow(image_grid(imgs, n), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def samples_figure(samples: np.ndarray, title: str = ""):
    """Pixel probabilities of images decoded from prior draws ``z ~ N(0, I)``."""
    plt = _pyplot()
    ncol = int(math.ceil(math.sqrt(len(samples))))
    fig, ax = plt.subplots(figsize=(2.6, 2.6))
    ax.imshow(image_grid(samples, ncol), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "samples", fontsize=8)
    return fig


def project_2d(latents: np.ndarray) -> tuple[np.ndarray, str]:
    """The latents themselves when D <= 2, else their first two principal components."""
    latents = np.asarray(latents, dtype=float)
    if latents.shape[1] == 1:
        return np.column_stack([latents[:, 0], np.zeros(len(latents))]), "z"
    if latents.shape[1] == 2:
        return latents, "z"
    centred = latents - latents.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "principal component"


def latent_scatter_figure(latents: np.ndarray, labels: np.ndarray, title: str = ""):
    """Encoder means of the test images, coloured by digit."""
    plt = _pyplot()
    xy, axis = project_2d(latents)
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    cbar = fig.colorbar(sc, ax=ax, ticks=range(10))
    cbar.ax.tick_params(labelsize=6)
    ax.set_xlabel(f"{axis} 1", fontsize=7)
    ax.set_ylabel(f"{axis} 2", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_title(title or "latent means by digit", fontsize=8)
    return fig


def training_curves_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """Training objective and validation bound (nats per image) per epoch, per objective.

    ``curves`` maps an objective tag to ``(train_loss, val_bound)``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.6), sharey=False)
    for i, (tag, (loss, val)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        epochs = np.arange(1, len(loss) + 1)
        axes[0].plot(epochs, -np.asarray(loss), color=color, lw=1, label=tag)
        axes[1].plot(epochs, np.asarray(val), color=color, lw=1, label=tag)
    axes[0].set_title("training objective (minibatch average)", fontsize=8)
    axes[1].set_title("validation IWAE bound", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("nats per image", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def figure_png(fig) -> str:
    """A figure as a base64 PNG ``data:`` URI (the figure is closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pm(value: Any, se: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if se is None or (isinstance(se, float) and not math.isfinite(se)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} &plusmn; {se:.{digits}f}"


COLUMNS = (
    "objective",
    "epochs (best)",
    "s / epoch",
    "test log-lik. (K)",
    "test ELBO",
    "log p - L[q*]",
    "L[q*] - L[q_phi]",
    "NUTS vs q: mean err. (sd)",
    "sd ratio",
    "W2 (sd units)",
)


#: training settings that the objective column already names (they differ by design)
_OBJECTIVE_SETTINGS = frozenset({"elbo", "elbo_class", "num_particles", "elbo_options"})
#: column titles of settings whose keys are terse
_SETTING_LABELS = {
    "num_data": "training images",
    "num_val": "validation images",
    "max_epochs": "max epochs",
    "time_budget": "time budget (s)",
    "val_particles": "validation K",
}


def run_settings(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of one run besides its objective, by column title.

    The trainer's settings (``training.settings``, the network's among them:
    ``latent_dim``, ``hidden_dim`` ...), the number of test images, and the
    evaluation's settings (``evaluation_settings``, written by ``vimodels vae``).
    """
    out: dict[str, Any] = {}
    train = (summary.get("training") or {}).get("settings") or {}
    for key, value in train.items():
        if key in _OBJECTIVE_SETTINGS:
            continue
        if key == "static" and isinstance(value, Mapping):
            out.update({str(k): v for k, v in value.items()})
        else:
            out[_SETTING_LABELS.get(key, key)] = value
    test = (summary.get("evaluation") or {}).get("test") or {}
    if "num_data" in test:
        out["test images"] = test["num_data"]
    for key, value in (summary.get("evaluation_settings") or {}).items():
        out[key.replace("_", " ")] = value
    return out


def differing_settings(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Titles of the settings (:func:`run_settings`) that are not the same in every run."""
    settings = [run_settings(s) for s in summaries]
    keys = list(dict.fromkeys(k for s in settings for k in s))

    def canonical(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    return [k for k in keys if len({canonical(s.get(k)) for s in settings}) > 1]


def table_columns(summaries: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """:data:`COLUMNS`, with the settings that differ between runs after the objective."""
    return COLUMNS[:1] + tuple(differing_settings(summaries)) + COLUMNS[1:]


def _setting_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, sort_keys=True, default=str))
    return html.escape(str(value))


def table_rows(summaries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row of formatted cells (HTML) per run summary, columns :func:`table_columns`.

    Runs made with other settings than the objective (``latent_dim``, the number of
    training images ...) get a column for each setting that differs.
    """
    differing = differing_settings(summaries)
    rows = []
    for s in summaries:
        settings = run_settings(s)
        ev = s.get("evaluation", {})
        ll = ev.get("test", {})
        gap = ev.get("gap") or {}
        nuts = ev.get("nuts") or []
        mean_err = [r["mean_error_sd"] for r in nuts]
        ratio_lo = [r["sd_ratio_min"] for r in nuts]
        ratio_hi = [r["sd_ratio_max"] for r in nuts]
        w2 = [r["w2"] for r in nuts]
        train = s.get("training", {})
        rows.append(
            [
                html.escape(str(s.get("objective", "?"))),
                *(_setting_cell(settings.get(k)) for k in differing),
                f"{train.get('epochs', '-')} ({train.get('best_epoch', '-')})",
                _pm(train.get("seconds_per_epoch"), None, 3),
                _pm(ll.get("log_likelihood"), ll.get("log_likelihood_mcse"))
                + f" ({ll.get('num_particles', '-')})"
                + (f" k-hat&ge;0.7: {ll['khat_bad']}" if ll.get("khat_bad") else ""),
                _pm(ll.get("elbo"), ll.get("elbo_mcse")),
                _pm(gap.get("approximation_gap"), gap.get("approximation_gap_mcse")),
                _pm(gap.get("amortization_gap"), gap.get("amortization_gap_mcse")),
                f"{np.mean(mean_err):.2f}" if mean_err else "-",
                f"{min(ratio_lo):.2f} to {max(ratio_hi):.2f}" if ratio_lo else "-",
                f"{np.mean(w2):.2f}" if w2 else "-",
            ]
        )
    return rows


def results_table_html(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The results table as an HTML ``<table>``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table_columns(summaries))
    body = "".join(
        "<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in table_rows(summaries)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:1em auto;font-size:14px}"
    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #bbb;padding:3px 6px}"
    "th{background:#eee}img{margin:4px}h2{margin-top:1.5em}"
)


def build_report(
    summaries: Sequence[Mapping[str, Any]],
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    title: str = "digits_vae",
) -> str:
    """The report as one HTML string.

    Parameters
    ----------
    summaries : sequence of dict
        Run summaries (``objective``, ``training``, ``evaluation``, ``settings``).
    arrays : dict of str to dict of ndarray
        Per objective tag, the arrays named in the module docstring.
    title : str
    """
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p>Log-likelihood: importance sampling with the encoder as proposal, K draws per test "
        "image, &plusmn; Monte Carlo standard error (delta method). Gaps on a sample of test "
        "images: q* is the diagonal Gaussian optimised per image with the decoder fixed. NUTS "
        "columns compare q(z|x) with NUTS on z (decoder fixed), averaged over the images "
        "analysed. All values in nats per image.</p>",
        "<h2>Results</h2>",
    ]
    differing = differing_settings(summaries)
    if differing:
        parts.append(
            "<p><b>The runs differ in more than their objective</b>: "
            + html.escape(", ".join(differing))
            + " (columns after the objective). Differences between their rows are not the "
            "objectives' alone.</p>"
        )
    parts += [
        results_table_html(summaries),
    ]
    curves = {
        tag: (a["train_loss"], a["val_bound"])
        for tag, a in arrays.items()
        if "train_loss" in a and "val_bound" in a
    }
    if curves:
        parts += [
            "<h2>Training curves</h2>",
            f"<img src='{figure_png(training_curves_figure(curves))}'>",
        ]  # noqa: E501
    for tag, a in arrays.items():
        parts.append(f"<h2>{html.escape(tag)}</h2>")
        if "inputs" in a and "recon" in a:
            fig = reconstructions_figure(a["inputs"], a["recon"], "reconstructions")
            parts.append(f"<img src='{figure_png(fig)}'><br>")
        if "samples" in a:
            parts.append(f"<img src='{figure_png(samples_figure(a['samples']))}'>")
        if "latents" in a and "labels" in a:
            fig = latent_scatter_figure(a["latents"], a["labels"])
            parts.append(f"<img src='{figure_png(fig)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | Path,
    summaries: Sequence[Mapping[str, Any]],
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    title: str = "digits_vae",
) -> Path:
    """Write :func:`build_report` to ``path`` atomically."""
    return atomic_write_text(path, build_report(summaries, arrays, title))
