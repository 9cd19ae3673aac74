"""Evaluate a checkpoint on labelled studies: predictions, metrics with 95% CIs, plots.

Studies are scored by :class:`ctscreen.Screener`, the same path ``predict``
takes (series choice, float preprocessing from the model card, backend and
precision), so the threshold chosen here is chosen on the numbers ``predict``
will give.

Outputs in ``out_dir``:

* ``predictions.csv``: one row per study (``study_key``, ``dataset``, ``label``,
  ``probability``, ``prediction``, ``status`` ok/failed, ``error``);
* ``metrics.json``: threshold and how it was chosen, counts, and every metric of
  :data:`ctscreen.train.metrics.CI_METRICS` as ``{value, ci_low, ci_high}``
  (stratified percentile bootstrap), and ``shortcut_baseline``: the ROC-AUC
  with its CI of a cross-validated logistic regression on each scored volume's
  HU histogram alone (:mod:`ctscreen.baseline`), beside the model's, with a
  warning when the model does not beat it by more than its interval;
* ``report.html``: the metrics, the baseline and the plots on one page;
* ``roc.png``, ``pr.png``, ``calibration.png``, ``confusion_matrix.png``.

A threshold chosen on the same studies it is then measured on gives optimistic
threshold-dependent metrics; ``metrics.json`` says so. Choose it on validation
data and measure on a held-out test set for an honest figure.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import baseline as baseline_lib
from .data.dataset import select_rows
from .errors import DatasetError
from .evaluation_html import write_report
from .fileio import json_safe, write_text_atomic
from .results import StudyResult
from .screener import Screener
from .train import metrics as metrics_lib
from .train import plots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` produced.

    Attributes:
        out_dir: folder with the outputs.
        predictions: the rows of ``predictions.csv``.
        metrics: ``{name: {"value", "ci_low", "ci_high"}}``.
        threshold: the decision threshold used.
        threshold_rule: ``"card"`` (the checkpoint's own), ``"youden"`` or
            ``"sensitivity>=X"``.
        n_failed: studies that could not be read (left out of the metrics).
        written_checkpoint: the checkpoint copy holding the threshold, if written.
        baseline: the shortcut baseline's entry of ``metrics.json`` (see
            :func:`run_baseline`).
    """

    out_dir: Path
    predictions: pd.DataFrame
    metrics: dict[str, dict[str, float]]
    threshold: float
    threshold_rule: str
    n_failed: int
    written_checkpoint: Path | None = None
    baseline: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredRows:
    """Model scores and intensity features of registry rows, in row order.

    Attributes:
        probabilities: probability of pathology, ``nan`` where a study failed.
        errors: the error sentence of a failed study, ``""`` for the others.
        features: ``[n_rows, n_features]`` rows of
            :func:`ctscreen.baseline.hu_histogram_features` of each scored volume
            in the model's HU window (``nan`` rows where a study failed).
    """

    probabilities: np.ndarray
    errors: list[str]
    features: np.ndarray


def score_rows(screener: Screener, rows: pd.DataFrame, *, progress: bool = True) -> ScoredRows:
    """Score every registry row through ``screener`` and describe its HU histogram.

    Each row's ``path`` must hold exactly one study (a folder, zip or NIfTI file).
    The histogram is taken from the very volume that was scored (the series
    ``predict`` would choose), at the study's own resolution, and the volume is
    dropped as soon as its features are taken.
    """
    from tqdm.auto import tqdm

    config = screener.config
    n_features = baseline_lib.HISTOGRAM_BINS + 2
    paths = [str(p) for p in rows["path"]]
    unique = list(dict.fromkeys(paths))
    found: dict[str, list[tuple[StudyResult, np.ndarray | None]]] = {}
    for result in tqdm(
        screener.score(unique, keep_volume=True),
        total=len(unique),
        desc="scoring",
        unit="study",
        disable=not progress,
        leave=False,
    ):
        features = None
        if result.ok and result.volume is not None:
            features = baseline_lib.hu_histogram_features(
                result.volume.hu, hu_min=config.hu_min, hu_max=config.hu_max
            )
        found.setdefault(result.input_path, []).append((result.without_maps(), features))
    probs = np.full(len(paths), np.nan, dtype=np.float64)
    feats = np.full((len(paths), n_features), np.nan, dtype=np.float64)
    errors = [""] * len(paths)
    for i, (key, path) in enumerate(zip(rows["study_key"], paths, strict=True)):
        results = found.get(path, [])
        if len(results) != 1:
            errors[i] = (
                f"{path} holds {len(results)} studies; point the registry entry at one study."
            )
        elif not results[0][0].ok:
            errors[i] = results[0][0].error
        else:
            probs[i] = float(results[0][0].probability)  # type: ignore[arg-type]
            if results[0][1] is not None:
                feats[i] = results[0][1]
        if errors[i]:
            log.warning("cannot score study %s: %s", key, errors[i])
    return ScoredRows(probabilities=probs, errors=errors, features=feats)


def score_registry_rows(
    screener: Screener, rows: pd.DataFrame, *, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Probabilities of pathology for every registry row, through ``screener``.

    Each row's ``path`` must hold exactly one study (a folder, zip or NIfTI file).

    Returns:
        ``(probabilities, errors)``: ``nan`` and the error sentence for studies
        that could not be scored, ``""`` for the others, in row order.
    """
    scored = score_rows(screener, rows, progress=progress)
    return scored.probabilities, scored.errors


def run_baseline(
    features: np.ndarray,
    labels: np.ndarray,
    model_auc: float,
    *,
    n_boot: int,
    seed: int,
    repeats: int = baseline_lib.CV_REPEATS,
) -> dict[str, Any]:
    """The shortcut baseline's entry of ``metrics.json`` for one evaluation set.

    Returns:
        ``{"method", "bins", "folds", "repeats", "n", "roc_auc", "model_roc_auc",
        "warning"}``, or ``{"method", "skipped"}`` with the reason when the set is
        too small (fewer than 2 studies of a class) for a cross-validated baseline.
    """
    try:
        result = baseline_lib.shortcut_baseline(
            features, labels, n_boot=n_boot, seed=seed, repeats=repeats
        )
    except ValueError as exc:
        return {"method": baseline_lib.DESCRIPTION, "skipped": str(exc)}
    entry = result.to_dict()
    entry["model_roc_auc"] = float(model_auc)
    entry["warning"] = baseline_lib.baseline_warning(model_auc, result.roc_auc)
    return entry


def format_baseline(entry: dict[str, Any]) -> str:
    """The baseline's lines for the printed table (its AUC, CI and any warning)."""
    if "skipped" in entry:
        return f"shortcut baseline not computed: {entry['skipped']}"
    line = baseline_lib.format_baseline_line(float(entry["model_roc_auc"]), entry)
    if entry.get("warning"):
        return f"{line}\nWARNING: {entry['warning']}"
    return line


def format_metrics_table(
    metrics: dict[str, dict[str, float]], *, threshold: float, rule: str, n: int, n_pos: int
) -> str:
    """A plain-text table of metrics with their 95% intervals."""
    lines = [
        f"{n} studies ({n_pos} with pathology), threshold {threshold:.4f} ({rule})",
        f"{'metric':<14}{'value':>8}   95% CI",
    ]
    for name, m in metrics.items():
        label = metrics_lib.METRIC_LABELS.get(name, name)
        value = "nan" if not math.isfinite(m["value"]) else f"{m['value']:.4f}"
        ci = metrics_lib.format_interval(m["ci_low"], m["ci_high"])
        lines.append(f"{label:<14}{value:>8}   {ci}")
    return "\n".join(lines)


def evaluate(
    *,
    weights: Path | str,
    registry: pd.DataFrame | Path | str,
    keys: Sequence[str] | Path | str,
    out_dir: Path | str,
    threshold_rule: str | None = None,
    target_sensitivity: float = 0.95,
    write_threshold: Path | str | None = None,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationResult:
    """Score labelled studies with a checkpoint and report metrics with 95% CIs.

    Args:
        weights: checkpoint file (``best.pth`` or any ctscreen checkpoint).
        registry: registry frame or CSV path.
        keys: study keys or a key-list file.
        out_dir: output folder (created).
        threshold_rule: None keeps the checkpoint's threshold; ``"youden"`` or
            ``"sensitivity"`` chooses one on these studies.
        target_sensitivity: target of the ``"sensitivity"`` rule.
        write_threshold: where to save a copy of the checkpoint whose card carries
            the chosen threshold, the rule and these metrics.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        backend: ``auto``, ``torch`` or ``openvino`` (as ``predict``).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (as ``predict``).
        batch_size: studies per forward pass (default as ``predict``).
        n_boot: bootstrap resamples for the intervals.
        seed: bootstrap seed.
        progress: draw progress bars.

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        WeightsError: the checkpoint cannot be loaded.
        DatasetError: keys missing from the registry, or no readable study.
        DatasetError: also when a threshold rule meets studies of one class only.
    """
    from .train.loop import read_keys_arg, read_registry_arg
    from .weights import save_checkpoint

    out_dir = Path(out_dir)
    screener = Screener(
        weights, device=device, backend=backend, precision=precision, batch_size=batch_size
    )
    loaded, card = screener.loaded, screener.card
    frame = read_registry_arg(registry)
    rows = select_rows(frame, read_keys_arg(keys), what="evaluation")
    labels = rows["label"].astype(int).to_numpy()
    scored = score_rows(screener, rows, progress=progress)
    probs, errors = scored.probabilities, scored.errors
    ok = np.array([not e for e in errors])
    if not ok.any():
        raise DatasetError("no study of the evaluation list could be read; see the warnings.")
    y = labels[ok]
    p = probs[ok]

    if threshold_rule is None:
        threshold, rule = float(card.threshold), f"card ({card.threshold_rule})"
    else:
        if len(np.unique(y)) < 2:
            raise DatasetError(
                "choosing a threshold needs studies of both classes; evaluate on a list "
                "holding normal and pathological studies."
            )
        threshold = metrics_lib.choose_threshold(
            y, p, threshold_rule, target_sensitivity=target_sensitivity
        )
        rule = "youden" if threshold_rule == "youden" else f"sensitivity>={target_sensitivity:g}"
    values = metrics_lib.metrics_with_ci(y, p, threshold, n_boot=n_boot, seed=seed)
    counts = metrics_lib.confusion_counts(y, p, threshold)
    baseline = run_baseline(
        scored.features[ok], y, values["roc_auc"]["value"], n_boot=n_boot, seed=seed
    )
    if baseline.get("warning"):
        log.warning("%s", baseline["warning"])

    predictions = pd.DataFrame(
        {
            "study_key": rows["study_key"].astype(str),
            "dataset": rows["dataset"].astype(str) if "dataset" in rows else "",
            "label": labels,
            "probability": probs,
            "prediction": np.where(ok, (np.nan_to_num(probs) >= threshold).astype(int), -1),
            "status": np.where(ok, "ok", "failed"),
            "error": errors,
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.csv", predictions.to_csv(index=False))
    summary: dict[str, Any] = {
        "weights": str(loaded.path),
        "sha256": loaded.sha256,
        "preprocess": card.preprocess.to_dict(),
        "backend": screener.engine.name,
        "precision": screener.engine.precision,
        "n": int(ok.sum()),
        "n_with_pathology": int(y.sum()),
        "n_failed": int((~ok).sum()),
        "threshold": threshold,
        "threshold_rule": rule,
        "confidence_level": 0.95,
        "ci_method": "stratified percentile bootstrap",
        "n_boot": n_boot,
        "seed": seed,
        "counts": counts,
        "metrics": values,
        "shortcut_baseline": baseline,
    }
    if threshold_rule is not None:
        summary["note"] = (
            "the threshold was chosen on these same studies, so the threshold-dependent "
            "metrics are optimistic; confirm them on held-out data."
        )
    write_text_atomic(
        out_dir / "metrics.json", json.dumps(json_safe(summary), indent=2, ensure_ascii=False)
    )
    sens, spec = values["sensitivity"]["value"], values["specificity"]["value"]
    op = (1.0 - spec, sens) if math.isfinite(sens) and math.isfinite(spec) else None
    roc_ci = (values["roc_auc"]["ci_low"], values["roc_auc"]["ci_high"])
    plots.plot_roc(y, p, out_dir / "roc.png", auc_ci=roc_ci, seed=seed, operating_point=op)
    plots.plot_pr(
        y,
        p,
        out_dir / "pr.png",
        ap=values["pr_auc"]["value"],
        ap_ci=(values["pr_auc"]["ci_low"], values["pr_auc"]["ci_high"]),
    )
    plots.plot_calibration(y, p, out_dir / "calibration.png")
    plots.plot_confusion_matrix(
        counts, out_dir / "confusion_matrix.png", title=f"threshold {threshold:.3f} ({rule})"
    )
    write_report(json_safe(summary), out_dir)

    written = None
    if write_threshold is not None:
        new_card = card.replace(
            threshold=threshold,
            threshold_rule=rule,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            validation_metrics={
                **json_safe(values),
                "n": int(ok.sum()),
                "n_with_pathology": int(y.sum()),
            },
        )
        written = Path(write_threshold)
        save_checkpoint(written, loaded.model, new_card)
        log.info("wrote %s with threshold %.4f (%s)", written, threshold, rule)

    return EvaluationResult(
        out_dir=out_dir,
        predictions=predictions,
        metrics=values,
        threshold=threshold,
        threshold_rule=rule,
        n_failed=int((~ok).sum()),
        written_checkpoint=written,
        baseline=baseline,
    )
