"""Patient data kept only as long as needed: uploads removed once scored (and, for the
DICOM node, answered), results removed after --keep-results, the job then expired; and
the audit trail of all that (who uploaded, downloaded, deleted; what the sweep removed)."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ctscreen.cli.types import duration  # noqa: E402
from ctscreen.service.app import ServiceSettings, create_app  # noqa: E402
from ctscreen.service.audit import AuditTrail  # noqa: E402
from ctscreen.service.retention import RetentionPolicy, sweep  # noqa: E402
from ctscreen.service.roles import parse_tokens  # noqa: E402
from ctscreen.service.store import DONE, InputFile, JobStore, new_job_id, stored_name  # noqa: E402
from ctscreen.service.worker import WorkerConfig  # noqa: E402
from service_helpers import study_zip, wait_for  # noqa: E402

KEEP_RESULTS = 4.0
TOKENS = {"viewer": "v-token-for-tests", "operator": "o-token-for-tests", "admin": "a-token-x"}
AS = {role: {"Authorization": f"Bearer {token}"} for role, token in TOKENS.items()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[dict]:
    """One study scored by a service that keeps no uploads and results for 4 s."""
    folder = tmp_path_factory.mktemp("retention")
    archive = study_zip(folder, "retention_anon", seed=5)
    settings = ServiceSettings(
        data_dir=folder / "data",
        worker=WorkerConfig(weights=str(tiny_checkpoint), precision="fp32", backend="torch"),
        study_timeout=120.0,
        load_timeout=300.0,
        retention=RetentionPolicy(keep_uploads=0.0, keep_results=KEEP_RESULTS, interval=0.5),
        tokens=parse_tokens(
            "\n".join(
                f"{role[0]}-user {role} {hashlib.sha256(token.encode()).hexdigest()}"
                for role, token in TOKENS.items()
            )
        ),
    )
    app = create_app(settings)
    with TestClient(app) as client:
        parts = [("files", (archive.name, archive.read_bytes(), "application/zip"))]
        job_id = client.post("/api/v1/jobs", files=parts, headers=AS["operator"]).json()["id"]

        def done() -> dict | None:
            job = client.get(f"/api/v1/jobs/{job_id}", headers=AS["viewer"]).json()
            return job if job["status"] == DONE else None

        job = wait_for(done, timeout=300)
        # read at once, before the results expire (4 s after the job ended)
        table = client.get(f"/api/v1/jobs/{job_id}/result.csv", headers=AS["viewer"])
        report = client.get(f"/api/v1/jobs/{job_id}/report", headers=AS["viewer"])
        yield {
            "client": client,
            "store": app.state.store,
            "job": job,
            "archive": archive,
            "table": table,
            "report": report,
        }


def test_uploads_are_gone_once_scored_and_the_result_is_still_there(scored: dict) -> None:
    store, job = scored["store"], scored["job"]
    wait_for(lambda: not (store.job_dir(job["id"]) / "uploads").exists(), timeout=10)
    assert scored["table"].status_code == 200 and "retention_anon" in scored["table"].text
    assert scored["report"].status_code == 200
    (kept,) = job["inputs"]
    archive: Path = scored["archive"]
    assert kept == {
        "name": archive.name,
        "size": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }
    leftovers = [p for p in store.data_dir.rglob("*") if p.suffix in (".upload", ".dcm")]
    assert leftovers == []


def test_results_expire_after_keep_results_and_the_api_says_so(scored: dict) -> None:
    client, store, job_id = scored["client"], scored["store"], scored["job"]["id"]
    job = wait_for(
        lambda: (
            (j := client.get(f"/api/v1/jobs/{job_id}", headers=AS["viewer"]).json())["expired"]
            and j
        ),
        timeout=30,
    )
    assert job["expired"] >= job["finished"] + KEEP_RESULTS
    assert job["rows"] == [] and job["inputs"][0]["sha256"]
    for route in ("result.csv", "result.xlsx", "report"):
        answer = client.get(f"/api/v1/jobs/{job_id}/{route}", headers=AS["viewer"])
        assert answer.status_code == 410, route
        assert "expired" in answer.json()["detail"] and "--keep-results" in answer.json()["detail"]
    assert not store.job_dir(job_id).exists()
    assert "retention_anon" not in client.get("/api/v1/results.csv", headers=AS["viewer"]).text


def test_the_audit_trail_lists_every_action_with_who_and_from_where(scored: dict) -> None:
    client, job_id = scored["client"], scored["job"]["id"]
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=AS["admin"]).status_code == 200
    assert client.get("/api/v1/audit", headers=AS["operator"]).status_code == 403
    entries = client.get("/api/v1/audit", headers=AS["admin"]).json()["entries"]
    seen = {(e["action"], e["actor"], e["role"], e["job_id"]) for e in entries}
    assert ("upload", "o-user", "operator", job_id) in seen
    assert ("download", "v-user", "viewer", job_id) in seen  # result.csv and report
    assert ("uploads-removed", "ctscreen", "system", job_id) in seen
    assert ("results-expired", "ctscreen", "system", job_id) in seen
    assert ("delete", "a-user", "admin", job_id) in seen
    assert {e["address"] for e in entries if e["role"] != "system"} == {"testclient"}
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    csv = client.get("/api/v1/audit?format=csv", headers=AS["admin"])
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "id,time,actor,role,action,job_id,study_uid,address,detail"
    assert len(lines) == len(entries) + 1 and f"upload,{job_id}" in csv.text


def _ended_job(store: JobStore, finished: float) -> str:
    job_id = new_job_id()
    (store.upload_dir(job_id) / stored_name(0)).write_bytes(b"study")
    store.add_job(job_id, [InputFile(0, "a.zip", stored_name(0), 5, "ab" * 32)])
    store.start(job_id)
    store.finish(job_id, DONE)
    with store._transaction() as db:
        db.execute("UPDATE jobs SET finished = ? WHERE id = ?", (finished, job_id))
    return job_id


def test_keep_uploads_keeps_them_for_that_long(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    audit = AuditTrail(store)
    now = time.time()
    policy = RetentionPolicy(keep_uploads=duration("1h"), keep_results=duration("30d"))
    recent, old = _ended_job(store, now - 1800), _ended_job(store, now - 7200)
    swept = sweep(store, policy, audit, now=now)
    assert swept.uploads == [old] and swept.expired == []
    assert (store.job_dir(recent) / "uploads" / stored_name(0)).is_file()
    assert not (store.job_dir(old) / "uploads").exists()
    assert store.get(old).uploads_removed is not None and store.get(recent).uploads_removed is None
    assert sweep(store, policy, audit, now=now + 40 * 86400).expired == [old, recent]
    assert sweep(store, RetentionPolicy(keep_results=duration("never")), audit).expired == []
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        with store._transaction() as db:
            db.execute("DELETE FROM audit")
    store.close()


def test_a_dicom_node_job_keeps_its_instances_until_answered(tmp_path: Path) -> None:
    pytest.importorskip("pynetdicom")
    from ctscreen.service.node_store import NodeStore

    store = JobStore(tmp_path)
    node = NodeStore(store)
    job_id = _ended_job(store, time.time() - 10)
    with store._transaction() as db:
        db.execute(
            "INSERT INTO node_jobs (job_id, study_uid, calling_ae, state, created) "
            "VALUES (?, '1.2.3', 'PACS', 'outbox', 0)",
            (job_id,),
        )
        db.execute(
            "INSERT INTO outbox (job_id, path, state, next_try, created) "
            "VALUES (?, 'sr.dcm', 'pending', 0, 0)",
            (job_id,),
        )
    policy = RetentionPolicy()
    assert sweep(store, policy, AuditTrail(store)).uploads == []
    (item,) = node.outbox()
    node.mark_sent(item.id, "PACS@127.0.0.1:104")
    assert sweep(store, policy, AuditTrail(store)).uploads == [job_id]
    store.close()
