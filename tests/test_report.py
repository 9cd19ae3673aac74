"""The result table: column order and names, dtypes, formats, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import openpyxl
import pandas as pd
import pytest

from ctscreen import report
from ctscreen.errors import ConfigError
from ctscreen.report import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    OutputFormat,
    ResultRow,
    rows_to_frame,
    write_table,
)

UID_COLUMNS = {"study_uid": str, "series_uid": str}


def _rows() -> list[ResultRow]:
    return [
        ResultRow(
            path_to_study="Датасет/norma.zip/study1",
            study_uid="1.2.840.113619.2.1",
            series_uid="1.2.840.113619.2.1.3",
            probability_of_pathology=0.8125,
            pathology=1,
            processing_status="Success",
            time_of_processing=2.5,
            pathology_localization=(10.0, 50.5, 20.0, 80.0, -100.0, 40.0),
            warnings=("gantry tilt 12°", "3 duplicate slices dropped"),
            series_reason="most slices among 2 axial CT series",
            n_slices=120,
            input_path="Датасет/norma.zip",
        ),
        ResultRow(
            path_to_study="broken.zip",
            processing_status="Failure",
            time_of_processing=0.25,
            error="NO_DICOM: broken.zip holds no DICOM file",
            input_path="broken.zip",
        ),
        ResultRow(
            path_to_study="ok.zip/study2",
            study_uid="1.2.3.4",
            series_uid="1.2.3.4.5",
            probability_of_pathology=0.125,
            pathology=0,
            processing_status="Success",
            time_of_processing=1.75,
            n_slices=64,
        ),
    ]


def test_frame_columns_and_dtypes() -> None:
    frame = rows_to_frame(_rows())
    assert tuple(frame.columns[:7]) == REQUIRED_COLUMNS
    assert tuple(frame.columns[7:9]) == OPTIONAL_COLUMNS
    assert list(frame.columns[9:]) == [
        "error",
        "warnings",
        "series_reason",
        "n_slices",
        "input_path",
        "patient_id",
        "accession_number",
        "study_date",
    ]
    assert frame["probability_of_pathology"].dtype == "float64"
    assert frame["time_of_processing"].dtype == "float64"
    assert frame["pathology"].dtype == "Int64"
    assert frame["pathology"].tolist() == [1, pd.NA, 0]
    assert frame["probability_of_pathology"].isna().tolist() == [False, True, False]
    assert frame["processing_status"].tolist() == ["Success", "Failure", "Success"]
    assert frame.loc[0, "pathology_localization"] == "10,50.5,20,80,-100,40"
    assert frame.loc[0, "warnings"] == "gantry tilt 12°; 3 duplicate slices dropped"


def test_extras_follow_fixed_columns_in_first_seen_order() -> None:
    base = {"path_to_study": "s", "processing_status": "Success", "time_of_processing": 1.0}
    rows = [
        ResultRow(
            **base,
            probability_of_pathology=0.4,
            pathology=0,
            extras={"slice_index": 0, "sop_instance_uid": "1.9.1", "study_probability": 0.4},
        ),
        ResultRow(
            **base,
            probability_of_pathology=0.6,
            pathology=1,
            extras={"instance_number": 7, "slice_index": 1, "sop_instance_uid": "1.9.2"},
        ),
    ]
    frame = rows_to_frame(rows)
    assert list(frame.columns[17:]) == [
        "slice_index",
        "sop_instance_uid",
        "study_probability",
        "instance_number",
    ]
    assert frame["slice_index"].tolist() == [0, 1]
    assert frame["instance_number"].dtype == "Int64"
    assert frame["instance_number"].tolist() == [pd.NA, 7]
    assert frame["study_probability"].isna().tolist() == [False, True]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"processing_status": "success"},
        {"processing_status": "Failure", "probability_of_pathology": 0.3},
        {"processing_status": "Success", "probability_of_pathology": 1.5},
        {"processing_status": "Success", "pathology": 2},
        {"processing_status": "Success", "pathology_localization": (1.0, 2.0)},
        {"processing_status": "Success", "extras": {"pathology": 1}},
    ],
)
def test_invalid_rows_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ResultRow(path_to_study="s", time_of_processing=0.0, **kwargs)


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".xlsx":
        return pd.read_excel(path, sheet_name="results", dtype=UID_COLUMNS)
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=UID_COLUMNS)
    return pd.read_json(path, orient="records", dtype=UID_COLUMNS)


@pytest.mark.parametrize("suffix", ["xlsx", "csv", "json"])
def test_written_tables_read_back(tmp_path: Path, suffix: str) -> None:
    frame = rows_to_frame(_rows())
    path = tmp_path / "Результаты" / f"results.{suffix}"
    run_info = {"ctscreen_version": "0.1.0", "model_sha256": "ab" * 32, "threshold": 0.42}
    assert write_table(frame, path, run_info=run_info) == path
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []

    back = _read(path)
    assert tuple(back.columns[:7]) == REQUIRED_COLUMNS
    # Sheet 1 of an .xlsx leaves the identity columns to the "studies" sheet.
    identity = ["patient_id", "accession_number", "study_date"]
    expected = [c for c in frame.columns if suffix != "xlsx" or c not in identity]
    assert list(back.columns) == expected
    assert back["probability_of_pathology"].dtype == "float64"
    assert back["time_of_processing"].dtype == "float64"
    assert back["probability_of_pathology"].tolist()[0] == 0.8125
    assert pd.isna(back["probability_of_pathology"].tolist()[1])
    assert pd.isna(back["pathology"].tolist()[1])
    assert back["pathology"].astype("Int64").tolist() == [1, pd.NA, 0]
    assert back["time_of_processing"].tolist() == [2.5, 0.25, 1.75]
    assert back["processing_status"].tolist() == ["Success", "Failure", "Success"]
    assert back["path_to_study"].tolist()[0] == "Датасет/norma.zip/study1"
    assert back["study_uid"].tolist()[0] == "1.2.840.113619.2.1"
    assert back["error"].tolist()[1] == "NO_DICOM: broken.zip holds no DICOM file"

    if suffix == "xlsx":
        book = openpyxl.load_workbook(path)
        assert book.sheetnames == ["results", "run", "studies"]
        sheet = book["results"]
        assert sheet.freeze_panes == "A2"
        # Sized to the longest cell: the path column is wider than the status column.
        widths = {
            c[0].value: sheet.column_dimensions[c[0].column_letter].width for c in sheet.columns
        }
        assert widths["path_to_study"] > widths["pathology"]
        run = {row[0]: row[1] for row in book["run"].iter_rows(min_row=2, values_only=True)}
        assert run == {"ctscreen_version": "0.1.0", "model_sha256": "ab" * 32, "threshold": 0.42}
    else:
        sidecar = path.with_name("results.run.json")
        assert json.loads(sidecar.read_text(encoding="utf-8")) == run_info


def test_unwritable_destination_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match="cannot write the result table"):
        write_table(rows_to_frame(_rows()), blocker / "results.csv")


def test_unknown_suffix_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.txt"):
        write_table(rows_to_frame(_rows()), tmp_path / "results.txt")
    assert list(tmp_path.iterdir()) == []
    assert OutputFormat.from_path("A.XLSX") is OutputFormat.XLSX
    assert report.OUTPUT_FORMATS[0] == "xlsx"


@pytest.mark.parametrize("suffix", ["xlsx", "csv", "json"])
def test_failed_write_keeps_previous_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"results.{suffix}"
    first = rows_to_frame(_rows()[:1])
    write_table(first, path)
    before = path.read_bytes()

    writer_name = {"xlsx": "_write_xlsx", "csv": "_write_csv", "json": "_write_json"}[suffix]
    real_writer = getattr(report, writer_name)

    def half_then_crash(*args):
        real_writer(*args)  # the temporary file is complete here ...
        tmp = Path(args[-1])
        tmp.write_bytes(tmp.read_bytes()[:10])  # ... now damage it and die midway
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(report, writer_name, half_then_crash)
    with pytest.raises(RuntimeError, match="disk vanished"):
        write_table(rows_to_frame(_rows()), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert len(_read(path)) == 1
