"""Time `ctscreen demo` per seed: wall time, CPU time (user + sys, worker processes
included), disk left behind and the held-out ROC-AUC, then the median and spread.

On a machine shared with other work the wall time says little; CPU time / cores
approximates the wall time on free cores (training and decoding use both cores,
synthesis one, so it is a lower bound).

    python benchmarks/bench_demo.py --seeds 0 1 2 --out /tmp/demo-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def folder_bytes(folder: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in folder.rglob("*"):
        st = path.lstat()
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def run_seed(seed: int, out: Path) -> dict[str, float]:
    """One demo run in a child process; its resource use from RUSAGE_CHILDREN."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ctscreen",
            "--no-progress",
            "demo",
            "--out",
            str(out),
            "--seed",
            str(seed),
        ],
        check=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = json.loads((out / "holdout_metrics.json").read_text())
    return {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "disk_mb": folder_bytes(out) / 1e6,
        "roc_auc": metrics["roc_auc"]["value"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("demo-bench"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = [run_seed(seed, args.out / f"seed{seed}") for seed in args.seeds]
    from ctscreen.hardware import cpu_model

    print(f"{cpu_model()}, {cores} cores")
    for r in rows:
        print(
            f"seed {r['seed']}: wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s "
            f"(~{r['cpu_s'] / cores:.0f} s on {cores} free cores), disk {r['disk_mb']:.0f} MB, "
            f"held-out ROC-AUC {r['roc_auc']:.3f}"
        )
    for key in ("wall_s", "cpu_s"):
        values = [r[key] for r in rows]
        print(f"{key}: median {statistics.median(values):.0f}, {min(values):.0f}-{max(values):.0f}")


if __name__ == "__main__":
    main()
