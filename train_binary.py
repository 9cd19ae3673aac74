"""Training entry point with the original command line (kept for existing scripts).

    python train_binary.py --studies_csv data/merged.csv \
        --train_list data/train_keys.txt --val_list data/val_keys.txt \
        --epochs 30 --batch_size 2 --lr 1e-4 --out_dir runs_binary/binary_r3d18

It runs the same training as ``ctscreen train`` (see ``ctscreen train --help`` for
every option). Besides the original flags it accepts ``--tensorboard``,
``--config file.json`` (any training option, e.g. the input shape), ``--cache_dir``
and ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import ctscreen  # noqa: F401
except ImportError:  # a source checkout that was never installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the binary chest CT classifier (original command line)."
    )
    parser.add_argument("--studies_csv", type=Path, required=True, help="registry CSV")
    parser.add_argument("--train_list", type=Path, required=True, help="train key list")
    parser.add_argument("--val_list", type=Path, required=True, help="validation key list")
    parser.add_argument("--epochs", type=int, default=None, help="default 30")
    parser.add_argument("--batch_size", type=int, default=None, help="default 2")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4")
    parser.add_argument(
        "--out_dir",
        type=Path,
        default=Path("runs_binary/binary_r3d18"),
        help="run folder (default runs_binary/binary_r3d18)",
    )
    parser.add_argument(
        "--tensorboard", action="store_true", default=None, help="also log to TensorBoard"
    )
    parser.add_argument("--config", type=Path, default=None, help="JSON file of training options")
    parser.add_argument("--cache_dir", type=Path, default=None, help="preprocessing cache folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the original flags and train; returns the exit code."""
    from ctscreen.cli import EXIT_ERROR, EXIT_OK
    from ctscreen.errors import CtscreenError
    from ctscreen.train.config import TrainConfig, load_train_config, with_overrides
    from ctscreen.train.loop import train

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        base = load_train_config(args.config) if args.config else TrainConfig()
        config = with_overrides(
            base,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            tensorboard=args.tensorboard,
        )
        result = train(
            registry=args.studies_csv,
            train_keys=args.train_list,
            val_keys=args.val_list,
            out_dir=args.out_dir,
            config=config,
            cache_dir=args.cache_dir,
            resume=args.resume,
        )
    except CtscreenError as exc:
        print(f"train_binary.py: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    print(f"best checkpoint: {result.best_path} (epoch {result.best_epoch})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
