"""Adapter for MosMedData COVID19_1110 (NIfTI studies, categories CT-0..CT-4).

Layout::

    root/dataset_registry.xlsx      columns study_id, category, study_file[, mask_file]
    root/studies/CT-0/study_0001.nii.gz
    root/studies/CT-1/...

``study_file`` is written with a leading slash but is relative to ``root``. CT-0 means
no pathology (label 0); CT-1..CT-4 are COVID-19 findings of growing extent (label 1).
The dataset holds one study per patient and no patient id, so every study is its own
split group (``patient_id`` stays empty).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ..registry import RegistryRow, rows_to_frame
from .common import (
    AdapterResult,
    binary_rule,
    label_map_rule,
    read_registry_table,
    require_root,
)

log = logging.getLogger(__name__)

NAME = "covid19_1110"

COLUMN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "study": ("study_id",),
    "label": ("category",),
    "path": ("study_file",),
}

NEGATIVE_CATEGORIES = ("CT-0",)
POSITIVE_CATEGORIES = ("CT-1", "CT-2", "CT-3", "CT-4")


def resolve_study_file(root: Path, value: str) -> Path:
    """Turn a ``study_file`` cell into a path under ``root``.

    Args:
        root: dataset root.
        value: cell text such as ``/studies/CT-0/study_0001.nii.gz`` (a leading slash
            or backslashes are tolerated).

    Returns:
        The file path (not checked for existence).
    """
    rel = value.strip().replace("\\", "/").lstrip("/")
    return root / rel


def build_covid19_1110(
    root: Path,
    *,
    label_map: Mapping[str, int | str] | None = None,
    column_map: Mapping[str, str] | None = None,
) -> AdapterResult:
    """Build registry rows for MosMedData COVID19_1110.

    Args:
        root: dataset root (holding ``dataset_registry.xlsx`` and ``studies/``).
        label_map: category -> 0/1 replacing the default (CT-0 -> 0, CT-1..CT-4 -> 1).
        column_map: role -> column for ``study``, ``label``, ``path`` when the table's
            columns differ from ``study_id``, ``category``, ``study_file``.

    Returns:
        Rows for studies whose NIfTI file exists; absent files in ``missing``; rows with
        an unknown category or no file name in ``notes``.

    Raises:
        DatasetError: the root or its registry table is missing, or columns are not found.
    """
    root = require_root(root, NAME)
    table, cols = read_registry_table(
        root, NAME, COLUMN_SYNONYMS, required=("study", "label", "path"), column_map=column_map
    )
    rule = (
        label_map_rule(label_map)
        if label_map
        else binary_rule(POSITIVE_CATEGORIES, NEGATIVE_CATEGORIES)
    )
    rows: list[RegistryRow] = []
    missing: list[str] = []
    notes: list[str] = []
    unknown: dict[str, int] = {}
    seen: set[str] = set()
    for n, rec in enumerate(table.to_dict("records"), start=2):
        study = rec[cols["study"]]
        category = rec[cols["label"]]
        file_text = rec[cols["path"]]
        if not study or not file_text:
            notes.append(f"row {n}: empty study id or study file; skipped")
            continue
        label = rule(category)
        if label is None:
            unknown[category] = unknown.get(category, 0) + 1
            continue
        path = resolve_study_file(root, file_text)
        if not path.is_file():
            missing.append(str(path))
            continue
        key = f"{NAME}:{study}"
        if key in seen:
            notes.append(f"row {n}: study {study} listed twice; kept the first")
            continue
        seen.add(key)
        rows.append(
            RegistryRow(
                study_key=key,
                path=str(path),
                path_type="nifti",
                label=label,
                dataset=NAME,
                patient_id="",
                study_uid="",
                source_category=category,
            )
        )
    for category, count in sorted(unknown.items()):
        notes.append(
            f"{count} row(s) with unknown category {category!r} skipped "
            "(pass a label map to use them)"
        )
    notes.append("COVID19_1110 has no patient ids: each study is its own split group")
    log.info("%s: %d studies, %d missing", NAME, len(rows), len(missing))
    return AdapterResult(rows_to_frame(rows), missing, notes)
