"""The whole path on a fresh machine: synthetic data -> registry -> split -> train ->
evaluate -> predict on held-out archives -> Excel table and plots.

The model it leaves knows synthetic phantoms only: it shows the path, it does not
screen real CT (the result's ``model_warnings`` say so, and the CLI repeats them).

Everything is written under one folder. The training configuration is small
(a low-resolution input and a few epochs) so that it finishes in minutes on two
CPU cores; the numbers it prints are real, measured on held-out synthetic
studies the model never saw.

The demo says what it will do before doing it: the stages with an overall time
estimate (refined after every stage from the pace measured so far) and the disk
it will use. Only ``best.pth`` and the final ``model.pth`` are kept on disk; the
training resume state (~400 MB) is written only if the run is stopped with
Ctrl-C, and running the same command again continues from there.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import PreprocessConfig
from .data.registry import read_registry, write_registry
from .data.split import split_registry, write_keys
from .fileio import folder_bytes, format_bytes, write_text_atomic

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


#: The demo's stages and their wall time in seconds on two free cores of the
#: reference machine (AMD EPYC, 2 vCPUs) at the default sizes; the estimate given
#: at the start scales these by the default sizes, later ones by the pace measured.
STAGES: tuple[tuple[str, str, float], ...] = (
    ("synthesise", "write synthetic DICOM studies and held-out zip archives", 16.0),
    ("registry", "build the registry and split it by patient", 1.0),
    ("train", "cache the network inputs and train the model", 170.0),
    ("evaluate", "evaluate on the validation studies, choose the threshold", 15.0),
    # 15 s of scoring and about 30 s measuring how to run model.pth (issue 23's "30 of 35 s"
    # of a first predict), which the user's first predict then skips.
    ("predict", "measure how to run the model, score the held-out archives", 45.0),
)
#: Of the predict stage: measuring how to run the model, whatever the number of archives.
_MEASURE_SECONDS = 30.0
#: Bytes on disk per synthetic study of the "tiny" matrix preset (folder, zip).
_STUDY_BYTES = 330_000
_ARCHIVE_BYTES = 170_000
#: r3d_18's float32 weights (one checkpoint).
_CHECKPOINT_BYTES = 132_700_000

Echo = Callable[[str], None]


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and what it measured."""

    out: Path
    weights: Path
    results_table: Path | None
    holdout_metrics: dict[str, object]
    seconds: dict[str, float] = field(default_factory=dict)
    disk_bytes: int = 0
    interrupted: bool = False
    model_warnings: tuple[str, ...] = ()


def stage_seconds(config: DemoConfig) -> dict[str, float]:
    """Expected wall seconds of each stage on the reference machine at ``config``'s sizes."""
    base = DemoConfig()
    reference = {name: seconds for name, _, seconds in STAGES}
    voxels = math.prod(config.shape) / math.prod(base.shape)
    studies = (config.train_studies + config.holdout_studies) / (
        base.train_studies + base.holdout_studies
    )
    train_work = config.train_studies * config.epochs * voxels
    return {
        "synthesise": reference["synthesise"] * studies,
        "registry": reference["registry"],
        "train": reference["train"] * train_work / (base.train_studies * base.epochs),
        "evaluate": reference["evaluate"] * config.train_studies / base.train_studies,
        "predict": _MEASURE_SECONDS
        + (reference["predict"] - _MEASURE_SECONDS) * config.holdout_studies / base.holdout_studies,
    }


def disk_budget(config: DemoConfig) -> dict[str, int]:
    """Bytes the demo leaves in ``config.out``, by part."""
    return {
        "synthetic studies": config.train_studies * _STUDY_BYTES
        + config.holdout_studies * _ARCHIVE_BYTES,
        "cache": config.train_studies * (math.prod(config.shape) + 128),
        "best.pth and model.pth": 2 * _CHECKPOINT_BYTES,
        # Measuring how to run model.pth converts it for OpenVINO (an install dependency)
        # and keeps the graph in .ctscreen-export beside it, for predict to reuse.
        "OpenVINO copy of model.pth": _CHECKPOINT_BYTES,
    }


def budget_line(config: DemoConfig) -> str:
    """The disk budget as one sentence."""
    parts = disk_budget(config)
    detail = ", ".join(f"{name} {format_bytes(n)}" for name, n in parts.items())
    return (
        f"disk: about {format_bytes(sum(parts.values()))} in {config.out} ({detail}); "
        f"{format_bytes(3 * _CHECKPOINT_BYTES)} more for a resume state only if you stop "
        "it with Ctrl-C"
    )


class _Stages:
    """Prints a header per stage with the time still to go, from the pace so far."""

    def __init__(self, expected: dict[str, float], echo: Echo) -> None:
        self.expected = expected
        self.echo = echo
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._started = 0.0

    def remaining(self) -> float:
        done_expected = sum(self.expected[n] for n in self.seconds)
        pace = sum(self.seconds.values()) / done_expected if done_expected else 1.0
        left = sum(v for n, v in self.expected.items() if n not in self.seconds)
        return left * pace

    def start(self, name: str) -> None:
        from .train.progress import format_duration

        index = [s[0] for s in STAGES].index(name) + 1
        what = dict((s[0], s[1]) for s in STAGES)[name]
        self.echo(
            f"[{index}/{len(STAGES)}] {name}: {what} "
            f"(about {format_duration(self.remaining())} to go)"
        )
        self._name, self._started = name, time.perf_counter()

    def stop(self) -> None:
        self.seconds[self._name] = time.perf_counter() - self._started


def run_demo(config: DemoConfig, *, progress: bool = True, echo: Echo | None = None) -> DemoResult:
    """Run every stage and return where the outputs are.

    Args:
        config: sizes and the output folder.
        progress: draw progress bars on stderr.
        echo: receives the lines meant for the user (stage headers, estimates,
            training lines); default: this module's logger at INFO level.

    Returns:
        A :class:`DemoResult`; ``interrupted`` is true when Ctrl-C stopped the
        training (running the demo again continues it).
    """
    from tqdm.auto import tqdm

    from .data.sources.synthetic import build_synthetic
    from .evaluate import evaluate
    from .report import result_rows, rows_to_frame, write_table
    from .screener import Screener
    from .synth.dataset import generate_dataset
    from .train.config import TrainConfig
    from .train.loop import STATE_NAME, train
    from .train.metrics import metrics_with_ci
    from .train.progress import format_duration

    say: Echo = echo if echo is not None else log.info
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    expected = stage_seconds(config)
    say(
        f"ctscreen demo: {len(STAGES)} stages, about {format_duration(sum(expected.values()))} "
        "on two free CPU cores (longer on a busy or slower machine)"
    )
    say(budget_line(config))
    stages = _Stages(expected, say)

    stages.start("synthesise")
    labels = generate_dataset(
        out / "data",
        n_studies=config.train_studies,
        seed=config.seed,
        matrix=config.matrix,
        pathologies=config.pathologies,
        progress=progress,
    )
    holdout_labels = generate_dataset(
        out / "holdout",
        n_studies=config.holdout_studies,
        seed=config.seed + 1000,
        matrix=config.matrix,
        zip_archives=True,
        pathologies=config.pathologies,
        progress=progress,
    )
    stages.stop()

    stages.start("registry")
    # Read back: the same absolute paths as any later command reading registry.csv.
    registry = read_registry(
        write_registry(build_synthetic(labels.parent).rows, out / "registry.csv")
    )
    split = split_registry(registry, val_fraction=0.25, seed=config.seed)
    write_keys(split.train_keys, out / "train_keys.txt")
    write_keys(split.val_keys, out / "val_keys.txt")
    stages.stop()

    stages.start("train")
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
        # Two minutes of training: a crash costs little, 400 MB per epoch would not.
        resume_state="on_interrupt",
    )
    run_dir = out / "run"
    resume = (run_dir / STATE_NAME).exists()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # a finished run of an earlier demo: train afresh
    result = train(
        registry=registry,
        train_keys=split.train_keys,
        val_keys=split.val_keys,
        out_dir=run_dir,
        config=train_config,
        cache_dir=out / "cache",
        resume=resume,
        progress=progress,
        echo=say,
    )
    stages.stop()
    if result.interrupted:
        return DemoResult(out, out / "model.pth", None, {}, stages.seconds, interrupted=True)
    if result.best_path is None:
        raise RuntimeError(
            "training validated no epoch"
        )  # cannot happen: the last epoch is validated

    stages.start("evaluate")
    evaluate(
        weights=result.best_path,
        registry=registry,
        keys=split.val_keys,
        out_dir=out / "evaluation",
        threshold_rule="youden",
        write_threshold=out / "model.pth",
        progress=progress,
        device="cpu",
        # best.pth is not the model the demo leaves: measuring how to run it fastest
        # would be kept for a file nobody scores with again.
        backend="torch",
        precision="fp32",
    )
    stages.stop()

    stages.start("predict")
    # auto, as `ctscreen predict` asks for it: the demo measures once how this machine
    # runs the model it leaves, and the user's first predict reuses that measurement.
    screener = Screener(out / "model.pth", device="cpu")
    holdout = pd.read_csv(holdout_labels, dtype=str, keep_default_na=False)
    archives = [holdout_labels.parent / p for p in holdout["path"]]
    results = list(
        tqdm(
            screener.score(archives),
            total=len(archives),
            desc="predict",
            unit="archive",
            disable=not progress,
        )
    )
    rows = [row for result in results for row in result_rows(result)]
    table = write_table(
        rows_to_frame(rows),
        out / "results.xlsx",
        run_info=screener.run_info() | {"note": "synthetic demo data; research tool"},
    )
    stages.stop()

    truth = dict(zip(holdout["study_uid"], holdout["label"].astype(int), strict=True))
    scored = [r for r in results if r.ok]
    y = [truth[r.study_uid] for r in scored]
    p = [float(r.probability) for r in scored]  # type: ignore[arg-type]
    holdout_metrics = metrics_with_ci(y, p, threshold=screener.threshold, n_boot=1000, seed=0)
    holdout_metrics["n_studies"] = len(scored)
    holdout_metrics["n_failures"] = len(results) - len(scored)
    write_text_atomic(
        out / "holdout_metrics.json", json.dumps(holdout_metrics, indent=2, default=float)
    )
    return DemoResult(
        out=out,
        weights=out / "model.pth",
        results_table=table,
        holdout_metrics=holdout_metrics,
        seconds=stages.seconds,
        disk_bytes=folder_bytes(out),
        model_warnings=screener.warnings,
    )
