"""How well one forward pass localises a lesion, compared with chance.

On a synthetic dataset made by ``ctscreen synth`` (its ``labels.csv`` gives each
lesion's centre and box in LPS mm), for every study that carries a lesion:

* **slice hit**: the highest-scoring slice (per-slice scores from the activation
  map, :func:`ctscreen.explain.slice_scores`) lies within the lesion's z range,
  widened by half a slice spacing on each side (a slice is a slab, the range runs
  between voxel centres). Chance: the share of the scan's slices that would count
  as a hit, i.e. what a slice picked at random scores.
* **box hit**: the localisation box (:func:`ctscreen.explain.localization_box`,
  computed for every lesion study whatever the decision) contains the lesion
  centre. Chance: the box's share of the scanned volume (a random point's odds).
* **peak hit**: the centre of the hottest activation cell lies inside the
  lesion box (widened by half a voxel). Chance: the lesion box's share of the scan.

Chance rates are averaged over the studies; "expected" is their sum, and ``z`` is
how many standard deviations the observed hits lie above it (Poisson-binomial
normal approximation). Rates come with Wilson 95% intervals.

Usage::

    python benchmarks/bench_localization.py --weights run/best.pth --data synth_data
    python benchmarks/bench_localization.py --weights w.pth --data d --limit 50 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StudyResult:
    """Localisation outcome of one lesion study."""

    study_uid: str
    probability: float
    called_pathology: int
    top_slice: int
    top_slice_z: float
    slice_hit: bool
    slice_chance: float
    box_hit: bool
    box_chance: float
    peak_hit: bool
    peak_chance: float


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def scan_bounds(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """LPS bounds ``[[x0, x1], [y0, y1], [z0, z1]]`` of the scanned voxels (outer edges)."""
    edges = [(-0.5, n - 0.5) for n in shape]
    corners = np.array([[a, b, c, 1.0] for a in edges[0] for b in edges[1] for c in edges[2]])
    world = (affine @ corners.T).T[:, :3]
    return np.stack([world.min(axis=0), world.max(axis=0)], axis=1)


def box_share(box: np.ndarray, bounds: np.ndarray) -> float:
    """Share of the scan's bounding volume that ``box`` ([[lo, hi]] x 3, mm) covers."""
    lo = np.maximum(box[:, 0], bounds[:, 0])
    hi = np.minimum(box[:, 1], bounds[:, 1])
    inside = np.prod(np.clip(hi - lo, 0.0, None))
    return float(inside / np.prod(bounds[:, 1] - bounds[:, 0]))


def evaluate_study(visual, label: dict[str, str]) -> StudyResult:  # noqa: ANN001
    """Score one study's localisation against its ``labels.csv`` row."""
    from ctscreen.explain import localization_box, slice_scores

    volume = visual.geometry
    affine = volume.affine
    n_slices, height, width = volume.shape
    scores = slice_scores(visual.cam, visual.bias, n_slices)
    top = int(np.argmax(scores))
    centres = (
        affine @ np.array([[i, (height - 1) / 2, (width - 1) / 2, 1.0] for i in range(n_slices)]).T
    ).T[:, :3]
    half = 0.5 * abs(float(volume.spacing[0]))
    z_lo = float(label["lesion_z_min"]) - half
    z_hi = float(label["lesion_z_max"]) + half
    in_range = (centres[:, 2] >= z_lo) & (centres[:, 2] <= z_hi)
    bounds = scan_bounds(affine, volume.shape)

    centre = np.array([float(label[f"lesion_center_{a}"]) for a in "xyz"])
    box = localization_box(visual.cam, volume)
    if box is None:
        box_hit, box_chance = False, 0.0
    else:
        b = np.array(box, dtype=np.float64).reshape(3, 2)
        box_hit = bool(np.all((centre >= b[:, 0]) & (centre <= b[:, 1])))
        box_chance = box_share(b, bounds)

    cam = np.asarray(visual.cam)
    peak = np.array(np.unravel_index(int(np.argmax(cam)), cam.shape), dtype=np.float64)
    peak_index = (peak + 0.5) / np.array(cam.shape) * np.array(volume.shape) - 0.5
    peak_world = (affine @ np.append(peak_index, 1.0))[:3]
    voxel = np.abs(affine[:3, :3]).sum(axis=1) / 2  # half a voxel along x, y, z (mm)
    lesion = np.array(
        [[float(label[f"lesion_{a}_min"]), float(label[f"lesion_{a}_max"])] for a in "xyz"]
    )
    lesion_wide = lesion + np.stack([-voxel, voxel], axis=1)
    peak_hit = bool(np.all((peak_world >= lesion_wide[:, 0]) & (peak_world <= lesion_wide[:, 1])))
    return StudyResult(
        study_uid=label["study_uid"],
        probability=float(visual.probability),
        called_pathology=int(visual.pathology),
        top_slice=top,
        top_slice_z=round(float(centres[top, 2]), 2),
        slice_hit=bool(in_range[top]),
        slice_chance=float(in_range.mean()),
        box_hit=box_hit,
        box_chance=box_chance,
        peak_hit=peak_hit,
        peak_chance=box_share(lesion_wide, bounds),
    )


def summarise(results: list[StudyResult]) -> dict[str, dict[str, float]]:
    """Hit rate, Wilson interval, chance rate and z score per measure."""
    out = {}
    n = len(results)
    for name in ("slice", "box", "peak"):
        hits = sum(getattr(r, f"{name}_hit") for r in results)
        chances = np.array([getattr(r, f"{name}_chance") for r in results])
        expected = float(chances.sum())
        sd = float(np.sqrt((chances * (1 - chances)).sum()))
        low, high = wilson(hits, n)
        out[name] = {
            "hits": hits,
            "n": n,
            "rate": hits / n if n else float("nan"),
            "ci_low": low,
            "ci_high": high,
            "chance_rate": float(chances.mean()) if n else float("nan"),
            "expected_hits": expected,
            "z": (hits - expected) / sd if sd > 0 else float("nan"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="checkpoint (.pth)")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder made by `ctscreen synth` (labels.csv inside)",
    )
    parser.add_argument("--limit", type=int, default=0, help="at most this many lesion studies")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write per-study results and the summary")
    args = parser.parse_args(argv)

    import torch  # noqa: F401  (heavy: only once the arguments are fine)

    from ctscreen.screener import Screener

    with open(args.data / "labels.csv", newline="", encoding="utf-8") as handle:
        labels = [row for row in csv.DictReader(handle) if int(row["n_lesions"] or 0) > 0]
    if args.limit:
        labels = labels[: args.limit]
    if not labels:
        print(f"no study with a lesion in {args.data / 'labels.csv'}", file=sys.stderr)
        return 2
    by_uid = {row["study_uid"]: row for row in labels}
    scorer = Screener(args.weights, device=args.device)
    device, loaded = scorer.device, scorer.loaded
    results: list[StudyResult] = []
    failures = 0
    start = time.perf_counter()
    for scored in scorer.score([args.data / row["path"] for row in labels]):
        label = by_uid.get(scored.study_uid)
        if not scored.ok:
            failures += 1
        elif label is not None:
            results.append(evaluate_study(scored, label))
    seconds = time.perf_counter() - start
    summary = summarise(results)
    print(f"weights {args.weights} (sha256 {loaded.sha256[:12]}), device {device}")
    print(
        f"{len(results)} lesion studies scored, {failures} failed, {seconds:.1f} s; "
        f"{sum(r.called_pathology for r in results)} called pathology"
    )
    print(f"{'measure':<34}{'hits':>9}{'rate':>8}{'95% CI':>16}{'chance':>9}{'z':>7}")
    names = {
        "slice": "top slice in lesion z-range",
        "box": "box contains lesion centre",
        "peak": "hottest cell inside lesion box",
    }
    for key, text in names.items():
        s = summary[key]
        interval = f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
        print(
            f"{text:<34}{s['hits']:>4}/{s['n']:<4}{s['rate']:>8.3f}{interval:>16}"
            f"{s['chance_rate']:>9.3f}{s['z']:>7.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "weights": str(args.weights),
                    "sha256": loaded.sha256,
                    "device": str(device),
                    "seconds": seconds,
                    "failures": failures,
                    "summary": summary,
                    "studies": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
