"""Property tests: one anatomy, many encodings, one canonical array."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from ctscreen.config import PreprocessConfig
from ctscreen.dicom.discover import Series, discover
from ctscreen.dicom.select import select_series
from ctscreen.dicom.volume import build_volume
from ctscreen.nifti import read_nifti
from ctscreen.pipeline import prepare_one_study
from ctscreen.preprocess import preprocess
from ctscreen.synth.nifti_writer import write_nifti

CONFIG = PreprocessConfig(shape=(16, 32, 32))


def _load(folder: Path, tmp_path: Path):
    found = discover(folder, work_dir=tmp_path / "work")
    (study,) = found.studies
    return build_volume(select_series(study.series).best.series)


def test_written_series_reads_back_exactly(make_series, tmp_path: Path) -> None:
    paths, phantom = make_series(seed=3)
    volume = _load(paths[0].parent, tmp_path)
    assert volume.shape == phantom.hu.shape
    np.testing.assert_allclose(volume.hu, phantom.hu, atol=0.5)
    assert volume.spacing == pytest.approx((5.0, 5.0, 5.0))
    assert volume.affine[:3, 3] == pytest.approx((-157.5, -170.0, -320.0))


@pytest.mark.parametrize(
    "options",
    [
        {"shuffle_names": True, "extensionless": True},
        {"patient_position": "FFS"},
        {"patient_position": "FFS", "multiframe": True},
        {"multiframe": True},
        {"transfer_syntax": JPEG2000Lossless},
        {"transfer_syntax": RLELossless, "patient_position": "FFS"},
    ],
    ids=[
        "shuffled-extensionless",
        "feet-first",
        "feet-first-multiframe",
        "multiframe",
        "jpeg2000",
        "rle-ffs",
    ],
)
def test_every_encoding_gives_the_same_preprocessed_array(
    make_series, tmp_path: Path, options
) -> None:
    reference_paths, phantom = make_series(seed=5, name="reference")
    reference = preprocess(_load(reference_paths[0].parent, tmp_path / "a"), CONFIG)
    paths, _ = make_series(seed=5, name="variant", **options)
    variant_volume = _load(paths[0].parent, tmp_path / "b")
    np.testing.assert_allclose(variant_volume.hu, phantom.hu, atol=0.5)
    np.testing.assert_allclose(preprocess(variant_volume, CONFIG), reference, atol=1e-5)


def test_file_order_does_not_matter(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=8)
    found = discover(paths[0].parent, work_dir=tmp_path / "w")
    series = found.studies[0].series[0]
    base = build_volume(series)
    for seed in (0, 1):
        shuffled = list(series.instances)
        random.Random(seed).shuffle(shuffled)
        for order in (shuffled, shuffled[::-1]):
            volume = build_volume(replace(series, instances=tuple(order)))
            np.testing.assert_array_equal(volume.hu, base.hu)
            assert volume.sop_instance_uids == base.sop_instance_uids


def test_feet_first_slices_keep_their_uids_in_anatomical_order(make_series, tmp_path: Path) -> None:
    hfs_paths, _ = make_series(seed=4, name="hfs")
    ffs_paths, _ = make_series(seed=4, name="ffs", patient_position="FFS")
    hfs = _load(hfs_paths[0].parent, tmp_path / "h")
    ffs = _load(ffs_paths[0].parent, tmp_path / "f")
    np.testing.assert_allclose(hfs.hu, ffs.hu, atol=0.5)
    # head-first: instance 1 at the head (last canonical slice); feet-first: at the feet
    assert hfs.instance_numbers[-1] == 1 and ffs.instance_numbers[0] == 1


def test_nifti_copy_gives_the_same_array(make_series, tmp_path: Path) -> None:
    paths, _ = make_series(seed=6)
    dicom_volume = _load(paths[0].parent, tmp_path)
    nifti_path = write_nifti(dicom_volume, path=tmp_path / "copy.nii.gz")
    nifti_volume = read_nifti(nifti_path)
    np.testing.assert_allclose(nifti_volume.hu, dicom_volume.hu, atol=0.5)
    np.testing.assert_allclose(nifti_volume.affine, dicom_volume.affine, atol=1e-4)
    np.testing.assert_allclose(
        preprocess(nifti_volume, CONFIG), preprocess(dicom_volume, CONFIG), atol=1e-4
    )
    # a registry entry is read as predict reads it: the same array
    as_registry_entry = prepare_one_study(nifti_path, config=CONFIG, nifti=True)
    assert np.array_equal(as_registry_entry.array, preprocess(nifti_volume, CONFIG))


def test_dropped_slice_is_reported_as_a_gap(make_series, tmp_path: Path) -> None:
    paths, phantom = make_series(seed=2)
    found = discover(paths[0].parent, work_dir=tmp_path / "w")
    series = found.studies[0].series[0]
    middle = sorted(series.instances, key=lambda h: h.frames[0].position[2])[10]
    kept = tuple(h for h in series.instances if h is not middle)
    volume = build_volume(Series(series.series_uid, series.key, kept))
    assert volume.shape[0] == phantom.hu.shape[0] - 1
    (gap,) = [w for w in volume.warnings if w.startswith("gap in the slices")]
    assert "10.00 mm" in gap and "about 1 missing slice" in gap


def test_duplicate_files_are_dropped_and_said(make_series, tmp_path: Path) -> None:
    paths, phantom = make_series(seed=2)
    found = discover(paths[0].parent, work_dir=tmp_path / "w")
    series = found.studies[0].series[0]
    doubled = Series(series.series_uid, series.key, series.instances + series.instances[:3])
    volume = build_volume(doubled)
    assert volume.shape == phantom.hu.shape
    assert "3 duplicate copies of the same instance were ignored" in volume.warnings


def test_parallel_decode_matches_serial_and_names_a_damaged_file(
    make_series, tmp_path: Path
) -> None:
    from ctscreen.errors import DecodeError

    paths, phantom = make_series(seed=12, transfer_syntax=JPEG2000Lossless)
    assert len(paths) >= 24  # enough compressed files for the worker pool
    found = discover(paths[0].parent, work_dir=tmp_path / "w")
    series = found.studies[0].series[0]
    parallel = build_volume(series, decode_workers=2)
    serial = build_volume(series, decode_workers=1)
    np.testing.assert_array_equal(parallel.hu, serial.hu)
    np.testing.assert_allclose(parallel.hu, phantom.hu, atol=0.5)
    victim = sorted(paths)[7]
    data = victim.read_bytes()
    start = data.index(b"\xff\x4f\xff\x51")  # J2K start of codestream + SIZ marker
    victim.write_bytes(data[:start] + b"\0" * 4 + data[start + 4 :])
    broken = discover(paths[0].parent, work_dir=tmp_path / "w3").studies[0].series[0]
    # One rule for damaged files: the file is skipped and named, the rest is scored.
    rest = build_volume(broken, decode_workers=2)
    assert rest.shape[0] == serial.shape[0] - 1
    assert any(
        w.startswith("skipped 1 file(s) whose pixel data cannot be read")
        and victim.name in w
        and "JPEG 2000" in w
        for w in rest.warnings
    )
    assert any(w.startswith("gap in the slices") for w in rest.warnings)
    # Damage in most files is no series any more: the error names a file and its syntax.
    for other in sorted(paths)[: len(paths) // 2 + 1]:
        data = other.read_bytes()
        if b"\xff\x4f\xff\x51" in data:
            at = data.index(b"\xff\x4f\xff\x51")
            other.write_bytes(data[:at] + b"\0" * 4 + data[at + 4 :])
    ruined = discover(paths[0].parent, work_dir=tmp_path / "w4").studies[0].series[0]
    with pytest.raises(DecodeError, match=r"cannot be decoded.*JPEG 2000"):
        build_volume(ruined, decode_workers=2)


def test_truncated_file_is_skipped_as_damaged_and_leaves_a_gap(make_series, tmp_path: Path) -> None:
    paths, phantom = make_series(seed=12, transfer_syntax=JPEG2000Lossless)
    victim = sorted(paths, key=lambda p: p.name)[7]
    victim.write_bytes(victim.read_bytes()[:-8])  # the end marker of the pixel data is gone
    found = discover(paths[0].parent, work_dir=tmp_path / "w")
    assert any(
        w.startswith("skipped 1 damaged DICOM file(s)") and victim.name in w for w in found.warnings
    )
    volume = build_volume(found.studies[0].series[0])
    assert volume.shape[0] == phantom.hu.shape[0] - 1
    assert any(w.startswith("gap in the slices") for w in volume.warnings)
