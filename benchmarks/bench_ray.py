"""Studies per second of plain ``predict`` and of ``predict --engine ray`` on the same archives.

Writes ``--n`` synthetic zip archives (one study each, ``--matrix`` preset) and a
random-weight checkpoint at the model input ``--shape`` once into a cache folder,
then runs ``ctscreen predict`` on all of them in a fresh process per engine, each
``--repeat`` times, alternating the engines so that a shared machine's drift hits
both alike:

* ``local``: the default engine (this process: a reader thread and the network);
* ``ray``: a local Ray with ``--ray-cpus`` CPUs (started and stopped by the command),
  reading as Ray tasks and ``--ray-scorers`` scoring workers (default: one per two CPUs).

It prints, per engine, the median process wall time (Python start, model load and,
for Ray, starting the cluster included), the median scoring wall time (the
``wall_seconds`` of the run's ``run.json``: from the first input to the table
written, Ray's workers and model loads included), studies per second of each, and
the largest difference of probability against ``local`` (the same table is the
point; speed is the price). With ``--device auto`` on a GPU machine the scoring
workers take a GPU each.

    python benchmarks/bench_ray.py [--n 40] [--matrix small] [--shape 16,48,48]
        [--repeat 2] [--ray-cpus N] [--ray-scorers N] [--device cpu]
        [--cache /tmp/ctscreen-bench-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("local", "ray")


def make_inputs(
    cache: Path, n: int, matrix: str, shape: tuple[int, int, int]
) -> tuple[list[Path], Path]:
    """The archives and the checkpoint, written once into ``cache``."""
    from ctscreen.synth.dataset import generate_dataset

    folder = cache / f"archives-{n}-{matrix}"
    if not (folder / "labels.csv").exists():
        t = time.perf_counter()
        generate_dataset(folder, n_studies=n, seed=0, matrix=matrix, zip_archives=True)
        print(f"wrote {n} archives in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    archives = sorted((folder / "archives").glob("*.zip"))[:n]
    weights = cache / f"model-{'x'.join(map(str, shape))}.pth"
    if not weights.exists():
        import torch

        from ctscreen.card import ModelCard
        from ctscreen.config import PreprocessConfig
        from ctscreen.model import build_model
        from ctscreen.weights import save_checkpoint

        torch.manual_seed(0)
        card = ModelCard(preprocess=PreprocessConfig(shape=shape))
        save_checkpoint(weights, build_model(), card)
    return archives, weights


def run_predict(
    engine: str, archives: list[Path], weights: Path, out: Path, args: argparse.Namespace
) -> dict[str, float]:
    """One ``ctscreen predict`` in a fresh process; its wall times and table."""
    command = [sys.executable, "-m", "ctscreen", "--no-progress", "predict", *map(str, archives)]
    command += ["-w", str(weights), "-o", str(out), "--overwrite", "--device", args.device]
    command += ["--backend", args.backend, "--precision", args.precision]
    if engine == "ray":
        command += ["--engine", "ray"]
        if args.ray_cpus:
            command += ["--ray-cpus", str(args.ray_cpus)]
        if args.ray_scorers:
            command += ["--ray-scorers", str(args.ray_scorers)]
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if done.returncode not in (0, 1):
        raise SystemExit(f"{engine} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    info = json.loads(out.with_name(out.stem + ".run.json").read_text())
    return {"process_s": wall, "scoring_s": float(info["wall_seconds"]), "studies": info["studies"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="archives (40)")
    parser.add_argument("--matrix", default="small", help="synthetic matrix preset (small)")
    parser.add_argument("--shape", default="16,48,48", help="model input D,H,W (the demo's)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per engine (2)")
    parser.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (all cores)")
    parser.add_argument("--ray-scorers", type=int, help="Ray scoring workers (default rule)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    parser.add_argument("--backend", default="torch", help="torch (default), openvino, auto")
    parser.add_argument("--precision", default="fp32", help="fp32 (default), bf16, auto, ...")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ctscreen-bench-ray"))
    args = parser.parse_args()

    import pandas as pd

    from ctscreen.hardware import cpu_model, usable_cores

    shape = tuple(int(s) for s in args.shape.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    archives, weights = make_inputs(args.cache, args.n, args.matrix, shape)  # type: ignore[arg-type]
    load_before = os.getloadavg()
    times: dict[str, list[dict[str, float]]] = {e: [] for e in ENGINES}
    for k in range(args.repeat):
        for engine in ENGINES if k % 2 == 0 else ENGINES[::-1]:
            out = args.cache / f"{engine}.csv"
            times[engine].append(run_predict(engine, archives, weights, out, args))
            print(f"{engine} run {k + 1}: {times[engine][-1]}", file=sys.stderr)
    load_after = os.getloadavg()
    tables = {e: pd.read_csv(args.cache / f"{e}.csv") for e in ENGINES}
    local = tables["local"]

    print(
        f"CPU: {cpu_model()}, {usable_cores()} cores usable; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {len(archives)} archives "
        f"({args.matrix} matrix), model input {'x'.join(map(str, shape))}, device "
        f"{args.device}, {args.backend} {args.precision}, median of {args.repeat}"
    )
    print(
        f"{'engine':<8} {'process s':>10} {'scoring s':>10} {'studies/s':>10} "
        f"{'(process)':>10} {'max |dp|':>10} {'same rows':>10}"
    )
    for engine in ENGINES:
        process = statistics.median(t["process_s"] for t in times[engine])
        scoring = statistics.median(t["scoring_s"] for t in times[engine])
        studies = times[engine][-1]["studies"]
        table = tables[engine]
        same = list(table["path_to_study"]) == list(local["path_to_study"]) and list(
            table["processing_status"]
        ) == list(local["processing_status"])
        dp = (table["probability_of_pathology"] - local["probability_of_pathology"]).abs().max()
        print(
            f"{engine:<8} {process:>10.1f} {scoring:>10.1f} {studies / scoring:>10.2f} "
            f"{studies / process:>10.2f} {dp:>10.2g} {str(same):>10}"
        )


if __name__ == "__main__":
    main()
