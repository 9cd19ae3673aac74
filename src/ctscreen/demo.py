"""The whole path on a fresh machine: synthetic data -> registry -> split -> train ->
evaluate -> predict on held-out archives -> Excel table and plots.

Everything is written under one folder. The training configuration is small
(a low-resolution input and a few epochs) so that it finishes in minutes on two
CPU cores; the numbers it prints are real, measured on held-out synthetic
studies the model never saw.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import PreprocessConfig
from .data.registry import REGISTRY_COLUMNS, write_registry
from .data.split import split_registry, write_keys

log = logging.getLogger(__name__)

#: Findings the demo's pathological studies carry (see :class:`DemoConfig`).
DEMO_PATHOLOGIES: tuple[str, ...] = ("consolidation", "effusion", "pneumothorax")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo.

    Attributes:
        out: the folder everything goes into.
        train_studies: synthetic studies for training and validation.
        holdout_studies: synthetic zip archives kept aside for ``predict``.
        epochs: training epochs.
        shape: network input (D, H, W); small so that CPU training is quick.
        seed: one seed for data, split and training.
        batch_size: studies per step.
        lr: AdamW learning rate.
        matrix: in-plane size preset of the synthetic studies (see ``ctscreen synth``).
        pathologies: the synthetic findings of the pathological studies. The
            default keeps the large ones (consolidation, effusion, pneumothorax)
            that a network trained from scratch for three minutes can learn;
            small nodules and faint ground glass need far more data and time.
        workers: processes that build the preprocessing cache.
    """

    out: Path = Path("ctscreen-demo")
    train_studies: int = 160
    holdout_studies: int = 24
    epochs: int = 8
    shape: tuple[int, int, int] = (16, 48, 48)
    matrix: str = "tiny"
    pathologies: tuple[str, ...] = DEMO_PATHOLOGIES
    seed: int = 0
    batch_size: int = 8
    lr: float = 3e-4
    workers: int = 2


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and what it measured."""

    out: Path
    weights: Path
    results_table: Path
    holdout_metrics: dict[str, object]
    seconds: dict[str, float] = field(default_factory=dict)


def registry_from_labels(labels_csv: Path, *, dataset: str = "synthetic") -> pd.DataFrame:
    """Registry rows for a dataset written by :func:`ctscreen.synth.dataset.generate_dataset`."""
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    root = labels_csv.parent
    frame = pd.DataFrame(
        {
            "study_key": dataset + ":" + labels["study_id"],
            "path": [str((root / p).resolve()) for p in labels["path"]],
            "path_type": "dicom",
            "label": labels["label"].astype(int),
            "dataset": dataset,
            "patient_id": labels["patient_id"],
            "study_uid": labels["study_uid"],
            "source_category": labels["pathology_type"].replace("", "normal"),
        }
    )
    return frame[list(REGISTRY_COLUMNS)]


def run_demo(config: DemoConfig, *, progress: bool = True) -> DemoResult:
    """Run every stage and return where the outputs are."""
    from .evaluate import evaluate
    from .report import result_rows, rows_to_frame, write_table
    from .screener import Screener
    from .synth.dataset import generate_dataset
    from .train.config import TrainConfig
    from .train.loop import train
    from .train.metrics import metrics_with_ci

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    labels = generate_dataset(
        out / "data",
        n_studies=config.train_studies,
        seed=config.seed,
        matrix=config.matrix,
        pathologies=config.pathologies,
    )
    holdout_labels = generate_dataset(
        out / "holdout",
        n_studies=config.holdout_studies,
        seed=config.seed + 1000,
        matrix=config.matrix,
        zip_archives=True,
        pathologies=config.pathologies,
    )
    seconds["synthesise"] = time.perf_counter() - t

    t = time.perf_counter()
    registry = registry_from_labels(labels)
    write_registry(registry, out / "registry.csv")
    split = split_registry(registry, val_fraction=0.25, seed=config.seed)
    write_keys(split.train_keys, out / "train_keys.txt")
    write_keys(split.val_keys, out / "val_keys.txt")
    seconds["registry"] = time.perf_counter() - t

    t = time.perf_counter()
    train_config = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        num_workers=config.workers,
        preprocess=PreprocessConfig(shape=config.shape),
        device="cpu",
        amp=False,
        # A few epochs from scratch: augmentation would only slow the first signal down.
        augment=False,
        lr_schedule="cosine",
    )
    result = train(
        registry=registry,
        train_keys=split.train_keys,
        val_keys=split.val_keys,
        out_dir=out / "run",
        config=train_config,
        cache_dir=out / "cache",
        resume=(out / "run" / "last_state.pth").exists(),
        progress=progress,
    )
    if result.best_path is None:
        raise RuntimeError(
            "training validated no epoch"
        )  # cannot happen: the last epoch is validated
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate(
        weights=result.best_path,
        registry=registry,
        keys=split.val_keys,
        out_dir=out / "evaluation",
        threshold_rule="youden",
        write_threshold=out / "model.pth",
        progress=progress,
    )
    seconds["evaluate"] = time.perf_counter() - t
    del evaluation

    t = time.perf_counter()
    screener = Screener(out / "model.pth", device="cpu")
    holdout = pd.read_csv(holdout_labels, dtype=str, keep_default_na=False)
    archives = [holdout_labels.parent / p for p in holdout["path"]]
    results = list(screener.score(archives))
    rows = [row for result in results for row in result_rows(result)]
    table = write_table(
        rows_to_frame(rows),
        out / "results.xlsx",
        run_info=screener.run_info() | {"note": "synthetic demo data; research tool"},
    )
    seconds["predict"] = time.perf_counter() - t

    truth = dict(zip(holdout["study_uid"], holdout["label"].astype(int), strict=True))
    scored = [r for r in results if r.ok]
    y = [truth[r.study_uid] for r in scored]
    p = [float(r.probability) for r in scored]  # type: ignore[arg-type]
    holdout_metrics = metrics_with_ci(y, p, threshold=screener.threshold, n_boot=1000, seed=0)
    holdout_metrics["n_studies"] = len(scored)
    holdout_metrics["n_failures"] = len(results) - len(scored)
    (out / "holdout_metrics.json").write_text(json.dumps(holdout_metrics, indent=2, default=float))
    return DemoResult(
        out=out,
        weights=out / "model.pth",
        results_table=table,
        holdout_metrics=holdout_metrics,
        seconds=seconds,
    )
