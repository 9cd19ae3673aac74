"""Adapter for MosMedData LDCT-LUNGCR type I (low-dose chest CT, DICOM).

Layout::

    root/dataset_registry.xlsx      columns study_instance_anon, pathology (0/1, yes/no)
    root/studies/<study>/<series>/*.dcm

The row's path is the study folder. The patient id is, in this order: a patient
column of the registry, the PatientID of the study's first DICOM header (placeholders
such as ``ANONYMOUS`` ignored), the study id itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ..registry import RegistryRow, rows_to_frame
from .common import (
    AdapterResult,
    binary_rule,
    iter_files,
    label_map_rule,
    read_registry_table,
    read_study_header,
    require_root,
)

log = logging.getLogger(__name__)

NAME = "ldct_lungcr"

COLUMN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "study": ("study_instance_anon", "study_id", "study", "study_instance_uid", "study_uid"),
    "label": ("pathology", "label", "category", "class"),
    "patient": ("patient_id", "patient_anon", "patient"),
}

POSITIVE_VALUES = ("1", "yes", "true", "y", "да")
NEGATIVE_VALUES = ("0", "no", "false", "n", "нет")


def build_ldct_lungcr(
    root: Path,
    *,
    column_map: Mapping[str, str] | None = None,
    label_map: Mapping[str, int | str] | None = None,
) -> AdapterResult:
    """Build registry rows for MosMedData LDCT-LUNGCR type I.

    Args:
        root: dataset root (holding ``dataset_registry.xlsx`` and ``studies/``).
        column_map: role -> exact column for ``study``, ``label``, ``patient``.
        label_map: pathology value -> 0/1 replacing the default (1/yes/true -> 1,
            0/no/false -> 0).

    Returns:
        Rows for studies whose folder holds files; absent or empty study folders in
        ``missing``; rows with an unknown pathology value in ``notes``.

    Raises:
        DatasetError: the root or its registry table is missing, or columns are not found.
    """
    root = require_root(root, NAME)
    table, cols = read_registry_table(
        root, NAME, COLUMN_SYNONYMS, required=("study", "label"), column_map=column_map
    )
    rule = label_map_rule(label_map) if label_map else binary_rule(POSITIVE_VALUES, NEGATIVE_VALUES)
    studies_dir = root / "studies"
    rows: list[RegistryRow] = []
    missing: list[str] = []
    notes: list[str] = []
    unknown: dict[str, int] = {}
    seen: set[str] = set()
    patient_from = {"registry": 0, "header": 0, "study": 0}
    for n, rec in enumerate(table.to_dict("records"), start=2):
        study = rec[cols["study"]]
        raw = rec[cols["label"]]
        if not study:
            notes.append(f"row {n}: empty study id; skipped")
            continue
        label = rule(raw)
        if label is None:
            unknown[raw] = unknown.get(raw, 0) + 1
            continue
        folder = studies_dir / study
        if not folder.is_dir() or next(iter_files(folder), None) is None:
            missing.append(str(folder))
            continue
        key = f"{NAME}:{study}"
        if key in seen:
            notes.append(f"row {n}: study {study} listed twice; kept the first")
            continue
        seen.add(key)
        header = read_study_header(folder)
        patient = rec[cols["patient"]] if cols["patient"] else ""
        if patient:
            patient_from["registry"] += 1
        elif header is not None and header.patient_id:
            patient, patient_from["header"] = header.patient_id, patient_from["header"] + 1
        else:
            patient, patient_from["study"] = study, patient_from["study"] + 1
        rows.append(
            RegistryRow(
                study_key=key,
                path=str(folder),
                path_type="dicom",
                label=label,
                dataset=NAME,
                patient_id=patient,
                study_uid=header.study_uid if header else "",
                source_category=raw,
            )
        )
    for value, count in sorted(unknown.items()):
        notes.append(
            f"{count} row(s) with unknown pathology value {value!r} skipped "
            "(pass a label map to use them)"
        )
    used = {k: v for k, v in patient_from.items() if v}
    if used:
        notes.append("patient ids from " + ", ".join(f"{k}: {v}" for k, v in used.items()))
    log.info("%s: %d studies, %d missing", NAME, len(rows), len(missing))
    return AdapterResult(rows_to_frame(rows), missing, notes)
