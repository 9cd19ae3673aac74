"""``ctscreen dicomweb``: score studies already in an archive by UID, results back by STOW-RS."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import EXIT_OK, EXIT_PARTIAL
from .types import add_runtime_arguments, positive_int, probability

log = logging.getLogger(__name__)

TOKEN_ENV = "CTSCREEN_DICOMWEB_TOKEN"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dicomweb",
        help="score studies in a DICOMweb archive by StudyInstanceUID; SR + key images back",
        description=(
            "Find each study by QIDO-RS, retrieve its CT series by WADO-RS, score it, store a "
            "Comprehensive 3D SR and key-slice Secondary Captures back by STOW-RS (as the DICOM "
            "node of 'ctscreen serve' sends them), and write the result table. Needs the "
            "'dicom' extra: pip install 'ctscreen[dicom]'."
        ),
    )
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--study", action="append", required=True, metavar="UID", help="study UID")
    p.add_argument("--weights", "-w", type=Path, required=True, help="checkpoint file (.pth)")
    p.add_argument(
        "--output", "-o", type=Path, default=Path("dicomweb-results.xlsx"), help="result table"
    )
    p.add_argument("--no-store", action="store_true", help="score only; store nothing back")
    p.add_argument("--token", help=f"bearer token for the archive (default: ${TOKEN_ENV})")
    p.add_argument("--threshold", type=probability, help="decision threshold (model card's)")
    add_runtime_arguments(p)
    p.add_argument("--min-slices", type=positive_int, default=16, help="reject thinner series")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, InputError
    from ..report import result_rows, rows_to_frame, write_table
    from ..results import StudyResult
    from ..screener import Screener

    try:
        from ..service.dicomweb import DicomWebError, make_client, score_archived_study
    except ImportError as exc:
        raise ConfigError(
            f"ctscreen dicomweb needs the 'dicom' extra ({exc.name} is missing): "
            "pip install 'ctscreen[dicom]'."
        ) from exc
    screener = Screener(
        args.weights,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        min_slices=args.min_slices,
    )
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    client = make_client(args.url, token=token)
    rows = []
    failures = 0
    for study_uid in args.study:
        try:
            outcome = score_archived_study(screener, client, study_uid, store=not args.no_store)
            result = outcome.result
            if outcome.stored:
                print(
                    f"{study_uid}: {len(outcome.stored)} results stored back (SR + key images)",
                    file=sys.stderr,
                )
        except (InputError, DicomWebError) as exc:  # this study fails; the next one may not
            result = StudyResult(
                input_path=args.url,
                location=f"{args.url} study {study_uid}",
                study_uid=study_uid,
                error=exc.message,
            )
        if not result.ok:
            failures += 1
            print(f"Failure: {study_uid}: {result.error}", file=sys.stderr)
        rows.extend(result_rows(result))
    output = write_table(rows_to_frame(rows), args.output, run_info=screener.run_info())
    print(f"table written to {output}", file=sys.stderr)
    return EXIT_OK if failures == 0 else EXIT_PARTIAL
