"""The edge cases of the real-data tests, rebuilt from synthetic DICOM so they run
everywhere (the real files in ``../shared/data/dicom`` are not on a user's machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctscreen.dicom.discover import discover
from ctscreen.dicom.select import select_series
from ctscreen.dicom.volume import build_volume
from ctscreen.errors import SeriesSelectionError
from ctscreen.synth.dicom_writer import uid_from, write_localizer, write_secondary_capture

UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _one_study(folder: Path, tmp_path: Path):  # noqa: ANN202
    found = discover(folder, work_dir=tmp_path / "work")
    assert len(found.studies) == 1, [s.key for s in found.studies]
    return found.studies[0]


def test_blank_uids_fall_back_to_folder_grouping_and_say_so(make_series, tmp_path: Path) -> None:
    paths, phantom = make_series(seed=11, name="blank")
    sop_uids = []
    for path in paths:  # aggressive anonymisation: the UIDs are present but empty
        ds = pydicom.dcmread(path)
        sop_uids.append(str(ds.SOPInstanceUID))
        for keyword in UID_KEYWORDS:
            setattr(ds, keyword, "")
        ds.save_as(path)
    study = _one_study(paths[0].parent, tmp_path)
    assert study.study_uid == ""
    assert any(f"StudyInstanceUID is empty in {len(paths)} file(s)" in w for w in study.warnings)
    volume = build_volume(select_series(study.series).best.series)
    assert volume.shape == phantom.hu.shape
    # the file meta kept the SOP instance UIDs: per-slice output can still name the slices
    assert sorted(volume.sop_instance_uids) == sorted(sop_uids)


def test_localizer_and_secondary_capture_alone_are_rejected_by_name(
    make_series, tmp_path: Path
) -> None:
    _, phantom = make_series(seed=12, name="unused")
    study_uid = str(uid_from("edge-study", 12))
    folder = tmp_path / "scouts"
    write_localizer(
        phantom.hu,
        spacing=(5.0, 5.0, 5.0),
        out_dir=folder,
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "scout")),
        extensionless=True,
    )
    write_secondary_capture(
        phantom.hu,
        out_dir=folder,
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "sc")),
        extensionless=True,
    )
    study = _one_study(folder, tmp_path)
    assert len(study.series) == 2
    with pytest.raises(SeriesSelectionError) as info:
        select_series(study.series)
    assert "localizer" in info.value.message
    assert "Secondary Capture Image Storage" in info.value.message


@pytest.mark.parametrize("patient_position", ["HFS", "FFS"])
def test_enhanced_multiframe_geometry_comes_from_functional_groups(
    make_series, tmp_path: Path, patient_position: str
) -> None:
    paths, phantom = make_series(
        seed=13, name=f"mf-{patient_position}", multiframe=True, patient_position=patient_position
    )
    assert len(paths) == 1
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert "ImagePositionPatient" not in ds  # geometry lives in the functional groups only
    assert "PerFrameFunctionalGroupsSequence" in ds
    study = _one_study(paths[0].parent, tmp_path)
    series = study.series[0]
    assert series.n_frames == phantom.hu.shape[0]
    volume = build_volume(series)
    assert volume.shape == phantom.hu.shape
    assert volume.spacing == pytest.approx((5.0, 5.0, 5.0))
    assert sorted(s.frame for s in volume.slices) == list(range(1, phantom.hu.shape[0] + 1))
    # canonical orientation: the same anatomy whichever way the patient lay
    assert np.abs(volume.hu - phantom.hu).max() <= 1.0
