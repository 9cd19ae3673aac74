"""``ctscreen demo``: the whole path on synthetic data, in minutes, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .exit_codes import EXIT_INTERRUPTED, EXIT_OK
from .types import positive_int


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="generate synthetic studies, train, evaluate and predict, all in one folder",
        description=(
            "Run the whole path on built-in synthetic chest CT: generate studies, build the "
            "registry, split by patient, train a small model, evaluate it with 95% CIs, "
            "and score held-out zip archives into an Excel table. Needs no data, no GPU "
            "and no network; takes a few minutes on two CPU cores."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=Path("ctscreen-demo"), help="output folder (./ctscreen-demo)"
    )
    p.add_argument(
        "--studies", type=positive_int, default=160, help="training + validation studies (160)"
    )
    p.add_argument(
        "--holdout", type=positive_int, default=24, help="held-out archives for predict (24)"
    )
    p.add_argument("--epochs", type=positive_int, default=8, help="training epochs (8)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, split and training (0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo
    from ..fileio import format_bytes
    from .console import echo

    config = DemoConfig(
        out=args.out,
        train_studies=args.studies,
        holdout_studies=args.holdout,
        epochs=args.epochs,
        seed=args.seed,
    )
    result = run_demo(config, progress=not args.no_progress, echo=echo)
    if result.interrupted:
        print(f"stopped; run the same command again to continue the training in {args.out}")
        return EXIT_INTERRUPTED
    m = result.holdout_metrics
    auc = m.get("roc_auc", {})
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    print(f"\nctscreen demo finished in {sum(result.seconds.values()):.0f} s ({timing})")
    if isinstance(auc, dict):
        nan = float("nan")
        low, high = auc.get("ci_low", nan), auc.get("ci_high", nan)
        print(
            f"held-out ROC-AUC {auc.get('value', nan):.3f} (95% CI {low:.3f}-{high:.3f}) "
            f"on {m.get('n_studies')} synthetic archives"
        )
    out = result.out
    print(_baseline_line(out / "evaluation" / "metrics.json"))
    print(f"  disk used     : {format_bytes(result.disk_bytes)} in {out}")
    print(f"  results table : {result.results_table}")
    print(f"  model         : {result.weights}  (ctscreen info {result.weights})")
    print(f"  training run  : {out / 'run'}  (metrics.csv, learning_curves.png, best.pth)")
    print(f"  evaluation    : {out / 'evaluation'}  (metrics.json, ROC/PR/calibration plots)")
    print(f"  held-out data : {out / 'holdout' / 'archives'}")
    archives = out / "holdout" / "archives"
    print(f"Next: ctscreen predict {archives}/*.zip --weights {result.weights} -o my_results.xlsx")
    print(demo_model_caveat(result.model_warnings))
    return EXIT_OK


def _baseline_line(metrics_json: Path) -> str:
    """The evaluation's shortcut baseline beside the model, from its metrics.json."""
    import json

    from ..evaluate import format_baseline

    try:
        entry = json.loads(metrics_json.read_text(encoding="utf-8"))["shortcut_baseline"]
    except (OSError, ValueError, KeyError):
        return f"shortcut baseline: not found in {metrics_json}"
    n = entry.get("n", "?")
    return f"on the {n} validation studies, {format_baseline(entry)}"


def demo_model_caveat(model_warnings: tuple[str, ...]) -> str:
    """The closing paragraph: the model card's warnings, and what real CT needs instead."""
    lines = [f"Warning: {w}." for w in model_warnings]
    lines.append(
        "This model is the only one ctscreen ships with, and it is for trying the tool out: "
        "to screen real chest CT you need a checkpoint trained on real labelled CT, either "
        "your own (README: 'Training on real CT') or one from elsewhere (ctscreen info FILE "
        "shows what it is)."
    )
    return "\n".join(lines)
