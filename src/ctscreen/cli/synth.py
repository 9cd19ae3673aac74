"""``ctscreen synth OUT``: write a labelled synthetic chest CT dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK
from .types import positive_int, probability


def pathology_kinds(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated synthetic finding kinds."""
    from ..synth.phantom import PATHOLOGIES

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in PATHOLOGIES]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kinds {unknown or [text]}; choose from {', '.join(PATHOLOGIES)}"
        )
    return kinds


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
        "--pathologies",
        type=pathology_kinds,
        default=None,
        metavar="KIND[,KIND...]",
        help="findings the pathological studies cycle through (default: all five)",
    )
    p.add_argument(
        "--realism",
        choices=["easy", "matched"],
        default="easy",
        help=(
            "easy (default): a lesion adds dense or air voxels to an otherwise similar "
            "lung, so HU statistics nearly give the label away; matched: normal studies "
            "carry the same distribution of dense and air voxels in shapes that are not "
            "lesions (raised diaphragm, atelectasis, vessels, airways), so only shape "
            "tells the classes apart"
        ),
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
        realism=args.realism,
        **({"pathologies": args.pathologies} if args.pathologies else {}),
        progress=not getattr(args, "no_progress", False),
    )
    where = labels.parent / ("archives" if args.zip else "studies")
    realism = " intensity-matched" if args.realism == "matched" else ""
    print(f"wrote {args.studies}{realism} synthetic studies to {where}")
    print(f"labels: {labels}")
    print(f"next: ctscreen registry build synthetic {args.out} -o {args.out / 'registry.csv'}")
    return EXIT_OK
