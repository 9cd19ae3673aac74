"""Helpers of the DICOM node tests: a real Orthanc, a ctscreen serve process, a storescu."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE

from service_helpers import wait_for

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SRC = Path(__file__).resolve().parents[1] / "src"
NODE_AET = "CTSCREEN"
ORTHANC_AET = "ORTHANC"


@dataclass
class Orthanc:
    """A running Orthanc on loopback ports, configured in ``folder``."""

    folder: Path
    http_port: int
    dicom_port: int
    node_port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict:
        config: dict = {
            "Name": "ctscreen-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 10,
            "StableAge": 1,
            "SaveJobs": False,
            "DicomModalities": {"ctscreen": [NODE_AET, "127.0.0.1", self.node_port]},
        }
        if DICOMWEB_PLUGIN.is_file():
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=log)
        wait_for(self._answers, timeout=60)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}"
            )
        try:
            return requests.get(f"{self.url}/system", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, route: str) -> object:
        response = requests.get(f"{self.url}{route}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, route: str, **kwargs: object) -> object:
        response = requests.post(f"{self.url}{route}", timeout=120, **kwargs)
        response.raise_for_status()
        return response.json()

    def upload(self, paths: Sequence[Path]) -> str:
        """Store files in Orthanc by REST; returns the Orthanc id of their study."""
        study = ""
        for path in paths:
            answer = self.post("/instances", data=path.read_bytes())
            study = answer["ParentStudy"]  # type: ignore[index]
        return study

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Every series of the study with its main tags (Modality, SeriesInstanceUID, ...)."""
        found = self.post(
            "/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )
        return list(found)  # type: ignore[arg-type]

    def instances(self, series: dict) -> list[pydicom.Dataset]:
        """The instances of one series (as found by :meth:`series_of_study`), read back."""
        import io

        datasets = []
        for instance_id in series["Instances"]:
            response = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
            response.raise_for_status()
            datasets.append(pydicom.dcmread(io.BytesIO(response.content)))
        return datasets


def start_node(
    data: Path,
    weights: Path,
    *,
    http_port: int,
    dicom_port: int,
    send_to: str | None,
    stable_seconds: float = 1.0,
    retry_seconds: float = 1.0,
    log_file: Path,
    allow_ae: Sequence[str] = (ORTHANC_AET, "TESTSCU"),
    extra: Sequence[str] = (),
) -> subprocess.Popen:
    """``ctscreen serve`` with the DICOM node, as a site would run it (threshold 0: every
    study is called pathological, so that the tiny random model draws a box)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("CTSCREEN_TOKEN", None)
    command = [sys.executable, "-m", "ctscreen", "--log-level", "INFO", "serve"]
    command += ["-w", str(weights), "--data", str(data), "--port", str(http_port)]
    command += ["--precision", "fp32", "--backend", "torch", "--threshold", "0"]
    command += ["--dicom-port", str(dicom_port), "--ae-title", NODE_AET]
    command += ["--stable-seconds", str(stable_seconds), "--send-retry-seconds", str(retry_seconds)]
    command += ["--send-retry-max", str(retry_seconds * 4)]
    for peer in allow_ae:
        command += ["--allow-ae", peer]
    if send_to:
        command += ["--send-to", send_to]
    command += list(extra)
    log = log_file.open("ab")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"ctscreen serve exited: {log_file.read_text()[-3000:]}")
        try:
            return requests.get(f"{base}/readyz", timeout=2).ok and echo(dicom_port) == 0
        except requests.RequestException:
            return False

    try:
        wait_for(ready, timeout=180, interval=0.5)
    except BaseException:
        stop_process(server)  # a server that never became ready is not left running
        raise
    return server


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def echo(port: int, *, ae_title: str = NODE_AET, calling: str = "TESTSCU") -> int | None:
    """C-ECHO the node; its status, or None when no association could be made."""
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def store(port: int, paths: Sequence[Path], *, abort_after: int | None = None) -> list[int]:
    """C-STORE files to the node from a test SCU (``TESTSCU``); returns their statuses.
    With ``abort_after``, the association is aborted after that many files."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="TESTSCU")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established, "the node refused the association"
    statuses = []
    for i, ds in enumerate(datasets):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return statuses
        statuses.append(int(assoc.send_c_store(ds).Status))
    assoc.release()
    return statuses


def job_rows(http_port: int) -> list[dict]:
    """Every job of the service with its rows (newest first)."""
    base = f"http://127.0.0.1:{http_port}/api/v1/jobs"
    jobs = requests.get(base, timeout=10).json()
    items = jobs["jobs"] if isinstance(jobs, dict) else jobs
    return [requests.get(f"{base}/{job['id']}", timeout=10).json() for job in items]
