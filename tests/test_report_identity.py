"""The values a RIS/PACS finds a study by (PatientID, AccessionNumber, StudyDate,
StudyInstanceUID) go from the study's header into its rows, the .xlsx's "studies"
sheet, the .csv/.json tables, the service's JSON rows and its job store."""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
from pydicom.dataset import Dataset

from ctscreen.dicom.header import read_study_header
from ctscreen.report import (
    FIXED_COLUMNS,
    ResultRow,
    result_rows,
    row_from_json,
    row_to_json,
    rows_to_frame,
    write_table,
)
from ctscreen.results import StudyResult

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = STUDY_UID + ".2"


def _header(patient_id: str, accession: str, date: str, study_uid: str = STUDY_UID):
    ds = Dataset()
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    with warnings.catch_warnings():  # pydicom warns of the invalid date the test wants
        warnings.simplefilter("ignore", UserWarning)
        ds.StudyDate = date
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".2"
    return read_study_header(ds)


def _results() -> list[StudyResult]:
    scored = StudyResult(
        input_path="norma.zip",
        location="norma.zip/study1",
        study_uid=STUDY_UID,
        series_uid=SERIES_UID,
        probability=0.91,
        pathology=1,
        threshold=0.5,
        seconds=1.5,
        header=_header("00012345", "ACC-2024-77", "20240131"),
    )
    failed = StudyResult(
        input_path="broken.zip",
        location="broken.zip/study",
        study_uid="1.2.3.9",
        error="TOO_FEW_SLICES: the only CT series has 3 slices; 16 are needed",
        seconds=0.2,
        header=_header("PT-9", "", "2024-13-45", study_uid="1.2.3.9"),
    )
    nifti = StudyResult(
        input_path="lung.nii.gz", location="lung.nii.gz", probability=0.1, pathology=0
    )
    return [scored, failed, nifti]


def _rows() -> list[ResultRow]:
    return [row for result in _results() for row in result_rows(result)]


def test_rows_carry_the_headers_identifiers_success_or_failure() -> None:
    scored, failed, nifti = _rows()
    assert (scored.patient_id, scored.accession_number, scored.study_date) == (
        "00012345",
        "ACC-2024-77",
        "20240131",
    )
    assert scored.study_uid == STUDY_UID
    # A failed study that had a header keeps its identifiers; an invalid date is left empty.
    assert (failed.patient_id, failed.accession_number, failed.study_date) == ("PT-9", "", "")
    assert (nifti.patient_id, nifti.accession_number, nifti.study_date) == ("", "", "")


def test_xlsx_has_them_on_the_studies_sheet_and_sheet_1_is_unchanged(tmp_path: Path) -> None:
    path = write_table(rows_to_frame(_rows()), tmp_path / "results.xlsx", run_info={"a": 1})
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["results", "run", "studies"]
    header = [c.value for c in book["results"][1]]
    assert tuple(header) == FIXED_COLUMNS

    studies = pd.read_excel(path, sheet_name="studies", dtype=str, keep_default_na=False)
    assert studies.to_dict("records") == [
        {
            "path_to_study": "norma.zip/study1",
            "study_uid": STUDY_UID,
            "patient_id": "00012345",
            "accession_number": "ACC-2024-77",
            "study_date": "20240131",
        },
        {
            "path_to_study": "broken.zip/study",
            "study_uid": "1.2.3.9",
            "patient_id": "PT-9",
            "accession_number": "",
            "study_date": "",
        },
        {
            "path_to_study": "lung.nii.gz",
            "study_uid": "",
            "patient_id": "",
            "accession_number": "",
            "study_date": "",
        },
    ]
    # Text cells, so a PatientID with leading zeros survives Excel.
    assert book["studies"]["C2"].value == "00012345"


def test_one_studies_row_per_study_in_slice_mode(tmp_path: Path) -> None:
    rows = [
        ResultRow(
            path_to_study="a.zip/s",
            study_uid=STUDY_UID,
            probability_of_pathology=p,
            pathology=int(p >= 0.5),
            processing_status="Success",
            time_of_processing=1.0,
            patient_id="P1",
            extras={"slice_index": i},
        )
        for i, p in enumerate([0.2, 0.7, 0.4])
    ]
    path = write_table(rows_to_frame(rows), tmp_path / "slices.xlsx")
    studies = pd.read_excel(path, sheet_name="studies", dtype=str, keep_default_na=False)
    assert studies["patient_id"].tolist() == ["P1"]
    assert len(pd.read_excel(path, sheet_name="results")) == 3


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_one_file_tables_keep_them_as_columns(tmp_path: Path, suffix: str) -> None:
    path = write_table(rows_to_frame(_rows()), tmp_path / f"results.{suffix}")
    if suffix == "csv":
        back = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        back = pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    assert tuple(back.columns[: len(FIXED_COLUMNS)]) == FIXED_COLUMNS
    assert back["patient_id"].tolist()[:2] == ["00012345", "PT-9"]
    assert back["accession_number"].tolist()[0] == "ACC-2024-77"
    assert back["study_date"].tolist()[0] == "20240131"


def test_service_json_rows_carry_them() -> None:
    from ctscreen.service.routes.jobs import job_json

    class _Job:  # only what job_json reads
        id, status, mode, created, started, finished = "j1", "done", "study", 1.0, 1.0, 2.0
        message, uploads_removed, expired, inputs_done, rows_done, failures = "", 0, None, 2, 3, 1
        inputs = ()

    records = job_json(_Job(), _rows())["rows"]  # type: ignore[arg-type]
    assert [r["patient_id"] for r in records] == ["00012345", "PT-9", ""]
    assert records[0]["accession_number"] == "ACC-2024-77"
    assert records[0]["study_date"] == "20240131"
    assert records[0]["study_uid"] == STUDY_UID
    assert records[1]["error"].startswith("TOO_FEW_SLICES")


def test_stored_rows_round_trip_and_old_rows_still_load(tmp_path: Path) -> None:
    from ctscreen.service.store import DB_NAME, InputFile, JobStore, new_job_id, stored_name

    store = JobStore(tmp_path / "data")
    job = new_job_id()
    store.add_job(job, [InputFile(0, "norma.zip", stored_name(0), 10)], mode="study")
    store.add_rows(job, 0, _rows()[:2])
    assert store.rows(job) == _rows()[:2]

    # A row stored by a ctscreen without these fields loads with them empty.
    old = json.loads(row_to_json(_rows()[0]))
    for name in ("patient_id", "accession_number", "study_date"):
        del old[name]
    with sqlite3.connect(store.data_dir / DB_NAME) as db:
        db.execute(
            "UPDATE rows SET record = ? WHERE job_id = ? AND seq = 0", (json.dumps(old), job)
        )
    first = store.rows(job)[0]
    assert (first.patient_id, first.accession_number, first.study_date) == ("", "", "")
    assert first.study_uid == STUDY_UID and first.probability_of_pathology == 0.91
    assert row_from_json(json.dumps(old)) == first


def test_the_run_journal_keeps_them_for_resume() -> None:
    for row in _rows():
        back = ResultRow.from_record(json.loads(json.dumps(row.to_record())))
        assert back == row
    old = _rows()[0].to_record()
    for name in ("patient_id", "accession_number", "study_date"):
        del old[name]  # a journal line written before these columns existed
    assert ResultRow.from_record(old).patient_id == ""
