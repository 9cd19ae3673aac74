"""``ctscreen evaluate``: metrics with 95% confidence intervals, plots, threshold choice.

Writes ``predictions.csv``, ``metrics.json`` and ROC / PR / calibration /
confusion-matrix PNGs to ``--out``, prints a metric table, and with
``--write-threshold`` saves a copy of the checkpoint whose model card carries the
chosen threshold and the metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_OK, EXIT_PARTIAL
from .types import add_runtime_arguments, positive_int


def sensitivity_target(text: str) -> float:
    """argparse type for a sensitivity in (0, 1]."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], not {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``evaluate`` command."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on labelled studies (metrics with 95%% CIs)",
        description=(
            "Score the studies of a key list with a checkpoint (using the preprocessing "
            "stored in it) and report ROC-AUC, PR-AUC, accuracy, F1, sensitivity and "
            "specificity with stratified bootstrap 95% confidence intervals, beside a "
            "shortcut baseline: a cross-validated logistic regression on each volume's HU "
            "histogram alone, with a warning when the model does not beat it by more than "
            "its interval. Writes report.html, metrics.json, predictions.csv and plots."
        ),
    )
    p.add_argument("--weights", type=Path, required=True, help="checkpoint (.pth)")
    p.add_argument("--registry", type=Path, required=True, help="registry CSV")
    p.add_argument("--keys", type=Path, required=True, help="key list to evaluate on")
    p.add_argument(
        "--out", type=Path, default=Path("evaluation"), help="output folder (default ./evaluation)"
    )
    p.add_argument(
        "--threshold-rule",
        choices=("youden", "sensitivity"),
        default=None,
        help="choose the threshold on these studies (default: the checkpoint's)",
    )
    p.add_argument(
        "--target-sensitivity",
        type=sensitivity_target,
        default=0.95,
        help="sensitivity the 'sensitivity' rule must reach (default 0.95)",
    )
    p.add_argument(
        "--write-threshold",
        type=Path,
        default=None,
        metavar="OUT.pth",
        help="save a copy of the checkpoint carrying the chosen threshold",
    )
    add_runtime_arguments(p)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help="studies per forward pass (default: 1 on the CPU, 4 on a GPU)",
    )
    p.add_argument(
        "--n-boot", type=positive_int, default=2000, help="bootstrap resamples (default 2000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table; exit 1 when some studies could not be read.

    Raises:
        WeightsError: the checkpoint cannot be loaded.
        DatasetError: registry or key list missing or inconsistent.
        ConfigError: --write-threshold without --threshold-rule.
    """
    from ..errors import ConfigError
    from ..evaluate import evaluate, format_baseline, format_metrics_table

    if args.write_threshold is not None and args.threshold_rule is None:
        raise ConfigError(
            "--write-threshold needs --threshold-rule youden or sensitivity to choose one."
        )
    result = evaluate(
        weights=args.weights,
        registry=args.registry,
        keys=args.keys,
        out_dir=args.out,
        threshold_rule=args.threshold_rule,
        target_sensitivity=args.target_sensitivity,
        write_threshold=args.write_threshold,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        seed=args.seed,
        progress=not getattr(args, "no_progress", False),
    )
    ok = result.predictions[result.predictions["status"] == "ok"]
    print(
        format_metrics_table(
            result.metrics,
            threshold=result.threshold,
            rule=result.threshold_rule,
            n=len(ok),
            n_pos=int(ok["label"].sum()),
        )
    )
    if result.baseline:
        print(format_baseline(result.baseline))
    print(f"outputs: {result.out_dir} (report.html, metrics.json, plots)")
    if result.written_checkpoint is not None:
        print(f"checkpoint with threshold: {result.written_checkpoint}")
    if result.n_failed:
        print(f"{result.n_failed} studies could not be read (see predictions.csv)")
        return EXIT_PARTIAL
    return EXIT_OK
