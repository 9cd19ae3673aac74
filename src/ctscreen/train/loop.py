"""The training loop: registry + split -> run folder with checkpoints, metrics and plots.

Run folder layout (``out_dir``)::

    config.json                    resolved TrainConfig
    metrics.csv, metrics.jsonl     one row per epoch (losses, ROC-AUC, PR-AUC, accuracy,
                                   F1, sensitivity, specificity for train and val)
    learning_curves.png            redrawn from metrics.csv every epoch
    epochs/epoch_XXX/{train,val}_cm.png, {train,val}_report.txt
    epochs/epoch_XXX/weights.pth   only with ``save_every_epoch`` (~130 MB each)
    best.pth                       the epoch with the highest validation ROC-AUC
                                   (checkpoint with model card, ctscreen.weights format)
    last_state.pth                 resume state of the last finished epoch (model,
                                   optimizer, scaler, RNG, history; ~3x a checkpoint)
    tensorboard/                   when requested

Like timm's and nanoGPT's run folders, only the best checkpoint and the latest
resume state are kept unless per-epoch weights are asked for, and the run says
how much disk that is before it starts.

Train-set metrics come from the predictions made during the training pass
(augmented inputs, weights changing within the epoch), as is usual; they show
fitting progress, not generalisation. Validation runs in eval mode without
augmentation. The validation loss uses the same (possibly ``pos_weight``-ed) loss
as training, so both curves are on one scale.

Reproducibility: every epoch reseeds torch, numpy, random and the data-order
generator from ``(seed, epoch)``, so a run resumed from ``last_state.pth`` draws
the same batches and augmentations as an uninterrupted one; on CPU the metric
history is then identical.

Several processes (``torchrun --nproc_per_node N -m ctscreen train ...``): the
model is wrapped in DistributedDataParallel, every process trains on its shard of
one epoch sample that all draw alike (class balancing kept), the epoch's labels
and predictions of all processes are gathered so that every metric, the best
epoch and the threshold are those of the whole set, and rank 0 alone writes the
run folder and prints. Augmentations differ per process (seeded by
``(seed, epoch, rank)``). :mod:`ctscreen.train.distributed` holds the plumbing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from ..card import CLASS_NAMES, ModelCard
from ..data import cache as cache_lib
from ..data.dataset import StudyDataset, select_rows
from ..errors import ConfigError, DatasetError
from ..fileio import folder_bytes, format_bytes, json_safe, write_text_atomic
from ..interrupts import (
    acknowledge_stop,
    interruptible,
    leave_stops_to_parent,
    stop_requests,
)
from . import distributed as dist_lib
from . import metrics as metrics_lib
from . import plots
from . import progress as progress_lib
from .augment import augment_volume
from .checkpoint import (
    capture_rng_state,
    link_or_copy,
    load_train_state,
    restore_rng_state,
    save_train_state,
)
from .config import TrainConfig, learning_rate

log = logging.getLogger(__name__)

#: Epoch metrics with a train and a val column each.
EPOCH_METRICS: tuple[str, ...] = metrics_lib.CI_METRICS
#: Columns of metrics.csv, in order.
METRICS_COLUMNS: tuple[str, ...] = (
    ("epoch", "lr", "train_loss", "val_loss")
    + tuple(f"train_{m}" for m in EPOCH_METRICS)
    + tuple(f"val_{m}" for m in EPOCH_METRICS)
    + ("val_roc_auc_ci_low", "val_roc_auc_ci_high", "seconds")
)
STATE_NAME = "last_state.pth"
BEST_NAME = "best.pth"
#: Bootstrap resamples of the per-epoch validation ROC-AUC interval.
VAL_CI_BOOT = 1000

#: Receives the lines a run has for its user (see :func:`train`).
Echo = Callable[[str], None]
#: Called after every training batch with ``(step, seconds of that batch)``.
BatchHook = Callable[[int, float], None]
#: Called after every optimisation step with ``(epoch, step, model)``; ``model`` is
#: the plain network (not its DDP wrapper), e.g. to log weight norms.
StepHook = Callable[[int, int, nn.Module], None]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes:
        out_dir: the run folder.
        best_path: ``best.pth`` (None when no epoch was validated).
        best_epoch: epoch of ``best.pth``.
        best_val_roc_auc: its validation ROC-AUC (nan when undefined).
        last_epoch: last completed epoch.
        history: one dict per epoch (the rows of metrics.csv).
        dropped_keys: studies left out because they could not be cached.
        interrupted: the run was stopped by Ctrl-C (its resume state is on disk
            when at least one epoch finished).
    """

    out_dir: Path
    best_path: Path | None
    best_epoch: int | None
    best_val_roc_auc: float
    last_epoch: int
    history: tuple[dict[str, float], ...]
    dropped_keys: tuple[str, ...] = ()
    interrupted: bool = False


def read_keys_arg(keys: Sequence[str] | Path | str) -> list[str]:
    """Key list from a sequence, or from a text file of one study_key per line."""
    if isinstance(keys, (str, Path)):
        from ..data.split import read_keys

        return [str(k) for k in read_keys(Path(keys))]
    return [str(k) for k in keys]


def read_registry_arg(registry: pd.DataFrame | Path | str) -> pd.DataFrame:
    """Registry frame from a DataFrame or a registry CSV path."""
    if isinstance(registry, pd.DataFrame):
        return registry
    from ..data.registry import read_registry

    return read_registry(Path(registry))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


def write_history(out_dir: Path, history: Sequence[dict[str, float]]) -> None:
    """Write metrics.csv (empty cell = undefined) and metrics.jsonl (null) from the history."""
    lines = [",".join(METRICS_COLUMNS)]
    for row in history:
        cells = []
        for col in METRICS_COLUMNS:
            value = row.get(col, math.nan)
            if col == "epoch":
                cells.append(str(int(value)))
            elif isinstance(value, float) and not math.isfinite(value):
                cells.append("")
            else:
                cells.append(repr(float(value)))
        lines.append(",".join(cells))
    write_text_atomic(out_dir / "metrics.csv", "\n".join(lines) + "\n")
    jsonl = "".join(json.dumps(json_safe(dict(row))) + "\n" for row in history)
    write_text_atomic(out_dir / "metrics.jsonl", jsonl)


def _open_tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "TensorBoard logging was requested but the tensorboard package is not installed; "
            "install it (pip install 'ctscreen[tensorboard]') or drop --tensorboard."
        ) from exc
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _label_counts(rows: pd.DataFrame) -> dict[str, int]:
    counts = rows["label"].astype(int).value_counts()
    return {"0": int(counts.get(0, 0)), "1": int(counts.get(1, 0))}


def training_data_summary(
    train_rows: pd.DataFrame, val_rows: pd.DataFrame, dropped: Sequence[str], seed: int
) -> dict[str, Any]:
    """Plain-type summary of the data for the model card."""
    summary: dict[str, Any] = {
        "n_train": int(len(train_rows)),
        "n_val": int(len(val_rows)),
        "train_labels": _label_counts(train_rows),
        "val_labels": _label_counts(val_rows),
        "dropped_unreadable": int(len(dropped)),
        "seed": int(seed),
    }
    if "dataset" in train_rows.columns:
        both = pd.concat([train_rows, val_rows])
        summary["datasets"] = {str(k): int(v) for k, v in both["dataset"].value_counts().items()}
    return summary


def _make_sampler(
    dataset: StudyDataset,
    *,
    config: TrainConfig,
    train: bool,
    generator: torch.Generator,
    world: dist_lib.World,
) -> Sampler[int] | None:
    """Which studies a pass visits, in which order; None: the dataset in order.

    Several processes: this process's shard of one epoch sample that all draw alike
    (call ``sampler.set_epoch`` every epoch; every shard has the same length, so every
    process runs the same number of batches). One process: for training, a weighted
    sample with replacement when balancing by sampler, else a shuffle.
    """
    balanced = train and config.balance in ("sampler", "both")
    if world.distributed:
        return dist_lib.ShardSampler(
            dataset.labels, world=world, weighted=balanced, shuffle=train, seed=config.seed
        )
    if not train:
        return None
    if balanced:
        counts = np.bincount(dataset.labels, minlength=2).astype(np.float64)
        weights = 1.0 / counts[dataset.labels]
        return WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double),
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
    return RandomSampler(dataset, generator=generator)


def _make_loader(
    dataset: StudyDataset,
    *,
    config: TrainConfig,
    train: bool,
    generator: torch.Generator,
    device: torch.device,
    world: dist_lib.World = dist_lib.SINGLE,
) -> DataLoader:
    sampler = _make_sampler(dataset, config=config, train=train, generator=generator, world=world)
    n = len(sampler) if sampler is not None else len(dataset)
    # A last batch of one study makes batch norm statistics degenerate; drop it.
    drop_last = train and n > config.batch_size and n % config.batch_size == 1
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=leave_stops_to_parent,
    )


@dataclass(frozen=True)
class EpochPass:
    """What one pass over a loader gave in this process.

    Attributes:
        loss_sum: sum over studies of the batch-mean loss times the batch size.
        seen: studies passed.
        labels: 0/1 per study, in loader order.
        probs: sigmoid of the logits (float64).
        logits: the raw logits (float64).
    """

    loss_sum: float
    seen: int
    labels: np.ndarray
    probs: np.ndarray
    logits: np.ndarray

    @property
    def mean_loss(self) -> float:
        """Mean loss per study."""
        return self.loss_sum / self.seen


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    criterion: nn.Module,
    device: torch.device,
    use_amp: bool,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
    desc: str,
    progress: bool,
    on_batch: BatchHook | None = None,
    on_step: Callable[[int], None] | None = None,
    world: dist_lib.World = dist_lib.SINGLE,
) -> EpochPass:
    """One pass over ``loader``; trains when ``optimizer`` is given.

    Args:
        on_batch: called after every batch with ``(step, seconds)``, the time of
            that batch (data loading included).
        on_step: called with the step number after every optimisation step.
        world: the processes training together; with several, a stop request is
            acted on at the end of a batch once all processes know of it, never
            inside a batch (whose gradient exchange the others would wait for).

    Returns:
        This process's :class:`EpochPass`.
    """
    from tqdm.auto import tqdm

    training = optimizer is not None
    model.train(training)
    total_loss, seen = 0.0, 0
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    logit_parts: list[np.ndarray] = []
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    tick = time.perf_counter()
    with torch.set_grad_enabled(training):
        for step, (x, y) in enumerate(bar, start=1):
            # Ctrl-C stops within the batch's computation; elsewhere (loading, the
            # loader starting its workers) it waits for the next batch (interrupts.py).
            guard = contextlib.nullcontext() if world.distributed else interruptible()
            with guard:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True).view(-1, 1)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    logits = model(x)
                loss = criterion(logits.float(), y)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"the {desc} loss became {loss.item()} at step {step}; "
                        "lower the learning rate (--lr) or disable mixed precision."
                    )
                if training:
                    assert optimizer is not None and scaler is not None
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if config.max_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
            if training and on_step is not None:
                on_step(step)
            batch = int(y.shape[0])
            total_loss += float(loss.detach()) * batch
            seen += batch
            labels.append(y.detach().view(-1).cpu().numpy())
            probs.append(torch.sigmoid(logits.detach().float()).view(-1).cpu().numpy())
            logit_parts.append(logits.detach().float().view(-1).cpu().numpy())
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            if training and step % config.log_every == 0:
                log.debug("%s step %d: running loss %.4f", desc, step, total_loss / seen)
            now = time.perf_counter()
            if on_batch is not None:
                on_batch(step, now - tick)
            tick = now
            if world.distributed and dist_lib.stop_agreed(world):
                bar.close()
                raise KeyboardInterrupt(f"stop requested, acted on by all {world.size} processes")
    bar.close()
    if seen == 0:
        raise DatasetError(f"the {desc} pass saw no study; check the split and the batch size.")
    return EpochPass(
        loss_sum=total_loss,
        seen=seen,
        labels=np.concatenate(labels).astype(int),
        probs=np.concatenate(probs).astype(np.float64),
        logits=np.concatenate(logit_parts).astype(np.float64),
    )


def combine_passes(
    done: EpochPass,
    indices: np.ndarray,
    *,
    world: dist_lib.World,
    validation: bool,
    pos_weight: float | None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """The loss, labels and probabilities of a pass over all processes, in every process.

    Args:
        done: this process's pass.
        indices: the dataset index of each of its studies, in loader order.
        world: the processes training together.
        validation: each study counts once (shard padding repeats some), in
            dataset order, and the loss is recomputed over exactly those; else
            (a training epoch) everything drawn counts and the loss is the
            study-weighted mean over the processes.
        pos_weight: of the loss, for the validation loss.

    Returns:
        ``(mean loss per study, labels, probabilities)``.
    """
    if not world.distributed:
        return done.mean_loss, done.labels, done.probs
    part = {
        "index": np.asarray(indices, dtype=np.int64),
        "label": done.labels,
        "prob": done.probs,
        "logit": done.logits,
        "loss_sum": np.full(done.seen, done.loss_sum / done.seen),
    }
    merged = dist_lib.merge_parts(dist_lib.gather_parts(part, world), dedupe=validation)
    if validation:
        weight = None if pos_weight is None else torch.tensor([pos_weight], dtype=torch.float64)
        loss = F.binary_cross_entropy_with_logits(
            torch.from_numpy(merged["logit"]),
            torch.from_numpy(merged["label"].astype(np.float64)),
            pos_weight=weight,
        )
        return float(loss), merged["label"], merged["prob"]
    return float(merged["loss_sum"].mean()), merged["label"], merged["prob"]


def _write_split_outputs(
    folder: Path,
    split: str,
    y: np.ndarray,
    p: np.ndarray,
    values: dict[str, float],
    *,
    threshold: float,
    epoch: int,
) -> None:
    """Confusion matrix PNG and classification report of one split (``values``: its metrics)."""
    from sklearn.metrics import classification_report

    counts = {k: int(values[k]) for k in ("tp", "fp", "tn", "fn")}
    plots.plot_confusion_matrix(
        counts,
        folder / f"{split}_cm.png",
        title=f"{split}, epoch {epoch} (threshold {threshold:g})",
    )
    report = classification_report(
        y,
        (p >= threshold).astype(int),
        labels=[0, 1],
        target_names=list(CLASS_NAMES),
        digits=3,
        zero_division=0,
    )
    header = (
        f"{split} set, epoch {epoch}, threshold {threshold:g}, n={len(y)}\n"
        f"ROC-AUC {values['roc_auc']:.4f}  PR-AUC {values['pr_auc']:.4f}  "
        f"sensitivity {values['sensitivity']:.4f}  specificity {values['specificity']:.4f}\n\n"
    )
    write_text_atomic(folder / f"{split}_report.txt", header + report)


def _check_run_folder(out_dir: Path, resume: bool) -> bool:
    """Whether a resume state exists; refuse to overwrite a finished or started run."""
    has_state = (out_dir / STATE_NAME).exists()
    if not resume and (has_state or (out_dir / "metrics.csv").exists()):
        raise ConfigError(
            f"{out_dir} already holds a training run; pass --resume to continue it "
            "or choose another --out folder."
        )
    if resume and not has_state:
        log.warning("nothing to resume in %s (no %s); starting at epoch 1", out_dir, STATE_NAME)
    return resume and has_state


def _drop_unreadable(
    rows: pd.DataFrame, failed: frozenset[str], what: str
) -> tuple[pd.DataFrame, list[str]]:
    mask = rows["study_key"].astype(str).isin(failed)
    dropped = rows.loc[mask, "study_key"].astype(str).tolist()
    if dropped:
        log.warning(
            "leaving %d %s studies out that cannot be read or are refused (see the cache "
            "manifest): %s",
            len(dropped),
            what,
            ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
        )
    return rows.loc[~mask].reset_index(drop=True), dropped


def _state_payload(
    *,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    use_amp: bool,
    best_score: float,
    best_epoch: int | None,
    history: Sequence[dict[str, float]],
    config: TrainConfig,
) -> dict[str, Any]:
    """Everything a resumed run needs, as copies (the model trains on after this)."""
    return {
        "epoch": epoch,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scaler": scaler.state_dict() if use_amp else {},
        "best_score": best_score,
        "best_epoch": best_epoch,
        "history": [dict(row) for row in history],
        "config": config.to_dict(),
        "rng": capture_rng_state(),
    }


def _loader_indices(loader: DataLoader) -> np.ndarray:
    """The dataset indices a sharded loader visits this epoch, in order (as batched)."""
    sampler = loader.sampler
    if not isinstance(sampler, dist_lib.ShardSampler):
        return np.arange(0)
    indices = sampler.indices()
    if loader.drop_last and loader.batch_size:
        indices = indices[: len(indices) // loader.batch_size * loader.batch_size]
    return indices


def _per_process(world: dist_lib.World) -> str:
    return f" per process ({world.size} processes)" if world.distributed else ""


def _n_validated(start: int, config: TrainConfig) -> int:
    last = config.epochs
    return sum(1 for e in range(start, last + 1) if e % config.val_every == 0 or e == last)


def train(
    *,
    registry: pd.DataFrame | Path | str,
    train_keys: Sequence[str] | Path | str,
    val_keys: Sequence[str] | Path | str,
    out_dir: Path | str,
    config: TrainConfig,
    cache_dir: Path | str | None = None,
    resume: bool = False,
    progress: bool = True,
    echo: Echo | None = None,
    after_step: StepHook | None = None,
) -> TrainResult:
    """Train r3d_18 on the train keys, validate on the val keys, write a run folder.

    Before the first epoch it states what the run folder will hold on disk; after
    the first few training batches it estimates the run's duration from their
    measured time (with advice when that is hours on a CPU); after every epoch it
    gives one line with the losses, the validation ROC-AUC with its 95% bootstrap
    interval, the epoch's time and the time still to go.

    Ctrl-C (KeyboardInterrupt) stops the run within a batch: the unfinished epoch
    is dropped, the resume state of the last finished epoch is on disk (written
    now when ``config.resume_state`` is ``"on_interrupt"``), and the function
    returns with ``interrupted=True``; ``resume=True`` continues from there.

    Launched by ``torchrun`` with ``WORLD_SIZE`` > 1, every process calls this:
    they join one process group (NCCL on CUDA, each on ``cuda:LOCAL_RANK``; gloo
    on the CPU), train the model under DistributedDataParallel on their shards
    (``config.batch_size`` studies per process and step), compute every metric on
    the whole set, and rank 0 alone builds the cache (the others wait), writes
    the run folder and echoes; the group is left at the end, also on errors and
    Ctrl-C. A stop request is then acted on at the end of a batch, when all
    processes know of it. A group the caller started is used and left running.

    Args:
        registry: registry frame or CSV path (``study_key``, ``path``, ``path_type``,
            ``label``; ``dataset`` is summarised when present).
        train_keys: study keys or a key-list file.
        val_keys: study keys or a key-list file.
        out_dir: the run folder (created; see the module docstring for its content).
        config: the training configuration.
        cache_dir: preprocessing cache; studies are cached first (in
            ``config.num_workers`` processes) and the ones that cannot be read or
            that ``predict`` refuses (a head CT) are left out with a warning.
            Without it every epoch decodes every study.
        resume: continue from ``out_dir/last_state.pth`` at the next epoch.
        progress: draw tqdm bars on stderr.
        echo: receives the lines meant for the user (estimate, epoch lines, disk
            use); default: this module's logger at INFO level. Rank 0 only.
        after_step: called after every optimisation step with ``(epoch, step,
            model)`` (the plain network, in every process).

    Returns:
        A :class:`TrainResult`.

    Raises:
        DatasetError: keys missing from the registry, train/val overlap, or a
            training set without both classes.
        ConfigError: invalid options, an existing run without ``resume``, a resume
            state made with other preprocessing, TensorBoard requested but missing.
        WeightsError: an unreadable Kinetics weight file.
    """
    from ..hardware import select_device

    world = dist_lib.world_from_env()
    device = dist_lib.process_device(world, select_device(config.device))
    with dist_lib.process_group(world, device):
        return _train(
            registry=registry,
            train_keys=train_keys,
            val_keys=val_keys,
            out_dir=Path(out_dir),
            config=config,
            cache_dir=cache_dir,
            resume=resume,
            progress=progress and world.is_main,
            say=(echo if echo is not None else log.info) if world.is_main else _silent,
            after_step=after_step,
            world=world,
            device=device,
        )


def _silent(line: str) -> None:
    """The echo of every process but rank 0."""


def _train(
    *,
    registry: pd.DataFrame | Path | str,
    train_keys: Sequence[str] | Path | str,
    val_keys: Sequence[str] | Path | str,
    out_dir: Path,
    config: TrainConfig,
    cache_dir: Path | str | None,
    resume: bool,
    progress: bool,
    say: Echo,
    after_step: StepHook | None,
    world: dist_lib.World,
    device: torch.device,
) -> TrainResult:
    """The body of :func:`train`, within the process group.

    Every process makes the same calls in the same order (several of them are
    collectives); rank 0 alone writes the run folder.
    """
    studies = _prepare_studies(
        registry=registry,
        train_keys=train_keys,
        val_keys=val_keys,
        out_dir=out_dir,
        config=config,
        cache_dir=cache_dir,
        resume=resume,
        progress=progress,
        say=say,
        world=world,
    )
    if studies is None:
        return TrainResult(out_dir, None, None, math.nan, 0, (), (), interrupted=True)
    run, standing = _build_run(
        studies,
        out_dir=out_dir,
        config=config,
        cache_dir=cache_dir,
        progress=progress,
        say=say,
        after_step=after_step,
        world=world,
        device=device,
    )
    epochs_left = _announce_run(run, studies, standing)
    estimate = _DurationEstimate(run, epochs_left=epochs_left, start_epoch=standing.start_epoch)
    interrupted = _run_epochs(run, standing, estimate)
    return _finish_run(run, standing, dropped=studies.dropped, interrupted=interrupted)


@dataclass(frozen=True)
class _Studies:
    """The studies a run trains and validates on, after caching and checks.

    Attributes:
        train_rows: registry rows of the training studies (readable ones only).
        val_rows: registry rows of the validation studies (readable ones only).
        dropped: keys of the studies left out because they could not be cached.
        n_pos: training studies with pathology (label 1).
        n_neg: normal training studies (label 0).
        resuming: the run folder holds a resume state to continue from (rank 0's
            folder decides for every process).
    """

    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    dropped: list[str]
    n_pos: int
    n_neg: int
    resuming: bool


def _prepare_studies(
    *,
    registry: pd.DataFrame | Path | str,
    train_keys: Sequence[str] | Path | str,
    val_keys: Sequence[str] | Path | str,
    out_dir: Path,
    config: TrainConfig,
    cache_dir: Path | str | None,
    resume: bool,
    progress: bool,
    say: Echo,
    world: dist_lib.World,
) -> _Studies | None:
    """Select the train and val studies, check the run folder, cache, check the classes.

    Collectives (every process calls them alike): the run folder check and the
    cache build, both done by rank 0 (:func:`dist_lib.run_on_main`). Rank 0 also
    creates ``out_dir``.

    Returns:
        The studies, or None when Ctrl-C stopped the cache build (said via ``say``;
        the studies cached so far are kept).

    Raises:
        DatasetError: keys missing from the registry, train/val overlap, a training
            set without both classes or an empty validation set.
        ConfigError: an existing run folder without ``resume``.
    """
    frame = read_registry_arg(registry)
    train_rows = select_rows(frame, read_keys_arg(train_keys), what="train")
    val_rows = select_rows(frame, read_keys_arg(val_keys), what="val")
    overlap = set(train_rows["study_key"].astype(str)) & set(val_rows["study_key"].astype(str))
    if overlap:
        raise DatasetError(
            f"{len(overlap)} studies are in both the train and the val list "
            f"(e.g. {sorted(overlap)[0]!r}); make the split again."
        )
    # Rank 0's run folder decides for all (other machines may not see it).
    resuming = dist_lib.run_on_main(lambda: _check_run_folder(out_dir, resume), world)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    dropped: list[str] = []
    if cache_dir is not None:
        both_rows = pd.concat([train_rows, val_rows], ignore_index=True)
        try:
            report = dist_lib.run_on_main(
                lambda: cache_lib.build_cache(
                    both_rows,
                    cache_dir,
                    config.preprocess,
                    workers=max(1, config.num_workers),
                    progress=progress,
                ),
                world,
            )
        except KeyboardInterrupt:
            say(
                "stopped by Ctrl-C while caching; the studies cached so far are kept, "
                "run the same command again to go on"
            )
            return None
        train_rows, lost_train = _drop_unreadable(train_rows, report.failed_keys, "train")
        val_rows, lost_val = _drop_unreadable(val_rows, report.failed_keys, "val")
        dropped = lost_train + lost_val
    n_pos = int((train_rows["label"] == 1).sum())
    n_neg = int((train_rows["label"] == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise DatasetError(
            f"the training set has {n_neg} normal and {n_pos} pathological studies; "
            "it needs both classes."
        )
    if len(val_rows) == 0:
        raise DatasetError("the validation set is empty; give val keys of readable studies.")
    if val_rows["label"].nunique() < 2:
        log.warning("the validation set holds one class only: ROC-AUC is undefined (nan)")
    return _Studies(train_rows, val_rows, dropped, n_pos, n_neg, resuming)


@dataclass
class _Standing:
    """Where a run stands: its finished epochs and the best of them.

    Attributes:
        history: one row per finished epoch (the rows of metrics.csv).
        best_score: validation ROC-AUC of the best epoch (-inf: none yet, or undefined).
        best_epoch: the best epoch; None before the first validated one.
        start_epoch: the first epoch this run trains (1, or the one after the resume state's).
        snapshot: rank 0's resume state of the last finished epoch, kept in memory and
            written on Ctrl-C (``resume_state="on_interrupt"``); None otherwise.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int | None = None
    start_epoch: int = 1
    snapshot: dict[str, Any] | None = None


def _restore_state(
    out_dir: Path,
    *,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    say: Echo,
    world: dist_lib.World,
) -> _Standing:
    """Load ``out_dir/last_state.pth`` into the network, optimizer, scaler and RNGs.

    A collective: rank 0 reads the state and sends it to the others
    (:func:`dist_lib.run_on_main`).

    Returns:
        The history, best epoch and score of the resumed run, starting at the epoch
        after the state's.

    Raises:
        ConfigError: the state was made with other preprocessing.
    """
    state_path = out_dir / STATE_NAME
    # Read by rank 0 and sent to the others: its folder need not be shared.
    state = dist_lib.run_on_main(lambda: load_train_state(state_path), world)
    saved = TrainConfig.from_dict(state["config"])
    if saved.preprocess != config.preprocess:
        raise ConfigError(
            f"cannot resume {out_dir}: it was trained with preprocessing "
            f"{saved.preprocess.describe()}, not {config.preprocess.describe()}; "
            "use the same window and shape or start a new run."
        )
    changed = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
    if changed:
        log.warning("resuming with changed options: %s", ", ".join(changed))
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    standing = _Standing(
        history=[dict(row) for row in state["history"]],
        best_score=float(state["best_score"]),
        best_epoch=state["best_epoch"],
        start_epoch=int(state["epoch"]) + 1,
    )
    say(f"resuming {out_dir} at epoch {standing.start_epoch}")
    return standing


@dataclass(frozen=True)
class _Run:
    """The objects a training run works with, made once before its first epoch.

    Attributes:
        config: the training configuration.
        out_dir: the run folder.
        world: the processes training together.
        device: this process's device.
        say: receives the lines for the user (silent in every process but rank 0).
        progress: draw tqdm bars.
        after_step: the caller's hook after every optimisation step, or None.
        net: the plain network (validated, saved, handed to ``after_step``).
        model: ``net`` or its DistributedDataParallel wrapper (the one trained).
        optimizer: AdamW over ``net``'s parameters.
        scaler: the mixed-precision gradient scaler (disabled without AMP).
        criterion: the (possibly ``pos_weight``-ed) BCE-with-logits loss.
        use_amp: mixed precision is on (CUDA only).
        pos_weight: the loss's weight of the positive class, or None.
        generator: the data-order and augmentation generator of the loaders,
            reseeded every epoch.
        train_loader: the training studies (this process's shard).
        val_loader: the validation studies (this process's shard).
        writer: the TensorBoard ``SummaryWriter`` (rank 0, when requested), or None.
        data_summary: the training data summary of the model cards.
    """

    config: TrainConfig
    out_dir: Path
    world: dist_lib.World
    device: torch.device
    say: Echo
    progress: bool
    after_step: StepHook | None
    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    use_amp: bool
    pos_weight: float | None
    generator: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader
    writer: Any
    data_summary: dict[str, Any]

    @property
    def state_path(self) -> Path:
        """The resume state, ``out_dir/last_state.pth``."""
        return self.out_dir / STATE_NAME


def _build_run(
    studies: _Studies,
    *,
    out_dir: Path,
    config: TrainConfig,
    cache_dir: Path | str | None,
    progress: bool,
    say: Echo,
    after_step: StepHook | None,
    world: dist_lib.World,
    device: torch.device,
) -> tuple[_Run, _Standing]:
    """Make the network, optimizer, loss and loaders; restore the resume state if any.

    Seeds the global generators with ``config.seed`` before building the network.
    Collectives: reading the resume state (:func:`_restore_state`) and the
    DistributedDataParallel wrap. Rank 0 opens TensorBoard (when requested) and
    writes ``config.json``.

    Returns:
        The run and where it stands (a fresh :class:`_Standing` unless resuming).
    """
    from ..model import build_model

    main = world.is_main
    writer = _open_tensorboard(out_dir) if config.tensorboard and main else None

    use_amp = bool(config.amp and device.type == "cuda")
    seed_everything(config.seed)
    kinetics = Path(config.kinetics_weights) if config.kinetics_weights else None
    net = build_model(kinetics_weights=kinetics).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pos_weight = None
    if config.balance in ("loss", "both"):
        pos_weight = torch.tensor(
            [studies.n_neg / studies.n_pos], dtype=torch.float32, device=device
        )
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    standing = _Standing()
    if studies.resuming:
        standing = _restore_state(
            out_dir,
            net=net,
            optimizer=optimizer,
            scaler=scaler,
            config=config,
            say=say,
            world=world,
        )
    # DDP starts every process from rank 0's weights (the same anyway: seed or resume state).
    model = dist_lib.wrap(net, world, device)
    if main:
        write_text_atomic(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    transform = augment_volume if config.augment else None
    # Only rank 0 fills missing cache entries; the others decode what they miss.
    train_set = StudyDataset(
        studies.train_rows,
        config.preprocess,
        cache_dir=cache_dir,
        transform=transform,
        fill_cache=main,
    )
    val_set = StudyDataset(
        studies.val_rows, config.preprocess, cache_dir=cache_dir, fill_cache=main
    )
    generator = torch.Generator()
    train_loader = _make_loader(
        train_set, config=config, train=True, generator=generator, device=device, world=world
    )
    val_loader = _make_loader(
        val_set, config=config, train=False, generator=generator, device=device, world=world
    )
    run = _Run(
        config=config,
        out_dir=out_dir,
        world=world,
        device=device,
        say=say,
        progress=progress,
        after_step=after_step,
        net=net,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        criterion=criterion,
        use_amp=use_amp,
        pos_weight=float(pos_weight.item()) if pos_weight is not None else None,
        generator=generator,
        train_loader=train_loader,
        val_loader=val_loader,
        writer=writer,
        data_summary=training_data_summary(
            studies.train_rows, studies.val_rows, studies.dropped, config.seed
        ),
    )
    return run, standing


def _announce_run(run: _Run, studies: _Studies, standing: _Standing) -> int:
    """Say what the run trains on and how much disk its folder will take.

    Returns:
        The number of epochs still to run.
    """
    config = run.config
    epochs_left = max(config.epochs - standing.start_epoch + 1, 0)
    run.say(
        f"training on {run.device}: {len(studies.train_rows)} train studies "
        f"({studies.n_pos} with pathology), "
        f"{len(studies.val_rows)} val, input {'x'.join(map(str, config.preprocess.shape))}, "
        f"{epochs_left} epoch(s) of {len(run.train_loader)} train + {len(run.val_loader)} val "
        f"batches{_per_process(run.world)}, balance={config.balance}"
        + (
            f" (pos_weight {studies.n_neg / studies.n_pos:.3f})"
            if run.pos_weight is not None
            else ""
        )
    )
    plan = progress_lib.disk_plan(
        sum(v.numel() for v in run.net.state_dict().values()),
        epochs=epochs_left,
        save_every_epoch=config.save_every_epoch,
        state_on_interrupt=config.resume_state == "on_interrupt",
    )
    run.say(progress_lib.disk_line(plan, str(run.out_dir)))
    return epochs_left


class _DurationEstimate:
    """Times the first training batches, then says once how long the run will take.

    An instance is the ``on_batch`` hook of the training passes (see :attr:`hook`)
    until it has said so.
    """

    def __init__(self, run: _Run, *, epochs_left: int, start_epoch: int) -> None:
        self.run = run
        self.epochs_left = epochs_left
        self.start_epoch = start_epoch
        self.batch_times: list[float] = []
        self.done = False

    @property
    def hook(self) -> BatchHook | None:
        """This estimate while it still times batches, else None."""
        return None if self.done else self

    def __call__(self, step: int, seconds: float) -> None:
        """Record the time of a training batch; say the estimate once it has enough."""
        config = self.run.config
        n_batches = len(self.run.train_loader)
        if self.done:
            return
        # The first batch of each loader worker pays for its start-up: not timed.
        if step > max(1, config.num_workers) or n_batches <= max(1, config.num_workers):
            self.batch_times.append(seconds)
        if len(self.batch_times) >= progress_lib.ESTIMATE_BATCHES or step == n_batches:
            self.done = True
            estimate = progress_lib.estimate_from_batches(
                self.batch_times,
                train_batches=n_batches,
                val_batches=len(self.run.val_loader),
                epochs_left=self.epochs_left,
                validated_epochs=_n_validated(self.start_epoch, config),
            )
            for line in progress_lib.estimate_lines(
                estimate, device=self.run.device.type, batch_size=config.batch_size
            ):
                self.run.say(line)


def _run_epochs(run: _Run, standing: _Standing, estimate: _DurationEstimate) -> bool:
    """Train, validate and record the epochs still to run, until the last or Ctrl-C.

    Args:
        run: the run.
        standing: where it stands; updated after every epoch.
        estimate: the duration estimate, fed by the first training batches.

    Returns:
        Whether Ctrl-C stopped the run (the unfinished epoch is then dropped and the
        last finished one's resume state is on disk).
    """
    config = run.config
    epoch_seconds: list[float] = []
    interrupted = False
    with stop_requests():
        try:
            for epoch in range(standing.start_epoch, config.epochs + 1):
                started = time.perf_counter()
                lr = _begin_epoch(run, epoch)
                folder = run.out_dir / "epochs" / f"epoch_{epoch:03d}"
                train_result = _split_pass(
                    run, "train", epoch=epoch, folder=folder, on_batch=estimate.hook
                )
                validate = epoch % config.val_every == 0 or epoch == config.epochs
                val_result = (
                    _split_pass(run, "val", epoch=epoch, folder=folder) if validate else None
                )
                row = _epoch_row(epoch, lr, train_result, val_result, started=started)
                is_best = _record_epoch(
                    run, standing, row, epoch=epoch, folder=folder, validated=validate
                )
                epoch_seconds.append(row["seconds"])
                left = config.epochs - epoch
                eta = sum(epoch_seconds) / len(epoch_seconds) * left if left else None
                run.say(
                    progress_lib.epoch_line(
                        row, epochs=config.epochs, eta_seconds=eta, best=is_best
                    )
                )
                # One that came while the epoch was recorded (all processes at once).
                if dist_lib.stop_agreed(run.world):
                    raise KeyboardInterrupt("stop requested")
        except KeyboardInterrupt:
            acknowledge_stop()
            interrupted = True
            _keep_stopped_run(run, standing)
        finally:
            if run.writer is not None:
                run.writer.close()
    return interrupted


def _begin_epoch(run: _Run, epoch: int) -> float:
    """Reseed the generators from ``(seed, epoch, rank)``, set the samplers' epoch and the lr.

    Returns:
        The epoch's learning rate.
    """
    epoch_seed = _epoch_seed(run.config.seed, epoch)
    # Each process its own augmentations; the data order is shared (samplers).
    seed_everything(epoch_seed + run.world.rank)
    run.generator.manual_seed(epoch_seed + run.world.rank)
    for loader in (run.train_loader, run.val_loader):
        if isinstance(loader.sampler, dist_lib.ShardSampler):
            loader.sampler.set_epoch(epoch_seed)
    lr = learning_rate(epoch, run.config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass(frozen=True)
class _SplitResult:
    """One split's pass of an epoch, over all processes.

    Attributes:
        loss: mean loss per study.
        labels: 0/1 per study.
        probs: predicted probabilities.
        metrics: :func:`metrics_lib.binary_metrics` at the configured threshold.
    """

    loss: float
    labels: np.ndarray
    probs: np.ndarray
    metrics: dict[str, float]


def _split_pass(
    run: _Run,
    split: str,
    *,
    epoch: int,
    folder: Path,
    on_batch: BatchHook | None = None,
) -> _SplitResult:
    """Run one pass over a split, gather it from all processes, score it, write its outputs.

    ``"train"`` trains ``run.model`` (calling ``on_batch`` and the caller's step
    hook) and then gives every process rank 0's batch norm statistics; ``"val"``
    evaluates ``run.net``. Collectives: :func:`combine_passes`, then after training
    :func:`dist_lib.sync_buffers`. Rank 0 writes the split's confusion matrix and
    report into ``folder``.

    Args:
        run: the run.
        split: ``"train"`` or ``"val"``.
        epoch: the epoch (from 1).
        folder: the epoch's output folder, ``epochs/epoch_XXX``.
        on_batch: the training pass's batch timing hook.

    Returns:
        The split's loss, labels, probabilities and metrics over all processes.
    """
    config = run.config
    training = split == "train"
    loader = run.train_loader if training else run.val_loader
    done = _run_epoch(
        run.model if training else run.net,
        loader,
        criterion=run.criterion,
        device=run.device,
        use_amp=run.use_amp,
        optimizer=run.optimizer if training else None,
        scaler=run.scaler if training else None,
        config=config,
        desc=f"epoch {epoch}/{config.epochs} {split}",
        progress=run.progress,
        on_batch=on_batch if training else None,
        on_step=_step_hook(run, epoch) if training else None,
        world=run.world,
    )
    loss, labels, probs = combine_passes(
        done,
        _loader_indices(loader),
        world=run.world,
        validation=not training,
        pos_weight=run.pos_weight,
    )
    if training:
        # Validation and the saved weights use rank 0's batch norm statistics.
        dist_lib.sync_buffers(run.net, run.world)
    metrics = metrics_lib.binary_metrics(labels, probs, config.threshold)
    if run.world.is_main:
        _write_split_outputs(
            folder, split, labels, probs, metrics, threshold=config.threshold, epoch=epoch
        )
    return _SplitResult(loss=loss, labels=labels, probs=probs, metrics=metrics)


def _step_hook(run: _Run, epoch: int) -> Callable[[int], None] | None:
    """The training pass's ``on_step``: ``run.after_step(epoch, step, run.net)``, or None."""
    after_step = run.after_step
    if after_step is None:
        return None
    net = run.net

    def on_step(step: int) -> None:
        after_step(epoch, step, net)

    return on_step


def _epoch_row(
    epoch: int,
    lr: float,
    trained: _SplitResult,
    validated: _SplitResult | None,
    *,
    started: float,
) -> dict[str, float]:
    """The epoch's metrics.csv row, in :data:`METRICS_COLUMNS` order.

    Args:
        epoch: the epoch.
        lr: its learning rate.
        trained: its training pass.
        validated: its validation pass; None when not validated (val columns nan).
        started: ``time.perf_counter()`` at the epoch's start, for ``seconds``
            (taken after the bootstrap interval of the validation ROC-AUC).

    Returns:
        The row.
    """
    row: dict[str, float] = {"epoch": epoch, "lr": lr, "train_loss": trained.loss}
    row.update({f"train_{m}": float(trained.metrics[m]) for m in EPOCH_METRICS})
    va: dict[str, float] = {}
    ci = (math.nan, math.nan)
    if validated is not None:
        va = validated.metrics
        row["val_loss"] = validated.loss
        ci = metrics_lib.bootstrap_ci(
            validated.labels,
            validated.probs,
            metrics_lib.roc_auc,
            n_boot=VAL_CI_BOOT,
            seed=epoch,
        )
    else:
        row["val_loss"] = math.nan
    row.update({f"val_{m}": float(va.get(m, math.nan)) for m in EPOCH_METRICS})
    row["val_roc_auc_ci_low"], row["val_roc_auc_ci_high"] = ci
    row["seconds"] = time.perf_counter() - started
    return row


def _record_epoch(
    run: _Run,
    standing: _Standing,
    row: dict[str, float],
    *,
    epoch: int,
    folder: Path,
    validated: bool,
) -> bool:
    """Keep a finished epoch: checkpoints, resume state, history, plot, TensorBoard.

    Every process updates ``standing`` alike; rank 0 alone writes files, in this
    order: the checkpoint(s), the resume state (or its in-memory snapshot), the
    history, the learning curves.

    Args:
        run: the run.
        standing: where it stands; its best epoch and history are updated.
        row: the epoch's metrics.csv row.
        epoch: the epoch.
        folder: the epoch's output folder, ``epochs/epoch_XXX``.
        validated: the epoch was validated (only then can it be the best).

    Returns:
        Whether the epoch is the best so far.
    """
    is_best = _save_checkpoints(run, standing, row, epoch=epoch, folder=folder, validated=validated)
    standing.history.append(row)
    if run.world.is_main:
        _save_progress(run, standing, epoch=epoch)
    if run.writer is not None:
        _log_scalars(run.writer, row, epoch=epoch)
    return is_best


def _save_checkpoints(
    run: _Run,
    standing: _Standing,
    row: dict[str, float],
    *,
    epoch: int,
    folder: Path,
    validated: bool,
) -> bool:
    """Save the epoch's checkpoint(s) and make it the best epoch when it is.

    An epoch validated with a higher ROC-AUC than the best so far (or the first
    validated one) is the best. Rank 0 writes ``epochs/epoch_XXX/weights.pth``
    with ``save_every_epoch`` (``best.pth`` then a link to or a copy of it), else
    ``best.pth`` for the best epoch only.

    Returns:
        Whether the epoch is the best so far.
    """
    from ..weights import save_checkpoint

    config, main = run.config, run.world.is_main
    card = ModelCard(
        preprocess=config.preprocess,
        threshold=config.threshold,
        validation_metrics={
            "epoch": epoch,
            "val_loss": row["val_loss"],
            **{m: row[f"val_{m}"] for m in EPOCH_METRICS},
        },
        training_data=run.data_summary,
        train_config=config.to_dict(),
        threshold_rule="default",
    )
    score = row["val_roc_auc"]
    score = score if math.isfinite(score) else -math.inf
    is_best = validated and (standing.best_epoch is None or score > standing.best_score)
    if main and config.save_every_epoch:
        weights_path = folder / "weights.pth"
        save_checkpoint(weights_path, run.net, card)
        if is_best:
            link_or_copy(weights_path, run.out_dir / BEST_NAME)
    elif main and is_best:
        save_checkpoint(run.out_dir / BEST_NAME, run.net, card)
    if is_best:
        standing.best_score, standing.best_epoch = score, epoch
    return is_best


def _save_progress(run: _Run, standing: _Standing, *, epoch: int) -> None:
    """Rank 0: the resume state (or its snapshot), metrics.csv/.jsonl, learning_curves.png."""
    config = run.config
    # The resume state first, the history after: a Ctrl-C between the two
    # leaves a state that knows the epoch, never a history ahead of the state.
    payload = _state_payload(
        epoch=epoch,
        model=run.net,
        optimizer=run.optimizer,
        scaler=run.scaler,
        use_amp=run.use_amp,
        best_score=standing.best_score,
        best_epoch=standing.best_epoch,
        history=standing.history,
        config=config,
    )
    if config.resume_state == "every_epoch":
        save_train_state(run.state_path, payload)
    else:
        standing.snapshot = payload
    write_history(run.out_dir, standing.history)
    plots.plot_learning_curves(run.out_dir / "metrics.csv", run.out_dir / "learning_curves.png")


def _log_scalars(writer: Any, row: dict[str, float], *, epoch: int) -> None:
    """The row's finite values as TensorBoard scalars (``train_loss`` -> ``train/loss``)."""
    for key, value in row.items():
        if key != "epoch" and math.isfinite(value):
            writer.add_scalar(key.replace("_", "/", 1), value, epoch)
    writer.flush()


def _keep_stopped_run(run: _Run, standing: _Standing) -> None:
    """After Ctrl-C: write the in-memory snapshot, if any, and say what can be resumed."""
    state_path = run.state_path
    if standing.snapshot is not None:
        save_train_state(state_path, standing.snapshot)
    done = int(standing.history[-1]["epoch"]) if standing.history else standing.start_epoch - 1
    if standing.snapshot is not None:
        done = int(standing.snapshot["epoch"])
    if done >= 1 and state_path.exists():
        run.say(
            f"stopped by Ctrl-C during epoch {done + 1}; the run up to epoch {done} is "
            f"kept in {state_path}: add --resume to the same command to continue"
        )
    else:
        run.say("stopped by Ctrl-C before the first epoch finished; there is nothing to resume")


def _finish_run(
    run: _Run, standing: _Standing, *, dropped: Sequence[str], interrupted: bool
) -> TrainResult:
    """Remove a stale on-interrupt resume state, say the folder's size, sum the run up."""
    main = run.world.is_main
    state_path = run.state_path
    if (
        main
        and not interrupted
        and run.config.resume_state == "on_interrupt"
        and state_path.exists()
    ):
        # A state left by an earlier Ctrl-C describes an epoch this run has passed.
        state_path.unlink()

    best_path = run.out_dir / BEST_NAME
    if main:
        run.say(f"{run.out_dir} holds {format_bytes(folder_bytes(run.out_dir))}")
    history = standing.history
    return TrainResult(
        out_dir=run.out_dir,
        best_path=best_path if best_path.exists() else None,
        best_epoch=standing.best_epoch,
        best_val_roc_auc=standing.best_score if math.isfinite(standing.best_score) else math.nan,
        last_epoch=int(history[-1]["epoch"]) if history else 0,
        history=tuple(history),
        dropped_keys=tuple(dropped),
        interrupted=interrupted,
    )
