"""Every study the DICOM node receives is answered, whatever its headers look like.

Real exports fill the Patient and Study modules in every way the standard allows and
many it does not. Here one real chest series (Lung-PET-CT-Dx A0002, from
``../shared/data/dicom``) is sent over C-STORE as 20 studies, each with one kind of
header defect (Type 2 attributes missing or empty; invalid, legacy or too long dates,
times, names, ages and codes; three character sets and none; odd UID lengths;
private and retired attributes; a study in two associations; a series without
positions, which cannot be scored), plus the real GE head export. A study's defects
touch different attributes, and each attribute's defects are spread over studies,
so that every value is seen on its own. Each must come back to the calling AE
(a pynetdicom storage SCP of the test, addressed by ``--allow-ae AET@HOST:PORT``)
as an SR whose probability equals ``predict``'s for the same files, or as a "not
screened" SR whose study the API lists with its reason. Every SR and key image
passes dciodvfy, and ``GET /api/v1/dicom`` and ``/metrics`` count the studies.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
requests = pytest.importorskip("requests")

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    Comprehensive3DSRStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
)

from ctscreen import Screener  # noqa: E402
from ctscreen.outputs.dicom import read_sr  # noqa: E402
from dicom_helpers import NODE_AET, start_node, stop_process  # noqa: E402
from service_helpers import free_port, wait_for  # noqa: E402

SCU = "HOSPITALPACS"
SERIES = "chest-lung-pet-ct-dx-a0002/ct-series3-8mm-B40f"
SLICES = 16  # the node's least (--min-slices 16), contiguous so that the geometry holds
DCIODVFY = shutil.which("dciodvfy")


@dataclass(frozen=True)
class Variant:
    name: str
    change: Callable[[Dataset], None]
    screened: bool = True  # False: the study cannot be scored and gets "not screened"


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return change


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


def _raw(tag: int, vr: str, value: bytes | str) -> Callable[[Dataset], None]:
    """Write a value as raw bytes, whatever pydicom would say of it."""

    def change(ds: Dataset) -> None:
        data = value.encode("latin-1") if isinstance(value, str) else value
        if len(data) % 2:
            data += b" "
        ds.add(pydicom.DataElement(tag, vr, data))

    return change


def _private(ds: Dataset) -> None:
    block = ds.private_block(0x0011, "SOME VENDOR", create=True)
    block.add_new(0x01, "LO", "vendor's own value")
    block.add_new(0x02, "OB", b"\x00\x01\x02\x03")
    ds.add_new(0x00191010, "UN", b"garbage!")  # an unknown private element, no creator


def _retired(ds: Dataset) -> None:
    ds.add_new(0x00080010, "SH", "RECOG")  # RecognitionCode, retired
    ds.add_new(0x00101000, "LO", "OLD-ID")  # OtherPatientIDs, retired
    ds.add_new(0x00204000, "LT", "image comments are fine; retired ones too")


def _cyrillic(charset: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = "Иванов^Иван^Петрович"
        ds.StudyDescription = "КТ органов грудной клетки"
        ds.ReferringPhysicianName = "Петрова^Анна"

    return change


def _no_positions(ds: Dataset) -> None:
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
        if keyword in ds:
            delattr(ds, keyword)


def _all(*changes: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    """Several changes to different attributes, made together (one study for them all)."""

    def change(ds: Dataset) -> None:
        for one in changes:
            one(ds)

    return change


#: Each study carries the defects of its name; defects of one attribute are in different
#: studies, so that each value the node must clean, keep or drop is seen on its own.
VARIANTS: list[Variant] = [
    Variant("as exported", lambda ds: None),
    Variant(
        "GE-like: Type 2 attributes missing",
        _delete(
            "PatientBirthDate",
            "PatientSex",
            "PatientName",
            "PatientID",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyDate",
            "StudyTime",
            "BodyPartExamined",
            "FrameOfReferenceUID",
        ),
    ),
    Variant("Type 2 attributes empty", _set(StudyDate="", StudyTime="", PatientID="")),
    Variant(
        "invalid values: StudyDate 2025-13-45, StudyTime 25:61:00, PatientAge 45, PatientSex X",
        _all(
            _raw(0x00080020, "DA", "2025-13-45"),
            _raw(0x00100030, "DA", "19xx0101"),
            _raw(0x00080030, "TM", "25:61:00"),
            _raw(0x00101010, "AS", "45"),
            _raw(0x00100040, "CS", "X"),
        ),
    ),
    Variant(
        "invalid values: StudyDate 20251345, StudyTime text, PatientAge text, PatientSex male",
        _all(
            _raw(0x00080020, "DA", "20251345"),
            _raw(0x00080030, "TM", "noon"),
            _raw(0x00101010, "AS", "old"),
            _raw(0x00100040, "CS", "male"),
            _raw(0x00180015, "CS", "chest"),
        ),
    ),
    Variant(
        "legacy values: StudyDate 2007.04.25, StudyTime 17:33:33, PatientAge 045Y",
        _all(
            _raw(0x00080020, "DA", "2007.04.25"),
            _raw(0x00080030, "TM", "17:33:33"),
            _set(PatientAge="045Y"),
        ),
    ),
    Variant(
        "values too long: PatientName 80, StudyID 20, AccessionNumber 20, Issuer 90 characters",
        _all(
            _raw(0x00100010, "PN", "A" * 80),
            _raw(0x00200010, "SH", "S" * 20),
            _raw(0x00080050, "SH", "1" * 20),
            _raw(0x00100021, "LO", "I" * 90),
        ),
    ),
    Variant(
        "malformed names: PatientName of 7 components, ReferringPhysicianName '====='",
        _all(_raw(0x00100010, "PN", "a^b^c^d^e^f^g"), _raw(0x00080090, "PN", "=" * 5)),
    ),
    Variant("PatientName with a control character", _raw(0x00100010, "PN", "Doe\x07^John")),
    Variant("Cyrillic in ISO_IR 144", _cyrillic("ISO_IR 144")),
    Variant("Cyrillic in ISO_IR 192 (UTF-8)", _cyrillic("ISO_IR 192")),
    Variant(
        "Chinese in ISO_IR 192", _set(SpecificCharacterSet="ISO_IR 192", PatientName="王^小明")
    ),
    Variant("no SpecificCharacterSet, ASCII", _delete("SpecificCharacterSet")),
    Variant(
        "no SpecificCharacterSet, Latin-1 bytes",
        _all(_delete("SpecificCharacterSet"), _raw(0x00100010, "PN", "M\xfcller^J")),
    ),
    Variant("unknown SpecificCharacterSet", _set(SpecificCharacterSet="ISO_IR 999")),
    Variant("private tags and retired attributes", _all(_private, _retired)),
    Variant("no positions (cannot be scored)", _no_positions, screened=False),
]
INVALID_1, INVALID_2, LEGACY = (VARIANTS[i].name for i in (3, 4, 5))
#: variants whose UIDs are shaped on purpose (odd lengths, 64 characters)
UID_SHAPES = {"odd-length UIDs": 57, "UIDs of 64 characters": 64}
TWO_ASSOCIATIONS = "sent in two associations"


def _uid(root: str, *parts: object, length: int | None = None) -> str:
    """A deterministic UID under ``root`` (``length`` characters when given)."""
    import hashlib

    digits = str(int(hashlib.sha256(repr(parts).encode()).hexdigest(), 16))
    uid = f"{root}.{digits}"
    if length is not None:
        uid = uid[:length].rstrip(".")
        while len(uid) < length:
            uid += "1"
        if uid[-2:-1] == ".":
            uid = uid[:-1] + "2"
    return uid[:64]


def _write_variant(
    sources: list[Dataset],
    folder: Path,
    index: int,
    change: Callable[[Dataset], None],
    length: int | None,
) -> tuple[str, list[Path]]:
    """The series as a new study with one header variant; its StudyInstanceUID and files."""
    root = "1.2.826.0.1.3680043.10.1138"
    study_uid = _uid(root, "study", index, length=length)
    series_uid = _uid(root, "series", index, length=length)
    folder.mkdir(parents=True)
    paths = []
    for n, source in enumerate(sources):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = _uid(root, "sop", index, n, length=length)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        change(ds)
        path = folder / f"{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return study_uid, paths


class ResultsScp:
    """The calling PACS's storage SCP: keeps every SR and SC it is sent, by study."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: dict[str, list[Dataset]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=SCU)
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        return 0x0000

    def of(self, study_uid: str) -> list[Dataset]:
        with self._lock:
            return list(self.received.get(study_uid, []))

    def stop(self) -> None:
        self._server.shutdown()


def _send(port: int, paths: list[Path]) -> list[int]:
    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def sent(
    dicom_root: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """One node, every variant sent to it, and what came back."""
    root = tmp_path_factory.mktemp("headers")
    files = sorted((dicom_root / SERIES).glob("*.dcm"))
    sources = sorted((pydicom.dcmread(p) for p in files), key=lambda ds: int(ds.InstanceNumber))[
        :SLICES
    ]
    studies: dict[str, dict] = {}
    cases = [(v.name, v.change, None, v.screened) for v in VARIANTS]
    cases += [(name, lambda ds: None, length, True) for name, length in UID_SHAPES.items()]
    cases += [(TWO_ASSOCIATIONS, lambda ds: None, None, True)]
    for index, (name, change, length, screened) in enumerate(cases):
        uid, paths = _write_variant(sources, root / f"v{index:02d}", index, change, length)
        studies[name] = {"uid": uid, "paths": paths, "screened": screened}
    head = sorted(
        p for p in (dicom_root / "edge-gantry-tilt-ge-head").iterdir() if p.suffix == ".dcm"
    )
    head_uid = str(pydicom.dcmread(head[0], stop_before_pixels=True).StudyInstanceUID)
    studies["GE head export (not a chest CT)"] = {"uid": head_uid, "paths": head, "screened": False}

    scp = ResultsScp(free_port())
    weights = root / "model.pth"
    shutil.copy(tiny_checkpoint, weights)
    http_port, dicom_port = free_port(), free_port()
    server = start_node(
        root / "data",
        weights,
        http_port=http_port,
        dicom_port=dicom_port,
        send_to=None,  # answers go back to the calling AE
        stable_seconds=2.0,
        log_file=root / "serve.log",
        allow_ae=(f"{SCU}@127.0.0.1:{scp.port}", "TESTSCU"),  # TESTSCU: the ready check
        # a late series is scored with the earlier ones only while their instances are kept
        extra=("--keep-uploads", "1h"),
    )
    try:
        for name, study in studies.items():
            paths = study["paths"]
            if name == TWO_ASSOCIATIONS:
                half = len(paths) // 2
                statuses = _send(dicom_port, paths[:half]) + _send(dicom_port, paths[half:])
            else:
                statuses = _send(dicom_port, paths)
            assert statuses == [0] * len(paths), (name, statuses)
        base = f"http://127.0.0.1:{http_port}"

        def all_answered() -> dict | None:
            status = requests.get(f"{base}/api/v1/dicom?limit=1000", timeout=10).json()
            counts = status["studies"]
            done = (
                counts["received"] == len(studies)
                and counts["scoring"] == 0
                and status["outbox"]["pending"] == 0
            )
            return status if done else None

        status = wait_for(all_answered, timeout=900, interval=2)
        metrics = requests.get(f"{base}/metrics", timeout=10).text
        # A late series: another series of an answered study comes after its answer.
        first = studies["as exported"]
        late = root / "late"
        late.mkdir()
        late_paths = []
        for n, path in enumerate(first["paths"]):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = _uid("1.2.826.0.1.3680043.10.1138", "late-series")
            ds.SOPInstanceUID = _uid("1.2.826.0.1.3680043.10.1138", "late", n)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = 77
            late_paths.append(late / f"{n:03d}.dcm")
            ds.save_as(late_paths[-1], enforce_file_format=False)
        assert _send(dicom_port, late_paths) == [0] * len(late_paths)

        def two_reports() -> list[Dataset] | None:
            srs = [ds for ds in scp.of(first["uid"]) if ds.SOPClassUID == Comprehensive3DSRStorage]
            return srs if len(srs) == 2 else None

        late_srs = wait_for(two_reports, timeout=300, interval=1)
        yield {
            "studies": studies,
            "scp": scp,
            "status": status,
            "metrics": metrics,
            "root": root,
            "late": {"srs": late_srs, "paths": [*first["paths"], *late_paths]},
        }
    finally:
        stop_process(server)
        scp.stop()


def test_every_variant_is_answered_with_predicts_probability_or_not_screened(
    sent: dict, tiny_checkpoint: Path
) -> None:
    screener = Screener(
        tiny_checkpoint, device="cpu", backend="torch", precision="fp32", threshold=0
    )
    studies, scp = sent["studies"], sent["scp"]
    assert len(studies) == len(VARIANTS) + len(UID_SHAPES) + 2
    by_uid = {s["study_uid"]: s for s in sent["status"]["recent_studies"]}
    nothing_back = [name for name, s in studies.items() if not scp.of(s["uid"])]
    assert nothing_back == []
    for name, study in studies.items():
        answer = scp.of(study["uid"])
        srs = [
            ds
            for ds in answer
            if ds.SOPClassUID == Comprehensive3DSRStorage
            and "PredecessorDocumentsSequence" not in ds  # the late series' new answer
        ]
        assert len(srs) == 1, name
        findings = read_sr(srs[0])
        (expected,) = list(screener.score([study["paths"][0].parent]))
        assert findings.screened == expected.ok == study["screened"], (name, expected.error)
        if expected.ok:
            assert findings.probability == pytest.approx(expected.probability, abs=1e-6), name
            assert by_uid[study["uid"]]["outcome"] == "screened"
        else:
            assert findings.probability is None
            # the same sentence as predict's, but for the folder it names (the node's own)
            sentence = expected.error.split(" in /")[0]
            assert sentence in findings.comments[0], name
            node_study = by_uid[study["uid"]]
            assert node_study["outcome"] == "not_screened" and node_study["failed"] >= 1
            assert node_study["reason"].startswith(sentence)
        sr = srs[0]
        assert sr.StudyInstanceUID == study["uid"]
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
            assert keyword in sr, (name, keyword)  # Type 2: present, empty when unknown


def test_values_are_kept_cleaned_or_dropped_as_the_standard_says(sent: dict) -> None:
    studies, scp = sent["studies"], sent["scp"]

    def sr_of(name: str) -> Dataset:
        return next(
            ds for ds in scp.of(studies[name]["uid"]) if ds.SOPClassUID == Comprehensive3DSRStorage
        )

    assert sr_of(INVALID_1).StudyDate == ""
    assert sr_of(LEGACY).StudyDate == "20070425"
    assert sr_of(LEGACY).StudyTime == "173333"
    assert sr_of(INVALID_2).PatientSex == ""
    assert sr_of("as exported").PatientSex == "F"
    assert "PatientAge" not in sr_of(INVALID_1)
    assert sr_of(LEGACY).PatientAge == "045Y"
    cyrillic = sr_of("Cyrillic in ISO_IR 144")
    assert cyrillic.SpecificCharacterSet == "ISO_IR 144"
    assert str(cyrillic.PatientName) == "Иванов^Иван^Петрович"
    assert str(sr_of("Cyrillic in ISO_IR 192 (UTF-8)").PatientName) == "Иванов^Иван^Петрович"
    assert str(sr_of("Chinese in ISO_IR 192").PatientName) == "王^小明"
    private = sr_of("private tags and retired attributes")
    assert not any(element.tag.is_private for element in private.iterall())
    assert "RecognitionCode" not in private
    comments = read_sr(sr_of(INVALID_1)).comments
    assert any("StudyDate '2025-13-45' is not a date" in c for c in comments)
    for name, length in UID_SHAPES.items():
        assert len(studies[name]["uid"]) == length
        assert sr_of(name).StudyInstanceUID == studies[name]["uid"]


def test_a_late_series_gets_a_new_sr_that_supersedes_the_first(
    sent: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    first, second = sent["late"]["srs"]
    assert "PredecessorDocumentsSequence" not in first
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID
    # The new answer scores the study as it now is: both series, as predict would.
    both = tmp_path / "both"
    both.mkdir()
    for n, path in enumerate(sent["late"]["paths"]):
        shutil.copy(path, both / f"{n:03d}.dcm")
    screener = Screener(
        tiny_checkpoint, device="cpu", backend="torch", precision="fp32", threshold=0
    )
    (expected,) = list(screener.score([both]))
    assert read_sr(second).probability == pytest.approx(expected.probability, abs=1e-6)


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools' dciodvfy is not installed")
def test_every_answer_passes_dciodvfy(sent: dict) -> None:
    failures = {}
    folder = sent["root"] / "answers"
    folder.mkdir()
    for name, study in sent["studies"].items():
        answer = sent["scp"].of(study["uid"])
        # the SR and the first key image of each study (the others differ only in pixels)
        checked = [ds for ds in answer if ds.SOPClassUID == Comprehensive3DSRStorage]
        checked += [ds for ds in answer if ds.SOPClassUID == SecondaryCaptureImageStorage][:1]
        for i, ds in enumerate(checked):
            path = folder / f"{len(failures)}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            report = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
            errors = [
                line
                for line in (report.stdout + report.stderr).splitlines()
                if line.startswith("Error")
            ]
            if errors:
                failures[f"{name} {ds.Modality}"] = errors
    assert failures == {}


def test_api_and_metrics_count_exactly_what_was_received(sent: dict) -> None:
    studies = sent["studies"]
    counts = sent["status"]["studies"]
    not_screened = sum(1 for s in studies.values() if not s["screened"])
    assert counts["received"] == len(studies)
    assert counts["not_screened"] == not_screened
    assert counts["screened"] == len(studies) - not_screened
    assert counts["answered"] == len(studies) and counts["unanswered"] == 0
    assert sent["status"]["outbox"]["failed"] == not_screened
    assert sent["status"]["outbox"]["pending"] == 0
    lines = dict(
        line.rsplit(" ", 1) for line in sent["metrics"].splitlines() if not line.startswith("#")
    )
    assert float(lines['ctscreen_dicom_studies{state="received"}']) == len(studies)
    assert float(lines['ctscreen_dicom_studies{state="not_screened"}']) == not_screened
    assert float(lines["ctscreen_dicom_unanswered_studies"]) == 0
    assert float(lines['ctscreen_dicom_outbox{state="failed"}']) == not_screened
