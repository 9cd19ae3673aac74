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
            "leaving %d unreadable %s studies out (see the cache manifest): %s",
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
            ``config.num_workers`` processes) and unreadable ones are left out with
            a warning. Without it every epoch decodes every study.
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
    """The body of :func:`train`, within the process group."""
    from ..model import build_model
    from ..weights import save_checkpoint

    main = world.is_main
    state_path = out_dir / STATE_NAME
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
    train_rows, val_rows, dropped = studies.train_rows, studies.val_rows, studies.dropped
    n_pos, n_neg, resuming = studies.n_pos, studies.n_neg, studies.resuming
    writer = _open_tensorboard(out_dir) if config.tensorboard and main else None

    use_amp = bool(config.amp and device.type == "cuda")
    seed_everything(config.seed)
    kinetics = Path(config.kinetics_weights) if config.kinetics_weights else None
    net = build_model(kinetics_weights=kinetics).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pos_weight = None
    if config.balance in ("loss", "both"):
        pos_weight = torch.tensor([n_neg / n_pos], dtype=torch.float32, device=device)
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    standing = _Standing()
    if resuming:
        standing = _restore_state(
            out_dir,
            net=net,
            optimizer=optimizer,
            scaler=scaler,
            config=config,
            say=say,
            world=world,
        )
    history = standing.history
    best_score, best_epoch = standing.best_score, standing.best_epoch
    start_epoch = standing.start_epoch
    # DDP starts every process from rank 0's weights (the same anyway: seed or resume state).
    model = dist_lib.wrap(net, world, device)
    if main:
        write_text_atomic(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    transform = augment_volume if config.augment else None
    # Only rank 0 fills missing cache entries; the others decode what they miss.
    train_set = StudyDataset(
        train_rows, config.preprocess, cache_dir=cache_dir, transform=transform, fill_cache=main
    )
    val_set = StudyDataset(val_rows, config.preprocess, cache_dir=cache_dir, fill_cache=main)
    generator = torch.Generator()
    train_loader = _make_loader(
        train_set, config=config, train=True, generator=generator, device=device, world=world
    )
    val_loader = _make_loader(
        val_set, config=config, train=False, generator=generator, device=device, world=world
    )
    data_summary = training_data_summary(train_rows, val_rows, dropped, config.seed)
    epochs_left = max(config.epochs - start_epoch + 1, 0)
    say(
        f"training on {device}: {len(train_rows)} train studies ({n_pos} with pathology), "
        f"{len(val_rows)} val, input {'x'.join(map(str, config.preprocess.shape))}, "
        f"{epochs_left} epoch(s) of {len(train_loader)} train + {len(val_loader)} val "
        f"batches{_per_process(world)}, balance={config.balance}"
        + (f" (pos_weight {n_neg / n_pos:.3f})" if pos_weight is not None else "")
    )
    plan = progress_lib.disk_plan(
        sum(v.numel() for v in net.state_dict().values()),
        epochs=epochs_left,
        save_every_epoch=config.save_every_epoch,
        state_on_interrupt=config.resume_state == "on_interrupt",
    )
    say(progress_lib.disk_line(plan, str(out_dir)))

    batch_times: list[float] = []
    estimated = False

    def time_first_batches(step: int, seconds: float) -> None:
        nonlocal estimated
        n_batches = len(train_loader)
        if estimated:
            return
        # The first batch of each loader worker pays for its start-up: not timed.
        if step > max(1, config.num_workers) or n_batches <= max(1, config.num_workers):
            batch_times.append(seconds)
        if len(batch_times) >= progress_lib.ESTIMATE_BATCHES or step == n_batches:
            estimated = True
            estimate = progress_lib.estimate_from_batches(
                batch_times,
                train_batches=n_batches,
                val_batches=len(val_loader),
                epochs_left=epochs_left,
                validated_epochs=_n_validated(start_epoch, config),
            )
            for line in progress_lib.estimate_lines(
                estimate, device=device.type, batch_size=config.batch_size
            ):
                say(line)

    epoch_seconds: list[float] = []
    snapshot: dict[str, Any] | None = None
    interrupted = False
    pos_weight_value = float(pos_weight.item()) if pos_weight is not None else None
    with stop_requests():
        try:
            for epoch in range(start_epoch, config.epochs + 1):
                started = time.perf_counter()
                epoch_seed = _epoch_seed(config.seed, epoch)
                # Each process its own augmentations; the data order is shared (samplers).
                seed_everything(epoch_seed + world.rank)
                generator.manual_seed(epoch_seed + world.rank)
                for loader in (train_loader, val_loader):
                    if isinstance(loader.sampler, dist_lib.ShardSampler):
                        loader.sampler.set_epoch(epoch_seed)
                lr = learning_rate(epoch, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                common = {
                    "criterion": criterion,
                    "device": device,
                    "use_amp": use_amp,
                    "config": config,
                    "progress": progress,
                    "world": world,
                }
                step_hook = (
                    None
                    if after_step is None
                    else lambda step, epoch=epoch: after_step(epoch, step, net)
                )
                train_pass = _run_epoch(
                    model,
                    train_loader,
                    optimizer=optimizer,
                    scaler=scaler,
                    desc=f"epoch {epoch}/{config.epochs} train",
                    on_batch=None if estimated else time_first_batches,
                    on_step=step_hook,
                    **common,
                )
                train_loss, y_tr, p_tr = combine_passes(
                    train_pass,
                    _loader_indices(train_loader),
                    world=world,
                    validation=False,
                    pos_weight=pos_weight_value,
                )
                # Validation and the saved weights use rank 0's batch norm statistics.
                dist_lib.sync_buffers(net, world)
                folder = out_dir / "epochs" / f"epoch_{epoch:03d}"
                row: dict[str, float] = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
                tr = metrics_lib.binary_metrics(y_tr, p_tr, config.threshold)
                if main:
                    _write_split_outputs(
                        folder, "train", y_tr, p_tr, tr, threshold=config.threshold, epoch=epoch
                    )
                row.update({f"train_{m}": float(tr[m]) for m in EPOCH_METRICS})
                validate = epoch % config.val_every == 0 or epoch == config.epochs
                va: dict[str, float] = {}
                ci = (math.nan, math.nan)
                if validate:
                    val_pass = _run_epoch(
                        net,
                        val_loader,
                        optimizer=None,
                        scaler=None,
                        desc=f"epoch {epoch}/{config.epochs} val",
                        **common,
                    )
                    val_loss, y_va, p_va = combine_passes(
                        val_pass,
                        _loader_indices(val_loader),
                        world=world,
                        validation=True,
                        pos_weight=pos_weight_value,
                    )
                    va = metrics_lib.binary_metrics(y_va, p_va, config.threshold)
                    if main:
                        _write_split_outputs(
                            folder, "val", y_va, p_va, va, threshold=config.threshold, epoch=epoch
                        )
                    row["val_loss"] = val_loss
                    ci = metrics_lib.bootstrap_ci(
                        y_va, p_va, metrics_lib.roc_auc, n_boot=VAL_CI_BOOT, seed=epoch
                    )
                else:
                    row["val_loss"] = math.nan
                row.update({f"val_{m}": float(va.get(m, math.nan)) for m in EPOCH_METRICS})
                row["val_roc_auc_ci_low"], row["val_roc_auc_ci_high"] = ci
                row["seconds"] = time.perf_counter() - started

                card = ModelCard(
                    preprocess=config.preprocess,
                    threshold=config.threshold,
                    validation_metrics={
                        "epoch": epoch,
                        "val_loss": row["val_loss"],
                        **{m: row[f"val_{m}"] for m in EPOCH_METRICS},
                    },
                    training_data=data_summary,
                    train_config=config.to_dict(),
                    threshold_rule="default",
                )
                score = row["val_roc_auc"]
                score = score if math.isfinite(score) else -math.inf
                is_best = validate and (best_epoch is None or score > best_score)
                if main and config.save_every_epoch:
                    weights_path = folder / "weights.pth"
                    save_checkpoint(weights_path, net, card)
                    if is_best:
                        link_or_copy(weights_path, out_dir / BEST_NAME)
                elif main and is_best:
                    save_checkpoint(out_dir / BEST_NAME, net, card)
                if is_best:
                    best_score, best_epoch = score, epoch

                history.append(row)
                if main:
                    # The resume state first, the history after: a Ctrl-C between the two
                    # leaves a state that knows the epoch, never a history ahead of the state.
                    payload = _state_payload(
                        epoch=epoch,
                        model=net,
                        optimizer=optimizer,
                        scaler=scaler,
                        use_amp=use_amp,
                        best_score=best_score,
                        best_epoch=best_epoch,
                        history=history,
                        config=config,
                    )
                    if config.resume_state == "every_epoch":
                        save_train_state(state_path, payload)
                    else:
                        snapshot = payload
                    write_history(out_dir, history)
                    plots.plot_learning_curves(
                        out_dir / "metrics.csv", out_dir / "learning_curves.png"
                    )
                if writer is not None:
                    for key, value in row.items():
                        if key != "epoch" and math.isfinite(value):
                            writer.add_scalar(key.replace("_", "/", 1), value, epoch)
                    writer.flush()
                epoch_seconds.append(row["seconds"])
                left = config.epochs - epoch
                eta = sum(epoch_seconds) / len(epoch_seconds) * left if left else None
                say(
                    progress_lib.epoch_line(
                        row, epochs=config.epochs, eta_seconds=eta, best=is_best
                    )
                )
                # One that came while the epoch was recorded (all processes at once).
                if dist_lib.stop_agreed(world):
                    raise KeyboardInterrupt("stop requested")
        except KeyboardInterrupt:
            acknowledge_stop()
            interrupted = True
            if snapshot is not None:
                save_train_state(state_path, snapshot)
            done = int(history[-1]["epoch"]) if history else start_epoch - 1
            if snapshot is not None:
                done = int(snapshot["epoch"])
            if done >= 1 and state_path.exists():
                say(
                    f"stopped by Ctrl-C during epoch {done + 1}; the run up to epoch {done} is "
                    f"kept in {state_path}: add --resume to the same command to continue"
                )
            else:
                say("stopped by Ctrl-C before the first epoch finished; there is nothing to resume")
        finally:
            if writer is not None:
                writer.close()
    if main and not interrupted and config.resume_state == "on_interrupt" and state_path.exists():
        # A state left by an earlier Ctrl-C describes an epoch this run has passed.
        state_path.unlink()

    best_path = out_dir / BEST_NAME
    if main:
        say(f"{out_dir} holds {format_bytes(folder_bytes(out_dir))}")
    return TrainResult(
        out_dir=out_dir,
        best_path=best_path if best_path.exists() else None,
        best_epoch=best_epoch,
        best_val_roc_auc=best_score if math.isfinite(best_score) else math.nan,
        last_epoch=int(history[-1]["epoch"]) if history else 0,
        history=tuple(history),
        dropped_keys=tuple(dropped),
        interrupted=interrupted,
    )
