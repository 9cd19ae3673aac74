"""``ctscreen train``: train r3d_18 on a registry split and write a run folder.

Options resolve as defaults -> ``--config file.json`` -> flags; the resolved set is
written to ``<out>/config.json`` and into every checkpoint. See
:mod:`ctscreen.train.loop` for the run folder layout.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from .cache import add_preprocess_arguments
from .exit_codes import EXIT_INTERRUPTED, EXIT_OK
from .types import non_negative_int, positive_float, positive_int

BALANCE_CHOICES = ("none", "loss", "sampler", "both")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``train`` command."""
    p = subparsers.add_parser(
        "train",
        help="train the model on a registry split",
        description=(
            "Train r3d_18 (AdamW, BCE with pos_weight and/or a balanced sampler, mixed "
            "precision on GPU) and write metrics.csv/jsonl, learning curves, per-epoch "
            "confusion matrices and reports, best.pth by validation ROC-AUC and a resume "
            "state into --out. It states the disk use first, estimates the duration from "
            "the first batches and prints one line per epoch (loss, val ROC-AUC with its "
            "95%% CI, time, ETA). Ctrl-C stops within a batch; --resume continues from "
            "the last finished epoch. Under torchrun (torchrun --nproc_per_node N -m "
            "ctscreen train ...) it trains with DistributedDataParallel on N processes; "
            "--batch-size is then per process and rank 0 alone writes --out."
        ),
    )
    p.add_argument("--registry", type=Path, required=True, help="registry CSV (merged.csv)")
    p.add_argument("--train-keys", type=Path, required=True, help="train key list")
    p.add_argument("--val-keys", type=Path, required=True, help="validation key list")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--config", type=Path, default=None, help="JSON file of training options")
    p.add_argument("--epochs", type=positive_int, default=None, help="default 30")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 2")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (1e-4)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (0.01)")
    p.add_argument(
        "--balance",
        choices=BALANCE_CHOICES,
        default=None,
        help="class balancing: pos_weight in the loss, a weighted sampler, both "
        "or none (default loss)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default 42)")
    p.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=None,
        help="data loading and caching processes (default 2)",
    )
    p.add_argument(
        "--val-every", type=positive_int, default=None, help="validate every N epochs (default 1)"
    )
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None)
    p.add_argument("--warmup-epochs", type=non_negative_int, default=None)
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="light 3D augmentation of training studies (default on)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision on CUDA (default on)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log to TensorBoard (needs the tensorboard package)",
    )
    p.add_argument(
        "--kinetics-weights",
        type=Path,
        default=None,
        help="local torchvision r3d_18 Kinetics-400 file to start from",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="preprocessing cache (see `ctscreen cache`); strongly recommended",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last completed epoch",
    )
    p.add_argument(
        "--save-every-epoch",
        action="store_true",
        default=None,
        help="also keep epochs/epoch_XXX/weights.pth for every epoch (~130 MB each); "
        "by default only best.pth and the resume state are kept",
    )
    p.add_argument(
        "--resume-state",
        choices=("every-epoch", "on-interrupt"),
        default=None,
        help="write last_state.pth (~400 MB) after every epoch (default) or only when "
        "stopped with Ctrl-C",
    )
    add_preprocess_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The resolved TrainConfig: defaults, then ``--config``, then the flags given."""
    from ..train.config import TrainConfig, load_train_config, with_overrides

    base = load_train_config(args.config) if args.config is not None else TrainConfig()
    return with_overrides(
        base,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        balance=args.balance,
        seed=args.seed,
        num_workers=args.num_workers,
        val_every=args.val_every,
        lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs,
        augment=args.augment,
        amp=args.amp,
        tensorboard=args.tensorboard,
        kinetics_weights=str(args.kinetics_weights) if args.kinetics_weights else None,
        device=args.device,
        save_every_epoch=args.save_every_epoch,
        resume_state=args.resume_state.replace("-", "_") if args.resume_state else None,
        shape=tuple(args.shape) if args.shape is not None else None,
        window_level=args.window_level,
        window_width=args.window_width,
    )


def run(args: argparse.Namespace) -> int:
    """Train and print where the best checkpoint is.

    Raises:
        ConfigError: invalid options or an existing run without --resume.
        DatasetError: registry or key lists missing or inconsistent.
    """
    from ..train.distributed import world_from_env
    from ..train.loop import train
    from .console import echo

    config = config_from_args(args)
    world = world_from_env()
    if not world.is_main:
        # Rank 0 speaks for all processes; the others say only what went wrong.
        logging.getLogger("ctscreen").setLevel(logging.ERROR)
    result = train(
        registry=args.registry,
        train_keys=args.train_keys,
        val_keys=args.val_keys,
        out_dir=args.out,
        config=config,
        cache_dir=args.cache_dir,
        resume=args.resume,
        progress=not getattr(args, "no_progress", False),
        echo=echo,
    )
    if result.interrupted:
        return EXIT_INTERRUPTED
    if not world.is_main:
        return EXIT_OK
    auc = result.best_val_roc_auc
    auc_text = f"{auc:.4f}" if math.isfinite(auc) else "undefined"
    print(f"run folder: {result.out_dir} ({result.last_epoch} epochs)")
    if result.best_path is not None:
        print(f"best: {result.best_path} (epoch {result.best_epoch}, val ROC-AUC {auc_text})")
    if result.dropped_keys:
        print(f"left out {len(result.dropped_keys)} unreadable studies (see the cache manifest)")
    return EXIT_OK
