"""Samples per second of the training data path, cached vs uncached.

Writes synthetic chest-like NIfTI studies (int16 HU, gzip, like MosMedData), then
times one pass of :class:`ctscreen.data.dataset.StudyDataset` over them:

* uncached: every item reads the NIfTI, reorients, windows and resizes;
* cache build: :func:`ctscreen.data.cache.build_cache` with 1 and N workers;
* cached: every item loads a uint8 entry (with and without augmentation).

Also reports the entry size and the largest quantisation error in HU.

    python benchmarks/bench_cache.py --studies 6 --size 256 --slices 160
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ctscreen.config import PreprocessConfig
from ctscreen.data import cache as cache_lib
from ctscreen.data.dataset import StudyDataset
from ctscreen.train.augment import augment_volume


def synthetic_study(size: int, slices: int, seed: int) -> np.ndarray:
    """An int16 HU volume (x, y, z): air, an elliptic body, two darker lungs, noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    lungs = ((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    lungs |= ((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    plane = np.where(body, 40.0, -1000.0)
    plane = np.where(lungs, -850.0, plane)
    vol = np.repeat(plane[:, :, None], slices, axis=2)
    vol += rng.normal(0, 20, vol.shape)
    return np.clip(vol, -1024, 3071).astype(np.int16)


def time_pass(dataset: StudyDataset) -> float:
    """Seconds for one pass over every item."""
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--size", type=int, default=256, help="in-plane voxels")
    parser.add_argument("--slices", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    config = PreprocessConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for i in range(args.studies):
            path = root / f"s{i}.nii.gz"
            img = nib.Nifti1Image(
                synthetic_study(args.size, args.slices, i), np.diag([0.7, 0.7, 1.5, 1.0])
            )
            nib.save(img, str(path))
            rows.append(
                {"study_key": f"b:{i}", "path": str(path), "path_type": "nifti", "label": i % 2}
            )
        frame = pd.DataFrame(rows)
        n = len(frame)
        print(
            f"{n} synthetic studies {args.size}x{args.size}x{args.slices} int16 .nii.gz, "
            f"target shape {config.shape}, torch threads {torch.get_num_threads()}"
        )

        uncached = time_pass(StudyDataset(frame, config))
        print(
            f"uncached pass:            {n / uncached:7.2f} samples/s ({uncached / n:.3f} s each)"
        )

        t1 = cache_lib.build_cache(frame, root / "c1", config, workers=1, progress=False)
        print(f"cache build, 1 worker:    {n / t1.seconds:7.2f} studies/s")
        tn = cache_lib.build_cache(frame, root / "cN", config, workers=args.workers, progress=False)
        print(
            f"cache build, {args.workers} workers:   {n / tn.seconds:7.2f} studies/s "
            "(includes starting the spawned processes)"
        )
        reuse = cache_lib.build_cache(frame, root / "c1", config, workers=1, progress=False)
        print(f"cache re-run (all reused): {reuse.seconds:.3f} s")

        cached_set = StudyDataset(frame, config, cache_dir=root / "c1")
        cached = time_pass(cached_set)
        print(f"cached pass:              {n / cached:7.2f} samples/s ({cached / n:.4f} s each)")
        augmented = time_pass(
            StudyDataset(frame, config, cache_dir=root / "c1", transform=augment_volume)
        )
        print(f"cached + augmentation:    {n / augmented:7.2f} samples/s")
        print(f"speed-up cached/uncached: {uncached / cached:7.1f}x")

        entry = next(t1.root.glob("*.npy"))
        direct = cache_lib.decode_study(frame.loc[0, "path"], "nifti", config)
        err_hu = config.window_width * np.abs(
            cache_lib.load_entry(
                cache_lib.entry_path(root / "c1", config, "b:0", frame.loc[0, "path"])
            )
            - direct
        )
        print(
            f"entry size: {entry.stat().st_size / 1e6:.2f} MB (float32 would be "
            f"{direct.nbytes / 1e6:.2f} MB); quantisation error max "
            f"{err_hu.max():.2f} HU, mean {err_hu.mean():.2f} HU"
        )


if __name__ == "__main__":
    main()
