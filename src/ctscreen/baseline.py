"""A shortcut baseline: how well HU statistics alone, without any shape, tell the classes apart.

A network can score well on a set where counting voxels by density already
separates normal from pathological studies (a lesion adds dense voxels to
aerated lung). Radiology AI papers report such "shortcut" baselines beside the
model; ``ctscreen evaluate`` does the same on every evaluation set:

* features per study: a :data:`HISTOGRAM_BINS`-bin histogram of the HU values
  inside the model's own HU window (values outside are clipped into the end
  bins, as the network's input clips them), as fractions of the volume, plus the
  mean and standard deviation of the clipped values;
* model: scikit-learn's L2 logistic regression on standardised features, its
  strength chosen by an inner cross-validation (log loss) on each training part;
  scored out of fold by stratified k-fold cross-validation, repeated with
  shuffled folds and averaged per study, so every study's baseline score comes
  from models that never saw it;
* its ROC-AUC with the same stratified percentile bootstrap as the model's.

When the model's ROC-AUC does not exceed the upper end of the baseline's 95%
interval, :func:`baseline_warning` says so: on that set the figure does not show
that the model learned more than intensity statistics.

Torch-free (numpy + scikit-learn).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .train import metrics as metrics_lib

#: Histogram bins over the model's HU window.
HISTOGRAM_BINS = 32
#: Folds of the stratified cross-validation (fewer when a class has fewer studies).
CV_FOLDS = 5
#: Repeats of the cross-validation with reshuffled folds (scores averaged per study).
CV_REPEATS = 3
#: Inverse L2 strengths the inner cross-validation chooses from.
LOGREG_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 6))
#: Inner folds that choose the strength on each outer training part.
INNER_FOLDS = 3
#: One sentence naming what the baseline is, for reports.
DESCRIPTION = (
    f"logistic regression on a {HISTOGRAM_BINS}-bin HU histogram (+ mean, std) of each "
    f"volume, {CV_FOLDS}-fold cross-validated"
)


def hu_histogram_features(
    hu: np.ndarray, *, hu_min: float, hu_max: float, bins: int = HISTOGRAM_BINS
) -> np.ndarray:
    """Intensity features of one volume, blind to where any voxel lies.

    Args:
        hu: the volume in HU, any shape.
        hu_min: low end of the HU window (the model card's).
        hu_max: high end of the HU window.
        bins: histogram bins over ``[hu_min, hu_max]``.

    Returns:
        float64 array of ``bins + 2`` values: the share of voxels per bin (values
        outside the window counted in the end bins), then the mean and the
        standard deviation of the clipped HU, both scaled to the window (0..1).

    Raises:
        ValueError: an empty volume or a window with ``hu_max <= hu_min``.

    Example:
        >>> f = hu_histogram_features(np.full((2, 2, 2), -2000.0), hu_min=-1350, hu_max=150)
        >>> float(f[0]), float(f[-2])
        (1.0, 0.0)
    """
    if not hu_max > hu_min:
        raise ValueError(f"HU window [{hu_min}, {hu_max}] is empty; give hu_max > hu_min.")
    values = np.asarray(hu, dtype=np.float32).reshape(-1)
    if values.size == 0:
        raise ValueError("the volume holds no voxel; cannot compute its HU histogram.")
    clipped = np.clip(values, hu_min, hu_max)
    counts, _ = np.histogram(clipped, bins=bins, range=(hu_min, hu_max))
    width = float(hu_max - hu_min)
    mean = (float(clipped.mean(dtype=np.float64)) - hu_min) / width
    std = float(clipped.std(dtype=np.float64)) / width
    return np.concatenate([counts / values.size, [mean, std]]).astype(np.float64)


def _logistic_regression(y_train: np.ndarray) -> Any:
    """L2 logistic regression whose strength is chosen by an inner cross-validation.

    A fixed strength would make the baseline weaker than it can be (too little
    regularisation on a small set overfits 34 features); the inner folds choose it
    from :data:`LOGREG_CS` on the training part only. A training part with fewer than
    2 studies of a class cannot be split again and uses scikit-learn's default C=1.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    smaller = int(min((y_train == 0).sum(), (y_train == 1).sum()))
    if smaller < 2:
        return LogisticRegression(C=1.0, max_iter=5000)
    return LogisticRegressionCV(
        Cs=list(LOGREG_CS), cv=min(INNER_FOLDS, smaller), scoring="neg_log_loss", max_iter=5000
    )


def cross_validated_scores(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = CV_FOLDS,
    repeats: int = CV_REPEATS,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold probabilities of a logistic regression, averaged over repeats.

    Args:
        features: ``[n_studies, n_features]``.
        labels: 0/1 per study, both classes present.
        folds: stratified folds (capped at the smaller class's count, at least 2).
        repeats: cross-validations with reshuffled folds.
        seed: seed of the fold shuffles.

    Returns:
        One probability per study, each from models that did not see that study.

    Raises:
        ValueError: a class has fewer than 2 studies.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    smaller = int(min((y == 0).sum(), (y == 1).sum()))
    if smaller < 2:
        raise ValueError(
            f"the smaller class has {smaller} studies; a cross-validated baseline needs "
            "at least 2 of each class."
        )
    k = max(2, min(int(folds), smaller))
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=int(repeats), random_state=seed)
    total = np.zeros(y.size, dtype=np.float64)
    seen = np.zeros(y.size, dtype=np.int64)
    for train, test in splitter.split(x, y):
        model = make_pipeline(StandardScaler(), _logistic_regression(y[train]))
        with warnings.catch_warnings():
            # scikit-learn 1.8+ announces a change of LogisticRegressionCV's fitted
            # attributes, none of which is read here.
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(x[train], y[train])
        total[test] += model.predict_proba(x[test])[:, 1]
        seen[test] += 1
    return total / np.maximum(seen, 1)


@dataclass(frozen=True)
class BaselineResult:
    """The shortcut baseline on one evaluation set.

    Attributes:
        roc_auc: ``{"value", "ci_low", "ci_high"}`` (stratified percentile bootstrap).
        scores: the out-of-fold probability of every study, in input order.
        folds: folds actually used.
        repeats: cross-validation repeats.
        n: studies.
    """

    roc_auc: dict[str, float]
    scores: np.ndarray
    folds: int
    repeats: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Plain types for ``metrics.json``."""
        return {
            "method": DESCRIPTION,
            "bins": HISTOGRAM_BINS,
            "folds": self.folds,
            "repeats": self.repeats,
            "n": self.n,
            "roc_auc": dict(self.roc_auc),
        }


def shortcut_baseline(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    folds: int = CV_FOLDS,
    repeats: int = CV_REPEATS,
) -> BaselineResult:
    """Cross-validated HU-histogram baseline and its ROC-AUC with a 95% bootstrap CI.

    Args:
        features: rows of :func:`hu_histogram_features`, one per study.
        labels: 0/1 per study.
        n_boot: bootstrap resamples of the interval.
        seed: seed of the folds and of the bootstrap.
        folds: stratified folds.
        repeats: cross-validation repeats.

    Raises:
        ValueError: a class has fewer than 2 studies.
    """
    y = np.asarray(labels).astype(int).reshape(-1)
    scores = cross_validated_scores(features, y, folds=folds, repeats=repeats, seed=seed)
    low, high = metrics_lib.bootstrap_ci(y, scores, metrics_lib.roc_auc, n_boot=n_boot, seed=seed)
    smaller = int(min((y == 0).sum(), (y == 1).sum()))
    return BaselineResult(
        roc_auc={"value": metrics_lib.roc_auc(y, scores), "ci_low": low, "ci_high": high},
        scores=scores,
        folds=max(2, min(int(folds), smaller)),
        repeats=int(repeats),
        n=int(y.size),
    )


def baseline_warning(model_auc: float, baseline_auc: dict[str, float]) -> str | None:
    """A sentence when the model does not beat the baseline by more than its interval.

    Args:
        model_auc: the model's ROC-AUC on the evaluation set.
        baseline_auc: the baseline's ``{"value", "ci_low", "ci_high"}`` on the same set.

    Returns:
        ``None`` when ``model_auc`` exceeds the upper end of the baseline's 95%
        interval, else the warning (also when either AUC is undefined).

    Example:
        >>> baseline_warning(0.99, {"value": 0.55, "ci_low": 0.47, "ci_high": 0.63}) is None
        True
    """
    value = float(baseline_auc["value"])
    high = float(baseline_auc["ci_high"])
    if not (math.isfinite(model_auc) and math.isfinite(value) and math.isfinite(high)):
        return (
            "the model could not be compared with the HU-histogram baseline (an AUC is "
            "undefined on this set); evaluate on more studies of both classes."
        )
    if model_auc > high:
        return None
    return (
        f"the model's ROC-AUC {model_auc:.3f} does not exceed the HU-histogram baseline's "
        f"95% CI ({metrics_lib.format_interval(float(baseline_auc['ci_low']), high, 3)}, "
        f"value {value:.3f}): on these studies intensity statistics alone do about as "
        "well, so this AUC does not show that the model learned the findings' shape; "
        "evaluate on harder data (e.g. ctscreen synth --realism matched)."
    )


def format_baseline_line(model_auc: float, baseline: BaselineResult | dict[str, Any]) -> str:
    """One line for tables and the demo: the baseline's AUC with its CI beside the model's."""
    auc = baseline.roc_auc if isinstance(baseline, BaselineResult) else baseline["roc_auc"]
    ci = metrics_lib.format_interval(float(auc["ci_low"]), float(auc["ci_high"]), 3)
    return (
        f"shortcut baseline (HU histogram, cross-validated) ROC-AUC {float(auc['value']):.3f} "
        f"(95% CI {ci}) vs model {model_auc:.3f}"
    )
