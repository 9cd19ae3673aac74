"""Stack the slices of one series into a canonical HU volume.

Slices are ordered by ImagePositionPatient projected on the slice normal
(row cosine x column cosine), never by InstanceNumber or file name. What is off
is detected and reported, and the volume is still built when that is honest:

* exact copies of one instance (same SOPInstanceUID and frame) are kept once;
* different instances at the same position keep the one with the lowest
  (AcquisitionNumber-free) InstanceNumber, then SOPInstanceUID, and say so;
* gaps (a step over 1.5x the median) and non-uniform steps are reported; the
  median step is used as the slice spacing;
* a gantry tilt (slices stacked along a direction that is not the normal) is
  reported and kept in the affine, which uses the real stacking vector;
* mixed orientations or matrix sizes make a volume impossible (VolumeError).

HU come from each slice's own RescaleSlope/RescaleIntercept (per frame, from
the functional groups, for enhanced multi-frame CT).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import iter_pixels, pixel_array
from pydicom.uid import UID

from ..errors import DecodeError, VolumeError
from ..volume import (
    SliceRef,
    Volume,
    canonical_permutation,
    reorient_affine,
    spacing_from_affine,
)
from .discover import FrameGeometry, InstanceHeader, Series

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3  # max difference between direction cosines of one series
GAP_FACTOR = 1.5  # a step longer than this many median steps is a gap
UNIFORM_TOLERANCE = 0.05  # relative deviation of a step from the median that is reported
TILT_REPORT_DEG = 0.5
PARALLEL_MIN_FILES = 24  # fewer compressed files decode faster than workers start


@dataclass(frozen=True)
class _Slice:
    header: InstanceHeader
    frame: FrameGeometry
    distance: float  # position projected on the normal, mm


@dataclass(frozen=True)
class SliceGeometry:
    """The ordered slices of a series and what was found wrong with them."""

    slices: tuple[_Slice, ...]
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    step_mm: float
    stack_vector: np.ndarray  # mm from one slice to the next, in LPS
    warnings: tuple[str, ...]


def _frames_of(series: Series) -> list[tuple[InstanceHeader, FrameGeometry]]:
    return [(h, f) for h in series.instances for f in h.frames]


def order_slices(series: Series) -> SliceGeometry:
    """Sort a series' frames along the slice normal and check its geometry.

    Raises:
        VolumeError: orientation, position, spacing or matrix size are missing
            or inconsistent so that no volume can honestly be built.
    """
    frames = _frames_of(series)
    if not frames:
        raise VolumeError("the series holds no image frames; export the CT series again.")
    missing = [h.display_path for h, f in frames if f.position is None or f.orientation is None]
    if missing:
        raise VolumeError(
            f"{len(missing)} slice(s) lack ImagePositionPatient or ImageOrientationPatient "
            f"(e.g. {missing[0]}), so slice order and geometry are unknown; export the series "
            "with its geometry tags."
        )
    orientations = np.array([f.orientation for _, f in frames], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise VolumeError(
            "the slices of this series have different orientations (e.g. axial and sagittal "
            "mixed); export each reconstruction as its own series."
        )
    sizes = {(h.rows, h.columns) for h, _ in frames}
    if len(sizes) > 1:
        raise VolumeError(
            f"the slices have different matrix sizes {sorted(sizes)}; they cannot be stacked."
        )
    spacings = {f.pixel_spacing for _, f in frames}
    if None in spacings:
        raise VolumeError("PixelSpacing is missing; the voxel size is unknown.")
    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    warnings: list[str] = []
    if len(spacings) > 1:
        warnings.append(
            f"PixelSpacing differs between slices {sorted(spacings)}; the first is used"
        )
    pixel_spacing = next(iter(sorted(spacings)))  # type: ignore[arg-type]

    items = [_Slice(h, f, float(np.dot(np.asarray(f.position), normal))) for h, f in frames]
    items.sort(
        key=lambda s: (
            s.distance,
            s.header.instance_number or 0,
            s.header.sop_instance_uid,
            s.frame.frame or 0,
        )
    )
    items, dup_warnings = _drop_duplicates(items)
    warnings.extend(dup_warnings)
    if len(items) < 2:
        raise VolumeError(
            f"only {len(items)} distinct slice position(s); a volume needs at least 2."
        )
    distances = np.array([s.distance for s in items])
    steps = np.diff(distances)
    step = float(np.median(steps))
    warnings.extend(_spacing_warnings(steps, step, distances))
    first = np.asarray(items[0].frame.position)
    last = np.asarray(items[-1].frame.position)
    stack = (last - first) / (len(items) - 1)
    # Direction of stacking vs the normal: a gantry tilt shears the volume.
    cos_tilt = abs(float(np.dot(stack, normal))) / max(float(np.linalg.norm(stack)), 1e-9)
    tilt = math.degrees(math.acos(min(1.0, cos_tilt)))
    if tilt > TILT_REPORT_DEG:
        tag = items[0].header.gantry_tilt
        tag_text = f" (GantryDetectorTilt {tag:g}°)" if tag else ""
        warnings.append(
            f"gantry tilt of {tilt:.1f}°{tag_text}: slices are stacked along the table, "
            "kept sheared in the affine, not resampled"
        )
    return SliceGeometry(
        slices=tuple(items),
        row_cosine=row,
        col_cosine=col,
        normal=normal,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        step_mm=step,
        stack_vector=stack,
        warnings=tuple(warnings),
    )


def _drop_duplicates(items: list[_Slice]) -> tuple[list[_Slice], list[str]]:
    """Keep one slice per position; say how many copies and conflicts were dropped."""
    seen_instances: set[tuple[str, int | None]] = set()
    kept: list[_Slice] = []
    copies = conflicts = 0
    for s in items:
        key = (s.header.sop_instance_uid, s.frame.frame)
        if key in seen_instances:
            copies += 1
            continue
        seen_instances.add(key)
        if kept and abs(s.distance - kept[-1].distance) < 1e-3:
            conflicts += 1
            continue
        kept.append(s)
    warnings = []
    if copies:
        warnings.append(f"{copies} duplicate copies of the same instance were ignored")
    if conflicts:
        warnings.append(
            f"{conflicts} slice(s) share a position with another instance; at each position "
            "the instance with the lowest InstanceNumber (then SOPInstanceUID) was kept"
        )
    return kept, warnings


def _spacing_warnings(steps: np.ndarray, step: float, distances: np.ndarray) -> list[str]:
    warnings = []
    gaps = np.nonzero(steps > GAP_FACTOR * step)[0]
    for i in gaps[:5]:
        missing = int(round(steps[i] / step)) - 1
        warnings.append(
            f"gap in the slices: {steps[i]:.2f} mm between z={distances[i]:.2f} and "
            f"z={distances[i + 1]:.2f} (about {missing} missing slice(s))"
        )
    if len(gaps) > 5:
        warnings.append(f"... and {len(gaps) - 5} more gaps")
    regular = np.delete(steps, gaps)
    if regular.size and np.abs(regular - step).max() > UNIFORM_TOLERANCE * step:
        warnings.append(
            f"non-uniform slice spacing from {steps.min():.2f} to {steps.max():.2f} mm; "
            f"the median {step:.2f} mm is used"
        )
    return warnings


def geometry_affine(geometry: SliceGeometry) -> np.ndarray:
    """Affine of the array indexed [slice (sorted), row, column] -> LPS mm."""
    row_spacing, col_spacing = geometry.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = geometry.stack_vector
    affine[:3, 1] = geometry.col_cosine * row_spacing  # moving down one row
    affine[:3, 2] = geometry.row_cosine * col_spacing  # moving right one column
    affine[:3, 3] = np.asarray(geometry.slices[0].frame.position)
    return affine


def _decode_error(header: InstanceHeader, exc: Exception) -> DecodeError:
    ts = header.transfer_syntax
    name = UID(ts).name if ts else "an unknown transfer syntax"
    return DecodeError(
        f"cannot decode the pixel data of {header.display_path}, compressed as {name} "
        f"({ts or '?'}): {exc}; convert the series to uncompressed DICOM "
        "(e.g. gdcmconv --raw) and try again."
    )


def decode_single_frame(path: str) -> np.ndarray:
    """Decode a single-frame file with pydicom (a top-level function, so that
    worker processes can run it)."""
    try:
        return pixel_array(path)
    except (AttributeError, KeyError, ValueError, pydicom.errors.InvalidDicomError):
        # no preamble/file meta: let dcmread guess the encoding
        return pydicom.dcmread(path, force=True).pixel_array


def default_decode_workers() -> int:
    """Processes for decoding compressed slices: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _main_module_importable() -> bool:
    """Spawned workers re-import ``__main__``; that fails for code piped on stdin."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _parallel_decode(
    headers: list[InstanceHeader], workers: int
) -> Iterator[tuple[InstanceHeader, np.ndarray]]:
    """Decode compressed single-frame files in worker processes, in order.

    Decoders such as OpenJPEG hold the GIL, so threads do not help; processes
    do. Should any file fail, the rest is decoded here, one by one, so that the
    error names the file and its transfer syntax.
    """
    done = 0
    context = multiprocessing.get_context("spawn")  # safe beside the reader thread
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(decode_single_frame, [str(h.path) for h in headers], chunksize=8)
            for header, arr in zip(headers, results, strict=True):
                yield header, arr
                done += 1
    except Exception as exc:  # noqa: BLE001 - any worker failure is retried serially below
        log.debug("parallel decode stopped after %d files: %s", done, exc)
    for header in headers[done:]:
        for _, arr in _file_frames(header, {header.frames[0].frame}):
            yield header, arr


def _file_frames(
    header: InstanceHeader, wanted: set[int | None]
) -> Iterator[tuple[int | None, np.ndarray]]:
    """Decode the frames of one file that are in ``wanted``, one at a time."""
    try:
        native = header.native_pixels
        if native is not None:
            count = header.rows * header.columns
            arr = np.fromfile(header.path, dtype=native.dtype, count=count, offset=native.offset)
            if arr.size != count:
                raise ValueError(f"file ends after {arr.size} of {count} pixels")
            yield header.frames[0].frame, arr.reshape(header.rows, header.columns)
            return
        if header.number_of_frames == 1:
            yield header.frames[0].frame, decode_single_frame(str(header.path))
            return
        indices = sorted(k - 1 for k in wanted if k is not None)
        for k, arr in zip(indices, iter_pixels(header.path, indices=indices), strict=True):
            yield k + 1, arr
    except (RuntimeError, NotImplementedError, ValueError, OSError, AttributeError) as exc:
        raise _decode_error(header, exc) from exc


def _frames_of_files(
    headers: list[InstanceHeader], wanted_by_file: dict[Path, set[int | None]]
) -> Iterator[tuple[Path, int | None, np.ndarray]]:
    for header in headers:
        for frame, arr in _file_frames(header, wanted_by_file[header.path]):
            yield header.path, frame, arr


def build_volume(series: Series, *, decode_workers: int | None = None) -> Volume:
    """Decode and stack one series into a canonical HU :class:`~ctscreen.volume.Volume`.

    For the usual case (slices become the depth axis) each decoded slice is
    flipped in-plane as needed and written straight into its canonical depth
    index, so no second full-size copy is ever made.

    Args:
        series: the series to stack.
        decode_workers: processes that decode compressed single-frame files
            (None: :func:`default_decode_workers`; 1 decodes here). Used only when
            at least ``PARALLEL_MIN_FILES`` such files need decoding.

    Raises:
        VolumeError: the geometry makes a volume impossible.
        DecodeError: pixel data cannot be decoded (names the transfer syntax).
    """
    geometry = order_slices(series)
    rows, cols = geometry.slices[0].header.rows, geometry.slices[0].header.columns
    affine = geometry_affine(geometry)
    n = len(geometry.slices)
    perm, flips = canonical_permutation(affine)
    slices_are_depth = perm[0] == 0
    if slices_are_depth:
        plane = (rows, cols) if perm[1] == 1 else (cols, rows)
        hu = np.empty((n, *plane), dtype=np.float32)
    else:
        hu = np.empty((n, rows, cols), dtype=np.float32)

    def place(i: int, arr: np.ndarray) -> tuple[int, np.ndarray]:
        if not slices_are_depth:
            return i, arr
        if perm[1] == 2:
            arr = arr.T
        arr = arr[:: -1 if flips[1] else 1, :: -1 if flips[2] else 1]
        return (n - 1 - i if flips[0] else i), arr

    index_of = {(s.header.path, s.frame.frame): i for i, s in enumerate(geometry.slices)}
    wanted_by_file: dict[Path, set[int | None]] = {}
    header_of: dict[Path, InstanceHeader] = {}
    for s in geometry.slices:
        wanted_by_file.setdefault(s.header.path, set()).add(s.frame.frame)
        header_of[s.header.path] = s.header
    workers = default_decode_workers() if decode_workers is None else decode_workers
    if workers > 1 and not _main_module_importable():
        workers = 1
    compressed = [
        h for h in header_of.values() if h.native_pixels is None and h.number_of_frames == 1
    ]
    decoded: Iterator[tuple[Path, int | None, np.ndarray]]
    if workers > 1 and len(compressed) >= PARALLEL_MIN_FILES:
        in_pool = set(compressed)
        rest = [h for h in header_of.values() if h not in in_pool]
        decoded = itertools.chain(
            ((h.path, h.frames[0].frame, a) for h, a in _parallel_decode(compressed, workers)),
            _frames_of_files(rest, wanted_by_file),
        )
    else:
        decoded = _frames_of_files(list(header_of.values()), wanted_by_file)
    for path, frame, arr in decoded:
        wanted = wanted_by_file[path]
        header = header_of[path]
        if frame not in wanted:
            continue
        if arr.shape != (rows, cols):
            raise VolumeError(
                f"{header.display_path} decodes to shape {arr.shape}, expected "
                f"{(rows, cols)} (colour or damaged data); it cannot join the volume."
            )
        i = index_of[(path, frame)]
        g = geometry.slices[i].frame
        j, plane_arr = place(i, arr)
        np.multiply(plane_arr, np.float32(g.slope), out=hu[j], casting="unsafe")
        hu[j] += np.float32(g.intercept)

    new_affine = reorient_affine(affine, (n, rows, cols), perm, flips)
    warnings = list(geometry.warnings)
    if slices_are_depth:
        ordered = geometry.slices[::-1] if flips[0] else geometry.slices
        refs = tuple(
            SliceRef(
                sop_instance_uid=s.header.sop_instance_uid,
                instance_number=s.header.instance_number,
                frame=s.frame.frame,
            )
            for s in ordered
        )
    else:
        axes = [k for k in range(3) if flips[k]]
        hu = np.ascontiguousarray(np.flip(np.transpose(hu, perm), axes))
        refs = ()
        warnings.append("the slices are not axial; they were resliced into axial order")
    return Volume(
        hu=hu,
        spacing=spacing_from_affine(new_affine),
        affine=new_affine,
        slices=refs,
        warnings=tuple(warnings),
        source=series.first.display_path.rsplit("/", 1)[0],
    )
