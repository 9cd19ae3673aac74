"""Who a study is: StudyInstanceUID and PatientID from its first readable header.

Dataset adapters need a study's identity (to group by patient and to find one
study reached through two sources) without reading the whole study. This reads
only headers, and only through :mod:`ctscreen.dicom`'s own readers and limits: a
zip goes through :func:`ctscreen.dicom.archive.extract_zip` (member count, size,
ratio and path checks) into a temporary folder, files through
:func:`ctscreen.dicom.files.read_header`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CtscreenError
from .archive import extract_zip
from .files import iter_files, looks_like_zip, read_header

log = logging.getLogger(__name__)

#: How many files of one study are tried before giving up on finding a header.
HEADER_TRIES = 5

#: File suffixes that are never DICOM; such files are passed over without counting a
#: try (annotation folders full of XML often sort before the image series).
NON_DICOM_SUFFIXES = frozenset(
    {
        ".xml",
        ".txt",
        ".json",
        ".csv",
        ".xlsx",
        ".xls",
        ".md",
        ".pdf",
        ".png",
        ".jpg",
        ".jpeg",
        ".nii",
        ".gz",
        ".zip",
        ".py",
        ".html",
        ".log",
    }
)


@dataclass(frozen=True)
class StudyIdentity:
    """Identifiers read from one DICOM header of a study.

    Attributes:
        study_uid: StudyInstanceUID.
        patient_id: PatientID as written (may be a placeholder such as ``ANONYMOUS``).
        file: the file (or ``archive!member``) the header came from.
    """

    study_uid: str
    patient_id: str
    file: str


def _first_identity(files: list[Path], tries: int, shown: str, root: Path) -> StudyIdentity | None:
    candidates = [
        p
        for p in files
        if p.suffix.lower() not in NON_DICOM_SUFFIXES
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
    ]
    for path in candidates[:tries]:
        try:
            ds = read_header(path)
        except CtscreenError as exc:  # a damaged file: try the next one
            log.debug("no header in %s (%s)", path, exc.message)
            continue
        if ds is None:
            continue
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        if uid:
            name = str(path) if shown == str(root) else f"{shown}!{path.relative_to(root)}"
            return StudyIdentity(uid, str(ds.get("PatientID", "") or "").strip(), name)
    return None


def read_study_identity(path: Path | str, *, tries: int = HEADER_TRIES) -> StudyIdentity | None:
    """StudyInstanceUID and PatientID of the study in a folder, zip archive or file.

    Only headers are read, from at most ``tries`` files that could be DICOM (in
    sorted order); a zip is extracted under the archive safety limits first.

    Returns:
        The identity, or None when no tried file had a StudyInstanceUID.

    Raises:
        InputError: a zip that is not a readable archive.
        UnsafeArchiveError: a zip that breaks a safety bound.
    """
    path = Path(path)
    if path.is_file() and looks_like_zip(path):
        with tempfile.TemporaryDirectory(prefix="ctscreen-id-") as tmp:
            files, _ = extract_zip(path, Path(tmp))
            return _first_identity(sorted(files), tries, str(path), Path(tmp).resolve())
    return _first_identity(iter_files(path), tries, str(path), path)
