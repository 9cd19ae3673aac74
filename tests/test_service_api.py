"""The service's REST API with the real app, worker and scoring child (FastAPI TestClient)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ctscreen.errors import ConfigError  # noqa: E402
from ctscreen.report import REQUIRED_COLUMNS  # noqa: E402
from ctscreen.service.app import ServiceSettings, check_listen_address, create_app  # noqa: E402
from ctscreen.service.worker import WorkerConfig  # noqa: E402
from service_helpers import study_zip, wait_for  # noqa: E402

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("svc")
    damaged = folder / "damaged.zip"
    good = study_zip(folder, "norma_anon", seed=3)
    damaged.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    return {
        "weights": tiny_checkpoint,
        "good": good,
        "other": study_zip(folder, "pneumonia_anon", seed=4, pathology="consolidation"),
        "damaged": damaged,
    }


def _settings(data: Path, weights: Path, **overrides: object) -> ServiceSettings:
    values: dict[str, object] = dict(
        data_dir=data,
        worker=WorkerConfig(weights=str(weights), precision="fp32", backend="torch"),
        token=TOKEN,
        study_timeout=120.0,
        load_timeout=300.0,
    )
    values.update(overrides)
    return ServiceSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]
) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("data")
    app = create_app(_settings(data, files["weights"], max_files=3, max_upload_bytes=20 * 2**20))
    with TestClient(app) as test_client:
        app.state.worker.wait_ready(300)
        yield test_client


def _upload(client: TestClient, *paths: Path, names: list[str] | None = None, **data: str):
    names = names or [p.name for p in paths]
    parts = [
        ("files", (n, p.read_bytes(), "application/zip")) for n, p in zip(names, paths, strict=True)
    ]
    return client.post("/api/v1/jobs", files=parts, data=data, headers=AUTH)


def _finished(client: TestClient, job_id: str, timeout: float = 300) -> dict:
    def check() -> dict | None:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=AUTH).json()
        return job if job["status"] in ("done", "failed", "timeout") else None

    return wait_for(check, timeout=timeout)


def test_upload_scores_like_predict_and_tables_start_with_the_seven_columns(
    client: TestClient, files: dict[str, Path], tmp_path: Path, run_cli
) -> None:
    answer = _upload(client, files["good"], files["damaged"], files["other"])
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "queued" and len(body["id"]) == 22
    assert answer.headers["location"] == f"/api/v1/jobs/{body['id']}"
    job = _finished(client, body["id"])
    assert job["status"] == "done", job
    assert job["progress"] == {"inputs": 3, "inputs_done": 3, "studies_done": 3, "failures": 1}
    good, damaged, other = job["rows"]
    assert good["processing_status"] == "Success" and 0 <= good["probability_of_pathology"] <= 1
    assert good["path_to_study"] == "norma_anon.zip/norma_anon"
    assert damaged["processing_status"] == "Failure" and damaged["error"]
    assert damaged["probability_of_pathology"] is None and damaged["path_to_study"] == "damaged.zip"
    assert other["processing_status"] == "Success"

    # The same files through `ctscreen predict` give the same numbers.
    out = tmp_path / "predict.xlsx"
    inputs = [str(files[k]) for k in ("good", "damaged", "other")]
    predicted = run_cli(
        "predict",
        *inputs,
        "-w",
        files["weights"],
        "-o",
        out,
        "--precision",
        "fp32",
        "--backend",
        "torch",
    )
    assert predicted.code == 1  # one Failure row
    expected = pd.read_excel(out)
    assert list(expected["processing_status"]) == ["Success", "Failure", "Success"]
    for row, (_, ref) in zip(job["rows"], expected.iterrows(), strict=True):
        assert row["study_uid"] == (ref["study_uid"] if isinstance(ref["study_uid"], str) else "")
        if row["processing_status"] == "Success":
            assert row["probability_of_pathology"] == pytest.approx(
                ref["probability_of_pathology"], abs=1e-6
            )
            assert row["pathology"] == ref["pathology"]

    base = f"/api/v1/jobs/{body['id']}"
    xlsx = client.get(f"{base}/result.xlsx", headers=AUTH)
    assert xlsx.status_code == 200
    table = pd.read_excel(io.BytesIO(xlsx.content), sheet_name=0)
    assert tuple(table.columns[:7]) == REQUIRED_COLUMNS
    assert list(table["processing_status"]) == ["Success", "Failure", "Success"]
    run = pd.read_excel(io.BytesIO(xlsx.content), sheet_name="run")
    assert "weights_sha256" in set(run["key"])
    csv = pd.read_csv(io.StringIO(client.get(f"{base}/result.csv", headers=AUTH).text))
    assert tuple(csv.columns[:7]) == REQUIRED_COLUMNS and len(csv) == 3
    records = client.get(f"{base}/result.json", headers=AUTH).json()
    assert [r["path_to_study"] for r in records] == [r["path_to_study"] for r in job["rows"]]
    assert client.get(f"{base}/result.txt", headers=AUTH).status_code == 404

    everything = pd.read_excel(io.BytesIO(client.get("/api/v1/results.xlsx", headers=AUTH).content))
    assert tuple(everything.columns[:7]) == REQUIRED_COLUMNS and len(everything) >= 3
    report = client.get(f"{base}/report", headers=AUTH)
    assert report.status_code == 200 and "norma_anon.zip/norma_anon" in report.text
    assert report.text.count("data:image/png;base64,") >= 4  # curve + key slices per study
    assert ".upload" not in report.text  # stored names never shown


def test_per_slice_mode_gives_a_row_per_slice(client: TestClient, files: dict[str, Path]) -> None:
    job = _finished(client, _upload(client, files["good"], mode="slice").json()["id"])
    assert job["status"] == "done" and job["mode"] == "slice"
    rows = job["rows"]
    assert len(rows) == 24  # the synthetic series has 24 slices
    assert [r["slice_index"] for r in rows] == list(range(24))
    assert {r["study_uid"] for r in rows} == {rows[0]["study_uid"]}
    assert all(0 <= r["probability_of_pathology"] <= 1 for r in rows)


def test_damaged_upload_gives_a_failure_row_and_the_server_stays_ready(
    client: TestClient, files: dict[str, Path]
) -> None:
    job_id = _upload(client, files["damaged"]).json()["id"]
    job = _finished(client, job_id)
    assert job["status"] == "done"
    (row,) = job["rows"]
    assert row["processing_status"] == "Failure" and row["error"]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_loaded"] is True


def test_requests_without_the_token_get_401_except_health_checks(client: TestClient) -> None:
    for method, path in [
        ("get", "/api/v1/jobs"),
        ("post", "/api/v1/jobs"),
        ("get", "/api/v1/results.xlsx"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/ui/jobs"),
    ]:
        answer = getattr(client, method)(path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/api/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    page = client.get("/")
    assert page.status_code == 401 and 'name="token"' in page.text
    assert client.get("/api/v1/jobs", headers=AUTH).status_code == 200


def test_browser_signs_in_with_the_token_and_gets_a_cookie(client: TestClient) -> None:
    wrong = client.post("/ui/login", data={"token": "guess"}, follow_redirects=False)
    assert wrong.status_code == 401 and "ctscreen_session" not in wrong.cookies
    right = client.post("/ui/login?lang=ru", data={"token": TOKEN}, follow_redirects=False)
    assert right.status_code == 303
    cookie = right.cookies["ctscreen_session"]
    assert TOKEN not in cookie
    client.cookies.set("ctscreen_session", cookie)
    page = client.get("/?lang=ru")
    assert page.status_code == 200 and "Загрузить и оценить" in page.text
    assert page.cookies["lang"] == "ru"
    client.cookies.set("lang", "en")
    english = client.get("/")
    assert "Upload and score" in english.text
    assert english.headers["content-security-policy"].startswith("default-src 'self'")
    client.cookies.clear()


def test_limits_give_clear_4xx(client: TestClient, files: dict[str, Path], tmp_path: Path) -> None:
    too_many = _upload(client, *[files["good"]] * 4)
    assert too_many.status_code == 413 and "at most 3" in too_many.json()["detail"]
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (21 * 2**20))
    too_big = _upload(client, big)
    assert too_big.status_code == 413 and "MiB" in too_big.json()["detail"]
    empty = client.post(
        "/api/v1/jobs",
        data={"mode": "study"},
        headers=AUTH,
        files=[("other", ("x", b"", "text/plain"))],
    )
    assert empty.status_code == 400
    none = client.post(
        "/api/v1/jobs",
        headers={**AUTH, "content-type": "multipart/form-data; boundary=xyz"},
        content=b"--xyz--\r\n",
    )
    assert none.status_code == 422
    not_multipart = client.post("/api/v1/jobs", headers=AUTH, json={"files": ["a"]})
    assert not_multipart.status_code == 415
    bad_mode = _upload(client, files["good"], mode="everything")
    assert bad_mode.status_code == 422
    uploads = [p for p in client.app.state.store.jobs_dir.iterdir()]
    assert all(client.app.state.store.get(p.name) for p in uploads)  # no leftovers


def test_client_file_names_never_become_paths(client: TestClient, files: dict[str, Path]) -> None:
    store = client.app.state.store
    answer = _upload(client, files["good"], names=["../../../escape.zip"])
    job_id = answer.json()["id"]
    job = _finished(client, job_id)
    (stored,) = job["inputs"]
    assert (stored["name"], stored["size"]) == ("escape.zip", files["good"].stat().st_size)
    assert job["rows"][0]["path_to_study"] == "escape.zip/norma_anon"
    # stored as 0000.upload while scored, removed once scored (--keep-uploads 0)
    assert store.get(job_id).inputs[0].stored == "0000.upload"
    wait_for(lambda: not (store.job_dir(job_id) / "uploads").exists(), timeout=10)
    assert not list(store.data_dir.parent.rglob("escape.zip"))
    for bad in ("../x", "nope", "%2e%2e"):
        assert client.get(f"/api/v1/jobs/{bad}", headers=AUTH).status_code == 404


def test_too_many_active_jobs_get_429(files: dict[str, Path], tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, files["weights"], max_active_jobs=1))
    client = TestClient(app)  # no lifespan: the worker never starts, jobs stay queued
    assert _upload(client, files["good"]).status_code == 202
    refused = _upload(client, files["good"])
    assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
    app.state.store.close()


def test_delete_removes_the_job_and_its_files(client: TestClient, files: dict[str, Path]) -> None:
    store = client.app.state.store
    job_id = _upload(client, files["good"]).json()["id"]
    _finished(client, job_id)
    assert store.job_dir(job_id).exists()
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=AUTH).json() == {
        "id": job_id,
        "deleted": True,
    }
    assert not store.job_dir(job_id).exists()
    assert client.get(f"/api/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=AUTH).status_code == 404


def test_metrics_count_jobs_and_study_times(client: TestClient, files: dict[str, Path]) -> None:
    _finished(client, _upload(client, files["good"]).json()["id"])
    text = client.get("/metrics", headers=AUTH).text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['ctscreen_jobs{status="done"}'] >= 1
    assert values["ctscreen_queue_depth"] == 0
    assert values["ctscreen_study_seconds_count"] >= 1
    assert (
        values['ctscreen_study_seconds_bucket{le="+Inf"}'] == values["ctscreen_study_seconds_count"]
    )
    assert values["ctscreen_model_ready"] == 1
    assert not any(key.startswith("ctscreen_dicom_") for key in values)  # no DICOM node


def test_dicom_routes_say_the_node_is_off_without_dicom_port(client: TestClient) -> None:
    for method, route in (("get", "/api/v1/dicom"), ("post", "/api/v1/dicom/outbox/retry")):
        response = getattr(client, method)(route, headers=AUTH)
        assert response.status_code == 404
        assert "--dicom-port" in response.json()["detail"]


def test_openapi_lists_the_versioned_routes_and_docs_need_no_network(client: TestClient) -> None:
    spec = client.get("/openapi.json", headers=AUTH).json()
    for route in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/result.{fmt}",
        "/api/v1/results.{fmt}",
        "/api/v1/jobs/{job_id}/report",
        "/api/v1/dicom",
        "/api/v1/dicom/outbox/retry",
        "/healthz",
        "/readyz",
    ):
        assert route in spec["paths"], route
    docs = client.get("/docs", headers=AUTH).text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in docs and "cdn" not in docs
    assert client.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200
    assert json.loads(json.dumps(spec))["info"]["title"] == "ctscreen"


def test_listening_beyond_loopback_needs_a_token(
    files: dict[str, Path], tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CTSCREEN_TOKEN", raising=False)
    check_listen_address("127.0.0.1", "")
    check_listen_address("0.0.0.0", "t")
    with pytest.raises(ConfigError, match="CTSCREEN_TOKEN"):
        check_listen_address("0.0.0.0", "")
    refused = run_cli(
        "serve", "-w", files["weights"], "--data", tmp_path, "--host", "0.0.0.0", "--token", ""
    )
    assert refused.code == 2 and "needs a token" in refused.err
    assert not (tmp_path / "ctscreen.db").exists()
