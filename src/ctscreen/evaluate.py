"""Evaluate a checkpoint on labelled studies: predictions, metrics with 95% CIs, plots.

The preprocessing always comes from the checkpoint's model card, never from the
command line, so a model is evaluated on the input it was trained on.

Outputs in ``out_dir``:

* ``predictions.csv``: one row per study (``study_key``, ``dataset``, ``label``,
  ``probability``, ``prediction``, ``status`` ok/failed, ``error``);
* ``metrics.json``: threshold and how it was chosen, counts, and every metric of
  :data:`ctscreen.train.metrics.CI_METRICS` as ``{value, ci_low, ci_high}``
  (stratified percentile bootstrap);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .data.dataset import StudyDataset, select_rows
from .errors import CtscreenError, DatasetError
from .fileio import json_safe, write_text_atomic
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
    """

    out_dir: Path
    predictions: pd.DataFrame
    metrics: dict[str, dict[str, float]]
    threshold: float
    threshold_rule: str
    n_failed: int
    written_checkpoint: Path | None = None


class _SafeItems(Dataset):
    """Items ``(x, y, index, error)``; an unreadable study gives zeros and its error text."""

    def __init__(self, base: StudyDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        try:
            x, y = self.base[index]
            return x, y, index, ""
        except CtscreenError as exc:
            shape = self.base.config.shape
            y = torch.tensor(float(self.base.labels[index]), dtype=torch.float32)
            return torch.zeros((1, *shape), dtype=torch.float32), y, index, exc.message


def predict_dataset(
    model: torch.nn.Module,
    dataset: StudyDataset,
    *,
    device: torch.device,
    batch_size: int = 2,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Probabilities of pathology for every item, one forward pass per batch.

    Args:
        model: the network (put in eval mode here).
        dataset: the studies.
        device: where to run.
        batch_size: studies per forward pass.
        num_workers: DataLoader worker processes.
        progress: draw a tqdm bar on stderr.

    Returns:
        ``(probabilities, errors)``: ``nan`` and the error sentence for studies
        that could not be read, ``""`` for the others.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(
        _SafeItems(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    probs = np.full(len(dataset), np.nan, dtype=np.float64)
    errors = [""] * len(dataset)
    model.eval()
    with torch.no_grad():
        for x, _y, index, error in tqdm(
            loader, desc="predicting", unit="batch", disable=not progress, leave=False
        ):
            p = torch.sigmoid(model(x.to(device)).float()).view(-1).cpu().numpy()
            for i, e, value in zip(index.tolist(), error, p, strict=True):
                if e:
                    errors[i] = e
                    log.warning("cannot read study %s: %s", dataset.study_key(i), e)
                else:
                    probs[i] = float(value)
    return probs, errors


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
        if math.isfinite(m["ci_low"]) and math.isfinite(m["ci_high"]):
            ci = f"{m['ci_low']:.4f} – {m['ci_high']:.4f}"
        else:
            ci = "undefined"
        lines.append(f"{label:<14}{value:>8}   {ci}")
    return "\n".join(lines)


def evaluate(
    *,
    weights: Path | str,
    registry: pd.DataFrame | Path | str,
    keys: Sequence[str] | Path | str,
    out_dir: Path | str,
    cache_dir: Path | str | None = None,
    threshold_rule: str | None = None,
    target_sensitivity: float = 0.95,
    write_threshold: Path | str | None = None,
    device: str = "auto",
    batch_size: int = 2,
    num_workers: int = 0,
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
        cache_dir: preprocessing cache (entries for the card's preprocessing are
            read, missing ones decoded and added).
        threshold_rule: None keeps the checkpoint's threshold; ``"youden"`` or
            ``"sensitivity"`` chooses one on these studies.
        target_sensitivity: target of the ``"sensitivity"`` rule.
        write_threshold: where to save a copy of the checkpoint whose card carries
            the chosen threshold, the rule and these metrics.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        batch_size: studies per forward pass.
        num_workers: DataLoader worker processes.
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
    from .weights import load_checkpoint, save_checkpoint

    out_dir = Path(out_dir)
    loaded = load_checkpoint(weights, device=device)
    card = loaded.card
    frame = read_registry_arg(registry)
    rows = select_rows(frame, read_keys_arg(keys), what="evaluation")
    dataset = StudyDataset(rows, card.preprocess, cache_dir=cache_dir)
    target = next(loaded.model.parameters()).device
    probs, errors = predict_dataset(
        loaded.model,
        dataset,
        device=target,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    ok = np.array([not e for e in errors])
    if not ok.any():
        raise DatasetError("no study of the evaluation list could be read; see the warnings.")
    y = dataset.labels[ok]
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

    predictions = pd.DataFrame(
        {
            "study_key": rows["study_key"].astype(str),
            "dataset": rows["dataset"].astype(str) if "dataset" in rows else "",
            "label": dataset.labels,
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
    )
