"""Find DICOM objects in folders and zip archives and group them into studies and series.

Only headers are read here (pixel data is left on disk), so discovering a large
archive costs little memory. Aggressively anonymised exports sometimes blank the
UIDs; then a stable fallback is used and said: the SOP UIDs come from the file meta
header, and studies and series are grouped by their folder.

The work is split by stage: :mod:`~ctscreen.dicom.files` walks the input and reads
headers safely, :mod:`~ctscreen.dicom.instance` turns a header into an
:class:`InstanceHeader`, :mod:`~ctscreen.dicom.group` groups instances into studies
and series; this module runs them over one input (nested zips included). Their
names are importable from here as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InputError, NoDicomError
from .archive import ArchiveLimits, extract_zip
from .files import (
    PARSE_ERRORS,
    DamagedFileError,
    iter_files,
    looks_like_dicom,
    looks_like_zip,
    read_head,
    read_header,
    regular_files,
    special_file_kind,
    truncation,
)
from .group import Series, Study, folder_location, group_headers
from .instance import (
    CT_SOP_CLASSES,
    FrameGeometry,
    InstanceHeader,
    NativePixels,
    header_from_dataset,
)

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR


@dataclass(frozen=True)
class Discovery:
    """Everything found in one input (a folder, a zip archive or a file)."""

    input_path: Path
    studies: tuple[Study, ...]
    warnings: tuple[str, ...]
    n_files: int
    n_skipped: int


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
    except (*PARSE_ERRORS, RuntimeError) as exc:
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
        if path.suffix.lower() == ".zip" or read_head(path, 4) == b"PK\x03\x04":
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


__all__ = [
    "CT_SOP_CLASSES",
    "MAX_ZIP_DEPTH",
    "MEDIA_STORAGE_DIRECTORY",
    "PARSE_ERRORS",
    "DamagedFileError",
    "Discovery",
    "FrameGeometry",
    "InstanceHeader",
    "NativePixels",
    "Series",
    "Study",
    "discover",
    "folder_location",
    "group_headers",
    "header_from_dataset",
    "iter_files",
    "looks_like_dicom",
    "looks_like_zip",
    "read_header",
    "regular_files",
    "special_file_kind",
    "truncation",
]
