"""Find DICOM objects in folders and zip archives and group them into studies and series.

Only headers are read here (pixel data is left on disk), so discovering a large
archive costs little memory. Grouping is by StudyInstanceUID and
SeriesInstanceUID. Aggressively anonymised exports sometimes blank those UIDs;
then a stable fallback is used and said: the SOP UIDs come from the file meta
header, and studies and series are grouped by their folder.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import struct
import threading
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from ..errors import InputError, NoDicomError
from . import validate
from .archive import ArchiveLimits, extract_zip
from .header import StudyHeader, read_study_header

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
#: CT Image Storage and Enhanced CT Image Storage: the objects ctscreen reads and scores.
#: One set for the reader (a CT image must carry pixels), the series choice and the
#: DICOM node (which refuses every other storage class).
CT_SOP_CLASSES: frozenset[str] = frozenset({str(CTImageStorage), str(EnhancedCTImageStorage)})
_DEFER_BYTES = 4096

#: Errors pydicom may raise when force-reading bytes that are not really DICOM.
_PARSE_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    struct.error,
)


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


@dataclass(frozen=True)
class Series:
    """The instances of one series, in a stable order (by file path)."""

    series_uid: str
    key: str
    instances: tuple[InstanceHeader, ...]

    @property
    def first(self) -> InstanceHeader:
        return self.instances[0]

    @property
    def n_frames(self) -> int:
        return sum(i.number_of_frames for i in self.instances)


@dataclass(frozen=True)
class Study:
    """The series of one study and where it was found."""

    study_uid: str
    key: str
    location: str
    series: tuple[Series, ...]
    warnings: tuple[str, ...] = ()
    location_root: str = ""

    def location_of(self, series: Sequence[Series]) -> str:
        """The deepest folder that holds every file of ``series`` (the task's
        ``path_to_study`` of a row scored from them), shown under the input's path.

        :attr:`location` is the same for all the study's series; a row names the folder
        of the series it was scored from, so that a CT in ``study/ct`` beside an
        RTSTRUCT in ``study/rtstruct`` is found at ``study/ct``.
        """
        if not series or not self.location_root:
            return self.location
        return folder_location(self.location_root, [h.folder for s in series for h in s.instances])


@dataclass(frozen=True)
class Discovery:
    """Everything found in one input (a folder, a zip archive or a file)."""

    input_path: Path
    studies: tuple[Study, ...]
    warnings: tuple[str, ...]
    n_files: int
    n_skipped: int


# --------------------------------------------------------------------------- values


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return str(value).strip().strip("\x00").strip()


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


# --------------------------------------------------------------------------- files


def special_file_kind(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (``"a named pipe"``, ...), else None.

    Opening a named pipe blocks until someone writes to it, and a device can
    stream forever; only regular files are ever opened.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a regular file (b"" for anything else or on error)."""
    if special_file_kind(path) is not None:
        return b""
    try:
        # O_NONBLOCK: should the file be swapped for a pipe after the check, open()
        # still returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, size)
    except OSError:
        return b""
    finally:
        os.close(fd)


def looks_like_dicom(path: Path) -> bool:
    """Cheap sniff: a 'DICM' preamble, or a first element in group 0002 or 0008
    (DICOM written without the 128-byte preamble). Never opens anything but a
    regular file."""
    head = _read_head(path, 132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


#: ``warnings.catch_warnings`` swaps process-wide state; header reads in several
#: reader threads take turns so that each file's warnings are its own.
_HEADER_LOCK = threading.Lock()


class DamagedFileError(InputError):
    """A file starts like DICOM but cannot be parsed (truncated or corrupt)."""

    code = "DAMAGED_FILE"


def read_header(path: Path) -> Dataset | None:
    """Read a file's header without loading pixel data.

    Returns:
        The dataset, or None when the file is not DICOM at all.

    Raises:
        DamagedFileError: the file starts like DICOM but cannot be parsed.
    """
    if not looks_like_dicom(path):
        return None
    try:
        with _HEADER_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
    except RecursionError as exc:
        raise DamagedFileError(f"{path.name} nests sequences too deeply to read ({exc})") from exc
    except _PARSE_ERRORS as exc:
        raise DamagedFileError(f"{path.name} is a damaged DICOM file ({exc})") from exc
    # A cut file may still parse, into a dataset that lost its tail: refuse it.
    ends_early = [w for w in caught if "End of file reached" in str(w.message)]
    if ends_early:
        raise DamagedFileError(f"{path.name} is truncated ({ends_early[0].message})")
    cut = truncation(ds, path.stat().st_size)
    if cut:
        raise DamagedFileError(f"{path.name} is truncated ({cut})")
    if not any(k in ds for k in ("SOPClassUID", "StudyInstanceUID", "Modality")) and not (
        getattr(ds, "file_meta", None) and "MediaStorageSOPClassUID" in ds.file_meta
    ):
        return None
    return ds


_DEFLATED = "1.2.840.10008.1.2.1.99"


def truncation(ds: Dataset, file_size: int) -> str | None:
    """Why a dataset that parsed without complaint still lost its tail, or None.

    pydicom stops quietly when a file ends between two elements, and a deferred
    pixel element is not read at all, so a cut copy can look whole: a CT image
    without pixel data, or pixel data longer than what is left of the file.
    """
    raw = ds._dict.get(0x7FE00010)  # as read: deferred (value None) or raw bytes
    if raw is None:
        meta = getattr(ds, "file_meta", None)
        sop_class = str(
            ds.get("SOPClassUID", "") or (meta or {}).get("MediaStorageSOPClassUID", "")
        )
        if sop_class in CT_SOP_CLASSES:
            return "a CT image whose file ends before its pixel data"
        return None
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:  # encapsulated: the codec finds a cut
        return None
    value = getattr(raw, "value", None)
    start = getattr(raw, "value_tell", None)
    meta = getattr(ds, "file_meta", None)
    deflated = str((meta or {}).get("TransferSyntaxUID", "")) == _DEFLATED
    # In a deflated file, positions count bytes of the inflated stream, not of the file.
    if value is None and start is not None and not deflated and start + length > file_size:
        return f"its pixel data needs {length} bytes but only {max(file_size - start, 0)} remain"
    if isinstance(value, bytes) and len(value) < length:
        return f"its pixel data needs {length} bytes but only {len(value)} remain"
    return None


def looks_like_zip(path: Path) -> bool:
    """A zip by content, or something that claims to be one (a truncated download
    must fail as a damaged archive, not pass as a non-DICOM file)."""
    if special_file_kind(path) is not None:
        return False
    if path.suffix.lower() == ".zip":
        return True
    return _read_head(path, 4) == b"PK\x03\x04" or zipfile.is_zipfile(path)


def iter_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), sorted for stability;
    special files and links leaving ``root`` are left out (see :func:`regular_files`)."""
    return regular_files(root)[0]


def regular_files(root: Path) -> tuple[list[Path], list[str]]:
    """Every regular file under ``root`` (or ``root`` itself), sorted for stability.

    Named pipes, sockets and devices are never opened, and a symbolic link is
    followed only when it points to a regular file inside ``root``; each thing
    left out is named in the second list.

    Returns:
        The files, and one short note per entry left out (path relative to ``root``).
    """
    if not root.is_dir():
        kind = special_file_kind(root)
        return ([root], []) if kind is None else ([], [f"{root.name} ({kind})"])
    resolved_root = root.resolve()
    found: list[Path] = []
    left_out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)  # a linked folder is listed, not walked (loops, escapes)
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                left_out.append(f"{rel} (a symbolic link to a folder)")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(resolved_root):
                    left_out.append(f"{rel} (a symbolic link pointing outside the input)")
                    continue
            kind = special_file_kind(path)
            if kind is not None:
                left_out.append(f"{rel} ({kind})")
                continue
            found.append(path)
    return found, left_out


# --------------------------------------------------------------------------- grouping


def _fallback_series_key(h: InstanceHeader) -> str:
    orientation = h.frames[0].orientation if h.frames else None
    iop = "" if orientation is None else ",".join(f"{v:.2f}" for v in orientation)
    return f"{h.folder}|{h.series_number}|{h.modality}|{h.rows}x{h.columns}|{iop}"


def group_headers(headers: Sequence[InstanceHeader], *, location_root: str) -> tuple[Study, ...]:
    """Group headers into studies and series, with a stated fallback for empty UIDs.

    Args:
        headers: instances found in one input.
        location_root: the display path of the input (archive or folder).

    Returns:
        Studies in the order of their first file in the input; each study's series
        sorted by key.
    """
    by_study: dict[str, list[InstanceHeader]] = defaultdict(list)
    study_notes: dict[str, list[str]] = defaultdict(list)
    for h in headers:
        if h.study_uid:
            key = h.study_uid
        else:
            key = f"folder:{h.folder}"
        by_study[key].append(h)
    studies = []
    for key in sorted(by_study):
        members = sorted(by_study[key], key=lambda h: h.display_path)
        notes = study_notes[key]
        if key.startswith("folder:"):
            notes.append(
                f"StudyInstanceUID is empty in {len(members)} file(s); they were grouped "
                f"as one study by their folder {members[0].folder or '.'}"
            )
        by_series: dict[str, list[InstanceHeader]] = defaultdict(list)
        fallback_series = 0
        for h in members:
            if h.series_uid:
                by_series[h.series_uid].append(h)
            else:
                fallback_series += 1
                by_series[f"fallback:{_fallback_series_key(h)}"].append(h)
        if fallback_series:
            notes.append(
                f"SeriesInstanceUID is empty in {fallback_series} file(s); they were grouped "
                "by folder, series number and image geometry"
            )
        if any(h.notes for h in members):
            notes.append(
                f"{sum(1 for h in members if h.notes)} file(s) lack SOPInstanceUID in the "
                "dataset; the file meta header's UID was used"
            )
        series = tuple(
            Series(
                series_uid=sk if not sk.startswith("fallback:") else "",
                key=sk,
                instances=tuple(by_series[sk]),
            )
            for sk in sorted(by_series)
        )
        studies.append(
            Study(
                study_uid=members[0].study_uid,
                key=key,
                location=folder_location(location_root, [h.folder for h in members]),
                series=series,
                warnings=tuple(notes),
                location_root=location_root,
            )
        )
    # In the order their files come in the input (walked in sorted order), as a person
    # reading the folder tree meets them; the key only breaks ties.
    first_file = {key: min(h.display_path for h in by_study[key]) for key in by_study}
    return tuple(sorted(studies, key=lambda study: (first_file[study.key], study.key)))


def folder_location(location_root: str, folders: Sequence[str]) -> str:
    """``location_root`` and the deepest folder (relative to the input) holding all of
    ``folders``: the root itself when they have none in common."""
    common = os.path.commonpath(folders) if folders and all(folders) else ""
    return location_root if not common else f"{location_root}/{common}"


# --------------------------------------------------------------------------- inputs


#: Zip archives inside an input are opened this many levels deep (a zip that
#: holds itself, a "zip quine", would otherwise never end); all levels share one
#: member-count and size budget (:class:`~ctscreen.dicom.archive.ArchiveLimits`).
MAX_ZIP_DEPTH = 4


@dataclass
class _Scan:
    """What the header pass found so far in one input, across nested archives."""

    headers: list[InstanceHeader] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_files: int = 0
    members_left: int = 0
    bytes_left: int = 0
    archives: int = 0


def _header_or_reason(
    path: Path, *, display_path: str, folder: str
) -> tuple[InstanceHeader | None, str | None]:
    """The file's header, or why it is damaged; (None, None) when it is not DICOM."""
    try:
        ds = read_header(path)
        if ds is None:
            return None, None
        # pydicom converts raw elements lazily: a bad value representation or a
        # garbled value surfaces only here, when the header is built.
        return header_from_dataset(ds, path=path, display_path=display_path, folder=folder), None
    except DamagedFileError as exc:
        reason = exc.message.removeprefix(f"{path.name} ")
        return None, reason
    except RecursionError:
        return None, "nests sequences too deeply to read"
    except (*_PARSE_ERRORS, RuntimeError) as exc:
        return None, f"is a damaged DICOM file ({type(exc).__name__}: {str(exc)[:120]})"


def _nested_zip(
    path: Path,
    *,
    rel: str,
    scan: _Scan,
    display_root: str,
    folder_prefix: str,
    work_dir: Path,
    depth: int,
    limits: ArchiveLimits,
) -> None:
    """Extract a zip found inside an input and scan it, within the shared budget."""
    if depth >= MAX_ZIP_DEPTH:
        scan.skipped.append(f"{rel} (a zip nested more than {MAX_ZIP_DEPTH} levels deep)")
        return
    if scan.members_left <= 0 or scan.bytes_left <= 0:
        scan.skipped.append(f"{rel} (a nested zip past the input's size or member limit)")
        return
    scan.archives += 1
    target = work_dir / f"nested-{scan.archives}"
    target.mkdir(parents=True, exist_ok=True)
    budget = replace(limits, max_members=scan.members_left, max_total_bytes=scan.bytes_left)
    try:
        files, archive_warnings = extract_zip(path, target, limits=budget)
    except InputError as exc:
        scan.damaged.append(f"{rel} ({exc.message})")
        return
    scan.members_left -= len(files)
    scan.bytes_left -= sum(f.stat().st_size for f in files)
    scan.notes.extend(archive_warnings)
    _scan_files(
        sorted(files),
        root=target,
        scan=scan,
        display_root=f"{display_root}/{rel}",
        folder_prefix=f"{folder_prefix}{rel}/",
        work_dir=work_dir,
        depth=depth + 1,
        limits=limits,
    )


def _scan_files(
    files: Iterable[Path],
    *,
    root: Path,
    scan: _Scan,
    display_root: str,
    folder_prefix: str,
    work_dir: Path,
    depth: int,
    limits: ArchiveLimits,
) -> None:
    """Read the header of every file (opening nested zips), adding to ``scan``."""
    for path in files:
        scan.n_files += 1
        rel = path.relative_to(root) if path != root else Path(path.name)
        folder = folder_prefix + (rel.parent.as_posix() if rel.parent != Path(".") else "")
        folder = folder.rstrip("/")
        if path.name.upper() == "DICOMDIR":
            continue
        if path.suffix.lower() == ".zip" or _read_head(path, 4) == b"PK\x03\x04":
            _nested_zip(
                path,
                rel=rel.as_posix(),
                scan=scan,
                display_root=display_root,
                folder_prefix=folder_prefix,
                work_dir=work_dir,
                depth=depth,
                limits=limits,
            )
            continue
        header, reason = _header_or_reason(
            path, display_path=f"{display_root}/{rel.as_posix()}", folder=folder
        )
        if reason is not None:
            scan.damaged.append(f"{rel.as_posix()} ({reason})")
            continue
        if header is None:
            scan.skipped.append(rel.as_posix())
            continue
        if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
            continue
        scan.headers.append(header)


def _shown(items: Sequence[str], n: int = 3) -> str:
    return "; ".join(items[:n]) + (" …" if len(items) > n else "")


def discover(
    input_path: Path | str, *, work_dir: Path, limits: ArchiveLimits | None = None
) -> Discovery:
    """Find and group every DICOM object in one input.

    Zip archives inside the input (or inside its archive) are opened too, up to
    :data:`MAX_ZIP_DEPTH` levels, all within the one budget of ``limits``. Only
    regular files are opened; named pipes, devices, sockets and links that lead
    outside the input are named in the warnings and left alone. A damaged file is
    skipped and named; the input fails only when nothing usable is left.

    Args:
        input_path: a folder, a zip archive, or a single DICOM file.
        work_dir: an empty, run-owned folder a zip is extracted into (the
            caller deletes it after the input's studies are processed).
        limits: safety bounds for zip extraction.

    Raises:
        InputError: the path does not exist, is not a regular file or folder, or
            cannot be read.
        UnsafeArchiveError: a zip breaks a safety bound.
        NoDicomError: the input holds no usable DICOM object at all.
    """
    input_path = Path(input_path)
    limits = limits or ArchiveLimits()
    if not input_path.exists():
        raise InputError(f"{input_path} does not exist; check the path.")
    kind = None if input_path.is_dir() else special_file_kind(input_path)
    if kind is not None:
        raise InputError(
            f"{input_path} is {kind}, not a regular file or folder; ctscreen reads only "
            "regular files, so pass the folder or archive that holds the study."
        )
    scan = _Scan(members_left=limits.max_members, bytes_left=limits.max_total_bytes)
    common = dict(scan=scan, work_dir=work_dir, limits=limits, depth=0, folder_prefix="")
    work_dir.mkdir(parents=True, exist_ok=True)
    if input_path.is_file() and looks_like_zip(input_path):
        target = work_dir / "archive"
        target.mkdir(parents=True, exist_ok=True)
        files, archive_warnings = extract_zip(input_path, target, limits=limits)
        scan.members_left -= len(files)
        scan.bytes_left -= sum(f.stat().st_size for f in files)
        scan.notes.extend(archive_warnings)
        root, display_root = target, str(input_path)
        _scan_files(sorted(files), root=root, display_root=display_root, **common)  # type: ignore[arg-type]
    elif input_path.is_dir():
        root, display_root = input_path, str(input_path)
        files, left_out = regular_files(input_path)
        if left_out:
            scan.notes.append(
                f"left {len(left_out)} entr{'y' if len(left_out) == 1 else 'ies'} unopened "
                f"(only regular files inside the input are read): {_shown(left_out)}"
            )
            log.warning("%s: %s", input_path.name, scan.notes[-1])
        _scan_files(files, root=root, display_root=display_root, **common)  # type: ignore[arg-type]
    else:
        root, display_root = input_path.parent, str(input_path.parent)
        _scan_files([input_path], root=root, display_root=display_root, **common)  # type: ignore[arg-type]
    notes = scan.notes
    if scan.skipped:
        notes.append(
            f"skipped {len(scan.skipped)} file(s) that are not DICOM: {_shown(scan.skipped)}"
        )
        log.warning("%s: %s", input_path.name, notes[-1])
    if scan.damaged:
        notes.append(
            f"skipped {len(scan.damaged)} damaged DICOM file(s) (truncated or corrupt): "
            f"{_shown(scan.damaged)}"
        )
        log.warning("%s: %s", input_path.name, notes[-1])
    if not scan.headers and scan.damaged:
        raise NoDicomError(
            f"{input_path.name} holds {len(scan.damaged)} DICOM file(s), all damaged "
            f"({_shown(scan.damaged, 2)}); copy or export the study again."
        )
    if not scan.headers:
        n = scan.n_files
        what = "no files at all" if n == 0 else f"{n} file(s), none of them DICOM"
        if scan.archives:
            what += f" (looked inside {scan.archives} nested zip archive(s))"
        unopened = [s for s in scan.skipped if "nested" in s]
        if unopened:
            what += f"; left unopened: {_shown(unopened, 1)}"
        raise NoDicomError(
            f"{input_path.name} holds {what}; pass a folder or zip archive of DICOM files."
        )
    studies = group_headers(scan.headers, location_root=display_root)
    return Discovery(
        input_path=input_path,
        studies=studies,
        warnings=tuple(notes),
        n_files=scan.n_files,
        n_skipped=len(scan.skipped),
    )
