"""``ctscreen export WEIGHTS -o FOLDER``: a checkpoint as a bundle that scores without PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` command."""
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint as an OpenVINO bundle that scores without PyTorch",
        description=(
            "Convert a checkpoint once into a bundle folder: the network as OpenVINO IR "
            "(with the activation map that gives per-slice scores and the localisation), its "
            "model card (preprocessing, threshold, metrics) and the checkpoint's SHA-256. "
            "predict, serve and the DICOM node take the folder wherever they take a .pth and "
            "give the same numbers (fp32) with only the OpenVINO runtime: this is what the "
            "runtime container runs. Converting needs PyTorch; scoring the bundle does not."
        ),
    )
    p.add_argument("weights", type=Path, metavar="WEIGHTS", help="checkpoint file (.pth)")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        metavar="FOLDER",
        help="bundle folder to write (new, empty, or an earlier bundle, which is replaced)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint on the CPU, export it and say where it went.

    Raises:
        WeightsError: the checkpoint cannot be loaded, or the folder is taken.
        ConfigError: OpenVINO is not installed.
    """
    from ..backends import openvino_version
    from ..bundle import write_bundle
    from ..errors import ConfigError
    from ..weights import load_checkpoint

    if openvino_version() is None:
        raise ConfigError("export needs OpenVINO: pip install openvino.")
    loaded = load_checkpoint(args.weights, device="cpu")
    out = write_bundle(loaded, args.output)
    shape = "x".join(map(str, loaded.card.preprocess.shape))
    print(f"exported {args.weights} ({shape}, threshold {loaded.card.threshold:.4f}) to {out}")
    return EXIT_OK
