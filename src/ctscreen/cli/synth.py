"""``ctscreen synth OUT``: write a labelled synthetic chest CT dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK
from .types import positive_int, probability


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``synth`` command."""
    p = subparsers.add_parser(
        "synth",
        help="write synthetic chest CT studies (DICOM) with labels",
        description=(
            "Write seeded synthetic chest CT studies as DICOM folders or zip archives, "
            "half of them with a pathology (nodule, ground glass, consolidation, "
            "effusion, pneumothorax), and a labels.csv with lesion positions in mm. "
            "The same seed always gives the same dataset. `ctscreen registry build "
            "synthetic OUT` turns it into a registry."
        ),
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder")
    p.add_argument(
        "--studies", type=positive_int, default=20, help="number of studies (default: 20)"
    )
    p.add_argument("--seed", type=int, default=0, help="master seed (default: 0)")
    p.add_argument(
        "--zip",
        action="store_true",
        help="write archives/<study>.zip (one top folder each) instead of folders",
    )
    p.add_argument(
        "--matrix",
        choices=["tiny", "small", "full"],
        default="small",
        help="in-plane size: tiny 48-64, small 96-192, full 512 (default: small)",
    )
    p.add_argument(
        "--pathology-fraction",
        type=probability,
        default=0.5,
        help="share of studies with pathology (default: 0.5)",
    )
    p.add_argument(
        "--no-variety",
        action="store_true",
        help="plain head-first uncompressed single-frame series only",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print where it went."""
    from ..synth.dataset import generate_dataset

    labels = generate_dataset(
        args.out,
        n_studies=args.studies,
        seed=args.seed,
        matrix=args.matrix,
        pathology_fraction=args.pathology_fraction,
        zip_archives=args.zip,
        variety=not args.no_variety,
        progress=not getattr(args, "no_progress", False),
    )
    where = labels.parent / ("archives" if args.zip else "studies")
    print(f"wrote {args.studies} synthetic studies to {where}")
    print(f"labels: {labels}")
    print(f"next: ctscreen registry build synthetic {args.out} -o {args.out / 'registry.csv'}")
    return EXIT_OK
