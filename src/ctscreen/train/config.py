"""The training configuration: one frozen dataclass, a JSON file, CLI overrides.

Resolution order (later wins): defaults -> ``--config file.json`` -> command-line
flags. The resolved configuration is written to ``<run>/config.json`` and into
every checkpoint's model card. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig
from ..errors import ConfigError

BALANCE_CHOICES: tuple[str, ...] = ("none", "loss", "sampler", "both")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
#: When the resume state is written: after every epoch, or only when the run is stopped.
RESUME_STATE_CHOICES: tuple[str, ...] = ("every_epoch", "on_interrupt")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a model is trained.

    Attributes:
        epochs: number of passes over the training set.
        batch_size: studies per optimisation step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW decoupled weight decay.
        balance: class-imbalance handling: ``"loss"`` weights positives in the
            BCE loss by n_neg/n_pos, ``"sampler"`` draws studies with a
            WeightedRandomSampler so both classes are seen equally often,
            ``"both"`` does both (over-corrects; rarely wanted), ``"none"``.
        amp: mixed precision (float16 autocast + GradScaler); used on CUDA only.
        seed: seed of torch, numpy, random and the data order.
        num_workers: DataLoader worker processes (and cache-building processes).
        augment: light 3D augmentation of training studies
            (:mod:`ctscreen.train.augment`).
        preprocess: HU window and input shape; stored with every checkpoint.
        kinetics_weights: optional local Kinetics-400 r3d_18 weight file to start from.
        tensorboard: also log to TensorBoard (needs the ``tensorboard`` package).
        val_every: validate every N epochs (the last epoch is always validated).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (per epoch, after warm-up).
        warmup_epochs: epochs of linear warm-up from lr/10 (0 disables).
        max_grad_norm: clip the gradient norm to this value (None disables).
        threshold: decision threshold stored in the per-epoch checkpoints and
            used for the threshold-dependent epoch metrics.
        log_every: log a running training loss every N steps.
        save_every_epoch: keep ``epochs/epoch_XXX/weights.pth`` for every epoch
            (one full checkpoint each, ~130 MB); by default only ``best.pth`` and
            the resume state are kept, as in timm and nanoGPT run folders.
        resume_state: ``"every_epoch"`` rewrites ``last_state.pth`` (weights and
            AdamW moments, ~3x a checkpoint) after each epoch, so a crash loses at
            most one epoch; ``"on_interrupt"`` keeps the last finished epoch's state
            in memory and writes it only when the run is stopped with Ctrl-C (short
            runs such as the demo, where disk matters more).
    """

    epochs: int = 30
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-2
    balance: str = "loss"
    amp: bool = True
    seed: int = 42
    num_workers: int = 2
    augment: bool = True
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    kinetics_weights: str | None = None
    tensorboard: bool = False
    val_every: int = 1
    device: str = "auto"
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    max_grad_norm: float | None = None
    threshold: float = 0.5
    log_every: int = 10
    save_every_epoch: bool = False
    resume_state: str = "every_epoch"

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):
            object.__setattr__(self, "preprocess", PreprocessConfig.from_dict(self.preprocess))
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (
                self.balance in BALANCE_CHOICES,
                f"balance must be one of {', '.join(BALANCE_CHOICES)}, got {self.balance!r}",
            ),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.val_every >= 1, f"val_every must be at least 1, got {self.val_every}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
            ),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (
                self.max_grad_norm is None or self.max_grad_norm > 0,
                f"max_grad_norm must be positive or null, got {self.max_grad_norm}",
            ),
            (0.0 <= self.threshold <= 1.0, f"threshold must lie in [0, 1], got {self.threshold}"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
            (
                self.resume_state in RESUME_STATE_CHOICES,
                f"resume_state must be one of {', '.join(RESUME_STATE_CHOICES)}, "
                f"got {self.resume_state!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (JSON- and ``weights_only``-safe)."""
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict; unknown keys are an error (typos do not pass silently).

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {unknown}; expected some of {sorted(known)}."
            )
        kwargs = dict(data)
        if isinstance(kwargs.get("preprocess"), dict):
            kwargs["preprocess"] = PreprocessConfig.from_dict(kwargs["preprocess"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"invalid training configuration: {exc}.") from exc

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def load_train_config(path: Path | str) -> TrainConfig:
    """Read a training configuration from a JSON file.

    The file may hold any subset of :class:`TrainConfig` fields; ``preprocess``
    may itself be partial (missing keys take the defaults).

    Raises:
        ConfigError: the file is missing, not JSON, or holds invalid values.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"training config {path} does not exist; check the path.") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"training config {path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path} must hold a JSON object of options.")
    if isinstance(data.get("preprocess"), dict):
        data["preprocess"] = {**PreprocessConfig().to_dict(), **data["preprocess"]}
    return TrainConfig.from_dict(data)


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """Apply the overrides that are not None (e.g. flags the user gave).

    ``window_level``, ``window_width`` and ``shape`` are applied to ``preprocess``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    pre_keys = {"window_level", "window_width", "shape"}
    pre = {k: given.pop(k) for k in list(given) if k in pre_keys}
    if pre:
        pre_dict = {**config.preprocess.to_dict(), **pre}
        given["preprocess"] = PreprocessConfig.from_dict(pre_dict)
    unknown = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}.")
    return config.replace(**given) if given else config


def learning_rate(epoch: int, config: TrainConfig) -> float:
    """Learning rate of a (1-based) epoch: linear warm-up from lr/10, then constant or cosine.

    The cosine schedule decays to lr/100 at the last epoch.
    """
    if config.warmup_epochs and epoch <= config.warmup_epochs:
        return config.lr * (0.1 + 0.9 * (epoch - 1) / config.warmup_epochs)
    if config.lr_schedule == "constant":
        return config.lr
    import math

    span = max(config.epochs - config.warmup_epochs - 1, 1)
    progress = min(max(epoch - config.warmup_epochs - 1, 0) / span, 1.0)
    floor = config.lr / 100.0
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))
