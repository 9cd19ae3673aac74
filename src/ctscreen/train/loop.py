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
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from ..card import CLASS_NAMES, ModelCard
from ..data import cache as cache_lib
from ..data.dataset import StudyDataset, select_rows
from ..errors import ConfigError, DatasetError
from ..fileio import folder_bytes, format_bytes, json_safe, write_text_atomic
from ..interrupts import (
    acknowledge_stop,
    interruptible,
    raise_if_stop_requested,
    stop_requests,
)
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


def _make_loader(
    dataset: StudyDataset,
    *,
    config: TrainConfig,
    train: bool,
    generator: torch.Generator,
    device: torch.device,
) -> DataLoader:
    sampler = None
    shuffle = False
    n = len(dataset)
    if train:
        if config.balance in ("sampler", "both"):
            counts = np.bincount(dataset.labels, minlength=2).astype(np.float64)
            weights = 1.0 / counts[dataset.labels]
            sampler = WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double),
                num_samples=n,
                replacement=True,
                generator=generator,
            )
        else:
            shuffle = True
    # A last batch of one study makes batch norm statistics degenerate; drop it.
    drop_last = train and n > config.batch_size and n % config.batch_size == 1
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
    )


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
) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass over ``loader``; trains when ``optimizer`` is given.

    Args:
        on_batch: called after every batch with ``(step, seconds)``, the time of
            that batch (data loading included).

    Returns:
        ``(mean loss per study, labels, probabilities)``.
    """
    from tqdm.auto import tqdm

    training = optimizer is not None
    model.train(training)
    total_loss, seen = 0.0, 0
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    tick = time.perf_counter()
    with torch.set_grad_enabled(training):
        for step, (x, y) in enumerate(bar, start=1):
            # Ctrl-C stops within the batch's computation; elsewhere (loading, the
            # loader starting its workers) it waits for the next batch (interrupts.py).
            with interruptible():
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
            batch = int(y.shape[0])
            total_loss += float(loss.detach()) * batch
            seen += batch
            labels.append(y.detach().view(-1).cpu().numpy())
            probs.append(torch.sigmoid(logits.detach().float()).view(-1).cpu().numpy())
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            if training and step % config.log_every == 0:
                log.debug("%s step %d: running loss %.4f", desc, step, total_loss / seen)
            now = time.perf_counter()
            if on_batch is not None:
                on_batch(step, now - tick)
            tick = now
    bar.close()
    if seen == 0:
        raise DatasetError(f"the {desc} pass saw no study; check the split and the batch size.")
    y_all = np.concatenate(labels).astype(int)
    p_all = np.concatenate(probs).astype(np.float64)
    return total_loss / seen, y_all, p_all


def _write_split_outputs(
    folder: Path, split: str, y: np.ndarray, p: np.ndarray, *, threshold: float, epoch: int
) -> dict[str, float]:
    """Confusion matrix PNG and classification report of one split; returns its metrics."""
    from sklearn.metrics import classification_report

    values = metrics_lib.binary_metrics(y, p, threshold)
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
    return values


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
            use); default: this module's logger at INFO level.

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
    from ..model import build_model
    from ..weights import save_checkpoint

    say: Echo = echo if echo is not None else log.info
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    frame = read_registry_arg(registry)
    train_rows = select_rows(frame, read_keys_arg(train_keys), what="train")
    val_rows = select_rows(frame, read_keys_arg(val_keys), what="val")
    overlap = set(train_rows["study_key"].astype(str)) & set(val_rows["study_key"].astype(str))
    if overlap:
        raise DatasetError(
            f"{len(overlap)} studies are in both the train and the val list "
            f"(e.g. {sorted(overlap)[0]!r}); make the split again."
        )
    resuming = _check_run_folder(out_dir, resume)
    out_dir.mkdir(parents=True, exist_ok=True)

    dropped: list[str] = []
    if cache_dir is not None:
        try:
            report = cache_lib.build_cache(
                pd.concat([train_rows, val_rows], ignore_index=True),
                cache_dir,
                config.preprocess,
                workers=max(1, config.num_workers),
                progress=progress,
            )
        except KeyboardInterrupt:
            say(
                "stopped by Ctrl-C while caching; the studies cached so far are kept, "
                "run the same command again to go on"
            )
            return TrainResult(out_dir, None, None, math.nan, 0, (), (), interrupted=True)
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
    writer = _open_tensorboard(out_dir) if config.tensorboard else None

    device = select_device(config.device)
    use_amp = bool(config.amp and device.type == "cuda")
    seed_everything(config.seed)
    kinetics = Path(config.kinetics_weights) if config.kinetics_weights else None
    model = build_model(kinetics_weights=kinetics).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pos_weight = None
    if config.balance in ("loss", "both"):
        pos_weight = torch.tensor([n_neg / n_pos], dtype=torch.float32, device=device)
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    history: list[dict[str, float]] = []
    best_score, best_epoch = -math.inf, None
    start_epoch = 1
    if resuming:
        state = load_train_state(state_path)
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
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        history = [dict(row) for row in state["history"]]
        best_score = float(state["best_score"])
        best_epoch = state["best_epoch"]
        start_epoch = int(state["epoch"]) + 1
        say(f"resuming {out_dir} at epoch {start_epoch}")
    write_text_atomic(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    transform = augment_volume if config.augment else None
    train_set = StudyDataset(
        train_rows, config.preprocess, cache_dir=cache_dir, transform=transform
    )
    val_set = StudyDataset(val_rows, config.preprocess, cache_dir=cache_dir)
    generator = torch.Generator()
    train_loader = _make_loader(
        train_set, config=config, train=True, generator=generator, device=device
    )
    val_loader = _make_loader(
        val_set, config=config, train=False, generator=generator, device=device
    )
    data_summary = training_data_summary(train_rows, val_rows, dropped, config.seed)
    epochs_left = max(config.epochs - start_epoch + 1, 0)
    say(
        f"training on {device}: {len(train_rows)} train studies ({n_pos} with pathology), "
        f"{len(val_rows)} val, input {'x'.join(map(str, config.preprocess.shape))}, "
        f"{epochs_left} epoch(s) of {len(train_loader)} train + {len(val_loader)} val "
        f"batches, balance={config.balance}"
        + (f" (pos_weight {n_neg / n_pos:.3f})" if pos_weight is not None else "")
    )
    plan = progress_lib.disk_plan(
        sum(v.numel() for v in model.state_dict().values()),
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
    with stop_requests():
        try:
            for epoch in range(start_epoch, config.epochs + 1):
                started = time.perf_counter()
                epoch_seed = _epoch_seed(config.seed, epoch)
                seed_everything(epoch_seed)
                generator.manual_seed(epoch_seed)
                lr = learning_rate(epoch, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                common = {
                    "criterion": criterion,
                    "device": device,
                    "use_amp": use_amp,
                    "config": config,
                    "progress": progress,
                }
                train_loss, y_tr, p_tr = _run_epoch(
                    model,
                    train_loader,
                    optimizer=optimizer,
                    scaler=scaler,
                    desc=f"epoch {epoch}/{config.epochs} train",
                    on_batch=None if estimated else time_first_batches,
                    **common,
                )
                folder = out_dir / "epochs" / f"epoch_{epoch:03d}"
                row: dict[str, float] = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
                tr = _write_split_outputs(
                    folder, "train", y_tr, p_tr, threshold=config.threshold, epoch=epoch
                )
                row.update({f"train_{m}": float(tr[m]) for m in EPOCH_METRICS})
                validate = epoch % config.val_every == 0 or epoch == config.epochs
                va: dict[str, float] = {}
                ci = (math.nan, math.nan)
                if validate:
                    val_loss, y_va, p_va = _run_epoch(
                        model,
                        val_loader,
                        optimizer=None,
                        scaler=None,
                        desc=f"epoch {epoch}/{config.epochs} val",
                        **common,
                    )
                    va = _write_split_outputs(
                        folder, "val", y_va, p_va, threshold=config.threshold, epoch=epoch
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
                if config.save_every_epoch:
                    weights_path = folder / "weights.pth"
                    save_checkpoint(weights_path, model, card)
                    if is_best:
                        link_or_copy(weights_path, out_dir / BEST_NAME)
                elif is_best:
                    save_checkpoint(out_dir / BEST_NAME, model, card)
                if is_best:
                    best_score, best_epoch = score, epoch

                # The resume state first, the history after: a Ctrl-C between the two
                # leaves a state that knows the epoch, never a history ahead of the state.
                payload = _state_payload(
                    epoch=epoch,
                    model=model,
                    optimizer=optimizer,
                    scaler=scaler,
                    use_amp=use_amp,
                    best_score=best_score,
                    best_epoch=best_epoch,
                    history=[*history, row],
                    config=config,
                )
                if config.resume_state == "every_epoch":
                    save_train_state(state_path, payload)
                else:
                    snapshot = payload
                history.append(row)
                write_history(out_dir, history)
                plots.plot_learning_curves(out_dir / "metrics.csv", out_dir / "learning_curves.png")
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
                raise_if_stop_requested()  # one that came while the epoch was recorded
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
    if not interrupted and config.resume_state == "on_interrupt" and state_path.exists():
        # A state left by an earlier Ctrl-C describes an epoch this run has passed.
        state_path.unlink()

    best_path = out_dir / BEST_NAME
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
