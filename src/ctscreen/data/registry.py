"""The dataset registry: one row schema shared by every dataset adapter.

A registry is a table with one row per study and the columns of
:data:`REGISTRY_COLUMNS`. It is stored as CSV (UTF-8, header row, every value a
string, empty string = unknown). This module is torch-free and pydicom-free so that
the CLI, the split step and the tests can use it cheaply.

Paths in a registry file are relative to the file's own folder when the study lies
inside that folder (so a dataset folder moved or copied with its registry keeps
working), absolute otherwise; never relative to the directory a command happened to
run in. :func:`read_registry` returns absolute paths.

Columns:
    study_key: unique, stable key of the study, ``"<dataset>:<study id>"``.
    path: where the study lives (a DICOM study folder, a zip of DICOM, a NIfTI file).
    path_type: ``"dicom"`` or ``"nifti"``.
    label: 0 = no pathology, 1 = pathology.
    dataset: adapter name that produced the row (``covid19_1110``, ``custom``, ...).
    patient_id: patient identifier inside ``dataset``; empty when unknown.
    study_uid: DICOM StudyInstanceUID read from one header; empty when unknown.
    source_category: the dataset's own class value (``CT-2``, ``pneumonia_anon``, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from ..errors import ConfigError, DatasetError
from ..fileio import write_text_atomic

log = logging.getLogger(__name__)

REGISTRY_COLUMNS: tuple[str, ...] = (
    "study_key",
    "path",
    "path_type",
    "label",
    "dataset",
    "patient_id",
    "study_uid",
    "source_category",
)

#: Allowed values of ``path_type``.
PATH_TYPES: tuple[str, ...] = ("dicom", "nifti")

#: Allowed values of ``label`` (0 = no pathology, 1 = pathology).
LABELS: tuple[int, ...] = (0, 1)

#: Columns that must never be empty.
_REQUIRED_VALUES: tuple[str, ...] = ("study_key", "path", "path_type", "dataset")

ConflictPolicy = Literal["drop", "error"]


@dataclass(frozen=True)
class RegistryRow:
    """One study of a registry.

    Attributes:
        study_key: unique, stable key, ``"<dataset>:<study id>"``.
        path: study folder, zip archive or NIfTI file.
        path_type: ``"dicom"`` or ``"nifti"``.
        label: 0 = no pathology, 1 = pathology.
        dataset: name of the adapter that produced the row.
        patient_id: patient identifier within ``dataset``; empty when unknown.
        study_uid: DICOM StudyInstanceUID; empty when unknown.
        source_category: the dataset's own class value.

    Raises:
        DatasetError: ``path_type`` or ``label`` is out of range, or a required value is empty.
    """

    study_key: str
    path: str
    path_type: str
    label: int
    dataset: str
    patient_id: str = ""
    study_uid: str = ""
    source_category: str = ""

    def __post_init__(self) -> None:
        if self.path_type not in PATH_TYPES:
            raise DatasetError(
                f"study {self.study_key!r} has path_type {self.path_type!r}; "
                f"use one of {', '.join(PATH_TYPES)}."
            )
        if self.label not in LABELS:
            raise DatasetError(
                f"study {self.study_key!r} has label {self.label!r}; "
                "use 0 (normal) or 1 (pathology)."
            )
        for name in _REQUIRED_VALUES:
            if not str(getattr(self, name)).strip():
                raise DatasetError(f"a registry row has an empty {name}; every row needs one.")


def empty_frame() -> pd.DataFrame:
    """Return an empty registry frame with the schema's columns.

    Returns:
        A frame with :data:`REGISTRY_COLUMNS` and no rows.
    """
    frame = pd.DataFrame({name: pd.Series(dtype=object) for name in REGISTRY_COLUMNS})
    frame["label"] = frame["label"].astype("int64")
    return frame


def rows_to_frame(rows: Iterable[RegistryRow]) -> pd.DataFrame:
    """Turn registry rows into a registry frame.

    Args:
        rows: rows in the order they should appear.

    Returns:
        A frame with exactly :data:`REGISTRY_COLUMNS`, ``label`` as int64.
    """
    records = [asdict(row) for row in rows]
    if not records:
        return empty_frame()
    frame = pd.DataFrame.from_records(records, columns=list(REGISTRY_COLUMNS))
    frame["label"] = frame["label"].astype("int64")
    return frame


def _parse_label(value: object) -> int | None:
    text = str(value).strip()
    if text in {"0", "0.0"}:
        return 0
    if text in {"1", "1.0"}:
        return 1
    return None


def validate_registry(
    frame: pd.DataFrame, *, where: str = "registry", first_row: int = 0, unique: bool = True
) -> pd.DataFrame:
    """Check a registry frame and return a normalised copy.

    Text columns become strings with ``""`` for missing values, ``label`` becomes
    int64, the schema columns come first in schema order (extra columns are kept after).

    Args:
        frame: the frame to check.
        where: name of the table for messages (a file path or "registry").
        first_row: number reported for the frame's first row (2 for a CSV file: line 1
            is the header).
        unique: also require every ``study_key`` to appear once.

    Returns:
        The normalised copy.

    Raises:
        DatasetError: a column is missing or a value is invalid; the message names the
            column and the row.
    """
    missing = [name for name in REGISTRY_COLUMNS if name not in frame.columns]
    if missing:
        raise DatasetError(
            f"{where} lacks the column(s) {', '.join(missing)}; a registry needs "
            f"{', '.join(REGISTRY_COLUMNS)} (build one with `ctscreen registry build`)."
        )
    out = frame.reset_index(drop=True).copy()
    for name in REGISTRY_COLUMNS:
        if name == "label":
            continue
        out[name] = out[name].map(lambda v: "" if pd.isna(v) else str(v).strip()).astype(object)
    for name in _REQUIRED_VALUES:
        empty = out.index[out[name] == ""]
        if len(empty):
            raise DatasetError(f"{where}: column {name!r} is empty in row {empty[0] + first_row}.")
    bad_type = out.index[~out["path_type"].isin(PATH_TYPES)]
    if len(bad_type):
        i = bad_type[0]
        raise DatasetError(
            f"{where}: column 'path_type' in row {i + first_row} holds "
            f"{out.at[i, 'path_type']!r}; use one of {', '.join(PATH_TYPES)}."
        )
    labels = out["label"].map(_parse_label)
    bad_label = out.index[labels.isna()]
    if len(bad_label):
        i = bad_label[0]
        raise DatasetError(
            f"{where}: column 'label' in row {i + first_row} holds {out.at[i, 'label']!r}; "
            "use 0 (normal) or 1 (pathology)."
        )
    out["label"] = labels.astype("int64")
    if unique:
        dup = out.index[out["study_key"].duplicated()]
        if len(dup):
            i = dup[0]
            raise DatasetError(
                f"{where}: study_key {out.at[i, 'study_key']!r} in row {i + first_row} appears "
                "more than once; run `ctscreen registry merge` to drop duplicates."
            )
    extras = [c for c in out.columns if c not in REGISTRY_COLUMNS]
    return out[list(REGISTRY_COLUMNS) + extras]


def paths_for_file(paths: Iterable[str], registry_dir: Path) -> list[str]:
    """Study paths as stored in a registry file in ``registry_dir``.

    A relative path is taken relative to the current directory (where the rows were
    built). Paths inside ``registry_dir`` become relative to it, POSIX-style; the
    others become absolute.

    Example:
        >>> paths_for_file(["/data/a/s1", "/elsewhere/s2"], Path("/data"))
        ['a/s1', '/elsewhere/s2']
    """
    base = Path(os.path.abspath(registry_dir))
    out = []
    for text in paths:
        absolute = Path(os.path.abspath(text))
        try:
            out.append(absolute.relative_to(base).as_posix())
        except ValueError:
            out.append(str(absolute))
    return out


def paths_from_file(paths: Iterable[str], registry_dir: Path) -> list[str]:
    """Absolute study paths of a registry file in ``registry_dir`` (see :func:`paths_for_file`).

    A relative path is resolved against ``registry_dir``. Registries written by
    older versions stored paths relative to the directory they were built in: such
    a path that exists only relative to the current directory is taken from there,
    with a warning.
    """
    base = Path(os.path.abspath(registry_dir))
    out, legacy = [], 0
    for text in paths:
        path = Path(text)
        if path.is_absolute():
            out.append(str(path))
            continue
        beside = base / path
        if not beside.exists() and path.exists():
            legacy += 1
            out.append(os.path.abspath(path))
        else:
            out.append(os.path.abspath(beside))
    if legacy:
        log.warning(
            "%d registry path(s) are relative to the current directory, not to the registry "
            "file in %s; rebuild the registry (`ctscreen registry build`) so that it works "
            "from any directory",
            legacy,
            base,
        )
    return out


def read_registry(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a registry CSV.

    Args:
        path: the CSV file.

    Returns:
        The validated frame (see :func:`validate_registry`), with absolute ``path``
        values (relative ones are relative to the registry file's folder).

    Raises:
        DatasetError: the file does not exist, is empty, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"registry file {path} does not exist; build it with `ctscreen registry build`."
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(f"registry file {path} is empty; rebuild it.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"registry file {path} is not a readable UTF-8 CSV ({exc}).") from exc
    clean = validate_registry(frame, where=str(path), first_row=2)
    clean["path"] = paths_from_file(clean["path"], path.parent)
    return clean


def write_registry(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Validate a registry frame and write it as CSV, atomically.

    The CSV is written to a temporary file in the target folder and moved into place
    with ``os.replace``, so a reader never sees a half-written registry. Study paths
    are stored relative to the CSV's folder when inside it, else absolute (see
    :func:`paths_for_file`).

    Args:
        frame: the registry frame.
        path: target CSV file; parent folders are created.

    Returns:
        The path written.

    Raises:
        DatasetError: the frame fails validation.
    """
    path = Path(path)
    clean = validate_registry(frame, where="registry to write")
    clean["path"] = paths_for_file(clean["path"], path.parent)
    write_text_atomic(path, clean.to_csv(index=False, lineterminator="\n"))
    log.info("wrote %d registry rows to %s", len(clean), path)
    return path


def merge_registries(
    frames: Sequence[pd.DataFrame], *, on_conflict: ConflictPolicy = "drop"
) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate registries, dropping studies reached twice.

    Rows are taken in order (first frame first). A row is a duplicate when its
    ``study_key`` or its non-empty ``study_uid`` (StudyInstanceUID) was already kept;
    the first row is kept and the duplicate dropped. When the two rows disagree on the
    label, nobody can tell which label is right: with ``on_conflict="drop"`` (default)
    every row of that study is dropped, with ``on_conflict="error"`` a DatasetError is
    raised. Each drop is described in the returned notes.

    Args:
        frames: registry frames (each is validated; duplicates inside one frame are
            handled like duplicates across frames).
        on_conflict: ``"drop"`` or ``"error"`` for studies with conflicting labels.

    Returns:
        ``(merged frame, notes)``; the merged frame has unique ``study_key`` and unique
        non-empty ``study_uid``.

    Raises:
        DatasetError: conflicting labels and ``on_conflict="error"``.
        ConfigError: ``on_conflict`` is not one of the allowed values.
    """
    if on_conflict not in ("drop", "error"):
        raise ConfigError(f"on_conflict must be 'drop' or 'error', not {on_conflict!r}.")
    parts = [
        validate_registry(f, where=f"registry #{i + 1}", unique=False) for i, f in enumerate(frames)
    ]
    if not parts:
        return empty_frame(), []
    merged = pd.concat(parts, ignore_index=True)
    notes: list[str] = []
    kept: list[int] = []
    by_key: dict[str, int] = {}
    by_uid: dict[str, int] = {}
    conflicted: set[int] = set()
    for i, row in merged.iterrows():
        key, uid, label = row["study_key"], row["study_uid"], row["label"]
        first = by_key.get(key)
        reason = "study_key"
        if first is None and uid:
            first = by_uid.get(uid)
            reason = "StudyInstanceUID"
        if first is None:
            kept.append(i)
            by_key[key] = i
            if uid:
                by_uid[uid] = i
            continue
        first_key = merged.at[first, "study_key"]
        if merged.at[first, "label"] != label:
            message = (
                f"{key} and {first_key} are the same study (same {reason}) with labels "
                f"{label} and {merged.at[first, 'label']}"
            )
            if on_conflict == "error":
                raise DatasetError(f"{message}; fix one of the registries or merge with drop.")
            conflicted.add(first)
            notes.append(f"conflict: {message}; dropped both")
            continue
        notes.append(f"duplicate: dropped {key} (same {reason} as kept {first_key})")
    if conflicted:
        kept = [i for i in kept if i not in conflicted]
    out = merged.loc[kept].reset_index(drop=True)
    log.info("merged %d rows into %d (%d notes)", len(merged), len(out), len(notes))
    return out, notes
