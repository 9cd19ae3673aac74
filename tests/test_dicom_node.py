"""The DICOM node against a real PACS (Debian's Orthanc) on loopback ports.

A synthetic study goes into Orthanc, Orthanc sends it to ``ctscreen serve
--dicom-port`` as a modality, the service scores it and sends a Comprehensive 3D
SR and a Secondary Capture series back; the SR read back with highdicom says what
the table row says. Faults: an association aborted mid-study, a non-CT object, the
destination down and then up.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
requests = pytest.importorskip("requests")

from ctscreen import __version__  # noqa: E402
from ctscreen.outputs.dicom import read_sr  # noqa: E402
from ctscreen.synth.dicom_writer import uid_from, write_secondary_capture, write_series  # noqa: E402
from ctscreen.synth.phantom import make_phantom  # noqa: E402
from dicom_helpers import (  # noqa: E402
    DICOMWEB_PLUGIN,
    ORTHANC,
    Orthanc,
    echo,
    job_rows,
    start_node,
    stop_process,
    store,
)
from service_helpers import free_port, wait_for  # noqa: E402

pytestmark = pytest.mark.skipif(
    not Path(ORTHANC).is_file(), reason="Orthanc is not installed (apt-get install orthanc)"
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def write_study(folder: Path, name: str, *, seed: int) -> tuple[str, list[Path]]:
    """A small synthetic chest CT study (24 slices of 64x64); its UID and files."""
    spacing = (5.0, 5.0, 5.0)
    phantom = make_phantom(seed=seed, shape=(24, 64, 64), spacing=spacing, pathology=None)
    study_uid = str(uid_from("dicom-node", name, seed))
    paths = write_series(
        phantom.hu,
        spacing=spacing,
        out_dir=folder / name,
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "ct")),
        origin=(-157.5, -170.0, -320.0),
        seed=seed,
    )
    return study_uid, paths


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc with ctscreen as a modality; stopped after the test."""
    orthanc = Orthanc(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        node_port=free_port(),
    )
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


@pytest.fixture()
def node(tmp_path: Path, pacs: Orthanc, tiny_checkpoint: Path) -> Iterator[dict]:
    """``ctscreen serve`` with its DICOM node sending results to ``pacs``."""
    weights = tmp_path / "model.pth"
    shutil.copy(tiny_checkpoint, weights)
    http_port = free_port()

    def start(**options: float) -> subprocess.Popen:
        return start_node(
            tmp_path / "data",
            weights,
            http_port=http_port,
            dicom_port=pacs.node_port,
            send_to=pacs.destination,
            log_file=tmp_path / "serve.log",
            **options,
        )

    servers = [start()]

    def restart(**options: float) -> None:
        stop_process(servers[-1])
        servers.append(start(**options))

    try:
        yield {
            "http_port": http_port,
            "dicom_port": pacs.node_port,
            "data": tmp_path / "data",
            "restart": restart,
        }
    finally:
        stop_process(servers[-1])


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, list]:
    """The SR and SC instances Orthanc holds for the study (empty lists until they come)."""
    found: dict[str, list] = {"SR": [], "SC": []}
    for series in pacs.series_of_study(study_uid):
        if series.get("MainDicomTags", {}).get("Modality") == "CT":
            continue  # the study's own images: not downloaded on every poll
        datasets = pacs.instances(series)
        for ds in datasets:
            if ds.SOPClassUID == SR_CLASS:
                found["SR"].append(ds)
            elif ds.SOPClassUID == SC_CLASS:
                found["SC"].append(ds)
    return found


def only_row(http_port: int, study_uid: str) -> dict:
    """The row of the finished job that scored ``study_uid``."""
    for job in job_rows(http_port):
        for row in job.get("rows") or []:
            if row["study_uid"] == study_uid and job["status"] == "done":
                return row
    return {}


def test_study_from_orthanc_comes_back_as_sr_and_key_images(
    tmp_path: Path, pacs: Orthanc, node: dict
) -> None:
    study_uid, paths = write_study(tmp_path / "studies", "chest", seed=3)
    orthanc_study = pacs.upload(paths)
    assert echo(node["dicom_port"]) == 0  # C-ECHO answers
    # The PACS sends the study to ctscreen as a modality (what a routing rule does).
    pacs.post("/modalities/ctscreen/store", json={"Resources": [orthanc_study], "Timeout": 60})
    row = wait_for(lambda: only_row(node["http_port"], study_uid), timeout=240, interval=1)
    assert row["processing_status"] == "Success"
    found = wait_for(
        lambda: (lambda f: f if f["SR"] and len(f["SC"]) >= 2 else None)(
            results_in(pacs, study_uid)
        ),
        timeout=120,
        interval=1,
    )
    (sr,) = found["SR"]
    findings = read_sr(sr)
    assert findings.probability == pytest.approx(row["probability_of_pathology"], abs=1e-6)
    assert findings.pathology == row["pathology"] == 1
    table_box = [float(v) for v in str(row["pathology_localization"]).split(",")]
    assert findings.box == pytest.approx(table_box, abs=1e-3)
    assert findings.algorithm == ("ctscreen", __version__)
    sent_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    assert findings.referenced_sop_uids and set(findings.referenced_sop_uids) <= sent_uids
    # Patient and Study modules are those of the received study.
    source = pydicom.dcmread(paths[0])
    for ds in [sr, *found["SC"]]:
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName
    assert sr.VerificationFlag == "UNVERIFIED"
    assert "not for diagnosis" in sr.SeriesDescription.lower()
    for sc in found["SC"]:
        assert sc.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSIS" in sc.SeriesDescription
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sent_uids
    # Both pass dicom3tools' dciodvfy without errors.
    for i, ds in enumerate([sr, found["SC"][0]]):
        path = tmp_path / f"result-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            assert "Error" not in check.stdout + check.stderr, check.stdout + check.stderr


def test_non_ct_object_and_unknown_ae_are_refused(
    tmp_path: Path, pacs: Orthanc, node: dict
) -> None:
    study_uid, paths = write_study(tmp_path / "studies", "mixed", seed=4)
    phantom = make_phantom(seed=4, shape=(24, 64, 64), spacing=(5.0, 5.0, 5.0))
    sc_path = write_secondary_capture(
        phantom.hu,
        out_dir=tmp_path / "sc",
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "sc")),
    )
    # A dose-screen capture (Modality CT, but Secondary Capture storage) among CT images:
    # the association stands, the capture is answered (a refusal would fail a PACS's
    # whole study job) but not kept, and listed as refused; the CT images are stored.
    statuses = store(node["dicom_port"], [sc_path, *paths[:2]])
    assert statuses == [0x0000, 0x0000, 0x0000]
    stored = list((node["data"] / "dicom-in").rglob("*.dcm"))
    assert len(stored) == 2
    refused = requests.get(f"http://127.0.0.1:{node['http_port']}/api/v1/dicom", timeout=10).json()[
        "refused"
    ]
    (item,) = refused["items"]
    assert item["sop_class_uid"] == SC_CLASS and item["calling_ae"] == "TESTSCU"
    assert "not CT image storage" in item["reason"]
    # Only the allowed calling AE titles (--allow-ae) may associate, and only with our title.
    assert echo(node["dicom_port"]) == 0
    assert echo(node["dicom_port"], calling="INTRUDER") is None
    assert echo(node["dicom_port"], ae_title="SOMEONEELSE") is None


def test_aborted_association_is_scored_with_the_missing_slices_named(
    tmp_path: Path, pacs: Orthanc, node: dict
) -> None:
    study_uid, paths = write_study(tmp_path / "studies", "partial", seed=5)
    by_number = sorted(paths, key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    # Instances 1-16 and 21-24 are sent first, then 17-20 never arrive: the SCU aborts.
    order = by_number[:16] + by_number[20:] + by_number[16:20]
    statuses = store(node["dicom_port"], order, abort_after=20)
    assert statuses == [0] * 20
    row = wait_for(lambda: only_row(node["http_port"], study_uid), timeout=240, interval=1)
    assert "possibly incomplete" in row["warnings"]
    assert "aborted" in row["warnings"]
    assert "instance numbers 17-20 missing" in row["warnings"]
    found = wait_for(
        lambda: (lambda f: f if f["SR"] else None)(results_in(pacs, study_uid)),
        timeout=120,
        interval=1,
    )
    comments = [
        item.TextValue
        for item in found["SR"][0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert any("17-20 missing" in text for text in comments)


def node_status(http_port: int) -> dict:
    """``GET /api/v1/dicom``: the node's incoming studies and outbox."""
    return requests.get(f"http://127.0.0.1:{http_port}/api/v1/dicom", timeout=10).json()


def metric(http_port: int, name: str) -> float:
    """One value of the service's ``/metrics``."""
    text = requests.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return float(values[name])


def test_destination_down_then_up_results_arrive_after_retry_and_restart(
    tmp_path: Path, pacs: Orthanc, node: dict
) -> None:
    port = node["http_port"]
    pacs.stop()  # the PACS is down when the results are ready
    study_uid, paths = write_study(tmp_path / "studies", "later", seed=6)
    assert store(node["dicom_port"], paths) == [0] * len(paths)
    wait_for(lambda: only_row(port, study_uid), timeout=240, interval=1)

    def failed_tries() -> list[dict]:
        items = node_status(port)["items"]
        return [
            i for i in items if i["state"] == "pending" and i["attempts"] >= 2
        ] == items and items

    items = wait_for(failed_tries, timeout=60, interval=0.5)  # tried, failed, kept
    assert all(i["last_error"] and i["destination"] == pacs.destination for i in items)
    assert {i["file"].split(".")[-1] for i in items} == {"dcm"}
    assert metric(port, 'ctscreen_dicom_outbox{state="pending"}') == len(items)
    assert metric(port, "ctscreen_dicom_outbox_oldest_pending_seconds") > 0
    page = requests.get(f"http://127.0.0.1:{port}/", timeout=10).text
    assert '<section id="dicom">' in page
    panel = requests.get(f"http://127.0.0.1:{port}/ui/dicom", timeout=10).text
    assert f"{len(items)} results waiting to be sent" in panel
    assert '<button type="button" class="retry">' in panel

    # The outbox is on disk: a restart keeps it. With an hour's backoff after the next
    # failed try, only the retry route brings the results over once the PACS is back.
    node["restart"](retry_seconds=3600.0)

    def waiting_long() -> bool:
        status = node_status(port)
        return status["outbox"]["pending"] == len(items) and all(
            i["next_try"] > time.time() + 600 for i in status["items"]
        )

    wait_for(waiting_long, timeout=60, interval=0.5)
    pacs.start()
    retry = requests.post(f"http://127.0.0.1:{port}/api/v1/dicom/outbox/retry", timeout=10)
    assert retry.json() == {"rescheduled": len(items)}
    found = wait_for(
        lambda: (lambda f: f if f["SR"] and f["SC"] else None)(results_in(pacs, study_uid)),
        timeout=120,
        interval=1,
    )
    assert read_sr(found["SR"][0]).probability == pytest.approx(
        only_row(port, study_uid)["probability_of_pathology"], abs=1e-6
    )
    outbox = wait_for(
        lambda: (lambda o: o if o["sent"] == len(items) else None)(node_status(port)["outbox"]),
        timeout=30,
    )
    assert outbox["pending"] == 0 and outbox["oldest_pending_seconds"] is None
    assert metric(port, 'ctscreen_dicom_outbox{state="sent"}') == len(items)
    panel = requests.get(f"http://127.0.0.1:{port}/ui/dicom", timeout=10).text
    assert "nothing waiting to be sent" in panel and f"{len(items)} sent" in panel


@pytest.mark.skipif(
    not DICOMWEB_PLUGIN.is_file(), reason="Orthanc's DICOMweb plugin (orthanc-dicomweb) is missing"
)
def test_dicomweb_scores_an_archived_study_and_stores_results_back(
    tmp_path: Path, pacs: Orthanc, tiny_checkpoint: Path, run_cli
) -> None:
    study_uid, paths = write_study(tmp_path / "studies", "archived", seed=7)
    pacs.upload(paths)
    weights = tmp_path / "model.pth"
    shutil.copy(tiny_checkpoint, weights)
    table = tmp_path / "web.csv"
    run = run_cli(
        "dicomweb", "--url", f"{pacs.url}/dicom-web", "--study", study_uid, "-w", weights,
        "-o", table, "--threshold", "0", "--device", "cpu", "--backend", "torch",
        "--precision", "fp32",
    )  # fmt: skip
    assert run.code == 0, run.err
    assert "results stored back" in run.err
    import pandas as pd

    (row,) = pd.read_csv(table).to_dict("records")
    assert row["study_uid"] == study_uid and row["processing_status"] == "Success"
    found = results_in(pacs, study_uid)
    (sr,) = found["SR"]
    assert len(found["SC"]) >= 2
    findings = read_sr(sr)
    assert findings.probability == pytest.approx(row["probability_of_pathology"], abs=1e-6)
    box = [float(v) for v in str(row["pathology_localization"]).split(",")]
    assert findings.box == pytest.approx(box, abs=1e-3)
    # An unknown study is a Failure row, not a crash.
    missing = run_cli(
        "dicomweb", "--url", f"{pacs.url}/dicom-web", "--study", "1.2.3.4.5", "-w", weights,
        "-o", tmp_path / "missing.csv", "--device", "cpu", "--backend", "torch",
    )  # fmt: skip
    assert missing.code == 1 and "no study 1.2.3.4.5" in missing.err
