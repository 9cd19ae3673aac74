"""The SR and key images without a network: content read back, dciodvfy, node helpers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")

from ctscreen import Screener  # noqa: E402
from ctscreen.errors import ConfigError  # noqa: E402
from ctscreen.outputs.dicom import (  # noqa: E402
    RESEARCH_NOTE,
    Algorithm,
    build_key_images,
    build_sr,
    read_sr,
)
from ctscreen.service.node_answers import _ranges, missing_instances  # noqa: E402
from ctscreen.service.sender import backoff, parse_destination  # noqa: E402

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy(ds: pydicom.Dataset, path: Path) -> str:
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def screener(tiny_checkpoint: Path) -> Screener:
    # threshold 0: the tiny random model calls every study pathological, so it draws a box
    return Screener(tiny_checkpoint, device="cpu", backend="torch", precision="fp32", threshold=0)


@pytest.mark.parametrize("multiframe", [False, True], ids=["ct", "enhanced-ct"])
def test_sr_and_key_images_say_what_the_result_says(
    make_series, screener: Screener, tmp_path: Path, multiframe: bool
) -> None:
    paths, _ = make_series(seed=2, multiframe=multiframe)
    folder = paths[0].parent
    result = next(screener.score([folder], keep_image=True))
    assert result.ok and result.box is not None
    algorithm = Algorithm.from_run_info(screener.run_info())
    sr = build_sr(result, algorithm)
    pre = screener.config
    images = build_key_images(result, window=(pre.window_level, pre.window_width))

    findings = read_sr(sr)
    assert findings.probability == pytest.approx(result.probability, abs=1e-12)
    assert findings.pathology == result.pathology == 1
    assert findings.box == pytest.approx(result.box, abs=1e-3)  # SCOORD3D is float32
    assert findings.algorithm == (algorithm.name, algorithm.version)
    scored = {ref.sop_instance_uid for ref in result.slices}
    assert findings.referenced_sop_uids and set(findings.referenced_sop_uids) <= scored
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
    assert RESEARCH_NOTE in texts
    assert algorithm.weights_sha256 and len(algorithm.weights_sha256) == 64
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for ds in [sr, *images]:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName
    assert 2 <= len(images) <= 5
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    for sc in images:
        assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
        assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in scored
        # the research note is burned in as red text: the picture holds saturated red
        red = (sc.pixel_array[..., 0] > 150) & (sc.pixel_array[..., 1] < 60)
        assert red[-sc.Rows // 8 :].any()
    if DCIODVFY:
        for i, ds in enumerate([sr, *images]):
            report = dciodvfy(ds, tmp_path / f"{i}.dcm")
            assert "Error" not in report, report


def test_missing_instances_names_the_gaps(make_series) -> None:
    paths, _ = make_series(seed=1)
    folder = paths[0].parent
    numbers = {p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths}
    for path, number in numbers.items():
        if number in (5, 6, 7, 12):
            path.unlink()
    text = missing_instances(folder)
    assert "instance numbers 5-7, 12 missing, 20 received (1-24), and any after 24" in text
    assert _ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_destination_and_backoff() -> None:
    destination = parse_destination("PACS@10.0.0.5:104")
    assert (destination.ae_title, destination.host, destination.port) == ("PACS", "10.0.0.5", 104)
    for bad in ("PACS", "PACS@host", "PACS@host:0", "A_TITLE_LONGER_THAN_16@h:104"):
        with pytest.raises(ConfigError):
            parse_destination(bad)
    waits = [backoff(n, base=10, maximum=300) for n in range(1, 8)]
    assert waits == [10, 20, 40, 80, 160, 300, 300]
    assert np.all(np.diff(waits) >= 0)
