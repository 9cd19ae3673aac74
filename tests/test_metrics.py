"""Metrics, bootstrap intervals, threshold rules and plots (torch-free, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    recall_score,
    roc_auc_score,
)

from ctscreen.train import metrics as M
from ctscreen.train import plots


@pytest.fixture()
def noisy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(70, dtype=int), np.ones(30, dtype=int)]
    p = np.clip(0.35 + 0.25 * y + rng.normal(0, 0.2, y.size), 0, 1)
    p[:5] = p[70:75]  # force tied scores across classes
    return y, np.round(p, 2)  # rounding adds more ties


def test_metrics_agree_with_sklearn(noisy: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = noisy
    m = M.binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"] == 100


def test_known_small_example() -> None:
    m = M.binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], threshold=0.5)
    assert m["roc_auc"] == 0.75
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == 0.5


def test_undefined_metrics_are_nan() -> None:
    m = M.binary_metrics([0, 0, 0], [0.2, 0.7, 0.4])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        M.binary_metrics([0, 1], [0.1])


def test_perfect_separation_gives_degenerate_interval() -> None:
    y = np.r_[np.zeros(20, dtype=int), np.ones(10, dtype=int)]
    p = np.r_[np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 10)]
    out = M.metrics_with_ci(y, p, 0.5, n_boot=300, seed=1)
    for name in M.CI_METRICS:
        assert out[name] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}, name


def test_ci_contains_point_and_is_reproducible(noisy: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = noisy
    out = M.metrics_with_ci(y, p, 0.5, n_boot=400, seed=7)
    for name in M.CI_METRICS:
        m = out[name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
        assert m["ci_high"] - m["ci_low"] > 0.0, name
    again = M.metrics_with_ci(y, p, 0.5, n_boot=400, seed=7)
    assert again == out
    # bootstrap_ci with the same seed uses the same resamples as metrics_with_ci
    low, high = M.bootstrap_ci(y, p, M.roc_auc, n_boot=400, seed=7)
    assert (low, high) == (out["roc_auc"]["ci_low"], out["roc_auc"]["ci_high"])
    # a wider confidence level gives a wider interval
    wide = M.bootstrap_ci(y, p, M.roc_auc, n_boot=400, seed=7, alpha=0.01)
    assert wide[0] <= low and wide[1] >= high


def test_stratified_resamples_keep_class_counts() -> None:
    y = np.r_[np.zeros(7, dtype=int), np.ones(3, dtype=int)]
    for idx in M.stratified_bootstrap_indices(y, n_boot=50, seed=0):
        assert idx.size == 10 and int(y[idx].sum()) == 3


def test_single_class_bootstrap_gives_nan_auc_interval() -> None:
    y = np.ones(6, dtype=int)
    p = np.linspace(0.2, 0.9, 6)
    assert all(math.isnan(v) for v in M.bootstrap_ci(y, p, M.roc_auc, n_boot=50))
    sens = M.bootstrap_ci(y, p, M.metric_function("sensitivity", 0.5), n_boot=200, seed=0)
    assert 0.0 <= sens[0] <= sens[1] <= 1.0
    with pytest.raises(ValueError):
        M.bootstrap_ci(y, p, M.roc_auc, n_boot=0)


def test_threshold_rules_on_crafted_example() -> None:
    # sorted by score: 0.1 n, 0.2 n, 0.3 p, 0.4 n, 0.5 p, 0.6 n, 0.7 p, 0.8 p, 0.9 p, 0.95 p
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1])
    # Youden J at t=0.7: sens 4/6, spec 4/4 -> 0.667; at t=0.5: 5/6 + 3/4 - 1 = 0.583;
    # at t=0.3: 6/6 + 2/4 - 1 = 0.5.
    assert M.choose_threshold(y, p, "youden") == pytest.approx(0.7)
    # sensitivity >= 0.8 first reached at t=0.5 (5/6); 1.0 needs t=0.3.
    assert M.choose_threshold(y, p, "sensitivity", target_sensitivity=0.8) == pytest.approx(0.5)
    assert M.choose_threshold(y, p, "sensitivity", target_sensitivity=1.0) == pytest.approx(0.3)
    thr = M.choose_threshold(y, p, "sensitivity", target_sensitivity=0.95)
    assert M.binary_metrics(y, p, thr)["sensitivity"] >= 0.95
    with pytest.raises(ValueError):
        M.choose_threshold(y, p, "median")
    with pytest.raises(ValueError):
        M.choose_threshold(np.ones(3, dtype=int), [0.1, 0.2, 0.3])


def test_plots_write_pngs(tmp_path, noisy: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = noisy
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,train_loss,val_loss,train_roc_auc,val_roc_auc\n1,0.7,0.69,0.55,\n2,0.6,0.65,0.7,0.6\n"
    )
    paths = [
        plots.plot_roc(y, p, tmp_path / "roc.png", auc_ci=(0.7, 0.9), n_band=50),
        plots.plot_pr(y, p, tmp_path / "pr.png", ap=M.pr_auc(y, p)),
        plots.plot_calibration(y, p, tmp_path / "cal.png"),
        plots.plot_confusion_matrix(M.confusion_counts(y, p), tmp_path / "cm.png"),
        plots.plot_learning_curves(csv, tmp_path / "curves.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000
    rows = plots.read_metrics_csv(csv)
    assert rows[0]["epoch"] == 1.0 and math.isnan(rows[0]["val_roc_auc"])


def test_interval_text_says_when_there_is_no_interval() -> None:
    from ctscreen.train.metrics import format_interval

    assert format_interval(0.8123, 0.9701) == "0.8123 – 0.9701"
    # every study of a class got the same decision: all resamples give one accuracy
    y = np.array([0, 0, 1, 1])
    p = np.array([0.9, 0.9, 0.9, 0.9])
    ci = M.metrics_with_ci(y, p, threshold=0.5, n_boot=200, seed=0)["accuracy"]
    assert ci["ci_low"] == ci["ci_high"] == 0.5
    assert format_interval(ci["ci_low"], ci["ci_high"]) == "none (every resample gives 0.5000)"
    assert format_interval(float("nan"), 0.9) == "undefined"
