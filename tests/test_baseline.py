"""The shortcut baseline: HU-histogram features, cross-validated scores, the warning, the page."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctscreen import baseline
from ctscreen.evaluate import format_baseline, run_baseline
from ctscreen.evaluation_html import baseline_section
from ctscreen.train.metrics import roc_auc


def test_histogram_features_count_clipped_voxels_in_the_window() -> None:
    hu = np.array([-2000.0, -1350.0, -600.0, 100.0, 149.0, 3000.0], dtype=np.float32)
    f = baseline.hu_histogram_features(hu, hu_min=-1350.0, hu_max=150.0, bins=3)
    assert f.shape == (5,)
    # bins of 500 HU: [-1350,-850) holds -2000 (clipped) and -1350; [-850,-350) holds -600;
    # the last bin holds 100, 149 and 3000 (clipped to 150)
    np.testing.assert_allclose(f[:3], [2 / 6, 1 / 6, 3 / 6])
    clipped = np.clip(hu, -1350.0, 150.0)
    assert f[3] == pytest.approx((clipped.mean() + 1350.0) / 1500.0)
    assert f[4] == pytest.approx(clipped.std() / 1500.0, rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        baseline.hu_histogram_features(hu, hu_min=0.0, hu_max=0.0)
    with pytest.raises(ValueError, match="no voxel"):
        baseline.hu_histogram_features(np.empty(0), hu_min=-1.0, hu_max=1.0)


def _features(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half of ``n`` studies get ``shift`` more of their voxels in one bin."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0.0, 1.0, size=(n, baseline.HISTOGRAM_BINS + 2))
    x[:, 10] += shift * y
    return x, y


def test_cross_validated_baseline_finds_an_intensity_shortcut_and_not_noise() -> None:
    x, y = _features(60, 4.0, seed=1)
    strong = baseline.shortcut_baseline(x, y, n_boot=200, repeats=1)
    assert strong.roc_auc["value"] > 0.9 and strong.folds == 5 and strong.n == 60
    assert strong.roc_auc["ci_low"] <= strong.roc_auc["value"] <= strong.roc_auc["ci_high"]
    # every study's score is out of fold: pure noise gives about chance, not 1.0
    x, y = _features(60, 0.0, seed=2)
    noise = baseline.shortcut_baseline(x, y, n_boot=200, repeats=1)
    assert 0.25 < noise.roc_auc["value"] < 0.75
    assert noise.roc_auc["ci_low"] < 0.5 < noise.roc_auc["ci_high"]


def test_folds_shrink_to_the_smaller_class_and_one_study_is_refused() -> None:
    x, y = _features(6, 3.0, seed=3)
    y = np.array([1, 1, 0, 0, 0, 0])
    assert baseline.shortcut_baseline(x, y, n_boot=50, repeats=1).folds == 2
    with pytest.raises(ValueError, match="at least 2 of each class"):
        baseline.shortcut_baseline(x, np.array([1, 0, 0, 0, 0, 0]), n_boot=50, repeats=1)
    entry = run_baseline(x, np.array([1, 0, 0, 0, 0, 0]), 0.9, n_boot=50, seed=0)
    assert "at least 2" in entry["skipped"]
    assert format_baseline(entry).startswith("shortcut baseline not computed")


def test_warning_when_the_model_is_no_better_than_the_baseline() -> None:
    """A set where the model *is* the baseline: same scores, same AUC, so a warning."""
    x, y = _features(40, 1.5, seed=4)
    result = baseline.shortcut_baseline(x, y, n_boot=300, seed=0, repeats=1)
    model_auc = roc_auc(y, result.scores)  # the "model" gives the baseline's own scores
    assert model_auc == pytest.approx(result.roc_auc["value"])
    equal = run_baseline(x, y, model_auc, n_boot=300, seed=0, repeats=1)
    assert equal["roc_auc"] == pytest.approx(result.roc_auc)
    assert equal["warning"] and f"{model_auc:.3f}" in equal["warning"]
    assert "WARNING" in format_baseline(equal)
    # at the upper end of the interval it still warns; above it, it does not
    high = result.roc_auc["ci_high"]
    assert result.roc_auc["ci_low"] < model_auc < high < 1.0
    assert baseline.baseline_warning(high, result.roc_auc) is not None
    assert baseline.baseline_warning(high + 1e-6, result.roc_auc) is None
    assert baseline.baseline_warning(math.nan, result.roc_auc) is not None
    assert "WARNING" not in format_baseline({**equal, "model_roc_auc": 1.0, "warning": None})


def _entry(model_auc: float, warning: str | None) -> dict[str, object]:
    auc = {"value": 0.62, "ci_low": 0.51, "ci_high": 0.73}
    return {
        "method": baseline.DESCRIPTION,
        "folds": 5,
        "repeats": 3,
        "n": 80,
        "roc_auc": auc,
        "model_roc_auc": model_auc,
        "warning": warning,
    }


def test_the_report_section_shows_both_aucs_and_the_warning() -> None:
    warned = baseline_section(
        _entry(0.65, baseline.baseline_warning(0.65, _entry(0, None)["roc_auc"]))
    )
    assert "class='warning'" in warned and "0.620" in warned and "0.650" in warned
    assert "0.510 – 0.730" in warned
    fine = baseline_section(_entry(0.95, None))
    assert "class='ok'" in fine and "class='warning'" not in fine
    assert "Not computed" in baseline_section({"method": "m", "skipped": "too few"})


def test_demo_closing_line_reads_the_baseline_of_its_evaluation(tmp_path) -> None:
    import json

    from ctscreen.cli.demo import _baseline_line

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"shortcut_baseline": _entry(1.0, None)}), encoding="utf-8")
    line = _baseline_line(path)
    assert line.startswith("on the 80 validation studies") and "0.620" in line
    assert "1.000" in line and "WARNING" not in line
    assert "not found" in _baseline_line(tmp_path / "missing.json")
