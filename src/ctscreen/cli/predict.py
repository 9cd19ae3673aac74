"""``ctscreen predict``: zip archives or folders in, the task's result table out."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from . import EXIT_OK, EXIT_PARTIAL
from .types import positive_int, probability

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="score CT studies in zip archives or folders and write the result table",
        description=(
            "Score every chest CT study found in the inputs (zip archives, folders or "
            "files, any nesting) and write one row per study. Exit code 0: every study "
            "succeeded; 1: some rows are Failure; 2: the run could not start."
        ),
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="zip archive or folder")
    p.add_argument("--weights", "-w", type=Path, required=True, help="checkpoint file (.pth)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("results.xlsx"),
        help="result table; .xlsx (default), .csv or .json by suffix",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--per-series", action="store_true", help="one row per eligible series")
    mode.add_argument(
        "--per-slice", action="store_true", help="one row per slice of the scored series"
    )
    p.add_argument(
        "--threshold", type=probability, help="decision threshold (default: the model card's)"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 where the hardware computes it natively, else fp32",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        help="auto (default): on the CPU OpenVINO when installed, else PyTorch for bf16, else "
        "ONNX Runtime (fp32) when installed, else PyTorch; PyTorch off the CPU; "
        "a backend that fails falls back to PyTorch with a warning",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help="studies per forward pass (default: 1 on the CPU, 4 on a GPU)",
    )
    p.add_argument(
        "--readers",
        type=positive_int,
        help="inputs read at once in threads (default: 1 on the CPU, where the network is "
        "the slow stage; up to 4 on a GPU, where reading is)",
    )
    p.add_argument("--min-slices", type=positive_int, default=16, help="reject thinner series (16)")
    p.add_argument(
        "--no-localization", action="store_true", help="leave pathology_localization empty"
    )
    p.add_argument("--report", type=Path, metavar="DIR", help="also write an HTML report into DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import __version__
    from ..config import SelectionConfig
    from ..errors import ConfigError
    from ..inference import (
        PredictOptions,
        RunStats,
        Scorer,
        default_batch_size,
        default_readers,
        predict,
        resolve_precision,
    )
    from ..model import select_device
    from ..report import FAILURE, rows_to_frame, write_table
    from ..weights import load_checkpoint

    missing = [str(p) for p in args.inputs if not p.exists()]
    if len(missing) == len(args.inputs):
        raise ConfigError(f"none of the inputs exist ({', '.join(missing)}); check the paths.")
    device = select_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.precision == "auto" and args.backend == "onnxruntime":
        precision = "fp32"  # the only precision ONNX Runtime runs on the CPU
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 runs only on a GPU; use --precision bf16 or fp32 on the CPU.")
    loaded = load_checkpoint(args.weights, device=device)
    for warning in loaded.warnings:
        log.warning(warning)
    mode = "series" if args.per_series else "slice" if args.per_slice else "study"
    options = PredictOptions(
        mode=mode,
        threshold=args.threshold,
        selection=SelectionConfig(min_slices=args.min_slices),
        localize=not args.no_localization,
        batch_size=args.batch_size or default_batch_size(device),
        readers=args.readers or default_readers(device),
    )
    scorer = Scorer(loaded, device, precision, backend=args.backend)
    report = None
    if args.report is not None:
        from ..html_report import ReportWriter

        report = ReportWriter(args.report)
    stats = RunStats()
    bar = tqdm(total=len(args.inputs), unit="input", disable=args.no_progress, file=sys.stderr)
    seen_inputs: set[str] = set()

    def on_row(row: Any) -> None:
        if row.input_path not in seen_inputs:
            seen_inputs.add(row.input_path)
            bar.update(1)
        if row.processing_status == FAILURE:
            bar.write(f"Failure: {row.path_to_study}: {row.error}", file=sys.stderr)

    try:
        rows = predict(
            args.inputs,
            scorer=scorer,
            options=options,
            on_row=on_row,
            stats=stats,
            on_study=None if report is None else report.add_study,
        )
    finally:
        bar.close()
    threshold = loaded.card.threshold if args.threshold is None else args.threshold
    run_info = {
        "ctscreen_version": __version__,
        "weights": str(args.weights),
        "weights_sha256": loaded.sha256,
        "threshold": threshold,
        "threshold_rule": loaded.card.threshold_rule if args.threshold is None else "--threshold",
        "preprocess": str(loaded.card.preprocess.to_dict()),
        "device": str(device),
        "precision": scorer.engine.precision,
        "backend": scorer.engine.name,
        "mode": mode,
        "batch_size": options.batch_size,
        "readers": options.readers,
        "inputs": len(args.inputs),
        "studies": stats.studies,
        "failures": stats.failures,
        "wall_seconds": round(stats.wall_seconds, 2),
        "model_warnings": "; ".join(loaded.warnings),
        "note": "research tool, not for clinical use",
    }
    frame = rows_to_frame(rows)
    output = write_table(frame, args.output, run_info=run_info)
    if report is not None:
        report.finish(rows, run_info=run_info)
    ok = stats.studies - stats.failures
    print(
        f"{ok} of {stats.studies} studies scored, {stats.failures} failed; "
        f"table written to {output}",
        file=sys.stderr,
    )
    return EXIT_OK if stats.failures == 0 else EXIT_PARTIAL
