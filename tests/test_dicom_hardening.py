"""The DICOM boundary against damaged and hostile input: one behaviour per case of issue 13."""

from __future__ import annotations

import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctscreen.dicom.archive import MAX_NAME_BYTES, extract_zip
from ctscreen.dicom.discover import discover, regular_files
from ctscreen.dicom.volume import build_volume
from ctscreen.errors import InputError, NoDicomError, VolumeError
from ctscreen.explain import localization_box, sigmoid, slice_scores
from ctscreen.volume import Volume, canonical_permutation


def _edit(path: Path, **values: object) -> None:
    """Rewrite one file with new (possibly absurd) element values; None deletes a tag."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=False)


def _series(paths: list[Path], tmp_path: Path, name: str = "w"):
    found = discover(paths[0].parent, work_dir=tmp_path / name)
    return found, found.studies[0].series[0]


# --------------------------------------------------------------------------- special files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_in_a_folder_is_named_and_never_opened(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=1)
    os.mkfifo(paths[0].parent / "pipe")  # open() on it would block forever
    found, series = _series(paths, tmp_path)
    assert len(series.instances) == len(paths)
    assert any("pipe (a named pipe (FIFO))" in w for w in found.warnings)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_as_the_input_is_an_input_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match=r"pipe is a named pipe \(FIFO\), not a regular file"):
        discover(tmp_path / "pipe", work_dir=tmp_path / "w")


def test_links_are_followed_only_inside_the_input(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=1)
    folder = paths[0].parent
    outside = tmp_path / "outside.dcm"
    shutil.copy(paths[0], outside)
    (folder / "escape").symlink_to(outside)
    (folder / "inside").symlink_to(paths[1])
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    files, left_out = regular_files(folder)
    names = {p.name for p in files}
    assert "inside" in names and "escape" not in names
    assert "escape (a symbolic link pointing outside the input)" in left_out
    assert "loop (a symbolic link to a folder)" in left_out


# --------------------------------------------------------------------------- rescale


@pytest.mark.parametrize(
    ("values", "tag"),
    [
        ({"RescaleSlope": "NaN"}, "RescaleSlope is nan"),
        ({"RescaleSlope": "0"}, "RescaleSlope is 0; it must be positive"),
        ({"RescaleSlope": "1e30"}, "RescaleSlope is 1e+30, above the physical bound"),
        ({"RescaleIntercept": "inf"}, "RescaleIntercept is inf, not a finite number"),
    ],
)
def test_untrustworthy_rescale_in_every_file_fails_naming_file_and_tag(
    make_series, tmp_path: Path, values: dict[str, str], tag: str
) -> None:
    paths, _ = make_series(seed=2)
    for path in paths:
        _edit(path, **values)
    _, series = _series(paths, tmp_path)
    with pytest.raises(VolumeError, match="HU values cannot be trusted") as caught:
        build_volume(series, decode_workers=1)
    assert tag in caught.value.message
    assert paths[0].name in caught.value.message or any(
        p.name in caught.value.message for p in paths
    )


def test_one_file_with_a_nan_slope_is_skipped_and_leaves_a_gap(make_series, tmp_path: Path) -> None:
    paths, phantom = make_series(seed=2)
    victim = sorted(paths)[10]
    _edit(victim, RescaleSlope="NaN")
    _, series = _series(paths, tmp_path)
    volume = build_volume(series, decode_workers=1)
    assert volume.shape[0] == phantom.hu.shape[0] - 1
    assert np.isfinite(volume.hu).all()
    skipped = [w for w in volume.warnings if w.startswith("skipped 1 unusable slice(s)")]
    assert skipped and victim.name in skipped[0] and "RescaleSlope is nan" in skipped[0]
    assert any(w.startswith("gap in the slices") for w in volume.warnings)


def test_missing_rescale_everywhere_is_scored_with_a_warning(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=2)
    for path in paths:
        _edit(path, RescaleSlope=None, RescaleIntercept=None)
    _, series = _series(paths, tmp_path)
    volume = build_volume(series, decode_workers=1)
    assert any(
        w.startswith(f"RescaleSlope and RescaleIntercept are missing in {len(paths)} of")
        for w in volume.warnings
    )


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("values", "tag"),
    [
        ({"PixelSpacing": [0, 0]}, "PixelSpacing 0\\0 mm is outside the physical range"),
        ({"PixelSpacing": [-5, -5]}, "PixelSpacing -5\\-5 mm is outside the physical range"),
        ({"PixelSpacing": [1e9, 1e9]}, "PixelSpacing 1e+09\\1e+09 mm is outside"),
        (
            {"ImageOrientationPatient": [1, 0, 0, 0.6, 0.8, 0]},
            "ImageOrientationPatient 1\\0\\0\\0.6\\0.8\\0 is not orthogonal",
        ),
        ({"ImageOrientationPatient": [2, 0, 0, 0, 2, 0]}, "does not hold unit vectors"),
    ],
)
def test_unphysical_geometry_fails_naming_the_tag(
    make_series, tmp_path: Path, values: dict[str, object], tag: str
) -> None:
    paths, _ = make_series(seed=3)
    for path in paths:
        _edit(path, **values)
    _, series = _series(paths, tmp_path)
    with pytest.raises(VolumeError) as caught:
        build_volume(series, decode_workers=1)
    assert tag in caught.value.message


def test_an_impossible_position_in_one_file_is_skipped(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=3)
    victim = sorted(paths)[5]
    _edit(victim, ImagePositionPatient=[0, 0, 1e12])
    _, series = _series(paths, tmp_path)
    volume = build_volume(series, decode_workers=1)
    note = next(w for w in volume.warnings if w.startswith("skipped 1 unusable slice(s)"))
    assert victim.name in note and "ImagePositionPatient" in note
    assert abs(volume.affine[2, 3]) < 1000  # the box cannot reach 1e12 mm


def test_a_degenerate_affine_is_a_volume_error_not_an_index_error() -> None:
    affine = np.eye(4)
    affine[:3, 1] = 0.0  # a zero pixel spacing
    with pytest.raises(VolumeError, match="do not span 3D space"):
        canonical_permutation(affine)


# --------------------------------------------------------------------------- descriptors


@pytest.mark.parametrize(
    ("values", "tag"),
    [
        ({"NumberOfFrames": "999999"}, "NumberOfFrames is 999999"),
        ({"NumberOfFrames": "3"}, "NumberOfFrames is 3 but PixelData holds 1 frame(s)"),
        ({"Rows": 0}, "Rows is 0"),
        ({"BitsAllocated": None}, "BitsAllocated is missing"),
        ({"PixelRepresentation": 2}, "PixelRepresentation is 2"),
        ({"ImagePositionPatient": None}, "ImagePositionPatient is missing"),
    ],
)
def test_one_file_with_a_bad_descriptor_is_skipped_and_named(
    make_series, tmp_path: Path, values: dict[str, object], tag: str
) -> None:
    paths, phantom = make_series(seed=4)
    victim = sorted(paths)[12]
    _edit(victim, **values)
    _, series = _series(paths, tmp_path)
    volume = build_volume(series, decode_workers=1)
    assert volume.shape[0] == phantom.hu.shape[0] - 1
    note = next(w for w in volume.warnings if w.startswith("skipped 1 unusable slice(s)"))
    assert victim.name in note and tag in note


def test_bad_descriptors_in_most_files_fail_the_series(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=4)
    for path in sorted(paths)[: len(paths) // 2 + 1]:
        _edit(path, Rows=0)
    _, series = _series(paths, tmp_path)
    with pytest.raises(VolumeError, match=r"13 of 24 slices of this series cannot be used.*Rows"):
        build_volume(series, decode_workers=1)


def test_a_raw_file_that_cannot_be_read_is_not_called_compressed(
    make_series, tmp_path: Path
) -> None:
    paths, _ = make_series(seed=5)
    victim = sorted(paths)[3]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]  # length no longer rows x columns
    ds.save_as(victim, enforce_file_format=False)
    _, series = _series(paths, tmp_path)
    volume = build_volume(series, decode_workers=1)
    note = next(w for w in volume.warnings if "pixel data cannot be read" in w)
    assert victim.name in note and "stored uncompressed as Explicit VR Little Endian" in note
    assert "compressed as" not in note.replace("uncompressed as", "")


# --------------------------------------------------------------------------- parsing


def nested_sequence_bytes(depth: int) -> bytes:
    """(0040,A730) ContentSequence nested ``depth`` deep, explicit VR little endian,
    undefined lengths (pydicom's writer itself slows to a crawl on such depth)."""
    opening = (
        b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    ) * depth
    closing = (b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") * depth
    return opening + closing


def test_a_sequence_nested_too_deep_skips_that_file_only(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=6)
    victim = sorted(paths)[0]
    data = victim.read_bytes()
    at = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData
    victim.write_bytes(data[:at] + nested_sequence_bytes(200) + data[at:])
    found, series = _series(paths, tmp_path)
    assert len(series.instances) == len(paths) - 1
    assert any(victim.name in w and "nests sequences too deeply" in w for w in found.warnings)


def test_a_bad_value_representation_found_late_skips_that_file(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=6)
    victim = sorted(paths)[1]
    data = bytearray(victim.read_bytes())
    at = data.index(b"\x08\x00\x60\x00")  # (0008,0060) Modality, explicit VR "CS"
    data[at + 4 : at + 6] = b"ZZ"  # an unknown VR, raised by pydicom only on access
    victim.write_bytes(bytes(data))
    found, series = _series(paths, tmp_path)
    assert len(series.instances) == len(paths) - 1
    assert any(victim.name in w for w in found.warnings)


# --------------------------------------------------------------------------- containers


def test_a_zip_inside_a_zip_is_opened(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=7)
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for p in paths:
            zf.write(p, f"study/{p.name}")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "top/inner.zip")
    found = discover(outer, work_dir=tmp_path / "w")
    assert len(found.studies[0].series[0].instances) == len(paths)
    assert found.studies[0].location == f"{outer}/top/inner.zip/study"


def test_a_zip_that_holds_itself_stops_at_the_depth_limit(tmp_path: Path) -> None:
    archive = tmp_path / "quine.zip"
    payload = b"PK\x03\x04" + b"\0" * 64
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("again.zip", payload)
    level = archive
    for k in range(6):  # six levels of zips, each holding the previous one
        nxt = tmp_path / f"level{k}.zip"
        with zipfile.ZipFile(nxt, "w") as zf:
            zf.write(level, "inner.zip")
        level = nxt
    with pytest.raises(NoDicomError, match="nested zip archive"):
        discover(level, work_dir=tmp_path / "w")


def test_member_names_too_long_for_the_file_system_are_shortened(tmp_path: Path) -> None:
    long_name = "Датасет_" * 30 + ".dcm"  # 240 characters, 450 bytes in UTF-8
    archive = tmp_path / "long.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"top/{long_name}", b"data")
        zf.writestr(f"top/{long_name[:-4]}x.dcm", b"other")
    work = tmp_path / "w"
    work.mkdir()
    files, notes = extract_zip(archive, work)
    assert len(files) == 2 and {f.read_bytes() for f in files} == {b"data", b"other"}
    assert all(len(os.fsencode(f.name)) <= MAX_NAME_BYTES for f in files)
    assert all(f.suffix == ".dcm" for f in files)
    assert sum("too long for this file system" in n for n in notes) == 2


# --------------------------------------------------------------------------- numbers out


def test_probabilities_are_finite_without_overflow() -> None:
    assert sigmoid(1e6) == 1.0 and sigmoid(-1e6) == 0.0
    assert math.isclose(sigmoid(0.0), 0.5) and math.isclose(sigmoid(-2.0), 1 - sigmoid(2.0))
    np.testing.assert_allclose(sigmoid(np.array([-3.0, 3.0])), 1 / (1 + np.exp([3.0, -3.0])))
    scores = slice_scores(np.full((2, 2, 2), -5000.0), 0.0, 7)
    assert np.isfinite(scores).all() and scores.min() >= 0.0


def test_a_non_finite_map_gives_no_box() -> None:
    volume = Volume(hu=np.zeros((4, 4, 4), np.float32), spacing=(1.0, 1.0, 1.0), affine=np.eye(4))
    cam = np.ones((2, 2, 2))
    cam[0, 0, 0] = np.nan
    assert localization_box(cam, volume) is None
