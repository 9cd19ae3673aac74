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
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
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
from .group import Series
from .instance import FrameGeometry, InstanceHeader

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


#: A series stays a series when less than this share of its slices had to be skipped
#: as unusable (damaged values, another matrix or orientation). Past it, the rest
#: is more hole than volume and the study fails, naming what was wrong.
MAX_SKIPPED_SHARE = 0.5

_Frame = tuple[InstanceHeader, FrameGeometry]


def _frames_of(series: Series) -> list[_Frame]:
    return [(h, f) for h in series.instances for f in h.frames]


def _where(header: InstanceHeader, frame: FrameGeometry) -> str:
    if header.number_of_frames > 1 and frame.frame is not None:
        return f"{header.display_path} frame {frame.frame}"
    return header.display_path


def _frame_reason(header: InstanceHeader, frame: FrameGeometry) -> str | None:
    """Why one frame cannot join a volume on its own account, or None."""
    if header.problems:
        return header.problems[0]
    if frame.problem:
        return frame.problem
    if frame.position is None:
        return "ImagePositionPatient is missing"
    if frame.orientation is None:
        return "ImageOrientationPatient is missing"
    if frame.pixel_spacing is None:
        return "PixelSpacing is missing"
    return None


def _majority(frames: list[_Frame], key: Callable[[_Frame], object]) -> object:
    counts = Counter(key(item) for item in frames)
    return max(counts, key=lambda k: (counts[k], str(k)))


def usable_frames(series: Series) -> tuple[list[_Frame], list[str]]:
    """The frames of ``series`` that can form one volume, and one note per skipped one.

    One rule for damaged input: a file or frame whose header cannot be trusted
    (missing or unphysical geometry, rescale or pixel descriptors, see
    :mod:`ctscreen.dicom.validate`), or that differs from the rest of the series in
    matrix size or orientation, is skipped and named. The rest is used as long as
    it stays a consistent series.

    Raises:
        VolumeError: nothing usable is left, or more than :data:`MAX_SKIPPED_SHARE`
            of the frames had to be skipped; the message names a file and its tag.
    """
    frames = _frames_of(series)
    if not frames:
        raise VolumeError("the series holds no image frames; export the CT series again.")
    skipped: list[str] = []
    kept: list[_Frame] = []
    for h, f in frames:
        reason = _frame_reason(h, f)
        if reason is None:
            kept.append((h, f))
        else:
            skipped.append(f"{_where(h, f)} ({reason})")
    if kept:
        size = _majority(kept, lambda item: (item[0].rows, item[0].columns))
        rest = []
        for h, f in kept:
            if (h.rows, h.columns) == size:
                rest.append((h, f))
            else:
                skipped.append(
                    f"{_where(h, f)} (Rows x Columns {h.rows}x{h.columns}, while the series "
                    f"is {size[0]}x{size[1]})"  # type: ignore[index]
                )
        kept = rest
    if kept:
        rounded = _majority(kept, lambda item: tuple(round(v, 2) for v in item[1].orientation))  # type: ignore[union-attr]
        reference = np.asarray(rounded, dtype=np.float64)
        rest = []
        for h, f in kept:
            if np.abs(np.asarray(f.orientation) - reference).max() <= 0.01 + ORIENTATION_TOLERANCE:
                rest.append((h, f))
            else:
                skipped.append(
                    f"{_where(h, f)} (ImageOrientationPatient differs from the rest of the series)"
                )
        kept = rest
    if not kept:
        raise VolumeError(
            f"no slice of this series can be used, so its HU values cannot be trusted: "
            f"{_examples(skipped)}; export the series again."
        )
    if len(skipped) >= MAX_SKIPPED_SHARE * len(frames):
        raise VolumeError(
            f"{len(skipped)} of {len(frames)} slices of this series cannot be used, too many "
            f"to score the rest as one series: {_examples(skipped)}; export the series again."
        )
    return kept, skipped


def _examples(items: list[str], n: int = 2) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def order_slices(series: Series) -> SliceGeometry:
    """Sort a series' usable frames along the slice normal and check its geometry.

    Raises:
        VolumeError: orientation, position, spacing or matrix size are missing,
            unphysical or inconsistent so that no volume can honestly be built.
    """
    frames, skipped = usable_frames(series)
    orientations = np.array([f.orientation for _, f in frames], dtype=np.float64)
    spacings = {f.pixel_spacing for _, f in frames}
    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    warnings: list[str] = []
    if skipped:
        warnings.append(
            f"skipped {len(skipped)} unusable slice(s) of {len(skipped) + len(frames)} and "
            f"scored the rest: {_examples(skipped, 3)}"
        )
    no_rescale = sum(1 for _, f in frames if not f.rescale_given)
    if no_rescale:
        warnings.append(
            f"RescaleSlope and RescaleIntercept are missing in {no_rescale} of {len(frames)} "
            "slice(s); their stored values were taken as HU"
        )
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


def _decode_error(header: InstanceHeader, exc: BaseException) -> DecodeError:
    ts = header.transfer_syntax
    uid = UID(ts) if ts else None
    detail = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
    if uid is not None and uid.is_compressed:
        return DecodeError(
            f"cannot decode the pixel data of {header.display_path}, compressed as "
            f"{uid.name} ({ts}): {detail}; convert the series to uncompressed DICOM "
            "(e.g. gdcmconv --raw) and try again."
        )
    stored = f"stored uncompressed as {uid.name}" if uid is not None else "stored without a "
    if uid is None:
        stored += "transfer syntax"
    return DecodeError(
        f"cannot read the pixel data of {header.display_path} ({stored}): {detail}; "
        "the file is damaged, so copy or export it again."
    )


#: Errors pydicom and its decoders raise on damaged pixel data or a header
#: element that only fails when the full file is parsed.
_DECODE_ERRORS = (
    RuntimeError,  # includes RecursionError
    NotImplementedError,
    ValueError,
    OSError,
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    EOFError,
    OverflowError,
    MemoryError,
    struct.error,
    pydicom.errors.InvalidDicomError,
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
) -> Iterator[tuple[InstanceHeader, np.ndarray | DecodeError]]:
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
        try:
            for _, arr in _file_frames(header, {header.frames[0].frame}):
                yield header, arr
        except DecodeError as exc:
            yield header, exc


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
    except _DECODE_ERRORS as exc:
        raise _decode_error(header, exc) from exc


def _frames_of_files(
    headers: list[InstanceHeader], wanted_by_file: dict[Path, set[int | None]]
) -> Iterator[tuple[Path, int | None, np.ndarray | DecodeError]]:
    """Decoded frames; a file that fails yields its DecodeError once, and the rest go on."""
    for header in headers:
        try:
            for frame, arr in _file_frames(header, wanted_by_file[header.path]):
                yield header.path, frame, arr
        except DecodeError as exc:
            yield header.path, None, exc


def _without_undecodable(
    series: Series, failed: dict[Path, DecodeError], *, decode_workers: int | None
) -> Volume:
    """Build the volume again from the files that decoded, naming those that did not.

    Raises:
        DecodeError: every file failed, or too many to keep a consistent series
            (:data:`MAX_SKIPPED_SHARE`); the message names a file and why.
    """
    first = next(iter(failed.values()))
    remaining = tuple(h for h in series.instances if h.path not in failed)
    total = len(series.instances)
    if not remaining or len(failed) >= MAX_SKIPPED_SHARE * total:
        if len(failed) == 1:
            raise first
        raise DecodeError(
            f"{len(failed)} of {total} files of this series cannot be decoded, too many to "
            f"score the rest as one series; the first: {first.message}"
        )
    volume = build_volume(replace(series, instances=remaining), decode_workers=decode_workers)
    names = "; ".join(e.message.split(";")[0] for e in list(failed.values())[:2])
    more = f" and {len(failed) - 2} more" if len(failed) > 2 else ""
    note = f"skipped {len(failed)} file(s) whose pixel data cannot be read: {names}{more}"
    return replace(volume, warnings=(note, *volume.warnings))


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
    decoded: Iterator[tuple[Path, int | None, np.ndarray | DecodeError]]
    if workers > 1 and len(compressed) >= PARALLEL_MIN_FILES:
        in_pool = set(compressed)
        rest = [h for h in header_of.values() if h not in in_pool]
        decoded = itertools.chain(
            ((h.path, h.frames[0].frame, a) for h, a in _parallel_decode(compressed, workers)),
            _frames_of_files(rest, wanted_by_file),
        )
    else:
        decoded = _frames_of_files(list(header_of.values()), wanted_by_file)
    failed: dict[Path, DecodeError] = {}
    for path, frame, arr in decoded:
        wanted = wanted_by_file[path]
        header = header_of[path]
        if isinstance(arr, DecodeError):
            failed[path] = arr
            continue
        if frame not in wanted or path in failed:
            continue
        if arr.shape != (rows, cols):
            failed[path] = DecodeError(
                f"{header.display_path} decodes to shape {arr.shape}, expected "
                f"{(rows, cols)} from its Rows and Columns (colour or damaged data)"
            )
            continue
        i = index_of[(path, frame)]
        g = geometry.slices[i].frame
        j, plane_arr = place(i, arr)
        np.multiply(plane_arr, np.float32(g.slope), out=hu[j], casting="unsafe")
        hu[j] += np.float32(g.intercept)

    if failed:
        return _without_undecodable(series, failed, decode_workers=decode_workers)
    if not np.isfinite(hu).all():
        bad = int(np.count_nonzero(~np.isfinite(hu)))
        raise VolumeError(
            f"{bad} voxel(s) of {series.first.display_path}'s series are not finite numbers "
            "after rescaling, so its HU values cannot be trusted; export the series again."
        )
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
