"""Time the synthetic generator: one phantom and a 60-study dataset.

Run: ``python benchmarks/bench_synth.py [--studies 60] [--matrix small]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ctscreen.synth import PATHOLOGIES, generate_dataset, make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--matrix", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    for kind in (None, *PATHOLOGIES):
        best = float("inf")
        for rep in range(3):
            start = time.perf_counter()
            make_phantom(seed=rep, shape=(64, 128, 128), spacing=(5.0, 2.7, 2.7), pathology=kind)
            best = min(best, time.perf_counter() - start)
        print(f"phantom 64x128x128 {kind or 'normal':>14}: {best * 1000:7.1f} ms (best of 3)")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        labels = generate_dataset(
            Path(tmp), n_studies=args.studies, seed=args.seed, matrix=args.matrix
        )
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        print(
            f"dataset {args.studies} studies ({args.matrix}): {elapsed:.1f} s, "
            f"{size / 1e6:.0f} MB, labels at {labels.name}"
        )


if __name__ == "__main__":
    main()
