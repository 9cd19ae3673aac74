"""Value checks at the DICOM boundary: is a header's number physical enough to trust?

A damaged or hand-edited header can hold NaN, infinity, zero or absurd values in
exactly the tags that turn stored pixels into Hounsfield units and voxels into
millimetres. Read as they are, they give a confident wrong probability or a
localisation box kilometres wide. Each function here returns one sentence
naming the tag and its value when the value cannot be trusted (the file or
frame is then skipped and named), or None when it is usable.

The bounds are wide on purpose: they reject what cannot be a CT acquisition,
not what is merely unusual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: |ImagePositionPatient| bound in mm. Table positions of real scanners stay within
#: about ±2 m; 10 m leaves room for any frame of reference yet rejects 1e9-style garbage.
MAX_ABS_POSITION_MM = 10_000.0
#: PixelSpacing bounds in mm. Clinical CT is 0.2-2 mm in-plane (micro-CT ~0.01 mm);
#: the synthetic demo studies use up to ~10 mm. Zero, negative and 1e9 are corrupt.
MIN_PIXEL_SPACING_MM = 0.005
MAX_PIXEL_SPACING_MM = 50.0
#: RescaleSlope bound. Real CT uses 1 (sometimes 0.5, 2, or ~32 for 8-bit lossy
#: re-encodings); a slope past 1000 would spread one stored unit over 1000 HU.
MAX_RESCALE_SLOPE = 1000.0
#: |RescaleIntercept| bound in HU. Real scanners write 0 to -8192; beyond ±1e5 no
#: tissue (or padding convention) can be meant.
MAX_ABS_RESCALE_INTERCEPT = 100_000.0
#: ImageOrientationPatient: each cosine vector within this of unit length, and the
#: two within this of perpendicular (|dot|). Scanners write 6+ decimals; 0.01 is ~0.6°.
ORIENTATION_TOLERANCE = 0.01
#: Frames per object. The largest enhanced CT seen holds ~2000 frames; the bound keeps
#: a garbage NumberOfFrames from allocating millions of frame records.
MAX_FRAMES = 20_000
#: Rows/Columns bound. CT matrices are 512-1024 (2048 for high-resolution scanners).
MAX_MATRIX = 4096
BITS_ALLOCATED = (8, 16, 32)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "\\".join(_fmt(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def rescale_problem(slope: float | None, intercept: float | None) -> str | None:
    """Why RescaleSlope/RescaleIntercept cannot map stored values to HU, or None.

    ``None`` for a value means the tag is absent (slope 1, intercept 0 are then used;
    that case is reported as a warning by the caller, not here).
    """
    if slope is not None:
        if not math.isfinite(slope):
            return f"RescaleSlope is {_fmt(slope)}, not a finite number"
        if slope <= 0:
            return f"RescaleSlope is {_fmt(slope)}; it must be positive"
        if slope > MAX_RESCALE_SLOPE:
            return f"RescaleSlope is {_fmt(slope)}, above the physical bound {MAX_RESCALE_SLOPE:g}"
    if intercept is not None:
        if not math.isfinite(intercept):
            return f"RescaleIntercept is {_fmt(intercept)}, not a finite number"
        if abs(intercept) > MAX_ABS_RESCALE_INTERCEPT:
            return (
                f"RescaleIntercept is {_fmt(intercept)}, beyond the physical bound "
                f"±{MAX_ABS_RESCALE_INTERCEPT:g} HU"
            )
    return None


def position_problem(position: Sequence[float] | None) -> str | None:
    """Why ImagePositionPatient cannot place a slice, or None (absent is None too)."""
    if position is None:
        return None
    if not all(math.isfinite(v) for v in position):
        return f"ImagePositionPatient {_fmt(tuple(position))} is not finite"
    if max(abs(v) for v in position) > MAX_ABS_POSITION_MM:
        return (
            f"ImagePositionPatient {_fmt(tuple(position))} lies more than "
            f"{MAX_ABS_POSITION_MM / 1000:g} m from the origin"
        )
    return None


def spacing_problem(spacing: Sequence[float] | None) -> str | None:
    """Why PixelSpacing cannot be a voxel size, or None (absent is None too)."""
    if spacing is None:
        return None
    if not all(math.isfinite(v) for v in spacing):
        return f"PixelSpacing {_fmt(tuple(spacing))} is not finite"
    if min(spacing) < MIN_PIXEL_SPACING_MM or max(spacing) > MAX_PIXEL_SPACING_MM:
        return (
            f"PixelSpacing {_fmt(tuple(spacing))} mm is outside the physical range "
            f"{MIN_PIXEL_SPACING_MM:g}-{MAX_PIXEL_SPACING_MM:g} mm"
        )
    return None


def orientation_problem(orientation: Sequence[float] | None) -> str | None:
    """Why ImageOrientationPatient is not two orthonormal direction cosines, or None."""
    if orientation is None:
        return None
    if not all(math.isfinite(v) for v in orientation):
        return f"ImageOrientationPatient {_fmt(tuple(orientation))} is not finite"
    row, col = orientation[:3], orientation[3:]
    row_norm = math.sqrt(sum(v * v for v in row))
    col_norm = math.sqrt(sum(v * v for v in col))
    if abs(row_norm - 1) > ORIENTATION_TOLERANCE or abs(col_norm - 1) > ORIENTATION_TOLERANCE:
        return (
            f"ImageOrientationPatient {_fmt(tuple(orientation))} does not hold unit vectors "
            f"(lengths {row_norm:.3g} and {col_norm:.3g})"
        )
    dot = sum(a * b for a, b in zip(row, col, strict=True))
    if abs(dot) > ORIENTATION_TOLERANCE:
        return (
            f"ImageOrientationPatient {_fmt(tuple(orientation))} is not orthogonal "
            f"(row·column = {dot:.3g})"
        )
    return None


def pixel_descriptor_problem(
    *,
    rows: int | None,
    columns: int | None,
    bits_allocated: int | None,
    bits_stored: int | None,
    pixel_representation: int | None,
    samples_per_pixel: int | None,
) -> str | None:
    """Why the image pixel module cannot describe a CT image, or None."""
    for tag, value in (("Rows", rows), ("Columns", columns)):
        if value is None or value <= 0:
            return f"{tag} is {'missing' if value is None else value}"
        if value > MAX_MATRIX:
            return f"{tag} is {value}, above the bound {MAX_MATRIX}"
    if bits_allocated not in BITS_ALLOCATED:
        shown = "missing" if bits_allocated is None else str(bits_allocated)
        return f"BitsAllocated is {shown}; CT images use 8, 16 or 32"
    if bits_stored is not None and not 1 <= bits_stored <= bits_allocated:
        return f"BitsStored is {bits_stored} with BitsAllocated {bits_allocated}"
    if pixel_representation not in (None, 0, 1):
        return f"PixelRepresentation is {pixel_representation}; it must be 0 or 1"
    if samples_per_pixel not in (None, 1):
        return f"SamplesPerPixel is {samples_per_pixel}; a CT image has 1 (grayscale)"
    return None


def frame_count_problem(
    declared: int | None,
    *,
    per_frame_items: int | None,
    frame_bytes: int | None,
    pixel_bytes: int | None,
) -> str | None:
    """Why NumberOfFrames cannot be believed, or None.

    Args:
        declared: NumberOfFrames as read (None when absent, which means 1).
        per_frame_items: items of PerFrameFunctionalGroupsSequence (None when absent).
        frame_bytes: bytes of one uncompressed frame (None when unknown).
        pixel_bytes: length of native (not encapsulated) pixel data (None when unknown).
    """
    if declared is None:
        return None
    if declared < 1:
        return f"NumberOfFrames is {declared}; it must be at least 1"
    if declared > MAX_FRAMES:
        return f"NumberOfFrames is {declared}, above the bound {MAX_FRAMES}"
    if per_frame_items is not None and per_frame_items != declared:
        return (
            f"NumberOfFrames is {declared} but PerFrameFunctionalGroupsSequence holds "
            f"{per_frame_items} item(s)"
        )
    if frame_bytes and pixel_bytes is not None:
        held = pixel_bytes // frame_bytes
        if held < declared:  # more data than declared is odd but harmless
            return (
                f"NumberOfFrames is {declared} but PixelData holds {held} frame(s) "
                f"({pixel_bytes} bytes)"
            )
    return None
