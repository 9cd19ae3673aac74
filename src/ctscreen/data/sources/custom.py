"""Adapter for a custom set of class folders.

Layout::

    root/norma_anon/<study folder>/...        -> label from the mapping (0)
    root/norma_anon/<study>.zip
    root/pneumonia_anon/...                   -> 1
    root/pneumotorax_anon/...                 -> 1

Each class folder holds one study per subfolder and/or per zip archive. The zip is
not extracted here: its first DICOM member's header is streamed to read the
StudyInstanceUID, and the row's path is the zip itself (``path_type`` ``dicom``).
The patient id is the DICOM PatientID when present (placeholders ignored), else empty
(the study is then its own split group).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ...errors import ConfigError, DatasetError
from ..registry import RegistryRow, rows_to_frame
from .common import (
    AdapterResult,
    StudyHeader,
    iter_files,
    parse_key_values,
    read_study_header,
    require_root,
)

log = logging.getLogger(__name__)

NAME = "custom"

DEFAULT_MAPPING: dict[str, int] = {"norma_anon": 0, "pneumonia_anon": 1, "pneumotorax_anon": 1}

_EXAMPLE = "norma_anon=0,pneumonia_anon=1"


def parse_mapping(text: str) -> dict[str, int]:
    """Parse a class-folder mapping such as ``"norma_anon=0,pneumonia_anon=1"``.

    Args:
        text: comma-separated ``folder=label`` items, labels 0 or 1.

    Returns:
        folder name -> label, in the given order.

    Raises:
        ConfigError: bad syntax, a repeated folder, or a label other than 0/1.

    Example:
        >>> parse_mapping("norma_anon=0, pneumonia_anon=1")
        {'norma_anon': 0, 'pneumonia_anon': 1}
    """
    pairs = parse_key_values(text, what="mapping", example=_EXAMPLE)
    mapping: dict[str, int] = {}
    for name, label in pairs.items():
        if label not in {"0", "1"}:
            raise ConfigError(
                f"mapping gives folder {name!r} the label {label!r}; labels are 0 or 1 "
                f"(e.g. {_EXAMPLE})."
            )
        mapping[name] = int(label)
    return mapping


def build_custom(
    root: Path,
    mapping: Mapping[str, int] | str | None = None,
    *,
    dataset: str = NAME,
) -> AdapterResult:
    """Build registry rows for class folders of DICOM studies.

    Args:
        root: folder holding the class folders.
        mapping: class folder -> label (0/1), or its text form; default
            :data:`DEFAULT_MAPPING`.
        dataset: value of the ``dataset`` column and key prefix (to keep two custom
            sets apart).

    Returns:
        Rows for study folders with files and readable zip archives; absent class
        folders, empty study folders and unreadable zips in ``missing``.

    Raises:
        DatasetError: the root is missing or none of the mapped class folders exists.
        ConfigError: the mapping is invalid.
    """
    root = require_root(root, NAME)
    if mapping is None:
        mapping = DEFAULT_MAPPING
    elif isinstance(mapping, str):
        mapping = parse_mapping(mapping)
    for name, label in mapping.items():
        if label not in (0, 1):
            raise ConfigError(f"mapping gives folder {name!r} the label {label!r}; use 0 or 1.")
    present = [name for name in mapping if (root / name).is_dir()]
    if not present:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(
            f"none of the class folders {', '.join(mapping)} exists in {root} "
            f"(folders found: {', '.join(found) or 'none'}); pass a mapping such as {_EXAMPLE}."
        )
    rows: list[RegistryRow] = []
    missing = [f"{root / name} (class folder)" for name in mapping if name not in present]
    notes: list[str] = []
    ignored = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name not in mapping and not p.name.startswith(".")
    )
    if ignored:
        notes.append(f"folder(s) not in the mapping ignored: {', '.join(ignored)}")
    no_header = 0
    for class_name in present:
        label = int(mapping[class_name])
        class_dir = root / class_name
        loose = 0
        for entry in sorted(class_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            header: StudyHeader | None
            if entry.is_dir():
                if next(iter_files(entry), None) is None:
                    missing.append(f"{entry} (empty study folder)")
                    continue
                header = read_study_header(entry)
            elif entry.suffix.lower() == ".zip":
                try:
                    header = read_study_header(entry)
                except DatasetError as exc:
                    missing.append(f"{entry} ({exc.message})")
                    continue
            else:
                loose += 1
                continue
            no_header += header is None
            rows.append(
                RegistryRow(
                    study_key=f"{dataset}:{class_name}/{entry.name}",
                    path=str(entry),
                    path_type="dicom",
                    label=label,
                    dataset=dataset,
                    patient_id=header.patient_id if header else "",
                    study_uid=header.study_uid if header else "",
                    source_category=class_name,
                )
            )
        if loose:
            notes.append(
                f"{loose} loose file(s) in {class_dir} ignored; put each study in "
                "its own subfolder or zip"
            )
    if no_header:
        notes.append(
            f"{no_header} stud(ies) without a readable DICOM header in the first "
            "files; their study_uid is empty"
        )
    log.info("%s: %d studies, %d missing", dataset, len(rows), len(missing))
    return AdapterResult(rows_to_frame(rows), missing, notes)
