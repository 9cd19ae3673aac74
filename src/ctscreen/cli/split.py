"""``ctscreen split REGISTRY --out-dir DIR``: patient-grouped train/val key lists.

Writes ``train_keys.txt`` and ``val_keys.txt`` (one study_key per line) and
``split_summary.json`` (method, seed, counts per label per split), and prints the
counts per label per split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from .exit_codes import EXIT_OK

TRAIN_KEYS = "train_keys.txt"
VAL_KEYS = "val_keys.txt"
SUMMARY = "split_summary.json"


def fraction(text: str) -> float:
    """argparse type for a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), not {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``split`` command."""
    p = subparsers.add_parser(
        "split",
        help="split a registry into train/val key lists, grouped by patient",
        description=(
            "Split a registry CSV into train and validation study keys, stratified by "
            "label and grouped by patient (scikit-learn StratifiedGroupKFold), so that "
            "no patient appears in both. Patient ids are compared within one dataset; "
            "a study without a patient id is its own group. Same seed, same split."
        ),
    )
    p.add_argument("registry", type=Path, metavar="REGISTRY", help="registry CSV")
    p.add_argument(
        "--out-dir",
        type=Path,
        required=True,
        help=f"folder for {TRAIN_KEYS}, {VAL_KEYS} and {SUMMARY}",
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.2,
        help="share of studies for validation (default 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)
    return p


def _write_json(payload: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    """Split the registry and write the key lists.

    Returns:
        0 on success.

    Raises:
        DatasetError: the registry is missing, invalid or has fewer than 2 patients.
    """
    from ..data.registry import read_registry
    from ..data.split import split_registry, summary_lines, write_keys

    frame = read_registry(args.registry)
    result = split_registry(frame, val_fraction=args.val_fraction, seed=args.seed)
    out: Path = args.out_dir
    write_keys(result.train_keys, out / TRAIN_KEYS)
    write_keys(result.val_keys, out / VAL_KEYS)
    _write_json({"registry": str(args.registry), **result.summary}, out / SUMMARY)
    for line in summary_lines(result.summary):
        print(line)
    print(f"wrote {out / TRAIN_KEYS} and {out / VAL_KEYS}")
    return EXIT_OK
