"""Adapter for MosMedData CT-COVID19 type VII (DICOM, several studies per patient).

Layout::

    root/dicom/patient_001/<study folder>/<series folders or files ...>
    root/dicom/patient_001/<another study>/...
    root/<registry table>.xlsx | .csv      (optional; column names vary)

A study is an immediate subfolder of a patient folder (a patient folder holding files
directly is one study). The registry's column names are not fixed, so the study,
label and patient columns are found by synonyms (see :data:`COLUMN_SYNONYMS`) or
given with ``column_map``. A registry study value may be a path (relative to ``root``
or ``root/dicom``), a study folder name, or a StudyInstanceUID. Without a registry,
every study on disk gets ``default_label`` and its patient id from the folder name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError, DatasetError
from ..registry import RegistryRow, rows_to_frame
from .common import (
    AdapterResult,
    LabelRule,
    StudyHeader,
    find_registry_table,
    iter_files,
    label_map_rule,
    normalise_value,
    read_study_header,
    read_table,
    require_root,
    resolve_columns,
)

log = logging.getLogger(__name__)

NAME = "mosmed_vii"

COLUMN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "study": (
        "study_id",
        "study",
        "study_instance_uid",
        "study_uid",
        "study_instance_anon",
        "study_anon",
        "study_path",
        "study_folder",
        "study_file",
        "path",
        "folder",
        "исследование",
    ),
    "label": (
        "category",
        "label",
        "class",
        "pathology",
        "diagnosis",
        "ct_category",
        "target",
        "finding",
        "findings",
        "категория",
        "диагноз",
        "патология",
        "класс",
    ),
    "patient": (
        "patient_id",
        "patient",
        "patient_anon",
        "patient_uid",
        "subject",
        "subject_id",
        "пациент",
    ),
}

#: Values that mean "no pathology" under the default rule; anything else is 1.
DEFAULT_NEGATIVE_VALUES: tuple[str, ...] = (
    "CT-0",
    "CT0",
    "normal",
    "norma",
    "no pathology",
    "healthy",
    "negative",
    "0",
    "no",
    "false",
)


@dataclass(frozen=True)
class _Study:
    patient: str
    folder: Path
    rel: str
    header: StudyHeader | None


def default_rule(value: str) -> int | None:
    """Default VII label rule: CT-0/normal/0/no/... -> 0, empty -> None, else -> 1.

    Args:
        value: registry cell text.

    Returns:
        The label, or ``None`` for an empty cell.
    """
    v = normalise_value(value)
    if not v:
        return None
    return 0 if v in {normalise_value(n) for n in DEFAULT_NEGATIVE_VALUES} else 1


def positive_rule(positive_values: Iterable[str]) -> LabelRule:
    """Rule where the given values mean pathology and every other non-empty value normal.

    Args:
        positive_values: values meaning pathology.

    Returns:
        The rule.
    """
    pos = {normalise_value(v) for v in positive_values}

    def rule(value: str) -> int | None:
        v = normalise_value(value)
        if not v:
            return None
        return 1 if v in pos else 0

    return rule


def index_studies(dicom_dir: Path) -> list[_Study]:
    """List the study folders under ``dicom_dir`` and read one header of each.

    Args:
        dicom_dir: folder holding ``patient_XXX`` folders.

    Returns:
        Studies in sorted order; empty study folders are left out.
    """
    studies: list[_Study] = []
    for patient in sorted(p for p in dicom_dir.iterdir() if p.is_dir()):
        if patient.name.startswith("."):
            continue
        subdirs = sorted(p for p in patient.iterdir() if p.is_dir() and not p.name.startswith("."))
        folders = subdirs or [patient]
        for folder in folders:
            if next(iter_files(folder), None) is None:
                continue
            rel = folder.relative_to(dicom_dir).as_posix()
            studies.append(_Study(patient.name, folder, rel, read_study_header(folder)))
    return studies


class _Matcher:
    """Find the study a registry value points to (path, folder name or UID)."""

    def __init__(self, root: Path, dicom_dir: Path, studies: list[_Study]) -> None:
        self.root = root
        self.dicom_dir = dicom_dir
        self.by_folder = {s.folder.resolve(): s for s in studies}
        self.by_name: dict[str, list[_Study]] = {}
        self.by_uid: dict[str, _Study] = {}
        for s in studies:
            self.by_name.setdefault(s.folder.name, []).append(s)
            if s.header is not None:
                self.by_uid.setdefault(s.header.study_uid, s)

    def find(self, value: str, patient: str = "") -> _Study | None:
        rel = value.strip().replace("\\", "/").lstrip("/")
        if rel:
            for base in (self.root, self.dicom_dir):
                candidate = (base / rel).resolve()
                for folder in (candidate, *candidate.parents):
                    if folder in self.by_folder:
                        return self.by_folder[folder]
                    if folder == base.resolve():
                        break
        named = self.by_name.get(value.strip(), [])
        if patient:
            named = [s for s in named if s.patient == patient] or named
        if len(named) == 1:
            return named[0]
        return self.by_uid.get(value.strip())


def _label_rule(
    label_map: Mapping[str, int | str] | None, positive_values: Iterable[str] | None
) -> LabelRule:
    if label_map and positive_values:
        raise ConfigError("give either label_map or positive_values, not both.")
    if label_map:
        return label_map_rule(label_map)
    if positive_values:
        return positive_rule(positive_values)
    return default_rule


def build_mosmed_vii(
    root: Path,
    *,
    column_map: Mapping[str, str] | None = None,
    label_map: Mapping[str, int | str] | None = None,
    positive_values: Iterable[str] | None = None,
    registry: str | Path | None = None,
    default_label: int | None = None,
) -> AdapterResult:
    """Build registry rows for MosMedData CT-COVID19 type VII.

    Args:
        root: dataset root (holding ``dicom/`` and usually a registry table).
        column_map: role -> exact column for ``study``, ``label``, ``patient``.
        label_map: registry value -> 0/1; values not listed are skipped and reported.
        positive_values: registry values that mean pathology (all others -> 0).
        registry: the registry table, when it is not ``root/dataset_registry.xlsx``
            or the only table in ``root``.
        default_label: label for every study when there is no registry table.

    Returns:
        Rows for studies found on disk; registry rows whose study is absent in
        ``missing``; skipped rows and assumptions in ``notes``.

    Raises:
        DatasetError: the root is missing, columns cannot be detected, or there is no
            registry and no ``default_label``.
        ConfigError: conflicting or invalid label options.
    """
    root = require_root(root, NAME)
    rule = _label_rule(label_map, positive_values)
    dicom_dir = root / "dicom" if (root / "dicom").is_dir() else root
    notes: list[str] = []
    if dicom_dir == root:
        notes.append(f"no dicom/ folder in {root}: patient folders are read from the root")
    studies = index_studies(dicom_dir)
    no_header = [s.rel for s in studies if s.header is None]
    if no_header:
        notes.append(
            f"{len(no_header)} study folder(s) without a readable DICOM header "
            f"(first: {no_header[0]}); their study_uid is empty"
        )
    table_path = Path(registry) if registry is not None else find_registry_table(root)
    if table_path is None:
        return _without_registry(studies, default_label, notes, root)
    table = read_table(table_path)
    cols = resolve_columns(
        list(table.columns),
        COLUMN_SYNONYMS,
        required=("study", "label"),
        column_map=column_map,
        table=str(table_path),
    )
    if cols["patient"] is None:
        notes.append("registry has no patient column: patient ids come from patient folders")
    matcher = _Matcher(root, dicom_dir, studies)
    rows: list[RegistryRow] = []
    missing: list[str] = []
    used: set[str] = set()
    skipped = 0
    for n, rec in enumerate(table.to_dict("records"), start=2):
        value = rec[cols["study"]]
        raw_label = rec[cols["label"]]
        patient = rec[cols["patient"]] if cols["patient"] else ""
        if not value:
            notes.append(f"row {n}: empty study value; skipped")
            continue
        label = rule(raw_label)
        if label is None:
            skipped += 1
            continue
        study = matcher.find(value, patient)
        if study is None:
            missing.append(f"{value} (row {n} of {table_path.name})")
            continue
        if study.rel in used:
            notes.append(f"row {n}: study {value} listed twice; kept the first")
            continue
        used.add(study.rel)
        rows.append(_row(study, label, patient or study.patient, raw_label))
    if skipped:
        notes.append(f"{skipped} registry row(s) with an empty or unmapped label skipped")
    unlisted = len(studies) - len(used)
    if unlisted:
        notes.append(f"{unlisted} study folder(s) on disk are not in the registry; left out")
    log.info("%s: %d studies, %d missing", NAME, len(rows), len(missing))
    return AdapterResult(rows_to_frame(rows), missing, notes)


def _row(study: _Study, label: int, patient: str, category: str) -> RegistryRow:
    return RegistryRow(
        study_key=f"{NAME}:{study.rel}",
        path=str(study.folder),
        path_type="dicom",
        label=label,
        dataset=NAME,
        patient_id=patient,
        study_uid=study.header.study_uid if study.header else "",
        source_category=category,
    )


def _without_registry(
    studies: list[_Study], default_label: int | None, notes: list[str], root: Path
) -> AdapterResult:
    if default_label is None:
        raise DatasetError(
            f"{root} holds no registry table (dataset_registry.xlsx or a single .csv/.xlsx); "
            "pass registry=PATH, or default_label=0/1 if every study has the same label."
        )
    if default_label not in (0, 1):
        raise ConfigError(f"default_label must be 0 or 1, not {default_label!r}.")
    notes.append(
        f"no registry table: every study labelled {default_label}, patient ids from patient folders"
    )
    rows = [_row(s, default_label, s.patient, "") for s in studies]
    return AdapterResult(rows_to_frame(rows), [], notes)
