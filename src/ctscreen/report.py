"""The result table: rows -> one DataFrame -> an .xlsx, .csv, .json or .parquet file.

The first seven columns and their names are fixed by the task statement::

    path_to_study, study_uid, series_uid, probability_of_pathology, pathology,
    processing_status, time_of_processing

then the two optional ones it names (``most_dangerous_pathology_type``,
``pathology_localization``), then ctscreen's extra columns (error, warnings, the
reason the series was chosen, slice count, input path) and finally mode-specific
extras (per-slice mode adds slice index, InstanceNumber, SOPInstanceUID, ...).

The values a RIS or PACS finds a study by (PatientID, AccessionNumber, StudyDate,
beside the StudyInstanceUID of sheet 1) are columns of the frame too
(:data:`IDENTITY_COLUMNS`), for the service's JSON rows, but the writers put them on
an .xlsx sheet of their own, ``studies`` (one row per study): sheet 1 stays as the
task fixes it, and the personal identifiers are left out of shared results by deleting
one sheet. A .csv, .json or .parquet table, one table per file, keeps them as columns
after the fixed ones (so a downloaded table is still one file).

A study that could not be processed keeps its row: ``processing_status`` is
``Failure``, probability and label stay empty and ``error`` says why.

Every writer is atomic: the table goes to a temporary file in the destination
folder, which then replaces the destination in one step, so a crash never leaves
a half-written table (and an earlier table at that path survives a failed write).
"""

from __future__ import annotations

import enum
import io
import json
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ConfigError, MissingExtraError, cannot_write
from .fileio import write_atomic
from .results import FAILURE, STATUSES, SUCCESS, StudyResult

log = logging.getLogger(__name__)

__all__ = [
    "FAILURE",
    "REQUIRED_COLUMNS",
    "SUCCESS",
    "OutputFormat",
    "IDENTITY_COLUMNS",
    "ResultRow",
    "result_rows",
    "rows_to_frame",
    "split_studies",
    "study_identity",
    "write_table",
]

REQUIRED_COLUMNS: tuple[str, ...] = (
    "path_to_study",
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "processing_status",
    "time_of_processing",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("most_dangerous_pathology_type", "pathology_localization")
EXTRA_COLUMNS: tuple[str, ...] = ("error", "warnings", "series_reason", "n_slices", "input_path")
#: Every column a :class:`ResultRow` always has on sheet 1, in table order.
FIXED_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + EXTRA_COLUMNS
#: What a RIS/PACS finds the study by, from its DICOM header ("" when unknown): frame
#: columns after the fixed ones; an .xlsx has them on its ``studies`` sheet, not sheet 1.
IDENTITY_COLUMNS: tuple[str, ...] = ("patient_id", "accession_number", "study_date")
#: The ``studies`` sheet: one row per study, keyed by where it was found and its UID.
STUDY_COLUMNS: tuple[str, ...] = ("path_to_study", "study_uid") + IDENTITY_COLUMNS
#: The DICOM keyword each identity column is read from.
IDENTITY_KEYWORDS: dict[str, str] = {
    "patient_id": "PatientID",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
}


RESULTS_SHEET = "results"
RUN_SHEET = "run"
STUDIES_SHEET = "studies"
_MAX_COLUMN_WIDTH = 60
_LOCALIZATION_LENGTH = 6


class OutputFormat(str, enum.Enum):
    """File formats of the result table, named by their suffix."""

    XLSX = "xlsx"
    CSV = "csv"
    JSON = "json"
    #: Columnar, for large runs; needs pyarrow (it comes with ``ctscreen[ray]``).
    PARQUET = "parquet"

    @classmethod
    def from_path(cls, path: Path | str) -> OutputFormat:
        """The format a path's suffix asks for.

        Raises:
            ConfigError: the suffix is not .xlsx, .csv or .json.
        """
        suffix = Path(path).suffix.lower().lstrip(".")
        try:
            return cls(suffix)
        except ValueError:
            raise ConfigError(
                f"cannot write a table to {path}: unknown suffix {Path(path).suffix!r}; "
                f"end the file name with one of {', '.join('.' + f for f in OUTPUT_FORMATS)}."
            ) from None

    def require_writer(self) -> None:
        """Check that this format can be written here (Parquet needs pyarrow).

        Raises:
            MissingExtraError: the format's library is not installed.
        """
        if self is OutputFormat.PARQUET:
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise MissingExtraError(
                    "a .parquet table needs pyarrow, which is not installed here; install it "
                    'with: pip install "ctscreen[ray]" (or pip install pyarrow).'
                ) from exc


#: Suffixes for CLI ``choices=``; the first is the default.
OUTPUT_FORMATS: tuple[str, ...] = tuple(f.value for f in OutputFormat)


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One row of the result table (one study, or one slice in per-slice mode).

    Attributes:
        path_to_study: where the study was found (archive path and folder inside it).
        study_uid: StudyInstanceUID ("" when unknown).
        series_uid: SeriesInstanceUID of the scored series ("" when none was).
        probability_of_pathology: model probability in [0, 1]; None for Failure rows.
        pathology: 1 when the probability reaches the threshold, else 0; None for
            Failure rows.
        processing_status: exactly ``"Success"`` or ``"Failure"``.
        time_of_processing: seconds spent on this study.
        most_dangerous_pathology_type: optional pathology type.
        pathology_localization: optional box ``(x_min, x_max, y_min, y_max, z_min,
            z_max)``; written as one comma-separated cell.
        error: why the study failed (empty on success).
        warnings: notes worth reading even on success, joined by "; " in the table.
        series_reason: why this series was chosen.
        n_slices: slices in the scored volume.
        input_path: the archive or folder given on the command line.
        patient_id: PatientID of the study's header ("" when unknown).
        accession_number: AccessionNumber of the study's header ("" when unknown).
        study_date: StudyDate of the study's header, as DICOM writes it (YYYYMMDD;
            "" when unknown or invalid).
        extras: mode-specific extra columns, written after the fixed ones.
    """

    path_to_study: str
    study_uid: str = ""
    series_uid: str = ""
    probability_of_pathology: float | None = None
    pathology: int | None = None
    processing_status: str
    time_of_processing: float
    most_dangerous_pathology_type: str | None = None
    pathology_localization: tuple[float, ...] | None = None
    error: str = ""
    warnings: tuple[str, ...] = ()
    series_reason: str = ""
    n_slices: int | None = None
    input_path: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    extras: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.processing_status not in STATUSES:
            raise ValueError(
                f"processing_status must be 'Success' or 'Failure', got {self.processing_status!r}"
            )
        if self.processing_status == FAILURE:
            if self.probability_of_pathology is not None or self.pathology is not None:
                raise ValueError("a Failure row carries no probability or pathology label")
        if self.probability_of_pathology is not None:
            p = float(self.probability_of_pathology)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"probability_of_pathology must lie in [0, 1], got {p}")
        if self.pathology is not None and self.pathology not in (0, 1):
            raise ValueError(f"pathology must be 0 or 1, got {self.pathology!r}")
        if self.pathology_localization is not None and (
            len(self.pathology_localization) != _LOCALIZATION_LENGTH
        ):
            raise ValueError(
                "pathology_localization needs 6 values (x_min, x_max, y_min, y_max, z_min, "
                f"z_max), got {len(self.pathology_localization)}"
            )
        clashes = set(self.extras) & (set(FIXED_COLUMNS) | set(IDENTITY_COLUMNS))
        if clashes:
            raise ValueError(f"extra columns {sorted(clashes)} clash with fixed columns")
        if isinstance(self.warnings, str):
            object.__setattr__(self, "warnings", (self.warnings,))

    def to_record(self) -> dict[str, object]:
        """The row as a flat mapping column -> cell value (fixed columns, then extras)."""
        loc = self.pathology_localization
        record: dict[str, object] = {
            "path_to_study": self.path_to_study,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "probability_of_pathology": self.probability_of_pathology,
            "pathology": self.pathology,
            "processing_status": self.processing_status,
            "time_of_processing": float(self.time_of_processing),
            "most_dangerous_pathology_type": self.most_dangerous_pathology_type,
            "pathology_localization": None if loc is None else ",".join(f"{v:g}" for v in loc),
            "error": self.error,
            "warnings": "; ".join(self.warnings),
            "series_reason": self.series_reason,
            "n_slices": self.n_slices,
            "input_path": self.input_path,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_date": self.study_date,
        }
        record.update(self.extras)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ResultRow:
        """The row :meth:`to_record` made ``record`` from (e.g. read back from a journal).

        Warnings come back as one joined sentence; the table cell is the same.
        """
        fixed = {k: record.get(k) for k in FIXED_COLUMNS + IDENTITY_COLUMNS}
        loc = fixed.pop("pathology_localization")
        warnings = fixed.pop("warnings") or ""
        return cls(
            **{k: v for k, v in fixed.items() if v is not None},  # type: ignore[arg-type]
            pathology_localization=(
                None if not loc else tuple(float(v) for v in str(loc).split(","))
            ),
            warnings=(str(warnings),) if warnings else (),
            extras={k: v for k, v in record.items() if k not in _ROW_COLUMNS},
        )


_ROW_COLUMNS: frozenset[str] = frozenset(FIXED_COLUMNS + IDENTITY_COLUMNS)

#: Row layouts: one row per study, per eligible series, or per slice of the scored series.
ROW_MODES: tuple[str, ...] = ("study", "series", "slice")


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def study_identity(result: StudyResult) -> dict[str, str]:
    """The :data:`IDENTITY_COLUMNS` of a result, from the header the Screener read
    (all "" when none was read: NIfTI input, an unreadable study)."""
    header = result.header
    return {
        column: "" if header is None else header.get(keyword)
        for column, keyword in IDENTITY_KEYWORDS.items()
    }


def result_rows(result: StudyResult, mode: str = "study") -> list[ResultRow]:
    """The table rows of one study result: the one place rows are made.

    Args:
        result: what :meth:`ctscreen.Screener.score` gave for a study (or series).
        mode: ``study`` or ``series``: one row; ``slice``: one row per slice of
            the scored series, each with its own score (a Failure stays one row).

    Returns:
        The rows, in table order.
    """
    if mode not in ROW_MODES:
        raise ConfigError(f"row mode must be one of {', '.join(ROW_MODES)}, not {mode!r}.")
    common: dict[str, Any] = dict(
        path_to_study=result.location,
        study_uid=result.study_uid,
        series_uid=result.series_uid,
        processing_status=result.status,
        time_of_processing=round(result.seconds, 3),
        error=result.error,
        warnings=result.warnings,
        series_reason=result.series_reason,
        n_slices=result.n_slices,
        input_path=result.input_path,
        **study_identity(result),
    )
    if not result.ok:
        return [ResultRow(**common)]
    probability = _round(result.probability)
    if mode != "slice" or result.slice_scores is None:
        return [
            ResultRow(
                **common,
                probability_of_pathology=probability,
                pathology=result.pathology,
                pathology_localization=result.box,
                extras={k: round(v, 3) for k, v in result.timings.items()},
            )
        ]
    threshold = float(result.threshold if result.threshold is not None else 0.5)
    return [
        ResultRow(
            **common,
            probability_of_pathology=_round(score),
            pathology=int(score >= threshold),
            pathology_localization=result.box,
            extras={
                "slice_index": index,
                "instance_number": ref.instance_number,
                "sop_instance_uid": ref.sop_instance_uid,
                "frame": ref.frame,
                "study_probability": probability,
                "study_pathology": result.pathology,
            },
        )
        for index, (ref, score) in enumerate(zip(result.slices, result.slice_scores, strict=True))
    ]


def rows_to_frame(rows: Iterable[ResultRow]) -> pd.DataFrame:
    """Build the result table.

    Args:
        rows: result rows, in output order.

    Returns:
        A DataFrame with the seven required columns, the two optional ones, the
        extra columns, the identity columns (which the writers move to the
        ``studies`` sheet), then mode-specific extras in order of first appearance.
        ``probability_of_pathology`` and ``time_of_processing`` are float64 (NaN
        when empty); ``pathology``, ``n_slices`` and extras holding only
        integers are nullable ``Int64``.
    """
    records = [row.to_record() for row in rows]
    extra_names: list[str] = []
    for row_record in records:
        for name in row_record:
            if name not in _ROW_COLUMNS and name not in extra_names:
                extra_names.append(name)
    columns = list(FIXED_COLUMNS) + list(IDENTITY_COLUMNS) + extra_names
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["probability_of_pathology"] = pd.to_numeric(
        frame["probability_of_pathology"], errors="raise"
    ).astype("float64")
    frame["time_of_processing"] = frame["time_of_processing"].astype("float64")
    integer_columns = ["pathology", "n_slices"] + [
        name for name in extra_names if _holds_only_integers([r.get(name) for r in records])
    ]
    for name in integer_columns:
        cells = [r.get(name) for r in records]
        frame[name] = pd.array([None if _is_missing(v) else int(v) for v in cells], dtype="Int64")
    return frame


def split_studies(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The result table without its identity columns (sheet 1) and the ``studies``
    sheet: :data:`STUDY_COLUMNS`, one row per study (per-slice and per-series rows
    of a study share one), in table order.

    A frame without identity columns (written by an older ctscreen) gets an empty
    ``studies`` sheet's worth of "" values for them.
    """
    results = frame.drop(columns=[c for c in IDENTITY_COLUMNS if c in frame.columns])
    studies = frame.reindex(columns=list(STUDY_COLUMNS)).astype(object)
    studies = studies.where(studies.notna(), "")
    studies = studies.drop_duplicates(subset=["path_to_study", "study_uid"], keep="first")
    return results, studies.reset_index(drop=True)


def _holds_only_integers(values: Sequence[object]) -> bool:
    """True when every present value is an integer (so the column becomes ``Int64``)."""
    present = [v for v in values if not _is_missing(v)]
    return bool(present) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in present
    )


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _cell_value(value: object) -> object:
    """A run-info cell: numbers and booleans as they are, containers as JSON, the rest as text."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _column_width(header: str, values: Sequence[object]) -> int:
    longest = max([len(header)] + [len(str(v)) for v in values if not _is_missing(v)])
    return min(longest + 2, _MAX_COLUMN_WIDTH)


def _sheet(writer: pd.ExcelWriter, frame: pd.DataFrame, name: str) -> None:
    """``frame`` as sheet ``name``: header row frozen, columns sized to their cells."""
    from openpyxl.utils import get_column_letter

    frame.to_excel(writer, sheet_name=name, index=False)
    sheet = writer.sheets[name]
    sheet.freeze_panes = "A2"
    for i, column in enumerate(frame.columns, start=1):
        width = _column_width(str(column), frame[column].tolist())
        sheet.column_dimensions[get_column_letter(i)].width = width


def _write_xlsx(frame: pd.DataFrame, run_info: Mapping[str, Any] | None, tmp: Path) -> None:
    results, studies = split_studies(frame)
    # Built in memory, then written in one go: openpyxl's zip writer, cut off by a
    # full disk, would complain again from its finaliser after the error is handled.
    buffer = io.BytesIO()
    with pd.ExcelWriter(buffer, engine="openpyxl") as writer:
        _sheet(writer, results, RESULTS_SHEET)
        if run_info:
            info = pd.DataFrame(
                {"key": list(run_info), "value": [_cell_value(v) for v in run_info.values()]}
            )
            _sheet(writer, info, RUN_SHEET)
        _sheet(writer, studies, STUDIES_SHEET)
    tmp.write_bytes(buffer.getvalue())


def _write_csv(frame: pd.DataFrame, tmp: Path) -> None:
    frame.to_csv(tmp, index=False, encoding="utf-8")


def _write_json(frame: pd.DataFrame, tmp: Path) -> None:
    # pandas' own writer escapes "/" in paths; its records, re-encoded, read better.
    records = json.loads(frame.to_json(orient="records"))
    text = json.dumps(records, ensure_ascii=False, indent=2)
    tmp.write_text(text + "\n", encoding="utf-8")


def _write_parquet(frame: pd.DataFrame, tmp: Path) -> None:
    frame.to_parquet(tmp, index=False, engine="pyarrow")


def _write_run_json(run_info: Mapping[str, Any], tmp: Path) -> None:
    text = json.dumps(dict(run_info), ensure_ascii=False, indent=2, default=str)
    tmp.write_text(text + "\n", encoding="utf-8")


def run_info_path(path: Path) -> Path:
    """Where run information goes beside a .csv, .json or .parquet table (``<name>.run.json``)."""
    return path.with_name(path.stem + ".run.json")


def write_table(
    frame: pd.DataFrame, path: Path, *, run_info: Mapping[str, Any] | None = None
) -> Path:
    """Write the result table atomically, in the format its suffix names.

    Args:
        frame: the table from :func:`rows_to_frame`.
        path: ``.xlsx`` (sheet "results", sheet "run" with ``run_info``, sheet
            "studies" with the identity columns, one row per study), ``.csv``,
            ``.json`` (a list of records) or ``.parquet`` (identity columns kept in
            the table). For the formats other than .xlsx, ``run_info`` goes to
            ``<name>.run.json`` beside the table.
        run_info: key/value facts about the run (ctscreen version, model sha256,
            threshold, device, start time, ...).

    Returns:
        ``path``.

    Raises:
        ConfigError: the suffix is unknown, or the folder cannot be written.
        MissingExtraError: a .parquet table without pyarrow.
    """
    path = Path(path)
    fmt = OutputFormat.from_path(path)
    fmt.require_writer()
    try:
        if fmt is OutputFormat.XLSX:
            write_atomic(path, lambda tmp: _write_xlsx(frame, run_info, tmp))
        else:
            writer = {
                OutputFormat.CSV: _write_csv,
                OutputFormat.JSON: _write_json,
                OutputFormat.PARQUET: _write_parquet,
            }[fmt]
            write_atomic(path, lambda tmp: writer(frame, tmp))
            if run_info:
                write_atomic(run_info_path(path), lambda tmp: _write_run_json(run_info, tmp))
    except OSError as exc:
        raise cannot_write(f"the result table {path}", exc) from exc
    log.info("wrote %d rows to %s", len(frame), path)
    return path


def row_to_json(row: ResultRow) -> str:
    """A result row as JSON text (every field, extras included), for storage."""
    return json.dumps(asdict(row), ensure_ascii=False, allow_nan=False, default=_plain)


def row_from_json(text: str) -> ResultRow:
    """The :class:`ResultRow` that :func:`row_to_json` stored (a row stored before a
    field existed gets that field's default: "" for the identity columns)."""
    data = json.loads(text)
    names = {f.name for f in fields(ResultRow)}
    data = {k: v for k, v in data.items() if k in names}
    if data.get("pathology_localization") is not None:
        data["pathology_localization"] = tuple(data["pathology_localization"])
    data["warnings"] = tuple(data.get("warnings") or ())
    return ResultRow(**data)


def _plain(value: object) -> object:
    """numpy scalars and other number-likes as plain Python values."""
    for kind in (int, float):
        try:
            return kind(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            continue
    return str(value)
