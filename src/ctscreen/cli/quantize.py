"""``ctscreen quantize WEIGHTS --calibration DIR [--check DIR] -o OUT``: INT8 ahead of time."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK, EXIT_PARTIAL
from .types import positive_int


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``quantize`` command."""
    p = subparsers.add_parser(
        "quantize",
        help="make an INT8 copy of a checkpoint and check it against fp32",
        description=(
            "Quantize a checkpoint to INT8 for OpenVINO with NNCF (pip install "
            "'ctscreen[quantize]'), from calibration studies you choose, and check it on "
            "other studies against PyTorch fp32: the largest probability move, ROC-AUC of "
            "both where the check folder has labels.csv, and every decision that flips, with "
            "its fp32 probability. Writes a copy of the checkpoint that carries the INT8 "
            "graph and, in its model card, what calibrated it and the check. The check "
            "passes when no probability moves by more than 0.01 and ROC-AUC drops by at "
            "most 0.005; predict's auto runs INT8 only from a checkpoint that passed, and "
            "only where it measures faster. Exit code 1 when the check fails."
        ),
    )
    p.add_argument("weights", type=Path, metavar="WEIGHTS", help="fp32 checkpoint (.pth)")
    p.add_argument(
        "--calibration",
        type=Path,
        required=True,
        metavar="DIR",
        help="calibration studies: a folder of zip archives or DICOM (read as predict reads "
        "them), or a training cache folder of .npy entries made with this model's "
        "preprocessing (ctscreen cache)",
    )
    p.add_argument(
        "--check",
        type=Path,
        metavar="DIR",
        help="check studies (not the calibration ones): a folder of zip archives or DICOM; "
        "a labels.csv (study_uid,label) inside adds ROC-AUC",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="the INT8 checkpoint to write")
    p.add_argument(
        "--keep",
        default="auto",
        help="parts kept in floating point, comma-separated from stem, layer1, layer2, layer3, "
        "layer4, head; or auto (default): with --check, stem,head then stem,layer1,head then "
        "stem,layer1,layer2,head until the check passes",
    )
    p.add_argument(
        "--max-calibration",
        type=positive_int,
        default=64,
        help="calibration studies used at most (default 64)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Quantize, check, write; print the check.

    Raises:
        WeightsError: the checkpoint cannot be read or the copy written.
        ConfigError: NNCF missing, no readable calibration study, a bad ``--keep``.
    """
    from ..quantize import iter_report, quantize_checkpoint

    keep: str | list[str] = "auto"
    if args.keep != "auto":
        keep = [part.strip() for part in str(args.keep).split(",") if part.strip()]
    result = quantize_checkpoint(
        args.weights,
        calibration=args.calibration,
        out=args.out,
        check=args.check,
        keep=keep,
        limit=args.max_calibration,
    )
    for line in iter_report(result):
        print(line)
    return EXIT_PARTIAL if result.check is not None and not result.check.passed else EXIT_OK
