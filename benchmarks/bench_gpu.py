"""Studies per second on a GPU, where the bottleneck is, and pipelining against stages in turn.

Uses the 512x512 synthetic archive of ``bench_predict.py`` (written once into the
cache) ``--studies`` times and a random-weight r3d_18 at (96, 192, 192), then prints
one table:

* read: discover + decode + preprocess alone (``prepare_inputs``), per reader count;
* forward: the network alone on ready inputs, per batch size (CUDA synchronised);
* predict: the whole pipeline per batch size and reader count, its studies/s,
  the slower stage's rate, and the speed-up over running the stages one after
  another (``1 / (1/read + 1/forward)``).

Also runs on the CPU (``--device cpu``) to check the script itself.

    python benchmarks/bench_gpu.py [--device cuda] [--studies 16] [--slices 100]
        [--batch-sizes 1 4 8] [--readers 1 4] [--precision auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import make_data, random_weights  # noqa: E402


def _sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_rate(inputs: list[Path], config, readers: int) -> float:  # noqa: ANN001
    """Studies per second of reading alone."""
    from ctscreen.config import SelectionConfig
    from ctscreen.pipeline import ReadSettings, prepare_inputs

    t = time.perf_counter()
    n = sum(
        job.array is not None
        for job in prepare_inputs(
            inputs, ReadSettings(config=config, selection=SelectionConfig()), readers=readers
        )
    )
    return n / (time.perf_counter() - t)


def forward_rate(scorer, batch: int, repeat: int = 3) -> float:  # noqa: ANN001
    """Studies per second of the network alone at ``batch`` studies per pass."""
    import numpy as np

    x = np.random.default_rng(0).random((batch, *scorer.config.shape), dtype=np.float32)
    scorer.forward(x)  # warm-up (cuDNN autotuning, allocator)
    _sync(scorer.device)
    t = time.perf_counter()
    for _ in range(repeat):
        scorer.forward(x)
    _sync(scorer.device)
    return batch * repeat / (time.perf_counter() - t)


def predict_rate(inputs: list[Path], scorer, batch: int, readers: int) -> float:  # noqa: ANN001
    scorer.batch_size, scorer.readers, scorer.prefetch = batch, readers, max(2, batch)
    t = time.perf_counter()
    results = list(scorer.score(inputs))
    _sync(scorer.device)
    assert all(result.ok for result in results)
    return len(results) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ctscreen-bench-predict"))
    args = parser.parse_args()

    import torch

    from ctscreen.screener import Screener

    device = torch.device(args.device)
    archive, _ = make_data(args.cache, slices=args.slices, n_small=0)
    weights = random_weights(args.cache / "random-r3d18.pth")
    scorer = Screener(weights, device=device, precision=args.precision, backend="torch")
    inputs = [archive] * args.studies
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}; {len(os.sched_getaffinity(0))} CPU cores; torch {torch.__version__}; "
        f"{scorer.engine.name}/{scorer.engine.precision}; {args.studies} studies of "
        f"{args.slices} slices 512x512 -> {tuple(scorer.config.shape)}"
    )
    reads = {r: read_rate(inputs, scorer.config, r) for r in args.readers}
    forwards = {b: forward_rate(scorer, b) for b in args.batch_sizes}
    for r, rate in reads.items():
        print(f"read alone, {r} reader(s): {rate:6.2f} studies/s")
    for b, rate in forwards.items():
        print(f"forward alone, batch {b}: {rate:6.2f} studies/s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(
        f"{'batch':>5}{'readers':>8}{'studies/s':>11}{'slowest stage':>15}{'bottleneck':>12}"
        f"{'/ slowest':>10}{'/ in turn':>10}"
    )
    for b in args.batch_sizes:
        for r in args.readers:
            rate = predict_rate(inputs, scorer, b, r)
            slowest = min(reads[r], forwards[b])
            in_turn = 1.0 / (1.0 / reads[r] + 1.0 / forwards[b])
            where = "read" if reads[r] < forwards[b] else "forward"
            print(
                f"{b:>5}{r:>8}{rate:>11.2f}{slowest:>15.2f}{where:>12}"
                f"{rate / slowest:>10.2f}{rate / in_turn:>10.2f}"
            )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
        print(f"peak GPU memory allocated: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
