"""The DICOM core on real, public CT exports (skipped where the data is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ctscreen.dicom.discover import discover
from ctscreen.dicom.select import select_series
from ctscreen.dicom.volume import build_volume
from ctscreen.errors import CtscreenError, NoDicomError, SeriesSelectionError

REAL = Path(
    os.environ.get(
        "CTSCREEN_TEST_DICOM", Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
    )
)

pytestmark = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real DICOM test data not found at {REAL}"
)


def _study(folder: str, tmp_path: Path):
    found = discover(REAL / folder, work_dir=tmp_path / "work")
    assert len(found.studies) == 1, [s.key for s in found.studies]
    return found, found.studies[0]


@pytest.mark.parametrize(
    ("folder", "n_slices", "spacing", "series_suffix"),
    [
        ("chest-lidc-idri-0001", 133, (2.5, 0.703125, 0.703125), "179049373636438705059720603192"),
        (
            "chest-lung-pet-ct-dx-a0001",
            64,
            (5.0, 0.841797, 0.841797),
            "257508444832901632590301540805",
        ),
        (
            "chest-lung-pet-ct-dx-a0002",
            30,
            (8.0, 0.646484, 0.646484),
            "207154000096236603057216610983",
        ),
    ],
)
def test_chest_series_load_with_right_geometry_and_hu(
    tmp_path: Path,
    folder: str,
    n_slices: int,
    spacing: tuple[float, float, float],
    series_suffix: str,
) -> None:
    found, study = _study(folder, tmp_path)
    # the XML annotations beside the series are skipped, with a warning
    assert found.n_skipped > 0 and "not DICOM" in found.warnings[0]
    selection = select_series(study.series)
    assert selection.best.series_uid.endswith(series_suffix)
    volume = build_volume(selection.best.series)
    assert volume.shape == (n_slices, 512, 512)
    assert volume.spacing == pytest.approx(spacing, abs=1e-3)
    assert len(volume.slices) == n_slices and len(set(volume.sop_instance_uids)) == n_slices
    hu = volume.hu
    # air inside and around the body sits near -1000 HU
    air = hu[(hu > -1100) & (hu < -900)]
    assert air.size > 0.2 * hu.size
    assert -1010 < float(np.median(air)) < -960
    # the soft-tissue peak (muscle, blood; fat peaks near -100) lies between 0 and 100 HU
    soft = hu[(hu > -30) & (hu < 200)]
    counts, edges = np.histogram(soft, bins=46, range=(-30, 200))
    peak = edges[int(np.argmax(counts))]
    assert 0 <= peak <= 100
    # canonical orientation: depth runs feet -> head, so z grows along axis 0
    assert volume.affine[2, 0] > 0
    z = volume.affine[2, 3] + volume.affine[2, 0] * np.arange(n_slices)
    assert np.all(np.diff(z) > 0)


def test_slices_are_ordered_by_position_not_instance_number(tmp_path: Path) -> None:
    _, study = _study("chest-lidc-idri-0001", tmp_path)
    volume = build_volume(select_series(study.series).best.series)
    by_uid = {h.sop_instance_uid: h for h in study.series[0].instances}
    z = [by_uid[s.sop_instance_uid].frames[0].position[2] for s in volume.slices]
    assert z == sorted(z)
    assert volume.instance_numbers[0] != volume.instance_numbers[-1]


def test_fifteen_transfer_syntax_copies_are_not_stacked(tmp_path: Path) -> None:
    _, study = _study(
        "edge-ct-transfer-syntaxes/ctimage-same-instance-15-transfer-syntaxes", tmp_path
    )
    assert len(study.series[0].instances) == 15
    with pytest.raises(SeriesSelectionError, match=r"too few slices \(1 <"):
        select_series(study.series)


def test_empty_uids_fall_back_to_folder_grouping_and_say_so(tmp_path: Path) -> None:
    found, study = _study("edge-empty-uids-totalseg-abdomen", tmp_path)
    assert study.study_uid == ""
    assert any("StudyInstanceUID is empty in 20 file(s)" in w for w in study.warnings)
    volume = build_volume(select_series(study.series).best.series)
    assert volume.shape == (20, 512, 512)
    assert all(uid.startswith("1.3.12.2.1107.5.1.4.60064") for uid in volume.sop_instance_uids)


def test_gantry_tilt_and_uneven_spacing_are_reported(tmp_path: Path) -> None:
    _, study = _study("edge-gantry-tilt-ge-head", tmp_path)
    volume = build_volume(select_series(study.series).best.series)
    assert volume.shape[0] == 28
    text = " ".join(volume.warnings)
    assert "gantry tilt of 18.5°" in text
    assert "non-uniform slice spacing" in text


def test_localizer_and_secondary_capture_are_rejected_by_name(tmp_path: Path) -> None:
    _, study = _study("edge-philips-localizer-and-sc", tmp_path)
    with pytest.raises(SeriesSelectionError) as info:
        select_series(study.series)
    assert "localizer" in info.value.message
    assert "Secondary Capture Image Storage" in info.value.message


def test_enhanced_multiframe_geometry_comes_from_functional_groups(tmp_path: Path) -> None:
    _, study = _study("edge-pydicom-samples/enhanced-ct-2frame-perfusion", tmp_path)
    series = study.series[0]
    assert series.n_frames == 2
    volume = build_volume(series)
    assert volume.shape == (2, 512, 512)
    assert [s.frame for s in volume.slices] in ([1, 2], [2, 1])
    assert volume.spacing[1] == pytest.approx(0.388672)
    assert volume.hu.min() >= -1024  # rescale intercept -1024 from the shared groups


@pytest.mark.parametrize(
    "folder", sorted(p.name for p in REAL.iterdir() if p.is_dir()) if REAL.is_dir() else []
)
def test_every_folder_gives_a_volume_or_a_specific_error(tmp_path: Path, folder: str) -> None:
    found = discover(REAL / folder, work_dir=tmp_path / "work")
    for study in found.studies:
        try:
            selection = select_series(study.series)
        except SeriesSelectionError as exc:
            assert exc.message.endswith(".")
            continue
        for candidate in selection.chosen:
            try:
                volume = build_volume(candidate.series)
            except CtscreenError as exc:
                assert exc.code in {"VOLUME", "DECODE"}
                continue
            assert volume.hu.dtype == np.float32 and np.isfinite(volume.hu).all()


def test_undecodable_jpeg_names_its_transfer_syntax(tmp_path: Path) -> None:
    from ctscreen.dicom.volume import _file_frames

    _, study = _study(
        "edge-ct-transfer-syntaxes/ctimage-same-instance-15-transfer-syntaxes", tmp_path
    )
    (p68,) = [h for h in study.series[0].instances if h.transfer_syntax == "1.2.840.10008.1.2.4.53"]
    with pytest.raises(
        CtscreenError, match=r"JPEG Spectral Selection.*1\.2\.840\.10008\.1\.2\.4\.53"
    ):
        list(_file_frames(p68, {None}))


def test_folder_of_junk_is_no_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("not an image")
    (junk / "DICOMDIR").write_bytes(b"\0" * 200)
    with pytest.raises(NoDicomError, match="none of them DICOM"):
        discover(junk, work_dir=tmp_path / "work")


@pytest.mark.parametrize(
    "folder", ["chest-lidc-idri-0001", "chest-lung-pet-ct-dx-a0001", "chest-lung-pet-ct-dx-a0002"]
)
def test_direct_pixel_read_equals_pydicom(tmp_path: Path, folder: str) -> None:
    import pydicom

    from ctscreen.dicom.volume import _file_frames

    _, study = _study(folder, tmp_path)
    headers = study.series[0].instances
    assert all(h.native_pixels is not None for h in headers)
    for header in headers[:: max(1, len(headers) // 5)]:
        ((_, fast),) = list(_file_frames(header, {None}))
        np.testing.assert_array_equal(fast, pydicom.dcmread(header.path).pixel_array)


def test_truncated_uncompressed_files_are_skipped_as_damaged(tmp_path: Path) -> None:
    import shutil

    source = REAL / "chest-lung-pet-ct-dx-a0002" / "ct-series3-8mm-B40f"
    copy = tmp_path / "series"
    shutil.copytree(source, copy)
    files = sorted(copy.iterdir())
    cut_pixels, cut_header = files[5], files[9]
    cut_pixels.write_bytes(cut_pixels.read_bytes()[:-1000])  # pydicom defers it: no complaint
    cut_header.write_bytes(cut_header.read_bytes()[:600])  # parses into a UID-less fragment
    found = discover(copy, work_dir=tmp_path / "work")
    assert len(found.studies) == 1  # the fragment did not become a study of its own
    [note] = [w for w in found.warnings if "damaged" in w]
    assert note.startswith("skipped 2 damaged DICOM file(s)")
    assert cut_pixels.name in note and cut_header.name in note
    volume = build_volume(select_series(found.studies[0].series).best.series)
    assert volume.shape[0] == len(files) - 2
    assert any(w.startswith("gap in the slices") for w in volume.warnings)
