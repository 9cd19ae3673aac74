"""The service's job store: persistence, recovery after a crash, safe ids and paths."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ctscreen.report import ResultRow, rows_to_frame
from ctscreen.results import FAILURE, SUCCESS
from ctscreen.service.store import (
    DONE,
    MAX_ATTEMPTS,
    QUEUED,
    RUNNING,
    TIMEOUT,
    InputFile,
    JobStore,
    is_job_id,
    new_job_id,
    row_from_json,
    row_to_json,
)

SUCCESS_ROW = ResultRow(
    path_to_study="norma_anon.zip/norma_anon",
    study_uid="1.2.3",
    series_uid="1.2.3.4",
    probability_of_pathology=0.73,
    pathology=1,
    processing_status=SUCCESS,
    time_of_processing=2.5,
    pathology_localization=(-10.0, 12.5, 3.0, 40.0, -200.0, -150.0),
    warnings=("few slices", "tilt"),
    series_reason="thinnest",
    n_slices=96,
    input_path="norma_anon.zip",
    extras={"read_s": 0.4},
)
FAILURE_ROW = ResultRow(
    path_to_study="broken.zip",
    processing_status=FAILURE,
    time_of_processing=0.1,
    error="not a zip archive",
    input_path="broken.zip",
)


def _queue(store: JobStore, names: tuple[str, ...] = ("a.zip", "b.zip")) -> str:
    job_id = new_job_id()
    folder = store.upload_dir(job_id)
    inputs = []
    for i, name in enumerate(names):
        (folder / f"{i:04d}").write_bytes(b"x" * (i + 1))
        inputs.append(InputFile(i, name, f"{i:04d}", i + 1))
    store.add_job(job_id, inputs)
    return job_id


def test_rows_round_trip_through_json_unchanged() -> None:
    for row in (SUCCESS_ROW, FAILURE_ROW):
        assert row_from_json(row_to_json(row)) == row


def test_job_lifecycle_and_rows_in_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job_id = _queue(store)
    job = store.get(job_id)
    assert (
        job is not None
        and job.status == QUEUED
        and [f.name for f in job.inputs]
        == [
            "a.zip",
            "b.zip",
        ]
    )
    assert store.next_queued().id == job_id
    store.start(job_id)
    store.add_rows(job_id, 0, [SUCCESS_ROW])
    store.add_rows(job_id, 1, [FAILURE_ROW])
    running = store.get(job_id)
    assert running.status == RUNNING and running.rows_done == 2 and running.failures == 1
    assert running.inputs_done == 1
    store.finish(job_id, DONE)
    done = store.get(job_id)
    assert done.status == DONE and done.final and done.inputs_done == 2
    assert store.rows(job_id) == [SUCCESS_ROW, FAILURE_ROW]
    frame = rows_to_frame(store.rows(job_id))
    assert frame.loc[0, "probability_of_pathology"] == pytest.approx(0.73)
    assert store.next_queued() is None
    assert store.count_by_status()[DONE] == 1


def test_store_persists_across_reopen_and_requeues_running_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    finished = _queue(store)
    store.start(finished)
    store.add_rows(finished, 0, [SUCCESS_ROW])
    store.finish(finished, DONE)
    interrupted = _queue(store)
    store.start(interrupted)
    store.add_rows(interrupted, 0, [SUCCESS_ROW])
    store.close()  # the process dies here

    reopened = JobStore(tmp_path)
    assert reopened.recover() == [interrupted]
    job = reopened.get(interrupted)
    assert job.status == QUEUED and job.rows_done == 0 and job.attempts == 1
    assert reopened.get(finished).status == DONE
    assert reopened.rows(finished) == [SUCCESS_ROW]
    assert reopened.input_paths(job)[1].read_bytes() == b"xx"


def test_a_job_that_keeps_killing_the_service_is_failed_not_retried_forever(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path)
    job_id = _queue(store)
    for _ in range(MAX_ATTEMPTS):
        store.start(job_id)
        store.recover()
    job = store.get(job_id)
    assert job.status == "failed" and "3 times" in job.message


def test_recover_removes_uploads_of_jobs_never_added(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    orphan = new_job_id()
    (store.upload_dir(orphan) / "0000").write_bytes(b"half an upload")
    kept = _queue(store)
    store.recover()
    assert not store.job_dir(orphan).exists()
    assert store.job_dir(kept).exists()


def test_delete_removes_rows_and_files(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job_id = _queue(store)
    store.start(job_id)
    store.add_rows(job_id, 0, [SUCCESS_ROW])
    store.finish(job_id, TIMEOUT, "too slow")
    assert store.delete(job_id)
    assert store.get(job_id) is None and not store.job_dir(job_id).exists()
    assert store.all_rows() == []
    assert not store.delete(job_id)


def test_ids_are_random_and_never_become_paths(tmp_path: Path) -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(is_job_id(i) for i in ids)
    store = JobStore(tmp_path)
    for bad in ("../../etc", "..", "a/b", "", "x" * 22 + "/", "%2e%2e%2fetc%2fpasswd1"):
        assert not is_job_id(bad)
        assert store.get(bad) is None
        assert not store.delete(bad)
        with pytest.raises(ValueError):
            store.job_dir(bad)


def test_database_is_in_wal_mode(tmp_path: Path) -> None:
    JobStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "ctscreen.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_release_puts_a_running_job_back_without_counting_the_attempt(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job_id = _queue(store)
    store.start(job_id)
    store.add_rows(job_id, 0, [SUCCESS_ROW])
    store.release(job_id)
    job = store.get(job_id)
    assert job.status == QUEUED and job.attempts == 0 and job.rows_done == 0
    assert job.started is None
    store.finish(job_id, DONE)
    store.release(job_id)  # only a running job goes back
    assert store.get(job_id).status == DONE
