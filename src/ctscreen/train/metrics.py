"""Binary classification metrics, bootstrap confidence intervals and threshold rules.

Torch-free (numpy + scipy only) so evaluation reports and tests stay light.

Conventions:
    * ``y_true`` holds 0 (no pathology) / 1 (pathology); ``prob`` is the model
      probability of pathology; a study is called positive when ``prob >= threshold``.
    * Sensitivity is the recall of class 1 (pathology found), specificity the
      recall of class 0. A metric whose denominator is empty (no positives for
      sensitivity, a single class for ROC-AUC) is ``nan``, never a made-up 0 or 1.
    * ROC-AUC counts ties as one half (Mann-Whitney); PR-AUC is the average
      precision (step-wise, no interpolation), the same quantity as scikit-learn's
      ``average_precision_score``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..card import format_interval as format_interval  # its home is the card (it says CIs)

#: Metrics reported with confidence intervals, in display order.
CI_METRICS: tuple[str, ...] = (
    "roc_auc",
    "pr_auc",
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
)

#: Human-readable names for tables and plots.
METRIC_LABELS: dict[str, str] = {
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "accuracy": "Accuracy",
    "f1": "F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "npv": "NPV",
}

THRESHOLD_RULES: tuple[str, ...] = ("youden", "sensitivity")

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _as_arrays(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels and probabilities to flat numpy arrays.

    Raises:
        ValueError: lengths differ, labels are not 0/1, or probabilities are not finite.
    """
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob has {p.size}.")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1.")
    if not np.isfinite(p).all():
        raise ValueError("prob must hold finite numbers.")
    return y.astype(np.int8), p


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def roc_auc(y_true: Any, prob: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half).

    Returns:
        The AUC, or ``nan`` when only one class is present.
    """
    y, p = _as_arrays(y_true, prob)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pr_auc(y_true: Any, prob: Any) -> float:
    """Average precision: sum over thresholds of (recall step) x precision.

    Returns:
        The average precision, or ``nan`` when there is no positive study.
    """
    y, p = _as_arrays(y_true, prob)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    # Last index of every run of equal scores = one operating point per distinct threshold.
    last = np.r_[np.nonzero(np.diff(p_sorted))[0], p_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1.0)
    recall = tps / n_pos
    steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(steps * precision))


def confusion_counts(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, int]:
    """True/false positives/negatives when ``prob >= threshold`` is called positive."""
    y, p = _as_arrays(y_true, prob)
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _threshold_metrics(counts: dict[str, int]) -> dict[str, float]:
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    n = tp + fp + tn + fn
    return {
        "accuracy": _safe_div(tp + tn, n),
        # F1 is 0 (not nan) when nothing is positive in truth or prediction but
        # studies exist: no positive was found, which is the worst F1 possible.
        "f1": (2.0 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else (0.0 if n else math.nan),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "precision": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
    }


def binary_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, float]:
    """All metrics of one set of predictions.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of pathology.
        threshold: probability at or above which a study is called positive.

    Returns:
        ``roc_auc``, ``pr_auc``, ``accuracy``, ``f1``, ``sensitivity``,
        ``specificity``, ``precision``, ``npv`` (floats, ``nan`` where undefined)
        and the counts ``tp``, ``fp``, ``tn``, ``fn``, ``n``.

    Example:
        >>> binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])["roc_auc"]
        0.75
    """
    y, p = _as_arrays(y_true, prob)
    counts = confusion_counts(y, p, threshold)
    out: dict[str, float] = {"roc_auc": roc_auc(y, p), "pr_auc": pr_auc(y, p)}
    out.update(_threshold_metrics(counts))
    out.update({k: v for k, v in counts.items()})
    out["n"] = int(y.size)
    return out


def metric_function(name: str, threshold: float = 0.5) -> MetricFn:
    """The function ``(y_true, prob) -> value`` computing one named metric.

    Raises:
        ValueError: the name is not a known metric.
    """
    if name == "roc_auc":
        return roc_auc
    if name == "pr_auc":
        return pr_auc
    known = ("accuracy", "f1", "sensitivity", "specificity", "precision", "npv")
    if name not in known:
        raise ValueError(f"unknown metric {name!r}; choose one of roc_auc, pr_auc, {known}.")

    def fn(y_true: np.ndarray, prob: np.ndarray) -> float:
        return _threshold_metrics(confusion_counts(y_true, prob, threshold))[name]

    return fn


def stratified_bootstrap_indices(
    y_true: Any, *, n_boot: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Index arrays of a stratified bootstrap (positives and negatives resampled apart).

    Each resample draws, with replacement, as many positives as the data hold
    from the positives and as many negatives from the negatives, so class
    balance is fixed and every resample has both classes when the data do.

    Args:
        y_true: 0/1 labels.
        n_boot: number of resamples.
        seed: seed of the numpy generator (same seed, same resamples).

    Yields:
        One integer index array of length ``len(y_true)`` per resample.
    """
    y = np.asarray(y_true).reshape(-1)
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y != 1)
    for _ in range(int(n_boot)):
        parts = []
        if pos.size:
            parts.append(pos[rng.integers(0, pos.size, pos.size)])
        if neg.size:
            parts.append(neg[rng.integers(0, neg.size, neg.size)])
        yield np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _percentile_interval(values: list[float], alpha: float) -> tuple[float, float]:
    """Percentile interval of the finite values (``nan`` bounds when none is finite)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(arr, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


def _check_ci_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")


def bootstrap_ci(
    y_true: Any,
    prob: Any,
    metric_fn: MetricFn,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval of one metric.

    Resamples where the metric is undefined (``nan``, e.g. ROC-AUC of a
    single-class resample, which only happens when the data hold one class) are
    left out of the percentiles; when all are, both bounds are ``nan``.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of pathology.
        metric_fn: ``(y_true, prob) -> float``, e.g. :func:`roc_auc` or
            ``metric_function("sensitivity", threshold)``.
        n_boot: number of resamples.
        seed: random seed (the interval is reproducible).
        alpha: 1 - confidence level (0.05 gives a 95% interval).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: invalid inputs, ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    _check_ci_args(n_boot, alpha)
    y, p = _as_arrays(y_true, prob)
    values = [
        float(metric_fn(y[idx], p[idx]))
        for idx in stratified_bootstrap_indices(y, n_boot=n_boot, seed=seed)
    ]
    return _percentile_interval(values, alpha)


def metrics_with_ci(
    y_true: Any,
    prob: Any,
    threshold: float = 0.5,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    names: tuple[str, ...] = CI_METRICS,
) -> dict[str, dict[str, float]]:
    """Point estimates and stratified bootstrap intervals of the main metrics.

    All metrics share the same resamples, so their intervals are consistent
    with each other.

    Args:
        y_true: 0/1 labels.
        prob: probabilities of pathology.
        threshold: decision threshold for the threshold-dependent metrics.
        n_boot: number of bootstrap resamples.
        seed: random seed.
        alpha: 1 - confidence level.
        names: which metrics (default :data:`CI_METRICS`).

    Returns:
        ``{name: {"value": v, "ci_low": lo, "ci_high": hi}}``.

    Raises:
        ValueError: invalid inputs or CI arguments.
    """
    _check_ci_args(n_boot, alpha)
    y, p = _as_arrays(y_true, prob)
    point = binary_metrics(y, p, threshold)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for idx in stratified_bootstrap_indices(y, n_boot=n_boot, seed=seed):
        resampled = binary_metrics(y[idx], p[idx], threshold)
        for name in names:
            samples[name].append(resampled[name])
    out: dict[str, dict[str, float]] = {}
    for name in names:
        low, high = _percentile_interval(samples[name], alpha)
        out[name] = {"value": float(point[name]), "ci_low": low, "ci_high": high}
    return out


def choose_threshold(
    y_true: Any,
    prob: Any,
    rule: str = "youden",
    target_sensitivity: float = 0.95,
) -> float:
    """Pick a decision threshold on labelled data.

    Candidate thresholds are the distinct predicted probabilities (a study is
    positive when ``prob >= threshold``), so the metrics at the returned
    threshold are exactly those achieved on these data.

    Args:
        y_true: 0/1 labels (both classes needed).
        prob: probabilities of pathology.
        rule: ``"youden"`` maximises sensitivity + specificity - 1 (ties: the
            higher sensitivity, then the higher threshold); ``"sensitivity"`` gives
            the highest threshold whose sensitivity is at least
            ``target_sensitivity``, i.e. the best specificity that keeps that
            sensitivity (screening for studies *without* pathology wants few
            missed positives).
        target_sensitivity: minimum sensitivity for the ``"sensitivity"`` rule.

    Returns:
        The threshold in [0, 1].

    Raises:
        ValueError: an unknown rule, a target outside (0, 1], or data with one class.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}.")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target_sensitivity}.")
    y, p = _as_arrays(y_true, prob)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs studies of both classes.")
    candidates = np.unique(p)[::-1]  # descending: sensitivity grows along the array
    pred = p[None, :] >= candidates[:, None]
    tp = (pred & (y == 1)[None, :]).sum(axis=1)
    fp = (pred & (y == 0)[None, :]).sum(axis=1)
    sens = tp / n_pos
    spec = 1.0 - fp / n_neg
    if rule == "youden":
        j = sens + spec - 1.0
        best = np.flatnonzero(np.isclose(j, j.max()))
        # Among ties prefer higher sensitivity, then the higher threshold.
        chosen = best[np.argmax(sens[best])]
        return float(candidates[chosen])
    ok = np.flatnonzero(sens >= target_sensitivity - 1e-12)
    return float(candidates[ok[0]])  # first = highest threshold reaching the target
