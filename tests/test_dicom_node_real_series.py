"""Every real CT study, sent by a real PACS, comes back to it with an SR.

All the real public DICOM in ``../shared/data/dicom`` is stored in Debian's Orthanc;
Orthanc then sends each study holding CT images to ``ctscreen serve --dicom-port``
(its modality ``ctscreen``), and ctscreen sends its answers back to Orthanc. The three
chest series come back screened with ``predict``'s probability for the same files;
every other CT study (head, abdomen, tilted gantry, odd codecs, localizers, single
slices) comes back too: screened, or "not screened" with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
requests = pytest.importorskip("requests")

from ctscreen import Screener  # noqa: E402
from ctscreen.outputs.dicom import read_sr  # noqa: E402
from dicom_helpers import ORTHANC, Orthanc  # noqa: E402
from test_dicom_node import node, pacs, results_in  # noqa: E402, F401 - fixtures

pytestmark = pytest.mark.skipif(
    not Path(ORTHANC).is_file(), reason="Orthanc is not installed (apt-get install orthanc)"
)

CT_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"}
CHEST = {
    "chest-lidc-idri-0001": "ct-series-2.5mm",
    "chest-lung-pet-ct-dx-a0001": "ct-series2-5mm-kernelL",
    "chest-lung-pet-ct-dx-a0002": "ct-series3-8mm-B40f",
}


def _store_everything(pacs: Orthanc, root: Path) -> int:
    """Store every file of the real data in Orthanc (what it refuses is left out)."""
    stored = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() in (".xml", ".md"):
            continue
        answer = requests.post(f"{pacs.url}/instances", data=path.read_bytes(), timeout=60)
        stored += answer.ok
    return stored


def _ct_studies(pacs: Orthanc) -> dict[str, str]:
    """Orthanc id -> StudyInstanceUID of every study that holds a CT image."""
    found = {}
    for study_id in pacs.get("/studies"):  # type: ignore[union-attr]
        study = pacs.get(f"/studies/{study_id}")
        for instance in pacs.get(f"/studies/{study_id}/instances"):  # type: ignore[union-attr]
            tags = pacs.get(f"/instances/{instance['ID']}/simplified-tags")
            if tags.get("SOPClassUID") in CT_IMAGE_CLASSES:  # type: ignore[union-attr]
                found[str(study_id)] = study["MainDicomTags"]["StudyInstanceUID"]  # type: ignore[index]
                break
    return found


def test_every_real_ct_study_sent_by_orthanc_comes_back_with_an_sr(
    dicom_root: Path, pacs: Orthanc, node: dict, tiny_checkpoint: Path
) -> None:
    assert _store_everything(pacs, dicom_root) > 250
    studies = _ct_studies(pacs)
    assert len(studies) >= 10  # the three chest series and the CT edge cases
    for orthanc_id in studies:
        pacs.post("/modalities/ctscreen/store", json={"Resources": [orthanc_id], "Timeout": 120})

    def answered() -> dict[str, list] | None:
        found = {uid: results_in(pacs, uid)["SR"] for uid in studies.values()}
        return found if all(found.values()) else None

    deadline = time.monotonic() + 600
    found = None
    while found is None and time.monotonic() < deadline:
        found = answered()
        time.sleep(2)
    missing = [uid for uid in studies.values() if not results_in(pacs, uid)["SR"]]
    assert missing == [], f"no SR came back for {missing}"
    assert found is not None

    screener = Screener(
        tiny_checkpoint, device="cpu", backend="torch", precision="fp32", threshold=0
    )
    chest_uids = set()
    for folder, series in CHEST.items():
        (expected,) = list(screener.score([dicom_root / folder / series]))
        assert expected.ok, expected.error
        chest_uids.add(expected.study_uid)
        (sr,) = found[expected.study_uid]
        findings = read_sr(sr)
        assert findings.screened, findings.comments
        assert findings.probability == pytest.approx(expected.probability, abs=1e-6), folder
    status = requests.get(
        f"http://127.0.0.1:{node['http_port']}/api/v1/dicom?limit=1000", timeout=10
    ).json()
    counts = status["studies"]
    assert counts["received"] == len(studies) and counts["unanswered"] == 0
    reasons = {s["study_uid"]: s for s in status["recent_studies"]}
    for uid, srs in found.items():
        if uid in chest_uids:
            continue
        findings = read_sr(srs[0])
        if not findings.screened:  # the reason is said, in the SR and in the API
            assert findings.comments[0].startswith("NOT SCREENED by ctscreen: ")
            assert reasons[uid]["outcome"] == "not_screened" and reasons[uid]["reason"]
