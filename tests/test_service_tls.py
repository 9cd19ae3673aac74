"""``ctscreen serve`` over TLS, as a site runs it: HTTPS with a self-signed certificate
(upload and result work, plain HTTP is refused), the DICOM node over TLS with a client
certificate (a study sent over TLS is scored and its SR comes back over TLS, after which
its instances are removed; a plain association is refused), the audit trail of it all,
and no PatientName or PatientID in any line of the server's log."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pynetdicom")
x509 = pytest.importorskip("cryptography.x509")
import httpx  # noqa: E402
import pydicom  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    Comprehensive3DSRStorage,
    CTImageStorage,
    Verification,
)

from ctscreen.synth.dicom_writer import uid_from, write_series  # noqa: E402
from ctscreen.synth.phantom import make_phantom  # noqa: E402
from service_helpers import free_port, wait_for  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TOKEN = "tls-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NODE_AET, SCU_AET = "CTSCREEN", "TLSSCU"
PATIENT_NAME = "Zyxwova^Quirina^Phitest"
PATIENT_ID = "PHI-ID-470815"


def _certificate(
    folder: Path, name: str, issuer: tuple | None, *, ca: bool = False
) -> tuple[Path, Path, tuple]:
    """A PEM certificate and key; self-signed when ``issuer`` is None (a CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_cert, signer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(signer_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, (cert, key)


def _named_study(folder: Path) -> list[Path]:
    """A synthetic CT series whose headers carry :data:`PATIENT_NAME` and :data:`PATIENT_ID`."""
    spacing = (5.0, 5.0, 5.0)
    phantom = make_phantom(seed=11, shape=(24, 64, 64), spacing=spacing)
    study_uid = str(uid_from("tls-study", 11))
    paths = write_series(
        phantom.hu,
        spacing=spacing,
        out_dir=folder / "series",
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "series")),
        origin=(-157.5, -170.0, -320.0),
        patient_id=PATIENT_ID,
    )
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.save_as(path)
    return paths


def _results_scp(port: int, cert: Path, key: Path, ca: Path) -> tuple[object, list]:
    """The calling AE's own storage SCP, TLS only, taking the node's answers."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    tls.load_cert_chain(cert, key)
    tls.verify_mode = ssl.CERT_REQUIRED  # the node shows its certificate when sending
    received: list = []

    def on_store(event: object) -> int:
        received.append(str(event.dataset.SOPClassUID))  # type: ignore[attr-defined]
        return 0

    ae = AE(ae_title=SCU_AET)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=tls,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    return server, received


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("tls")
    ca_cert, _, ca = _certificate(root, "test-ca", None, ca=True)
    server_cert, server_key, _ = _certificate(root, "server", ca)
    client_cert, client_key, _ = _certificate(root, "client", ca)
    paths = _named_study(root)
    archive = root / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in paths:
            zf.write(path, f"study/{path.name}")
    http_port, dicom_port, scp_port = free_port(), free_port(), free_port()
    scp, received = _results_scp(scp_port, server_cert, server_key, ca_cert)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("CTSCREEN_TOKEN", None)
    command = [sys.executable, "-m", "ctscreen", "--log-level", "DEBUG", "serve"]
    command += ["-w", str(tiny_checkpoint), "--data", str(root / "data")]
    command += ["--port", str(http_port), "--token", TOKEN, "--precision", "fp32"]
    command += ["--backend", "torch", "--tls-cert", str(server_cert), "--tls-key", str(server_key)]
    command += ["--dicom-port", str(dicom_port), "--ae-title", NODE_AET, "--send-tls"]
    command += ["--allow-ae", f"{SCU_AET}@127.0.0.1:{scp_port}"]
    command += ["--stable-seconds", "1", "--dicom-tls-cert", str(server_cert)]
    command += ["--dicom-tls-key", str(server_key), "--dicom-tls-ca", str(ca_cert)]
    log_file = root / "serve.log"
    with log_file.open("ab") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    client_tls = ssl.create_default_context(cafile=str(ca_cert))
    client_tls.load_cert_chain(client_cert, client_key)
    https = httpx.Client(
        base_url=f"https://127.0.0.1:{http_port}", verify=client_tls, headers=AUTH, timeout=30
    )

    def ready() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"ctscreen serve exited: {log_file.read_text()[-3000:]}")
        try:
            return https.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=180, interval=0.5)
        yield {
            "https": https,
            "http_port": http_port,
            "dicom_port": dicom_port,
            "paths": paths,
            "archive": archive,
            "client_tls": client_tls,
            "ca": ca_cert,
            "log": log_file,
            "data": root / "data",
            "received": received,
        }
    finally:
        scp.shutdown()
        https.close()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _done(https: httpx.Client, job_id: str) -> dict:
    def check() -> dict | None:
        job = https.get(f"/api/v1/jobs/{job_id}").json()
        return job if job["status"] in ("done", "failed", "timeout") else None

    return wait_for(check, timeout=180, interval=0.5)


@pytest.fixture(scope="module")
def uploaded(site: dict) -> dict:
    https, archive = site["https"], site["archive"]
    answer = https.post(
        "/api/v1/jobs", files=[("files", (archive.name, archive.read_bytes(), "application/zip"))]
    )
    assert answer.status_code == 202
    return _done(https, answer.json()["id"])


def _associate(site: dict, tls: ssl.SSLContext | None) -> object:
    ae = AE(ae_title=SCU_AET)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    tls_args = None if tls is None else (tls, "localhost")
    return ae.associate("127.0.0.1", site["dicom_port"], ae_title=NODE_AET, tls_args=tls_args)


@pytest.fixture(scope="module")
def sent(site: dict) -> dict:
    assoc = _associate(site, site["client_tls"])
    assert assoc.is_established, "the node refused a TLS association with a CA-signed client"
    statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in site["paths"]]
    assoc.release()
    assert statuses == [0] * len(site["paths"])
    https = site["https"]

    def node_job() -> dict | None:
        jobs = https.get("/api/v1/jobs").json()["jobs"]
        found = [j for j in jobs if j["inputs"][0]["name"].startswith("DICOM study")]
        return found[0] if found else None

    return _done(https, wait_for(node_job, timeout=60)["id"])


def test_https_upload_and_result_work(site: dict, uploaded: dict) -> None:
    assert uploaded["status"] == "done"
    (row,) = uploaded["rows"]
    assert row["processing_status"] == "Success" and row["study_uid"]
    table = site["https"].get(f"/api/v1/jobs/{uploaded['id']}/result.csv")
    assert table.status_code == 200 and row["study_uid"] in table.text
    upload_dir = site["data"] / "jobs" / uploaded["id"] / "uploads"
    wait_for(lambda: not upload_dir.exists(), timeout=10)  # --keep-uploads 0


def test_plain_http_is_refused_when_tls_is_on(site: dict) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{site['http_port']}/healthz", timeout=10)


def test_a_dicom_tls_association_scores_a_study_and_a_plain_one_is_refused(
    site: dict, sent: dict
) -> None:
    assert sent["status"] == "done"
    assert len(sent["inputs"][0]["sha256"]) == 64  # kept after the instances are removed
    (row,) = sent["rows"]
    assert row["processing_status"] == "Success"
    plain = _associate(site, None)
    assert not plain.is_established
    anonymous = ssl.create_default_context(cafile=str(site["ca"]))  # no client certificate
    assert not _associate(site, anonymous).is_established


def test_the_answer_goes_back_over_tls_and_then_the_instances_are_removed(
    site: dict, sent: dict
) -> None:
    wait_for(lambda: str(Comprehensive3DSRStorage) in site["received"], timeout=60)
    https = site["https"]
    job = wait_for(
        lambda: (j := https.get(f"/api/v1/jobs/{sent['id']}").json())["uploads_removed"] and j,
        timeout=30,
    )
    assert not (site["data"] / "jobs" / sent["id"] / "uploads").exists()
    assert https.get(f"/api/v1/jobs/{job['id']}/result.csv").status_code == 200


def test_the_audit_trail_lists_the_https_and_dicom_actions(
    site: dict, uploaded: dict, sent: dict
) -> None:
    def trail() -> list[dict] | None:
        entries = site["https"].get("/api/v1/audit").json()["entries"]
        done = {(e["action"], e["job_id"]) for e in entries}
        return entries if ("uploads-removed", sent["id"]) in done else None

    entries = wait_for(trail, timeout=90)  # the node's instances go once answered
    seen = {(e["action"], e["actor"], e["job_id"]) for e in entries}
    assert ("upload", "admin", uploaded["id"]) in seen
    assert ("download", "admin", uploaded["id"]) in seen
    assert ("uploads-removed", "ctscreen", uploaded["id"]) in seen
    accepted = [e for e in entries if e["action"] == "dicom-association"]
    assert accepted and {e["actor"] for e in accepted} == {SCU_AET}
    assert all(e["detail"] == "accepted over TLS" for e in accepted)
    received = [e for e in entries if e["action"] == "dicom-study-received"]
    assert [e["study_uid"] for e in received] == [sent["rows"][0]["study_uid"]]
    answered = [e for e in entries if e["action"] == "dicom-results-sent"]
    assert [(e["job_id"], e["detail"].endswith("over TLS")) for e in answered] == [
        (sent["id"], True)
    ]
    assert ("uploads-removed", "ctscreen", sent["id"]) in seen


def test_no_log_line_holds_the_patient_name_or_id(site: dict, uploaded: dict, sent: dict) -> None:
    text = site["log"].read_text(errors="replace")
    assert uploaded["id"] in text and sent["id"] in text  # the log is the run's
    lowered = text.lower()
    for needle in (*PATIENT_NAME.split("^"), PATIENT_ID):
        assert needle.lower() not in lowered, needle
