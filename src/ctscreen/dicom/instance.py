"""One DICOM instance's header, as ctscreen needs it: geometry, pixels, rescale, tags.

:func:`header_from_dataset` turns a dataset read without pixel data into an
:class:`InstanceHeader`: where each frame lies and how its stored values become HU
(:class:`FrameGeometry`), whether its plain pixels can be read directly
(:class:`NativePixels`), and every descriptor that cannot be trusted, named in a
sentence (``problems``) instead of raised.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from . import validate
from .header import StudyHeader, plain_text, read_study_header

#: CT Image Storage and Enhanced CT Image Storage: the objects ctscreen reads and scores.
#: One set for the reader (a CT image must carry pixels), the series choice and the
#: DICOM node (which refuses every other storage class).
CT_SOP_CLASSES: frozenset[str] = frozenset({str(CTImageStorage), str(EnhancedCTImageStorage)})


@dataclass(frozen=True)
class FrameGeometry:
    """Where one 2D frame lies and how its stored values become HU.

    Attributes:
        position: ImagePositionPatient (LPS mm) of the first pixel, or None.
        orientation: ImageOrientationPatient (row cosines, then column cosines), or None.
        pixel_spacing: (row spacing, column spacing) in mm, or None.
        slope: RescaleSlope (1.0 when absent).
        intercept: RescaleIntercept (0.0 when absent).
        frame: 1-based frame number inside a multi-frame object, None for single-frame.
        problem: why this frame's geometry or rescale cannot be trusted (a sentence
            naming the tag and value, see :mod:`ctscreen.dicom.validate`), or None.
        rescale_given: False when RescaleSlope and RescaleIntercept are both absent
            (stored values are then taken as HU, which is reported).
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slope: float = 1.0
    intercept: float = 0.0
    frame: int | None = None
    problem: str | None = None
    rescale_given: bool = True


@dataclass(frozen=True)
class NativePixels:
    """Where an uncompressed little-endian single-frame image lies in its file.

    Found during the header pass, it lets the volume builder read the pixels
    straight from disk (``numpy.fromfile``) instead of parsing the file again.
    """

    offset: int
    dtype: str  # numpy dtype string, e.g. "<i2"


#: Transfer syntaxes whose pixel data is a plain little-endian array.
_NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


@dataclass(frozen=True)
class InstanceHeader:
    """What ctscreen needs from one DICOM file, read without its pixel data."""

    path: Path
    display_path: str
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    transfer_syntax: str
    rows: int
    columns: int
    has_pixel_data: bool
    instance_number: int | None
    series_number: int | None
    series_description: str
    slice_thickness: float | None
    gantry_tilt: float | None
    frames: tuple[FrameGeometry, ...]
    folder: str
    notes: tuple[str, ...] = ()
    native_pixels: NativePixels | None = None
    problems: tuple[str, ...] = ()
    body_part: str = ""
    protocol: str = ""
    study_description: str = ""
    #: the instance's Patient/Study values, cleaned for the DICOM results (see header.py)
    study_header: StudyHeader | None = field(default=None, repr=False, compare=False)

    @property
    def number_of_frames(self) -> int:
        return len(self.frames)

    @property
    def region_tags(self) -> tuple[tuple[str, str], ...]:
        """``(keyword, value)`` of the tags that name the body region, most specific first."""
        return (
            ("BodyPartExamined", self.body_part),
            ("ProtocolName", self.protocol),
            ("SeriesDescription", self.series_description),
            ("StudyDescription", self.study_description),
        )

    @property
    def usable(self) -> bool:
        """False when a pixel descriptor or the frame count cannot be trusted."""
        return not self.problems


def _text(ds: Dataset, keyword: str) -> str:
    return plain_text(ds.get(keyword, ""))


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return items if len(items) == n else None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    if not seq:
        return None
    try:
        return seq[0]
    except (IndexError, TypeError):
        return None


def _rescale_value(value: object, keyword: str) -> tuple[float | None, str | None]:
    """A rescale tag as a float (None when absent) and a sentence when it is not a number."""
    if value is None or value == "":
        return None, None
    number = _float_or_none(value)
    if number is None:
        return None, f"{keyword} {str(value)[:40]!r} is not a number"
    return number, None


def _frame(
    *,
    position: object,
    orientation: object,
    spacing: object,
    slope_value: object,
    intercept_value: object,
    frame: int | None,
) -> FrameGeometry:
    """One frame's geometry and rescale, with the first value that cannot be trusted."""
    pos = _floats(position, 3)
    iop = _floats(orientation, 6)
    px = _floats(spacing, 2)
    slope, slope_text = _rescale_value(slope_value, "RescaleSlope")
    intercept, intercept_text = _rescale_value(intercept_value, "RescaleIntercept")
    problem = (
        slope_text
        or intercept_text
        or validate.rescale_problem(slope, intercept)
        or validate.position_problem(pos)
        or validate.orientation_problem(iop)
        or validate.spacing_problem(px)
    )
    return FrameGeometry(
        position=pos,  # type: ignore[arg-type]
        orientation=iop,  # type: ignore[arg-type]
        pixel_spacing=px,  # type: ignore[arg-type]
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        frame=frame,
        problem=problem,
        rescale_given=slope is not None or intercept is not None,
    )


def _pixel_bytes(ds: Dataset) -> int | None:
    """Length of native (not encapsulated) pixel data, or None when unknown."""
    raw = ds._dict.get(0x7FE00010)
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:
        return None
    return int(length)


def _frame_count(ds: Dataset) -> tuple[int, str | None]:
    """How many frames to describe, and why NumberOfFrames cannot be believed (or None)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    items = len(per_frame) if per_frame else None
    if "NumberOfFrames" in ds and ds.get("NumberOfFrames") not in (None, ""):
        declared = _int_or_none(ds, "NumberOfFrames")
        if declared is None:
            text = str(ds.get("NumberOfFrames"))[:40]
            return (items or 1), f"NumberOfFrames {text!r} is not a number"
    else:
        declared = None
    rows, cols = _int_or_none(ds, "Rows") or 0, _int_or_none(ds, "Columns") or 0
    bits = _int_or_none(ds, "BitsAllocated") or 0
    samples = _int_or_none(ds, "SamplesPerPixel") or 1
    frame_bytes = rows * cols * samples * bits // 8 if bits in validate.BITS_ALLOCATED else None
    problem = validate.frame_count_problem(
        declared, per_frame_items=items, frame_bytes=frame_bytes, pixel_bytes=_pixel_bytes(ds)
    )
    if problem is not None:
        # Describe what can be trusted, never allocate what a garbage count claims.
        return min(items or 1, validate.MAX_FRAMES), problem
    return (items or declared or 1), None


def _frame_geometries(ds: Dataset) -> tuple[tuple[FrameGeometry, ...], str | None]:
    """Per-frame geometry and rescale: top level for classic images, functional groups
    (per-frame overriding shared) for enhanced multi-frame objects; with the reason the
    frame count cannot be believed, if any."""
    n_frames, count_problem = _frame_count(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        first = _frame(
            position=ds.get("ImagePositionPatient"),
            orientation=ds.get("ImageOrientationPatient"),
            spacing=ds.get("PixelSpacing"),
            slope_value=ds.get("RescaleSlope"),
            intercept_value=ds.get("RescaleIntercept"),
            frame=None if n_frames == 1 else 1,
        )
        rest = tuple(FrameGeometry(None, None, None, frame=k) for k in range(2, n_frames + 1))
        return (first, *rest), count_problem
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")

    def lookup(item: Dataset, seq_keyword: str, keyword: str) -> object:
        for source in (item, shared):
            inner = _first_item(source, seq_keyword)
            if inner is not None and keyword in inner:
                return inner.get(keyword)
        return ds.get(keyword)

    frames = []
    for k, item in enumerate(itertools.islice(per_frame, n_frames), start=1):
        frames.append(
            _frame(
                position=lookup(item, "PlanePositionSequence", "ImagePositionPatient"),
                orientation=lookup(item, "PlaneOrientationSequence", "ImageOrientationPatient"),
                spacing=lookup(item, "PixelMeasuresSequence", "PixelSpacing"),
                slope_value=lookup(item, "PixelValueTransformationSequence", "RescaleSlope"),
                intercept_value=lookup(
                    item, "PixelValueTransformationSequence", "RescaleIntercept"
                ),
                frame=k,
            )
        )
    return tuple(frames), count_problem


def _pixel_problems(ds: Dataset) -> tuple[str, ...]:
    """Why the pixel module of an image cannot describe a CT image (empty when it can)."""
    problem = validate.pixel_descriptor_problem(
        rows=_int_or_none(ds, "Rows"),
        columns=_int_or_none(ds, "Columns"),
        bits_allocated=_int_or_none(ds, "BitsAllocated"),
        bits_stored=_int_or_none(ds, "BitsStored"),
        pixel_representation=_int_or_none(ds, "PixelRepresentation"),
        samples_per_pixel=_int_or_none(ds, "SamplesPerPixel"),
    )
    return () if problem is None else (problem,)


def _image_type(ds: Dataset) -> tuple[str, ...]:
    value = ds.get("ImageType")
    if value is None:
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        frame_type = _first_item(shared, "CTImageFrameTypeSequence")
        value = frame_type.get("FrameType") if frame_type is not None else None
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value)


def _native_pixels(ds: Dataset, transfer_syntax: str) -> NativePixels | None:
    """The location of plain pixel data when a direct read is exactly what pydicom
    would decode: one frame, one sample, 8 or 16 bits all used or unsigned."""
    raw = ds._dict.get(0x7FE00010)  # the deferred element, never loaded here
    if raw is None or getattr(raw, "value", b"") is not None:
        return None
    if (
        transfer_syntax not in _NATIVE_LITTLE_ENDIAN
        or (_int_or_none(ds, "NumberOfFrames") or 1) != 1
    ):
        return None
    bits = _int_or_none(ds, "BitsAllocated")
    stored = _int_or_none(ds, "BitsStored")
    signed = _int_or_none(ds, "PixelRepresentation") == 1
    rows, cols = _int_or_none(ds, "Rows") or 0, _int_or_none(ds, "Columns") or 0
    if (_int_or_none(ds, "SamplesPerPixel") or 1) != 1 or bits not in (8, 16):
        return None
    if signed and stored != bits:  # pydicom sign-extends such values; leave it to pydicom
        return None
    if raw.length != rows * cols * bits // 8 or raw.value_tell is None:
        return None
    dtype = ("<i" if signed else "<u") + str(bits // 8)
    return NativePixels(offset=int(raw.value_tell), dtype=dtype)


def header_from_dataset(
    ds: Dataset, *, path: Path, display_path: str, folder: str
) -> InstanceHeader:
    """Build an :class:`InstanceHeader` from a dataset read without pixel data."""
    meta = getattr(ds, "file_meta", None)
    notes: list[str] = []
    sop_uid = _text(ds, "SOPInstanceUID")
    sop_class = _text(ds, "SOPClassUID")
    if not sop_uid and meta is not None:
        sop_uid = _text(meta, "MediaStorageSOPInstanceUID")
        if sop_uid:
            notes.append("SOPInstanceUID taken from the file meta header")
    if not sop_class and meta is not None:
        sop_class = _text(meta, "MediaStorageSOPClassUID")
    transfer_syntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    pixel_present = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    frames, count_problem = _frame_geometries(ds)
    problems = _pixel_problems(ds) if pixel_present else ()
    if count_problem:
        problems += (count_problem,)
    return InstanceHeader(
        path=path,
        display_path=display_path,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        image_type=_image_type(ds),
        transfer_syntax=transfer_syntax,
        rows=_int_or_none(ds, "Rows") or 0,
        columns=_int_or_none(ds, "Columns") or 0,
        has_pixel_data=pixel_present,
        instance_number=_int_or_none(ds, "InstanceNumber"),
        series_number=_int_or_none(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        slice_thickness=_float_or_none(ds.get("SliceThickness")),
        gantry_tilt=_float_or_none(ds.get("GantryDetectorTilt")),
        frames=frames,
        folder=folder,
        notes=tuple(notes),
        native_pixels=_native_pixels(ds, transfer_syntax) if not problems else None,
        problems=problems,
        body_part=_text(ds, "BodyPartExamined"),
        protocol=_text(ds, "ProtocolName"),
        study_description=_text(ds, "StudyDescription"),
        study_header=read_study_header(ds),
    )
