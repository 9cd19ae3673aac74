"""Reading + preprocessing a 300-slice 512x512 CT series against the plain pydicom floor.

Writes a synthetic chest series (uncompressed, and a JPEG 2000 lossless copy) once
into a cache folder, then measures, each in a fresh subprocess so that peak memory
is that of the measured work alone:

* floor: ``pydicom.dcmread(f).pixel_array`` for every file (nothing else);
* ctscreen-1w / ctscreen-2w: discover (headers) -> select -> build_volume (HU,
  canonical) -> preprocess, decoding compressed files in 1 (this process) or 2
  worker processes. ``slices/s`` is the decode throughput of reading alone
  (discover + build_volume), without preprocessing.

Peak memory is the rise of the process's peak RSS (VmHWM) over its RSS after imports,
compared with the raw int16 size of the series (300 x 512 x 512 x 2 bytes = 150 MiB).

    python benchmarks/bench_read.py [--slices 300] [--matrix 512] [--repeat 3] [--cache DIR]
        [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss can carry its parent's peak.
    return _status_mib("VmHWM")


def measure(kind: str, folder: Path) -> dict[str, float]:
    """Time one way of reading ``folder``: ``floor`` or ``ctscreen-<N>w`` (N decode workers)."""
    import tempfile

    import numpy as np
    import pydicom

    from ctscreen.config import PreprocessConfig
    from ctscreen.dicom.discover import discover
    from ctscreen.dicom.select import select_series
    from ctscreen.dicom.volume import build_volume
    from ctscreen.preprocess import preprocess

    files = sorted(p for p in folder.iterdir() if p.is_file())
    for f in files[:2]:  # warm the imports of codecs, not the page cache of all files
        _ = pydicom.dcmread(f).pixel_array
    base = _rss_mib()
    t0 = time.perf_counter()
    if kind == "floor":
        total = 0
        for f in files:
            total += int(pydicom.dcmread(f).pixel_array[0, 0])
        result: dict[str, float] = {}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            found = discover(folder, work_dir=Path(tmp))
            t_disc = time.perf_counter()
            workers = int(kind.removeprefix("ctscreen-").removesuffix("w"))
            volume = build_volume(
                select_series(found.studies[0].series).best.series, decode_workers=workers
            )
            t_vol = time.perf_counter()
            x = preprocess(volume, PreprocessConfig())
            assert x.shape == (96, 192, 192) and np.isfinite(x).all()
        result = {
            "discover_s": t_disc - t0,
            "volume_s": t_vol - t_disc,
            "preprocess_s": time.perf_counter() - t_vol,
            "slices_per_s": len(files) / (t_vol - t0),
        }
    result["seconds"] = time.perf_counter() - t0
    result["peak_rise_mib"] = _peak_mib() - base
    return result


def make_series(cache: Path, slices: int, matrix: int) -> dict[str, Path]:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from ctscreen.synth.dicom_writer import write_series
    from ctscreen.synth.phantom import make_phantom

    out = {"uncompressed": cache / f"u{slices}x{matrix}", "jpeg2000": cache / f"j{slices}x{matrix}"}
    if all(p.is_dir() and any(p.iterdir()) for p in out.values()):
        return out
    spacing = (1.0, 350.0 / matrix, 350.0 / matrix)
    phantom = make_phantom(seed=7, shape=(slices, matrix, matrix), spacing=spacing)
    for (name, folder), ts in zip(
        out.items(), (ExplicitVRLittleEndian, JPEG2000Lossless), strict=True
    ):
        t = time.perf_counter()
        write_series(
            phantom.hu,
            spacing=spacing,
            out_dir=folder,
            study_uid="1.2.3.4",
            series_uid=f"1.2.3.4.{len(name)}",
            transfer_syntax=ts,
            seed=7,
        )
        print(f"wrote {name} series in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ctscreen-bench"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    series = make_series(args.cache, args.slices, args.matrix)
    raw_mib = args.slices * args.matrix * args.matrix * 2 / 1024**2
    print(
        f"series: {args.slices} slices of {args.matrix}x{args.matrix}, raw int16 {raw_mib:.0f} MiB"
    )
    print(
        f"{'series':<14}{'what':<13}{'best s':>8}{'ratio':>8}{'slices/s':>9}{'peak MiB':>10}"
        f"{'x raw':>7}  stages (best run)"
    )
    kinds = ["floor", *(f"ctscreen-{n}w" for n in args.workers)]
    for name, folder in series.items():
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeat):
            for kind in kinds:
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", kind, str(folder)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                r = json.loads(out)
                if kind not in best or r["seconds"] < best[kind]["seconds"]:
                    best[kind] = r
        floor = best["floor"]["seconds"]
        for kind in kinds:
            r = best[kind]
            rate = r.get("slices_per_s", args.slices / r["seconds"])
            stages = " ".join(f"{k}={v:.2f}" for k, v in r.items() if k.endswith("_s"))
            print(
                f"{name:<14}{kind:<13}{r['seconds']:>8.2f}{r['seconds'] / floor:>8.2f}"
                f"{rate:>9.0f}{r['peak_rise_mib']:>10.0f}{r['peak_rise_mib'] / raw_mib:>7.2f}"
                f"  {stages}"
            )


if __name__ == "__main__":
    main()
