"""Figures for training and evaluation (matplotlib, Agg backend, no pyplot state).

Every function draws one PNG and returns its path. Figures are built with
``matplotlib.figure.Figure`` directly, so nothing touches pyplot's global state
(safe in worker threads and never opens a window).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import roc_auc, stratified_bootstrap_indices

DPI = 120
CLASS_NAMES: tuple[str, str] = ("no pathology", "pathology")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_confusion_matrix(
    counts: dict[str, int],
    path: Path | str,
    *,
    title: str = "Confusion matrix",
    class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
    """Draw a 2x2 confusion matrix with counts and row percentages.

    Args:
        counts: ``{"tp", "fp", "tn", "fn"}`` as from
            :func:`ctscreen.train.metrics.confusion_counts`.
        path: output PNG.
        title: figure title (say which split and threshold).
        class_names: names of label 0 and 1.

    Returns:
        ``path``.
    """
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=float)
    row_sums = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    fig = _new_figure(4.6, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(2):
        for j in range(2):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color=colour,
                fontsize=12,
            )
    ax.set_xticks([0, 1], labels=list(class_names))
    ax.set_yticks([0, 1], labels=list(class_names), rotation=90, va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def read_metrics_csv(path: Path | str) -> list[dict[str, float]]:
    """Rows of a training ``metrics.csv`` with numeric values (empty cells -> nan)."""
    rows: list[dict[str, float]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: float(v) if v else math.nan for k, v in row.items()})
    return rows


def plot_learning_curves(metrics_csv: Path | str, path: Path | str) -> Path:
    """Draw loss and ROC-AUC / PR-AUC / F1 per epoch from a training ``metrics.csv``.

    Args:
        metrics_csv: the CSV written by the training loop (one row per epoch).
        path: output PNG.

    Returns:
        ``path``.
    """
    rows = read_metrics_csv(metrics_csv)
    epochs = [r["epoch"] for r in rows]

    def column(name: str) -> list[float]:
        return [r.get(name, math.nan) for r in rows]

    fig = _new_figure(11.0, 4.0)
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("Loss (BCE)", [("train_loss", "train"), ("val_loss", "val")]),
        (
            "ROC-AUC and PR-AUC",
            [
                ("train_roc_auc", "train ROC-AUC"),
                ("val_roc_auc", "val ROC-AUC"),
                ("train_pr_auc", "train PR-AUC"),
                ("val_pr_auc", "val PR-AUC"),
            ],
        ),
        (
            "Accuracy and F1 (threshold 0.5)",
            [
                ("train_accuracy", "train accuracy"),
                ("val_accuracy", "val accuracy"),
                ("train_f1", "train F1"),
                ("val_f1", "val F1"),
            ],
        ),
    ]
    for k, (title, series) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for name, label in series:
            values = column(name)
            style = "--" if label.startswith("train") else "-"
            ax.plot(epochs, values, style, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if k > 0:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if epochs:
            ax.set_xticks(_epoch_ticks(epochs))
    return _save(fig, path)


def _epoch_ticks(epochs: list[float]) -> list[int]:
    last = int(max(epochs))
    step = max(1, math.ceil(last / 10))
    return list(range(1, last + 1, step))


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    last = np.r_[np.nonzero(np.diff(p_sorted))[0], p_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def _ci_text(ci: tuple[float, float] | None) -> str:
    if ci is None or not all(math.isfinite(v) for v in ci):
        return ""
    return f", 95% CI {ci[0]:.3f}–{ci[1]:.3f}"


def plot_roc(
    y_true: Any,
    prob: Any,
    path: Path | str,
    *,
    auc_ci: tuple[float, float] | None = None,
    n_band: int = 200,
    seed: int = 0,
    operating_point: tuple[float, float] | None = None,
    title: str = "ROC curve",
) -> Path:
    """Draw the ROC curve with a pointwise 95% bootstrap band.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of pathology.
        path: output PNG.
        auc_ci: the AUC interval to print in the legend.
        n_band: stratified resamples for the band (0 draws no band).
        seed: seed of the band's resamples.
        operating_point: ``(1 - specificity, sensitivity)`` at the decision
            threshold, marked on the curve.
        title: figure title.

    Returns:
        ``path``.
    """
    y = np.asarray(y_true).reshape(-1).astype(int)
    p = np.asarray(prob, dtype=float).reshape(-1)
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    both = 0 < y.sum() < y.size
    if both and n_band > 0:
        grid = np.linspace(0.0, 1.0, 101)
        curves = []
        for idx in stratified_bootstrap_indices(y, n_boot=n_band, seed=seed):
            fpr, tpr = _roc_points(y[idx], p[idx])
            curves.append(np.interp(grid, fpr, tpr))
        low, high = np.quantile(np.asarray(curves), [0.025, 0.975], axis=0)
        ax.fill_between(grid, low, high, alpha=0.25, label="95% bootstrap band")
    if both:
        fpr, tpr = _roc_points(y, p)
        auc = roc_auc(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC {auc:.3f}{_ci_text(auc_ci)})")
    else:
        ax.text(0.5, 0.5, "one class only: ROC undefined", ha="center", va="center")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="crimson", label="decision threshold")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"{title} (n={y.size}, {int(y.sum())} with pathology)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(
    y_true: Any,
    prob: Any,
    path: Path | str,
    *,
    ap: float | None = None,
    ap_ci: tuple[float, float] | None = None,
    title: str = "Precision-recall curve",
) -> Path:
    """Draw the precision-recall curve (step-wise) with the prevalence baseline.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of pathology.
        path: output PNG.
        ap: average precision for the legend.
        ap_ci: its interval.
        title: figure title.

    Returns:
        ``path``.
    """
    y = np.asarray(y_true).reshape(-1).astype(int)
    p = np.asarray(prob, dtype=float).reshape(-1)
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    n_pos = int(y.sum())
    if n_pos:
        order = np.argsort(-p, kind="mergesort")
        p_sorted, y_sorted = p[order], y[order]
        last = np.r_[np.nonzero(np.diff(p_sorted))[0], p_sorted.size - 1]
        tps = np.cumsum(y_sorted)[last]
        precision = tps / (last + 1.0)
        recall = tps / n_pos
        label = "PR curve" if ap is None else f"PR (AP {ap:.3f}{_ci_text(ap_ci)})"
        ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", lw=2, label=label)
        ax.axhline(n_pos / y.size, ls=":", color="grey", label=f"prevalence {n_pos / y.size:.2f}")
    else:
        ax.text(0.5, 0.5, "no positive study: PR undefined", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_calibration(
    y_true: Any,
    prob: Any,
    path: Path | str,
    *,
    n_bins: int = 10,
    title: str = "Calibration (reliability)",
) -> Path:
    """Draw a reliability diagram: observed share of pathology per probability bin.

    Bins are equal-width on [0, 1]; each point sits at the mean predicted
    probability of its bin, and the histogram below shows how many studies
    fall in each bin.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of pathology.
        path: output PNG.
        n_bins: number of bins.
        title: figure title.

    Returns:
        ``path``.
    """
    y = np.asarray(y_true).reshape(-1).astype(float)
    p = np.asarray(prob, dtype=float).reshape(-1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    mean_p = np.bincount(which, weights=p, minlength=n_bins)
    observed = np.bincount(which, weights=y, minlength=n_bins)
    filled = counts > 0
    mean_p = np.divide(mean_p, counts, out=np.zeros(n_bins), where=filled)
    observed = np.divide(observed, counts, out=np.zeros(n_bins), where=filled)
    ece = float(np.sum(counts[filled] * np.abs(observed[filled] - mean_p[filled])) / max(p.size, 1))
    fig = _new_figure(5.0, 6.0)
    ax = fig.add_subplot(4, 1, (1, 3))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot(mean_p[filled], observed[filled], "o-", label=f"model (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("observed share with pathology")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist = fig.add_subplot(4, 1, 4, sharex=ax)
    hist.bar(edges[:-1], counts, width=1.0 / n_bins, align="edge", edgecolor="black", alpha=0.6)
    hist.set_xlabel("predicted probability of pathology")
    hist.set_ylabel("studies")
    return _save(fig, path)
