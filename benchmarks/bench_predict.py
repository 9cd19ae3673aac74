"""Prediction speed, accuracy and memory per backend, against the plain fp32 PyTorch forward.

Writes synthetic studies once into a cache folder (a 512x512 uncompressed series
zipped as one archive, and ``--n-small`` small studies), then prints one table:

* baseline: one plain fp32 PyTorch forward ``[1, 1, 96, 192, 192]`` (measured at the
  start and at the end of the run; the ratio uses their median);
* per backend and precision: model load time (export + compile, then from the
  cache), one forward, and the wall time of the whole ``predict()`` pipeline on the
  512x512 archive (discover, unzip, decode, preprocess, forward, localisation);
* ``--backend auto --precision auto``: ``--pairs`` times the archive's ``predict()``
  wall time over a plain fp32 forward timed just before it (the headline ratio,
  robust to a shared machine's drift); a batch of archives through ``predict()``
  with its reader thread (wall per study against the slowest stage), per-slice
  against per-study output, and the peak RSS of a ``--rss-archives`` batch against
  one archive (each in a fresh subprocess, ``ru_maxrss``);
* accuracy: largest |probability - fp32 probability| over the small studies and
  the number of decisions that flip at threshold 0.5.

Without ``--weights`` a random-weight r3d_18 is used whose head is scaled so that
the probabilities spread around 0.5 (a harder test of decision flips than a
trained model's confident outputs); pass ``--weights`` for a trained checkpoint.

    python benchmarks/bench_predict.py [--weights W.pth] [--slices 100] [--n-small 8]
        [--batch 4] [--rss-archives 20] [--repeat 2] [--pairs 3]
        [--cache /tmp/ctscreen-bench-predict] [--only-pairs]

``--only-pairs`` prints just the headline: the measured choice of ``auto`` (timed
on first use and kept in the user cache; the table it measured is printed) and the
paired ratios. Pass a checkpoint made by ``ctscreen quantize`` as ``--weights`` to
give ``auto`` its INT8 candidate.
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
import zipfile
from pathlib import Path

CONFIGS = (
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)


def installed_configs(
    configs: tuple[tuple[str, str], ...], *, int8: bool = False
) -> list[tuple[str, str]]:
    """The ``(backend, precision)`` pairs of ``configs`` whose backend is installed here
    (INT8 only for a checkpoint that carries an INT8 graph)."""
    from ctscreen.backends import openvino_version

    installed = {"torch": True, "openvino": bool(openvino_version())}
    return [
        (backend, precision)
        for backend, precision in configs
        if installed[backend] and (precision != "int8" or int8)
    ]


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _write_study(folder: Path, *, seed: int, slices: int, matrix: int) -> None:
    from ctscreen.synth.dicom_writer import write_series
    from ctscreen.synth.phantom import make_phantom

    spacing = (300.0 / slices, 350.0 / matrix, 350.0 / matrix)
    pathology = "nodule" if seed % 2 else None
    phantom = make_phantom(
        seed=seed, shape=(slices, matrix, matrix), spacing=spacing, pathology=pathology
    )
    write_series(
        phantom.hu,
        spacing=spacing,
        out_dir=folder,
        study_uid=f"1.2.826.0.9.{seed}",
        series_uid=f"1.2.826.0.9.{seed}.2",
        seed=seed,
    )


def make_data(cache: Path, *, slices: int, n_small: int) -> tuple[Path, list[Path]]:
    """The big archive and the small study folders, written once."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"study-{slices}x512.zip"
    if not archive.exists():
        folder = cache / "big"
        t = time.perf_counter()
        _write_study(folder, seed=101, slices=slices, matrix=512)
        partial = archive.with_suffix(".part")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"study/{f.name}")
        partial.rename(archive)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
        print(f"wrote {archive} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    small = []
    for i in range(n_small):
        folder = cache / f"small-{i}"
        if not (folder.is_dir() and any(folder.iterdir())):
            _write_study(folder, seed=200 + i, slices=64, matrix=256)
        small.append(folder)
    return archive, small


def random_weights(path: Path) -> Path:
    """A random r3d_18 checkpoint whose probabilities spread around 0.5."""
    if path.exists():
        return path
    import torch
    from torch import nn

    from ctscreen.card import ModelCard
    from ctscreen.model import build_model
    from ctscreen.weights import save_checkpoint

    torch.manual_seed(0)
    model = build_model().eval()
    nn.init.normal_(model.fc.weight, 0.0, 0.5)
    with torch.inference_mode():
        x = torch.rand(2, 1, 96, 192, 192)
        x[1] *= 0.5
        logits = model(x)[:, 0]
    model.fc.bias.data -= logits.mean()  # centre the logits near 0
    save_checkpoint(path, model, ModelCard())
    return path


def _time(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def plain_forward_seconds(model, repeat: int) -> float:  # noqa: ANN001
    """The original implementation's cost: ``model(x)`` in fp32, batch 1, 96x192x192."""
    import torch

    x = torch.rand(1, 1, 96, 192, 192)
    with torch.inference_mode():
        model(torch.rand(1, 1, 16, 32, 32))  # warm the allocator
        return _time(lambda: model(x), repeat)


def _scorer(weights: Path, backend: str, precision: str):  # noqa: ANN202
    import torch

    from ctscreen.screener import Screener

    return Screener(weights, device=torch.device("cpu"), precision=precision, backend=backend)


def _predict_wall(inputs: list[Path], scorer, *, mode: str = "study", repeat: int = 1) -> float:  # noqa: ANN001
    from ctscreen.report import result_rows

    def once() -> None:
        results = list(scorer.score(inputs))
        rows = [row for result in results for row in result_rows(result, mode)]
        assert all(result.ok for result in results), [r.error for r in rows if r.error]

    return _time(once, repeat)


def paired_ratios(model, scorer, archive: Path, pairs: int) -> list[float]:  # noqa: ANN001
    """``predict()`` wall time of one archive over a plain fp32 forward timed right
    before it (the faster of two), ``pairs`` times: on a shared machine whose speed
    drifts during a run, each ratio compares timings taken under the same conditions."""
    ratios = []
    for _ in range(pairs):
        base = plain_forward_seconds(model, 2)
        ratios.append(_predict_wall([archive], scorer) / base)
    return ratios


def _hwm_mib() -> float:
    """Peak RSS of this process image (``VmHWM``; ``ru_maxrss`` keeps the parent's peak
    across fork and exec, so in a child started by a big parent it reads too high)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(weights: Path, archive: Path, count: int) -> None:
    """Run ``predict`` on ``count`` copies of ``archive``; print peak RSS in MiB as JSON."""
    scorer = _scorer(weights, "auto", "auto")
    t = time.perf_counter()
    _predict_wall([archive] * count, scorer)
    print(json.dumps({"peak_mib": _hwm_mib(), "seconds": time.perf_counter() - t}))


def _rss(weights: Path, archive: Path, count: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-child",
            str(count),
            "--weights",
            str(weights),
            "--archive",
            str(archive),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def accuracy(weights: Path, small: list[Path], scorers: dict[str, object]) -> dict[str, tuple]:
    """Largest |p - p_fp32| and flips at 0.5 per configuration, over the small studies."""
    import tempfile

    import numpy as np

    from ctscreen.dicom.discover import discover
    from ctscreen.dicom.select import select_series
    from ctscreen.dicom.volume import build_volume
    from ctscreen.preprocess import preprocess

    base = scorers["torch/fp32"]
    arrays = []
    for folder in small:
        with tempfile.TemporaryDirectory() as tmp:
            study = discover(folder, work_dir=Path(tmp)).studies[0]
            volume = build_volume(select_series(study.series).best.series)
        arrays.append(preprocess(volume, base.config))

    def probs(scorer) -> np.ndarray:  # noqa: ANN001
        logits = np.array([scorer.forward(a[None])[0][0] for a in arrays], dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logits))

    ref = probs(base)
    median = float(np.median(ref))
    out = {"torch/fp32": (0.0, 0, 0, float(ref.min()), float(ref.max()))}
    for name, scorer in scorers.items():
        if name == "torch/fp32":
            continue
        p = probs(scorer)
        flips = int(((p >= 0.5) != (ref >= 0.5)).sum())
        flips_median = int(((p >= median) != (ref >= median)).sum())
        out[name] = (
            float(np.abs(p - ref).max()),
            flips,
            flips_median,
            float(p.min()),
            float(p.max()),
        )
    return out


def only_pairs(base, weights: Path, archive: Path, pairs: int, load_start: str) -> None:  # noqa: ANN001
    """The headline alone: auto's measured choice, then ``pairs`` paired ratios."""
    import torch

    from ctscreen.backends import ModelSource, choose_backend, openvino_version
    from ctscreen.hardware import cpu_model

    loaded = base.loaded
    choice, _ = choose_backend(ModelSource.of(loaded), device=torch.device("cpu"))
    t = time.perf_counter()
    auto = _scorer(weights, "auto", "auto")
    load_s = time.perf_counter() - t
    _predict_wall([archive], auto)  # warm-up: first inference, page cache
    ratios = paired_ratios(loaded.model, auto, archive, pairs)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), openvino {openvino_version() or 'not installed'}"
    )
    print(f"load average (1/5/15 min): start {load_start}, end {_load()}")
    print(f"auto's choice ({'kept' if choice.from_cache else 'measured now'}):")
    print(choice.table())
    print(f"auto runs {auto.engine.name}/{auto.engine.precision}; model load {load_s:.2f} s")
    print(
        f"predict() of one {archive.name} (reading included, model load excluded) over a "
        f"plain fp32 forward timed just before it, {pairs} pairs: "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + f"; median {statistics.median(ratios):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, help="checkpoint (default: random weights)")
    parser.add_argument("--slices", type=int, default=100, help="slices of the 512x512 study")
    parser.add_argument("--n-small", type=int, default=8, help="small studies for accuracy")
    parser.add_argument("--batch", type=int, default=4, help="archives in the throughput run")
    parser.add_argument("--rss-archives", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3, help="paired auto/base timings")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ctscreen-bench-predict"))
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--archive", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only-pairs", action="store_true", help="only auto's choice and the paired ratios"
    )
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.weights, args.archive, args.rss_child)
        return

    import torch

    from ctscreen.backends import openvino_version
    from ctscreen.hardware import cpu_model

    load_start = _load()
    archive, small = make_data(args.cache, slices=args.slices, n_small=args.n_small)
    weights = args.weights or random_weights(args.cache / "random-r3d18.pth")
    export_dir = weights.resolve().parent / ".ctscreen-export"

    base = _scorer(weights, "torch", "fp32")
    if args.only_pairs:
        only_pairs(base, weights, archive, args.pairs, load_start)
        return
    baseline = [plain_forward_seconds(base.loaded.model, args.repeat)]

    configs = installed_configs(CONFIGS, int8=base.loaded.int8_graph is not None)
    results: dict[str, dict[str, float]] = {}
    scorers: dict[str, object] = {}
    x = torch.rand(1, 96, 192, 192).numpy()
    for backend, precision in [*configs, ("auto", "auto")]:
        name = f"{backend}/{precision}"
        row: dict[str, float] = {}
        if backend == "openvino" and precision == "fp32":
            shutil.rmtree(export_dir, ignore_errors=True)  # time a cold export once
        t = time.perf_counter()
        scorer = _scorer(weights, backend, precision)
        row["load_s"] = time.perf_counter() - t
        if backend == "openvino":
            t = time.perf_counter()
            _scorer(weights, backend, precision)
            row["cached_load_s"] = time.perf_counter() - t
        scorer.forward(x)  # warm-up
        row["forward_s"] = _time(lambda s=scorer: s.forward(x), args.repeat)
        row["study_s"] = _predict_wall([archive], scorer, repeat=args.repeat)
        row["engine"] = f"{scorer.engine.name}/{scorer.engine.precision}"  # type: ignore[assignment]
        results[name] = row
        scorers[name] = scorer

    auto = scorers["auto/auto"]
    paired = paired_ratios(base.loaded.model, auto, archive, args.pairs)
    per_study = _predict_wall([archive], auto, repeat=args.repeat)
    per_slice = _predict_wall([archive], auto, mode="slice", repeat=args.repeat)

    t = time.perf_counter()
    results = list(auto.score([archive] * args.batch))
    batch_wall = time.perf_counter() - t
    read = statistics.mean(r.timings["read_s"] + r.timings["preprocess_s"] for r in results)
    model = statistics.mean(r.timings["model_s"] for r in results)

    acc = accuracy(weights, small, {k: v for k, v in scorers.items() if k != "auto/auto"})
    rss_one = _rss(weights, archive, 1)
    rss_many = _rss(weights, archive, args.rss_archives)
    baseline.append(plain_forward_seconds(base.loaded.model, args.repeat))
    ref = statistics.median(baseline)

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), openvino {openvino_version() or 'not installed'}"
    )
    print(f"load average (1/5/15 min): start {load_start}, end {_load()}")
    print(
        f"study: {args.slices} slices 512x512 uncompressed, one zip; weights: "
        f"{'given ' + str(weights) if args.weights else 'random'}"
    )
    print(
        f"baseline plain fp32 PyTorch forward 1x1x96x192x192: {ref:.2f} s "
        f"(start {baseline[0]:.2f}, end {baseline[1]:.2f})"
    )
    print()
    head = (
        f"{'backend/precision':<18}{'runs as':<15}{'load s':>8}{'cached':>8}{'fwd s':>8}"
        f"{'study s':>9}{'/base':>7}{'max|dp|':>9}{'flips':>6}{'@median':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, row in results.items():
        dp, flips, flips_median = acc.get(str(row["engine"]), (float("nan"), -1, -1))[:3]
        cached = f"{row['cached_load_s']:.2f}" if "cached_load_s" in row else "-"
        flips_text = "-" if flips < 0 else str(flips)
        median_text = "-" if flips_median < 0 else str(flips_median)
        print(
            f"{name:<18}{row['engine']:<15}{row['load_s']:>8.2f}{cached:>8}"
            f"{row['forward_s']:>8.2f}{row['study_s']:>9.2f}{row['study_s'] / ref:>7.2f}"
            f"{dp:>9.4f}{flips_text:>6}{median_text:>8}"
        )
    p_lo, p_hi = acc["torch/fp32"][3:]
    print(
        f"(accuracy over {len(small)} studies of 64x256x256; fp32 probabilities {p_lo:.3f}"
        f"-{p_hi:.3f}; flips at 0.5 and at the median fp32 probability; study s = whole "
        f"predict() on one archive, best of {args.repeat})"
    )
    print(
        f"auto/auto paired with a plain fp32 forward timed just before it, {args.pairs} "
        f"pairs: study/base median {statistics.median(paired):.2f} "
        f"(range {min(paired):.2f}-{max(paired):.2f})"
    )
    print()
    slowest = max(read, model)
    print(
        f"batch of {args.batch} archives (auto/auto, prefetch 2): {batch_wall / args.batch:.2f} "
        f"s/study ({batch_wall / args.batch / ref:.2f} x base); stages: read+preprocess "
        f"{read:.2f} s, forward {model:.2f} s; wall/slowest stage "
        f"{batch_wall / args.batch / slowest:.2f}"
    )
    print(
        f"per-slice output: {per_slice:.2f} s/study vs per-study {per_study:.2f} s "
        f"({args.slices} rows vs 1)"
    )
    print(
        f"peak RSS: 1 archive {rss_one['peak_mib']:.0f} MiB, {args.rss_archives} archives "
        f"{rss_many['peak_mib']:.0f} MiB ({rss_many['seconds'] / args.rss_archives:.2f} s/study)"
    )


if __name__ == "__main__":
    main()
