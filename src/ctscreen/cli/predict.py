"""``ctscreen predict``: zip archives or folders in, the task's result table out."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..engines import ENGINES
from .exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from .types import add_runtime_arguments, positive_float, positive_int, probability

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="score CT studies in zip archives or folders and write the result table",
        description=(
            "Score every chest CT study found in the inputs (zip archives, folders, single "
            "DICOM files, any nesting, and .nii/.nii.gz volumes, one study each) and write "
            "one row per study. Exit code 0: every study succeeded; 1: some rows are "
            "Failure; 2: the run could not start."
        ),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="zip archive, folder, DICOM file or NIfTI file (.nii, .nii.gz)",
    )
    p.add_argument(
        "--weights",
        "-w",
        type=Path,
        required=True,
        help="checkpoint file (.pth), or a bundle folder from `ctscreen export` (no PyTorch)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("results.xlsx"),
        help="result table; .xlsx (default), .csv, .json or .parquet by suffix",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--per-series", action="store_true", help="one row per eligible series")
    mode.add_argument(
        "--per-slice", action="store_true", help="one row per slice of the scored series"
    )
    p.add_argument(
        "--threshold", type=probability, help="decision threshold (default: the model card's)"
    )
    add_runtime_arguments(p)
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
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing table (and its journal)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run: inputs already in <output>.journal.jsonl are not "
        "scored again",
    )
    p.add_argument(
        "--study-timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="a study not read within this time becomes a Failure row and the run goes on "
        "(default 600)",
    )
    engine = p.add_argument_group("engine (where the studies are scored)")
    engine.add_argument(
        "--engine",
        choices=ENGINES,
        default=ENGINES[0],
        help="local (default): in this process; ray: on a Ray cluster with Ray Data, reading "
        'as CPU tasks and one model per scoring worker (needs pip install "ctscreen[ray]")',
    )
    engine.add_argument(
        "--address",
        metavar="ADDR",
        help="with --engine ray: join the Ray cluster at ADDR (e.g. auto or ray://head:10001) "
        "instead of starting a local Ray",
    )
    engine.add_argument(
        "--ray-cpus",
        type=positive_int,
        metavar="N",
        help="with --engine ray and no --address: CPUs of the local Ray (default: every core)",
    )
    engine.add_argument(
        "--ray-scorers",
        type=positive_int,
        metavar="N",
        help="with --engine ray: scoring workers, one model each (default: one per GPU of "
        "the cluster, else one per two CPUs)",
    )
    p.set_defaults(func=run, check_arguments=check_engine_arguments)


def check_engine_arguments(args: argparse.Namespace) -> None:
    """Refuse, before anything is read, options that do not fit the chosen engine.

    Raises:
        MissingExtraError: ``--engine ray`` without Ray installed.
        ConfigError: a Ray option without ``--engine ray``, or a local-only option with it.
    """
    from ..errors import ConfigError

    ray_only = [
        flag
        for flag, value in (
            ("--address", args.address),
            ("--ray-cpus", args.ray_cpus),
            ("--ray-scorers", args.ray_scorers),
        )
        if value is not None
    ]
    if args.engine != "ray":
        if ray_only:
            raise ConfigError(f"{', '.join(ray_only)} needs --engine ray.")
        return
    from ..engines import require_ray

    require_ray()
    if args.address is not None and args.ray_cpus is not None:
        raise ConfigError(
            "--ray-cpus sizes a local Ray; a cluster joined with --address has its own CPUs."
        )
    local_only = [
        flag
        for flag, value in (("--report", args.report), ("--readers", args.readers))
        if value is not None
    ]
    if local_only:
        raise ConfigError(
            f"{', '.join(local_only)} works with --engine local only (with --engine ray the "
            "studies are read by Ray tasks and their images stay on the workers)."
        )


@contextlib.contextmanager
def open_scorer(args: argparse.Namespace, options: dict[str, Any]) -> Iterator[Any]:
    """The scorer of the chosen engine: a :class:`ctscreen.Screener`, or a
    :class:`~ctscreen.engines.ray_engine.RayScorer` inside a Ray session that ends
    with the block."""
    if args.engine != "ray":
        from ..screener import Screener

        yield Screener(args.weights, readers=args.readers, **options)
        return
    from ..engines.ray_engine import RayScorer, ray_session

    scorer = RayScorer(args.weights, **options)  # the weights are checked before Ray starts
    quiet = logging.getLogger("ctscreen").getEffectiveLevel() > logging.INFO
    try:
        with ray_session(args.address, cpus=args.ray_cpus, quiet=quiet) as resources:
            scorer.place(resources, scorers=args.ray_scorers)
            log.info(
                "Ray: %d scoring worker(s), %g GPU each, batch %d, cluster %s",
                scorer.scorers,
                scorer.gpus_per_scorer,
                scorer.batch_size,
                {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
            )
            yield scorer
    finally:
        scorer.remove_scratch()


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..runs import check_output_path

    # Everything checkable is checked before the model loads and a study is read.
    check_engine_arguments(args)
    check_output_path(args.output, overwrite=args.overwrite, resume=args.resume)
    missing = [str(p) for p in args.inputs if not p.exists()]
    if len(missing) == len(args.inputs):
        raise ConfigError(f"none of the inputs exist ({', '.join(missing)}); check the paths.")
    mode = "series" if args.per_series else "slice" if args.per_slice else "study"
    options = dict(
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        mode="series" if mode == "series" else "study",
        min_slices=args.min_slices,
        localize=not args.no_localization,
        batch_size=args.batch_size,
        study_timeout=args.study_timeout,
    )
    with open_scorer(args, options) as screener:
        return score_inputs(args, screener, mode)


def score_inputs(args: argparse.Namespace, screener: Any, mode: str) -> int:
    """Score ``args.inputs`` with ``screener`` into the table, printing progress and
    the outcome; the exit code."""
    from tqdm import tqdm

    from ..runs import score_to_table

    for warning in screener.warnings:
        log.warning(warning)
    report = None
    if args.report is not None:
        from ..html_report import ReportWriter

        report = ReportWriter(args.report)
    bar = tqdm(total=len(args.inputs), unit="input", disable=args.no_progress, file=sys.stderr)
    seen_inputs: set[str] = set()

    def on_result(result: Any) -> None:
        if result.input_path not in seen_inputs:
            seen_inputs.add(result.input_path)
            bar.update(1)
        if not result.ok:
            bar.write(f"Failure: {result.location}: {result.error}", file=sys.stderr)
        if report is not None:
            report.add(result)

    try:
        outcome = score_to_table(
            screener,
            args.inputs,
            output=args.output,
            mode=mode,
            overwrite=args.overwrite,
            resume=args.resume,
            keep_image=report is not None,
            keep_volume=report is not None,
            on_result=on_result,
            run_info={"weights": str(args.weights)},
        )
    finally:
        bar.close()
    if report is not None and not outcome.interrupted:
        index = report.finish(run_info=outcome.run_info)
        print(f"HTML report written to {index}", file=sys.stderr)
    done = outcome.studies - outcome.failures
    resumed = f" ({outcome.resumed_inputs} input(s) taken from the journal)" * bool(
        outcome.resumed_inputs
    )
    if outcome.interrupted:
        print(
            f"interrupted: {outcome.studies} finished studies written to the partial table "
            f"{outcome.output}{resumed}; run the same command with --resume to finish it.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"{done} of {outcome.studies} studies scored, {outcome.failures} failed{resumed}; "
        f"table written to {outcome.output}",
        file=sys.stderr,
    )
    return EXIT_OK if outcome.failures == 0 else EXIT_PARTIAL
