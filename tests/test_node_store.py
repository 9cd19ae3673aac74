"""The DICOM node's tables: one database with the jobs, an old release's files migrated,
and an answer for a study whose scoring child left none."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")

from ctscreen.dicom.header import read_study_header  # noqa: E402
from ctscreen.outputs.dicom import NodeJob, read_sr  # noqa: E402
from ctscreen.report import ResultRow  # noqa: E402
from ctscreen.results import FAILURE  # noqa: E402
from ctscreen.service.node_answers import job_answer  # noqa: E402
from ctscreen.service.node_store import NOT_SCREENED, Incoming, NodeStore  # noqa: E402
from ctscreen.service.store import (  # noqa: E402
    DB_NAME,
    FAILED,
    InputFile,
    JobStore,
    new_job_id,
    stored_name,
)

#: The node's schema of the previous release (its own file, DATA/dicom-node.db).
OLD_NODE_SCHEMA = """
CREATE TABLE incoming (study_uid TEXT PRIMARY KEY, folder TEXT NOT NULL,
    calling_ae TEXT NOT NULL, first REAL NOT NULL, last REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0, receiving INTEGER NOT NULL DEFAULT 0,
    aborted TEXT NOT NULL DEFAULT '');
CREATE TABLE node_jobs (job_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
    path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '', created REAL NOT NULL, sent REAL);
"""


def test_an_old_release_s_node_database_is_merged_without_losing_anything(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job_id = new_job_id()
    jobs.upload_dir(job_id).mkdir(parents=True, exist_ok=True)
    jobs.add_job(job_id, [InputFile(0, "DICOM study 1.2.3", stored_name(0), 10)])
    jobs.close()
    old = sqlite3.connect(tmp_path / "dicom-node.db")
    old.executescript(OLD_NODE_SCHEMA)
    now = time.time()
    old.execute("INSERT INTO incoming VALUES ('1.2.9', 'abc', 'PACS', ?, ?, 7, 0, '')", (now, now))
    old.execute("INSERT INTO node_jobs VALUES (?, '1.2.3', 'PACS', 'outbox', ?)", (job_id, now))
    old.execute(
        "INSERT INTO outbox (job_id, path, state, next_try, created, destination) "
        "VALUES (?, '/data/jobs/x/dicom-out/0001.dcm', 'pending', ?, ?, 'PACS@h:104')",
        (job_id, now, now),
    )
    old.commit()
    old.close()

    store = JobStore(tmp_path)
    node = NodeStore(store)
    assert store.get(job_id) is not None  # the jobs table is untouched
    (incoming,) = node.incoming()
    assert (incoming.study_uid, incoming.instances, incoming.header) == ("1.2.9", 7, "")
    assert node.node_job(job_id) == ("1.2.3", "PACS")
    (item,) = node.outbox()
    assert (item.state, item.destination) == ("pending", "PACS@h:104")
    assert not (tmp_path / "dicom-node.db").exists()
    assert (tmp_path / "dicom-node.db.migrated").is_file()
    # One database file: the node's tables sit beside the jobs.
    tables = {
        r[0]
        for r in sqlite3.connect(tmp_path / DB_NAME).execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    assert {"jobs", "incoming", "node_jobs", "outbox", "refused"} <= tables
    store.close()
    # Opening again merges nothing twice.
    store = JobStore(tmp_path)
    assert len(NodeStore(store).outbox()) == 1
    store.close()


def test_a_study_whose_child_died_gets_a_not_screened_sr_and_a_failed_item(
    tmp_path: Path, make_series
) -> None:
    paths, _ = make_series(seed=4)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    header = read_study_header(ds).with_instances(
        str(ds.SeriesInstanceUID), ((str(ds.SOPClassUID), str(ds.SOPInstanceUID), 1),)
    )
    jobs = JobStore(tmp_path)
    node = NodeStore(jobs)
    job_id = new_job_id()
    jobs.upload_dir(job_id).mkdir(parents=True, exist_ok=True)
    jobs.add_job(job_id, [InputFile(0, "DICOM study", stored_name(0), 1)])
    NodeJob(str(ds.StudyInstanceUID), "PACS", header=header).write(jobs.job_dir(job_id))
    study = Incoming(str(ds.StudyInstanceUID), "f", "PACS", 0.0, 0.0, 1, 0, "")
    node.to_job(study, job_id)
    jobs.start(job_id)
    why = "the scoring process stopped (it was killed by SIGKILL) while reading DICOM study"
    jobs.add_rows(
        job_id,
        0,
        [ResultRow(path_to_study="DICOM study", processing_status=FAILURE,
                   time_of_processing=0.0, error=why)],
    )  # fmt: skip
    jobs.finish(job_id, FAILED, why)

    answer = job_answer(jobs, job_id, {"threshold": 0.5, "weights_sha256": "ab" * 32})
    assert answer.outcome == NOT_SCREENED and answer.reason == why
    assert answer.problems == [f"not screened: {why}"]
    (path,) = answer.paths
    findings = read_sr(pydicom.dcmread(path))
    assert not findings.screened and findings.probability is None
    assert findings.comments[0] == f"NOT SCREENED by ctscreen: {why}"
    sr = pydicom.dcmread(path)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientID == ds.PatientID
    assert sr.CompletionFlag == "PARTIAL"

    node.queue_results(
        job_id,
        answer.paths,
        destinations=["PACS@127.0.0.1:104"],
        outcome=answer.outcome,
        reason=answer.reason,
        problems=answer.problems,
    )
    counts = node.study_counts()
    assert counts["received"] == 1 and counts["not_screened"] == 1
    assert counts["answered"] == 0 and counts["unanswered"] == 1  # not sent yet
    (item,) = [i for i in node.outbox() if i.state == "pending"]
    node.mark_sent(item.id, "PACS@127.0.0.1:104")
    counts = node.study_counts()
    assert counts["answered"] == 1 and counts["unanswered"] == 0
    assert node.outbox_counts()["failed"] == 1
    (listed,) = node.studies()
    assert listed["reason"] == why and listed["failed"] == 1 and listed["sent"] == 1
    jobs.close()


def test_a_lone_iso_2022_character_set_still_gets_a_not_screened_sr(make_series) -> None:
    """Found with a real file sent through Orthanc: SpecificCharacterSet 'ISO 2022 IR 100'
    alone made pydicom refuse to write the answer."""
    from ctscreen.outputs.dicom import Algorithm, build_not_screened_sr

    paths, _ = make_series(seed=5)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    ds.SpecificCharacterSet = "ISO 2022 IR 100"
    header = read_study_header(ds).with_instances(
        str(ds.SeriesInstanceUID), ((str(ds.SOPClassUID), str(ds.SOPInstanceUID), 1),)
    )
    assert header.character_set == "ISO_IR 100"
    sr = build_not_screened_sr(header, "a reason", Algorithm())
    out = paths[0].parent / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    assert not read_sr(pydicom.dcmread(out)).screened
