"""Adapter for a dataset written by ``ctscreen synth`` (or the demo).

Layout::

    root/labels.csv                 one row per study (see ctscreen.synth.dataset)
    root/studies/<study_id>/...     DICOM study folders, or
    root/archives/<study_id>.zip    zip archives (``synth --zip``)

Labels, patient ids and StudyInstanceUIDs come from ``labels.csv``; nothing is
decoded. ``source_category`` is the synthetic finding (``none`` for normal studies).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ...errors import DatasetError
from ..registry import RegistryRow, rows_to_frame
from .common import AdapterResult

log = logging.getLogger(__name__)

NAME = "synthetic"
LABELS_NAME = "labels.csv"
_NEEDED = ("study_id", "label", "path")


def build_synthetic(root: Path, *, dataset: str = NAME) -> AdapterResult:
    """Build registry rows for a synthetic dataset from its ``labels.csv``.

    Args:
        root: the folder ``ctscreen synth`` wrote (holding ``labels.csv``).
        dataset: value of the ``dataset`` column and key prefix.

    Returns:
        One row per study whose folder or archive exists; the others in ``missing``.

    Raises:
        DatasetError: the root or its ``labels.csv`` is missing or lacks columns.
    """
    root = Path(root)
    labels_csv = root / LABELS_NAME
    if not labels_csv.is_file():
        raise DatasetError(
            f"{labels_csv} does not exist; pass the folder `ctscreen synth` wrote (e.g. "
            "`ctscreen synth data/` then `ctscreen registry build synthetic data/ -o reg.csv`)."
        )
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    lacking = [c for c in _NEEDED if c not in labels.columns]
    if lacking:
        raise DatasetError(f"{labels_csv} lacks the column(s) {', '.join(lacking)}.")
    rows: list[RegistryRow] = []
    missing: list[str] = []
    for record in labels.to_dict("records"):
        path = root / record["path"]
        if not path.exists():
            missing.append(f"{path} (study {record['study_id']})")
            continue
        finding = record.get("pathology_type", "") or "none"
        rows.append(
            RegistryRow(
                study_key=f"{dataset}:{record['study_id']}",
                path=str(path),
                path_type="dicom",
                label=int(record["label"]),
                dataset=dataset,
                patient_id=record.get("patient_id", ""),
                study_uid=record.get("study_uid", ""),
                source_category=finding,
            )
        )
    log.info("%s: %d studies, %d missing", dataset, len(rows), len(missing))
    return AdapterResult(rows_to_frame(rows), missing, [])
