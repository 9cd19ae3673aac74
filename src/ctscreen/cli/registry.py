"""``ctscreen registry build|merge``: dataset roots -> registry CSVs -> one merged CSV.

``ctscreen registry build SOURCE ROOT -o registry.csv`` runs one dataset adapter;
``ctscreen registry merge A.csv B.csv ... -o merged.csv`` joins registries and drops
studies reached twice. Missing files are printed to stderr with their count and make
the exit code 1; the CSV is still written with the studies that exist.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK, EXIT_PARTIAL

#: Adapter names, kept here as data so that ``--help`` needs no dataset imports.
SOURCE_NAMES: tuple[str, ...] = ("covid19_1110", "mosmed_vii", "ldct_lungcr", "custom", "synthetic")

#: How many missing files / notes are listed before "... and N more".
SHOW_AT_MOST = 20


def label_value(text: str) -> int:
    """argparse type for a 0/1 label."""
    if text.strip() not in {"0", "1"}:
        raise argparse.ArgumentTypeError(f"label must be 0 or 1, not {text!r}")
    return int(text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``registry`` command with its ``build`` and ``merge`` subcommands."""
    p = subparsers.add_parser(
        "registry",
        help="build dataset registries and merge them",
        description=(
            "Turn a dataset root into a registry CSV (one row per study: study_key, path, "
            "path_type, label, dataset, patient_id, study_uid, source_category), or merge "
            "several registries into one."
        ),
    )
    sub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    b = sub.add_parser(
        "build",
        help="build a registry from one dataset root",
        description=(
            "Build a registry CSV from a dataset root. Sources: covid19_1110 (MosMedData "
            "COVID19_1110, NIfTI), mosmed_vii (MosMedData CT-COVID19 type VII, DICOM), "
            "ldct_lungcr (MosMedData LDCT-LUNGCR type I, DICOM), custom (class folders "
            "of study folders/zips), synthetic (a folder written by `ctscreen synth`, "
            "labels from its labels.csv). Nothing is downloaded: pass the folder you downloaded."
        ),
    )
    b.add_argument(
        "source",
        choices=SOURCE_NAMES,
        metavar="SOURCE",
        help=f"dataset layout: {', '.join(SOURCE_NAMES)}",
    )
    b.add_argument("root", type=Path, metavar="ROOT", help="dataset root folder")
    b.add_argument("-o", "--output", type=Path, required=True, help="registry CSV to write")
    b.add_argument(
        "--mapping",
        help=(
            "custom: class folder labels, e.g. norma_anon=0,pneumonia_anon=1 (default "
            "norma_anon=0,pneumonia_anon=1,pneumotorax_anon=1); other sources: registry "
            "label values -> 0/1, e.g. CT-0=0,CT-1=1"
        ),
    )
    b.add_argument(
        "--column-map",
        help="registry table columns by role, e.g. study=Study UID,label=Diagnosis,patient=PID",
    )
    b.add_argument(
        "--positive-values",
        help="mosmed_vii: comma-separated label values meaning pathology (others are 0)",
    )
    b.add_argument(
        "--registry-file",
        type=Path,
        help="mosmed_vii: the dataset's registry table if not found in ROOT",
    )
    b.add_argument(
        "--default-label",
        type=label_value,
        help="mosmed_vii without a registry table: label of every study (0 or 1)",
    )
    b.add_argument(
        "--dataset-name",
        help="custom, synthetic: value of the dataset column and key prefix "
        "(default: the source name)",
    )
    b.set_defaults(func=run)

    m = sub.add_parser(
        "merge",
        help="merge registries, dropping studies reached twice",
        description=(
            "Concatenate registry CSVs in the given order. A study whose study_key or "
            "StudyInstanceUID was already kept is dropped; a study listed with two "
            "different labels is dropped entirely (or is an error with --on-conflict error)."
        ),
    )
    m.add_argument("inputs", type=Path, nargs="+", metavar="CSV", help="registry CSVs")
    m.add_argument("-o", "--output", type=Path, required=True, help="merged CSV to write")
    m.add_argument(
        "--on-conflict",
        choices=("drop", "error"),
        default="drop",
        help="what to do with a study listed with two labels (default drop)",
    )
    m.set_defaults(func=run)
    return p


def _warn_list(title: str, items: Sequence[str]) -> None:
    print(f"warning: {title}: {len(items)}", file=sys.stderr)
    for item in items[:SHOW_AT_MOST]:
        print(f"  {item}", file=sys.stderr)
    if len(items) > SHOW_AT_MOST:
        print(f"  ... and {len(items) - SHOW_AT_MOST} more", file=sys.stderr)


def _label_counts(frame: Any) -> str:
    counts = frame["label"].value_counts()
    return f"normal(0)={int(counts.get(0, 0))}  pathology(1)={int(counts.get(1, 0))}"


def _build_options(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.sources import parse_key_values

    options: dict[str, Any] = {}
    if args.mapping:
        if args.source == "custom":
            options["mapping"] = args.mapping
        else:
            options["label_map"] = parse_key_values(
                args.mapping, what="--mapping", example="CT-0=0,CT-1=1"
            )
    if args.column_map:
        options["column_map"] = parse_key_values(
            args.column_map, what="--column-map", example="study=StudyID,label=Class"
        )
    if args.positive_values:
        options["positive_values"] = [
            v.strip() for v in args.positive_values.split(",") if v.strip()
        ]
    options["registry"] = args.registry_file
    options["default_label"] = args.default_label
    options["dataset"] = args.dataset_name
    return options


def _run_build(args: argparse.Namespace) -> int:
    from ..data.registry import write_registry
    from ..data.sources import build_source

    result = build_source(args.source, args.root, **_build_options(args))
    write_registry(result.rows, args.output)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.missing:
        _warn_list("studies listed by the dataset but missing on disk", result.missing)
    print(
        f"{args.output}: {len(result.rows)} studies  {_label_counts(result.rows)}"
        + (f"  ({len(result.missing)} missing)" if result.missing else "")
    )
    return EXIT_PARTIAL if result.missing else EXIT_OK


def _run_merge(args: argparse.Namespace) -> int:
    from ..data.registry import merge_registries, read_registry, write_registry

    frames = [read_registry(path) for path in args.inputs]
    merged, notes = merge_registries(frames, on_conflict=args.on_conflict)
    write_registry(merged, args.output)
    duplicates = [n for n in notes if n.startswith("duplicate")]
    conflicts = [n for n in notes if n.startswith("conflict")]
    if duplicates:
        _warn_list("duplicate studies dropped", duplicates)
    if conflicts:
        _warn_list("studies with conflicting labels dropped", conflicts)
    total = sum(len(f) for f in frames)
    print(
        f"{args.output}: {len(merged)} studies from {total} rows in {len(frames)} file(s)  "
        f"{_label_counts(merged)}"
    )
    return EXIT_PARTIAL if conflicts else EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run ``registry build`` or ``registry merge``.

    Returns:
        0 on success; 1 when studies are missing on disk (build) or were dropped for
        conflicting labels (merge).

    Raises:
        DatasetError: a dataset root, table or registry is missing or inconsistent.
        ConfigError: an option is invalid for the chosen source.
    """
    if args.registry_command == "build":
        return _run_build(args)
    return _run_merge(args)
