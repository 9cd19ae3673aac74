"""Find DICOM objects in folders and zip archives and group them into studies and series.

Only headers are read here (pixel data is left on disk), so discovering a large
archive costs little memory. Grouping is by StudyInstanceUID and
SeriesInstanceUID. Aggressively anonymised exports sometimes blank those UIDs;
then a stable fallback is used and said: the SOP UIDs come from the file meta
header, and studies and series are grouped by their folder.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError, NoDicomError
from .archive import ArchiveLimits, extract_zip

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
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
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slope: float = 1.0
    intercept: float = 0.0
    frame: int | None = None


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

    @property
    def number_of_frames(self) -> int:
        return len(self.frames)


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


def _frame_geometries(ds: Dataset) -> tuple[FrameGeometry, ...]:
    """Per-frame geometry and rescale: top level for classic images, functional groups
    (per-frame overriding shared) for enhanced multi-frame objects."""
    n_frames = _int_or_none(ds, "NumberOfFrames") or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return (
            FrameGeometry(
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                slope=_float_or_none(ds.get("RescaleSlope")) or 1.0,
                intercept=_float_or_none(ds.get("RescaleIntercept")) or 0.0,
                frame=None if n_frames == 1 else 1,
            ),
        ) + tuple(FrameGeometry(None, None, None, frame=k) for k in range(2, n_frames + 1))
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")

    def lookup(item: Dataset, seq_keyword: str, keyword: str) -> object:
        for source in (item, shared):
            inner = _first_item(source, seq_keyword)
            if inner is not None and keyword in inner:
                return inner.get(keyword)
        return ds.get(keyword)

    frames = []
    for k, item in enumerate(per_frame, start=1):
        slope = _float_or_none(lookup(item, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float_or_none(
            lookup(item, "PixelValueTransformationSequence", "RescaleIntercept")
        )
        frames.append(
            FrameGeometry(
                position=_floats(lookup(item, "PlanePositionSequence", "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(
                    lookup(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),  # type: ignore[arg-type]
                pixel_spacing=_floats(lookup(item, "PixelMeasuresSequence", "PixelSpacing"), 2),  # type: ignore[arg-type]
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
                frame=k,
            )
        )
    return tuple(frames)


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
        frames=_frame_geometries(ds),
        folder=folder,
        notes=tuple(notes),
        native_pixels=_native_pixels(ds, transfer_syntax),
    )


# --------------------------------------------------------------------------- files


def looks_like_dicom(path: Path) -> bool:
    """Cheap sniff: a 'DICM' preamble, or a first element in group 0002 or 0008
    (DICOM written without the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
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
#: CT Image Storage and Enhanced CT Image Storage: objects that must carry pixels.
_CT_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})


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
        if sop_class in _CT_IMAGE_CLASSES:
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
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def iter_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), sorted for stability."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in sorted(filenames))
    return found


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
        Studies sorted by key; each study's series sorted by key.
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
        folders = [h.folder for h in members]
        common = os.path.commonpath(folders) if all(folders) else ""
        location = location_root if not common else f"{location_root}/{common}"
        studies.append(
            Study(
                study_uid=members[0].study_uid,
                key=key,
                location=location,
                series=series,
                warnings=tuple(notes),
            )
        )
    return tuple(studies)


# --------------------------------------------------------------------------- inputs


def _headers_from_files(
    files: Iterable[Path], *, root: Path, display_root: str
) -> tuple[list[InstanceHeader], list[str], list[str], int]:
    headers: list[InstanceHeader] = []
    skipped: list[str] = []
    damaged: list[str] = []
    n = 0
    for path in files:
        n += 1
        rel = path.relative_to(root) if path != root else Path(path.name)
        folder = rel.parent.as_posix() if rel.parent != Path(".") else ""
        if path.name.upper() == "DICOMDIR":
            continue
        if path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
            skipped.append(f"{rel.as_posix()} (a zip inside the input; pass it as its own input)")
            continue
        try:
            ds = read_header(path)
        except DamagedFileError:
            damaged.append(rel.as_posix())
            continue
        if ds is None:
            skipped.append(rel.as_posix())
            continue
        header = header_from_dataset(
            ds, path=path, display_path=f"{display_root}/{rel.as_posix()}", folder=folder
        )
        if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
            continue
        headers.append(header)
    return headers, skipped, damaged, n


def discover(
    input_path: Path | str, *, work_dir: Path, limits: ArchiveLimits | None = None
) -> Discovery:
    """Find and group every DICOM object in one input.

    Args:
        input_path: a folder, a zip archive, or a single DICOM file.
        work_dir: an empty, run-owned folder a zip is extracted into (the
            caller deletes it after the input's studies are processed).
        limits: safety bounds for zip extraction.

    Raises:
        InputError: the path does not exist or cannot be read.
        UnsafeArchiveError: a zip breaks a safety bound.
        NoDicomError: the input holds no DICOM object at all.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError(f"{input_path} does not exist; check the path.")
    notes: list[str] = []
    if input_path.is_file() and looks_like_zip(input_path):
        work_dir.mkdir(parents=True, exist_ok=True)
        files, archive_warnings = extract_zip(input_path, work_dir, limits=limits)
        notes.extend(archive_warnings)
        root, display_root = work_dir, str(input_path)
        files = sorted(files)
    elif input_path.is_dir():
        root, display_root = input_path, str(input_path)
        files = iter_files(input_path)
    elif input_path.is_file():
        root, display_root = input_path.parent, str(input_path.parent)
        files = [input_path]
    else:
        raise InputError(f"{input_path} is neither a folder, a zip archive nor a file.")
    headers, skipped, damaged, n_files = _headers_from_files(
        files, root=root, display_root=display_root
    )
    if skipped:
        shown = ", ".join(skipped[:3]) + (" …" if len(skipped) > 3 else "")
        notes.append(f"skipped {len(skipped)} file(s) that are not DICOM: {shown}")
        log.warning("%s: %s", input_path.name, notes[-1])
    if damaged:
        shown = ", ".join(damaged[:3]) + (" …" if len(damaged) > 3 else "")
        notes.append(
            f"skipped {len(damaged)} damaged DICOM file(s) (truncated or corrupt): {shown}"
        )
        log.warning("%s: %s", input_path.name, notes[-1])
    if not headers and damaged:
        raise NoDicomError(
            f"{input_path.name} holds {len(damaged)} DICOM file(s), all damaged (truncated or "
            "corrupt); copy or export the study again."
        )
    if not headers:
        what = "no files at all" if n_files == 0 else f"{n_files} file(s), none of them DICOM"
        raise NoDicomError(
            f"{input_path.name} holds {what}; pass a folder or zip archive of DICOM files."
        )
    studies = group_headers(headers, location_root=display_root)
    return Discovery(
        input_path=input_path,
        studies=studies,
        warnings=tuple(notes),
        n_files=n_files,
        n_skipped=len(skipped),
    )
