"""``ctscreen info WEIGHTS``: print what a checkpoint is and how it will be used."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``info`` command."""
    p = subparsers.add_parser(
        "info",
        help="show the model card of a checkpoint",
        description=(
            "Print the model card stored in a checkpoint: architecture, preprocessing, "
            "threshold and how it was chosen, classes, validation metrics with 95% "
            "confidence intervals, training data, version and the file's SHA-256. "
            "Checkpoints of the original implementation are shown with the defaults "
            "ctscreen assumes for them. The checkpoint is loaded with PyTorch, which "
            "takes a few seconds and about 1 GB of memory."
        ),
    )
    p.add_argument("weights", type=Path, metavar="WEIGHTS", help="checkpoint file (.pth)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the card, file hash and warnings as JSON instead of text",
    )
    p.add_argument(
        "--backends",
        action="store_true",
        help="also show how this machine runs the model: every installed backend and "
        "precision with its accuracy gate and measured seconds per forward at the model's "
        "input shape, and the one auto uses (measured now when not yet kept)",
    )
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="with --backends: measure again even when a measurement is kept",
    )
    p.add_argument("--device", default="cpu", help="with --backends: cpu (default), cuda or cuda:N")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint on the CPU and print its card.

    Raises:
        WeightsError: the file is missing, damaged or not an r3d_18 checkpoint
            (the CLI turns it into one sentence and exit code 2).
    """
    from ..weights import describe_card, load_checkpoint

    loaded = load_checkpoint(args.weights, device="cpu")
    if getattr(args, "json", False):
        payload = {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "card": loaded.card.to_dict(),
            "warnings": list(loaded.warnings),
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(describe_card(loaded))
    if getattr(args, "backends", False):
        print(_backend_table(loaded, args.device, remeasure=args.remeasure))
    return EXIT_OK


def _backend_table(loaded: Any, device_name: str, *, remeasure: bool) -> str:
    """The measured table of ``auto`` for ``loaded`` on this machine (measured when needed)."""
    from ..backends import ModelSource, choose_backend
    from ..hardware import cpu_model, select_device, usable_cores

    device = select_device(device_name)
    loaded.model.to(device)
    choice, _ = choose_backend(ModelSource.of(loaded), device=device, remeasure=remeasure)
    where = "kept from" if choice.from_cache else "measured"
    head = (
        f"backends on {cpu_model() if device.type == 'cpu' else device} ({usable_cores()} cores), "
        f"input {'x'.join(map(str, loaded.card.preprocess.shape))}, {where} {choice.measured}:"
    )
    return f"{head}\n{choice.table()}\nauto runs {choice.winner.label}"
