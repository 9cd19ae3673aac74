"""Train and evaluate on intensity-matched phantoms; print the model beside the shortcut baseline.

On the easy phantoms a logistic regression on each volume's HU histogram already
reaches ROC-AUC ~0.8-0.9, so a high model AUC there says little. This script
trains with `ctscreen train` on `ctscreen synth --realism matched` studies at the
demo's input (16x48x48, CPU) and evaluates on a held-out matched set, where the
HU-histogram baseline sits near chance; only a model that learned the findings'
shape beats it. Every stage is the command line a user would type:

    python benchmarks/bench_matched.py --out /tmp/matched-bench
    python benchmarks/bench_matched.py --out /tmp/matched-bench --reuse   # keep data/cache

It prints the stage times (wall and CPU, child processes included), the CPU model
and, on the held-out set, the model's ROC-AUC and the HU-histogram baseline's
(5-fold cross-validated on that set), both with bootstrap 95% CIs, and writes
`summary.json` in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: The demo's findings: the large ones a small network trained from scratch can learn.
KINDS = "consolidation,effusion,pneumothorax"


def cpu_model() -> str:
    """'model name, family F model M' from /proc/cpuinfo (or the platform's name)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    return (
        f"{info.get('model name', '?')}, family {info.get('cpu family', '?')} "
        f"model {info.get('model', '?')}"
    )


def ctscreen(*args: object, log: Path) -> dict[str, float]:
    """Run one `ctscreen` command; return its wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ctscreen", "--no-progress", *map(str, args)]
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd[2:]) + "\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code not in (0,):
        sys.exit(f"`ctscreen {args[0]}` failed with exit code {code}; see {log}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("matched-bench"))
    parser.add_argument("--studies", type=int, default=300, help="train + val studies (300)")
    parser.add_argument("--holdout", type=int, default=100, help="held-out studies (100)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=KINDS, help=f"finding kinds ({KINDS})")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--reuse", action="store_true", help="keep existing data and cache")
    args = parser.parse_args(argv)

    out = args.out
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    times: dict[str, dict[str, float]] = {}
    common = ["--matrix", "tiny", "--realism", "matched", "--pathologies", args.kinds]
    for name, n, seed in (("data", args.studies, args.seed), ("holdout", args.holdout, 1000)):
        if not (out / name / "labels.csv").exists():
            times[f"synth {name}"] = ctscreen(
                "synth", out / name, "--studies", n, "--seed", seed + args.seed, *common, log=log
            )
        ctscreen(
            "registry", "build", "synthetic", out / name, "-o", out / name / "registry.csv", log=log
        )
    ctscreen("split", out / "data" / "registry.csv", "--out-dir", out / "data", log=log)
    times["train"] = ctscreen(
        "train",
        "--registry", out / "data" / "registry.csv",
        "--train-keys", out / "data" / "train_keys.txt",
        "--val-keys", out / "data" / "val_keys.txt",
        "--out", out / "run", "--cache-dir", out / "cache",
        "--shape", 16, 48, 48, "--epochs", args.epochs, "--batch-size", 8, "--lr", 3e-4,
        "--lr-schedule", "cosine", "--no-augment", "--device", "cpu",
        "--resume-state", "on-interrupt", "--seed", args.seed,
        log=log,
    )  # fmt: skip
    keys = out / "holdout" / "keys.txt"
    import pandas as pd

    holdout = pd.read_csv(out / "holdout" / "registry.csv")
    keys.write_text("\n".join(holdout["study_key"]) + "\n", encoding="utf-8")
    times["evaluate"] = ctscreen(
        "evaluate",
        "--weights", out / "run" / "best.pth",
        "--registry", out / "holdout" / "registry.csv",
        "--keys", keys, "--out", out / "evaluation",
        "--device", "cpu", "--backend", "torch", "--n-boot", args.n_boot,
        log=log,
    )  # fmt: skip
    report = json.loads((out / "evaluation" / "metrics.json").read_text(encoding="utf-8"))
    model = report["metrics"]["roc_auc"]
    base = report["shortcut_baseline"]
    summary = {
        "cpu": cpu_model(),
        "times": times,
        "heldout_n": report["n"],
        "model_roc_auc": model,
        "baseline_heldout": base,
    }
    print(f"CPU: {summary['cpu']}")
    for name, t in times.items():
        print(f"  {name:<16} wall {t['wall_s']:>7.1f} s   cpu {t['cpu_s']:>7.1f} s")
    print(
        f"held-out ({report['n']} matched studies): model ROC-AUC {model['value']:.3f} "
        f"(95% CI {model['ci_low']:.3f}-{model['ci_high']:.3f})"
    )
    if "skipped" not in base:
        auc = base["roc_auc"]
        print(
            f"  HU-histogram baseline ({base['folds']}-fold CV) ROC-AUC {auc['value']:.3f} "
            f"(95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})"
        )
        if base.get("warning"):
            print(f"  WARNING: {base['warning']}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
