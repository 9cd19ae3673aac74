"""The synthetic chest CT generator: phantom, DICOM/NIfTI writers, dataset, CLI."""

from __future__ import annotations

import argparse
import csv
import hashlib
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from ctscreen.synth import (
    LABEL_COLUMNS,
    PATHOLOGIES,
    PIXEL_ENCODINGS,
    generate_dataset,
    make_phantom,
    write_localizer,
    write_nifti,
    write_secondary_capture,
)
from ctscreen.volume import canonical_permutation

SHAPE = (24, 64, 64)
SPACING = (5.0, 5.0, 5.0)


# --- an independent reader, written from the DICOM standard for these tests only ---------


def _read_geometry_and_hu(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(canonical HU array, IOP, LPS position of canonical voxel [0,0,0])."""
    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64)
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
            pvt = shared.PixelValueTransformationSequence[0]
            slope, intercept = float(pvt.RescaleSlope), float(pvt.RescaleIntercept)
            for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
                ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
                slices.append((ipp, iop, frame * slope + intercept))
        else:
            iop = np.array(ds.ImageOrientationPatient, float)
            hu = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            slices.append((np.array(ds.ImagePositionPatient, float), iop, hu))
    row_dir, col_dir = slices[0][1][:3], slices[0][1][3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s[0] @ normal))
    vol = np.stack([s[2] for s in slices])
    ipps = np.stack([s[0] for s in slices])
    # Axial only: rows must run towards +y (posterior), the normal along z.
    np.testing.assert_allclose(col_dir, [0, 1, 0], atol=1e-6)
    assert abs(abs(normal[2]) - 1.0) < 1e-6 and abs(abs(row_dir[0]) - 1.0) < 1e-6
    if normal[2] < 0:  # make axis 0 run feet -> head
        vol, ipps = vol[::-1], ipps[::-1]
    origin = ipps[0].copy()
    if row_dir[0] < 0:  # columns run towards the patient's right: flip them
        vol = vol[:, :, ::-1]
        origin[0] -= (vol.shape[2] - 1) * _column_spacing(paths[0])
    return vol, slices[0][1], origin


def _column_spacing(path: Path) -> float:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "SharedFunctionalGroupsSequence" in ds:
        return float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1])
    return float(ds.PixelSpacing[1])


# --- phantom --------------------------------------------------------------------------


def test_phantom_is_deterministic_and_varies_by_seed() -> None:
    a = make_phantom(seed=11, shape=SHAPE, spacing=SPACING, pathology="nodule")
    b = make_phantom(seed=11, shape=SHAPE, spacing=SPACING, pathology="nodule")
    c = make_phantom(seed=12, shape=SHAPE, spacing=SPACING, pathology="nodule")
    assert a.hu.dtype == np.float32 and a.hu.shape == SHAPE
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.lesions == b.lesions
    # Another seed moves anatomy, not just noise: lung volumes differ.
    lung_a = (a.hu < -700).sum()
    lung_c = (c.hu < -700).sum()
    assert lung_a != lung_c
    assert np.abs(a.hu - c.hu).mean() > 20.0


def test_normal_phantom_anatomy() -> None:
    ph = make_phantom(seed=3, shape=(32, 96, 96), spacing=(8.0, 3.6, 3.6), pathology=None)
    assert ph.label == 0 and ph.pathology is None and ph.lesions == ()
    hu = ph.hu
    assert np.median(hu[:, :4, :4]) < -950  # air in the corners
    assert hu.min() >= -1024 and hu.max() <= 3071
    # Both lungs at mid-height: the patient's right lung is on the low-w side.
    mid = hu[hu.shape[0] // 2]
    right, left = mid[:, :48], mid[:, 48:]

    def lung(x: np.ndarray) -> np.ndarray:
        return (x > -950) & (x < -700)

    assert lung(right).sum() > 300 and lung(left).sum() > 300
    assert np.median(mid[lung(mid)]) == pytest.approx(-850, abs=30)
    assert (hu > 400).sum() > 100  # ribs and spine
    # Vessels: soft-tissue-like voxels inside the lung field of the mid slices.
    lung_box = hu[10:22, 30:70, 10:40]
    assert ((lung_box > -600) & (lung_box < 100)).sum() > 5


@pytest.mark.parametrize("kind", PATHOLOGIES)
def test_each_pathology_is_drawn_where_its_lesion_says(kind: str) -> None:
    seed = 21
    normal = make_phantom(seed=seed, shape=(32, 96, 96), spacing=(8.0, 3.6, 3.6))
    sick = make_phantom(seed=seed, shape=(32, 96, 96), spacing=(8.0, 3.6, 3.6), pathology=kind)
    assert sick.label == 1 and sick.pathology == kind
    assert sick.lesions and all(les.kind == kind for les in sick.lesions)
    les = max(sick.lesions, key=lambda x: x.volume_ml)
    d0, d1, h0, h1, w0, w1 = les.bbox_index
    assert d0 <= les.center_index[0] <= d1 and w0 <= les.center_index[2] <= w1
    changed = np.abs(sick.hu - normal.hu) > 150
    box = changed[d0 : d1 + 1, h0 : h1 + 1, w0 : w1 + 1]
    assert box.sum() > 0.5 * changed.sum()  # the change sits in the stated box
    region = sick.hu[d0 : d1 + 1, h0 : h1 + 1, w0 : w1 + 1][box]
    expected = {
        "nodule": 30,
        "ground_glass": -500,
        "consolidation": 22,
        "effusion": 10,
        "pneumothorax": -1000,
    }[kind]
    assert np.median(region) == pytest.approx(expected, abs=120)
    if kind == "nodule":
        assert 12 <= (les.volume_ml * 6000 / np.pi) ** (1 / 3) <= 36  # equivalent diameter
    if kind == "pneumothorax":
        assert region.max() < -850  # an air rim without vessels


def test_pathology_survives_resizing_to_a_small_network_input() -> None:
    from ctscreen.config import PreprocessConfig
    from ctscreen.preprocess import preprocess_array

    cfg = PreprocessConfig(shape=(32, 64, 64))
    normal = preprocess_array(
        make_phantom(seed=5, shape=(64, 128, 128), spacing=(5.0, 2.7, 2.7)).hu, cfg
    )
    for kind in PATHOLOGIES:
        sick = make_phantom(seed=5, shape=(64, 128, 128), spacing=(5.0, 2.7, 2.7), pathology=kind)
        diff = np.abs(preprocess_array(sick.hu, cfg) - normal)
        assert (diff > 0.15).sum() >= 4, kind  # several input voxels clearly change


def test_unknown_pathology_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown pathology"):
        make_phantom(seed=0, shape=SHAPE, spacing=SPACING, pathology="fracture")


# --- DICOM series ---------------------------------------------------------------------

ROUNDTRIP_CASES = [
    ("HFS", ExplicitVRLittleEndian, False, 0),
    ("FFS", ExplicitVRLittleEndian, False, 1),
    ("HFS", ImplicitVRLittleEndian, False, 2),
    ("FFS", JPEG2000Lossless, False, 0),
    ("HFS", RLELossless, False, 2),
    ("HFS", ExplicitVRLittleEndian, True, 1),
    ("FFS", JPEG2000Lossless, True, 2),
    ("FFS", RLELossless, True, 0),
]


@pytest.mark.parametrize(("position", "syntax", "multiframe", "enc"), ROUNDTRIP_CASES)
def test_series_reads_back_to_the_phantom(make_series, position, syntax, multiframe, enc) -> None:
    origin = (-157.5, -170.0, -320.0)
    paths, ph = make_series(
        seed=4,
        pathology="nodule",
        patient_position=position,
        transfer_syntax=syntax,
        multiframe=multiframe,
        origin=origin,
        pixel_encoding=PIXEL_ENCODINGS[enc],
        shuffle_names=True,
    )
    assert len(paths) == (1 if multiframe else SHAPE[0])
    vol, _iop, first = _read_geometry_and_hu(paths)
    assert vol.shape == SHAPE
    assert np.abs(vol - ph.hu).max() <= 0.5 + 1e-6
    np.testing.assert_allclose(first, origin, atol=1e-3)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.SOPClassUID == (EnhancedCTImageStorage if multiframe else CTImageStorage)
    assert ds.PixelRepresentation == PIXEL_ENCODINGS[enc].pixel_representation


def test_hfs_and_ffs_differ_on_disk_but_describe_the_same_anatomy(make_series) -> None:
    hfs, ph = make_series(seed=8, pathology="effusion", name="hfs", patient_position="HFS")
    ffs, _ = make_series(seed=8, pathology="effusion", name="ffs", patient_position="FFS")
    by_instance = {}
    for label, paths in (("hfs", hfs), ("ffs", ffs)):
        headers = [pydicom.dcmread(p) for p in paths]
        first = min(headers, key=lambda ds: int(ds.InstanceNumber))
        by_instance[label] = first
    h, f = by_instance["hfs"], by_instance["ffs"]
    assert [float(v) for v in h.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in f.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    # Instance 1 is the top slice head-first and the bottom slice feet-first.
    assert float(h.ImagePositionPatient[2]) > float(f.ImagePositionPatient[2])
    assert h.pixel_array.tobytes() != f.pixel_array.tobytes()
    vol_h, _, _ = _read_geometry_and_hu(hfs)
    vol_f, _, _ = _read_geometry_and_hu(ffs)
    np.testing.assert_array_equal(vol_h, vol_f)
    assert np.abs(vol_h - ph.hu).max() <= 0.5 + 1e-6


def test_series_tags_and_file_format(make_series) -> None:
    paths, _ = make_series(seed=2, extensionless=True, patient_id="P123")
    assert all(p.suffix == "" for p in paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for path in paths[:2]:
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM" and raw[:128] == bytes(128)
    assert len({ds.SOPInstanceUID for ds in headers}) == len(paths)
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert sorted(int(ds.InstanceNumber) for ds in headers) == list(range(1, len(paths) + 1))
    ds = headers[0]
    assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.PatientID == "P123" and ds.BodyPartExamined == "CHEST"
    assert float(ds.SliceThickness) == SPACING[0] and float(ds.KVP) == 120
    assert [float(v) for v in ds.PixelSpacing] == [SPACING[1], SPACING[2]]
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_enhanced_ct_is_shaped_like_real_enhanced_ct(make_series) -> None:
    (path,), _ = make_series(seed=3, multiframe=True, transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) == SHAPE[0]
    for absent in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "RescaleIntercept",
        "RescaleSlope",
        "PixelSpacing",
    ):
        assert absent not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert "PlaneOrientationSequence" in shared and "PixelMeasuresSequence" in shared
    assert shared.PixelValueTransformationSequence[0].RescaleType == "HU"
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == SHAPE[0]
    assert [int(f.FrameContentSequence[0].InStackPositionNumber) for f in frames] == list(
        range(1, SHAPE[0] + 1)
    )
    assert ds.pixel_array.shape == (SHAPE[0], SHAPE[1], SHAPE[2])


def test_writing_is_byte_identical_for_the_same_inputs(make_series) -> None:
    a, _ = make_series(seed=6, name="a", series_uid="1.2.3.4", transfer_syntax=JPEG2000Lossless)
    b, _ = make_series(seed=6, name="b", series_uid="1.2.3.4", transfer_syntax=JPEG2000Lossless)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_localizer_and_secondary_capture(tmp_path: Path) -> None:
    ph = make_phantom(seed=1, shape=SHAPE, spacing=SPACING)
    loc = write_localizer(
        ph.hu,
        spacing=SPACING,
        out_dir=tmp_path,
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        origin=(-100.0, -100.0, -200.0),
    )
    sc = write_secondary_capture(
        ph.hu, out_dir=tmp_path, study_uid="1.2.3", series_uid="1.2.3.9", extensionless=True
    )
    ds = pydicom.dcmread(loc)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert ds.pixel_array.shape == (SHAPE[0], SHAPE[2])
    scd = pydicom.dcmread(sc)
    assert scd.SOPClassUID == SecondaryCaptureImageStorage and scd.Modality == "CT"
    assert "ImagePositionPatient" not in scd and scd.pixel_array.dtype == np.uint8


# --- NIfTI ----------------------------------------------------------------------------


def test_nifti_reorients_to_the_canonical_array(tmp_path: Path) -> None:
    ph = make_phantom(seed=9, shape=(20, 40, 48), spacing=(4.0, 3.0, 2.5), pathology="nodule")
    path = write_nifti(
        ph.hu, spacing=ph.spacing, path=tmp_path / "ct.nii.gz", origin=(-60.0, -50.0, -40.0)
    )
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    assert data.shape == (48, 40, 20)  # stored in (x, y, z) order, not canonical
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    perm, flips = canonical_permutation(lps)
    arr = np.transpose(data, perm)
    for axis, flip in enumerate(flips):
        if flip:
            arr = np.flip(arr, axis)
    assert any(flips)
    assert np.abs(arr - ph.hu).max() <= 0.5 + 1e-6
    # Voxel [0,0,0] of the canonical array sits at the origin.
    corner = np.array([data.shape[0] - 1, data.shape[1] - 1, 0, 1.0])
    np.testing.assert_allclose((lps @ corner)[:3], (-60.0, -50.0, -40.0))


# --- dataset and CLI ------------------------------------------------------------------


def _read_labels(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_dataset_is_deterministic_and_labels_match_lesions(tmp_path: Path) -> None:
    a = generate_dataset(
        tmp_path / "a", n_studies=6, seed=3, matrix="tiny", pathology_fraction=5 / 6
    )
    b = generate_dataset(
        tmp_path / "b", n_studies=6, seed=3, matrix="tiny", pathology_fraction=5 / 6
    )
    assert a.read_bytes() == b.read_bytes()
    assert _tree_hashes(a.parent) == _tree_hashes(b.parent)
    rows = _read_labels(a)
    assert list(rows[0]) == list(LABEL_COLUMNS)
    assert sorted(r["pathology_type"] for r in rows) == sorted([*PATHOLOGIES, "none"])
    for row in rows:
        folder = a.parent / row["path"]
        files = [p for p in folder.iterdir() if p.is_file()]
        main = [
            p
            for p in files
            if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == row["series_uid"]
        ]
        vol, _, origin = _read_geometry_and_hu(main)
        assert vol.shape == (int(row["n_slices"]), int(row["rows"]), int(row["cols"]))
        assert row["label"] == ("0" if row["pathology_type"] == "none" else "1")
        if row["label"] == "0":
            assert row["lesion_center_x"] == "" and row["n_lesions"] == "0"
            continue
        center = np.array([float(row[f"lesion_center_{c}"]) for c in "xyz"])
        lo = np.array([float(row[f"lesion_{c}_min"]) for c in "xyz"])
        hi = np.array([float(row[f"lesion_{c}_max"]) for c in "xyz"])
        assert np.all(lo - 1e-6 <= center) and np.all(center <= hi + 1e-6)
        spacing = np.array([float(s) for s in row["spacing_mm"].split()])
        index = np.rint((center[::-1] - origin[::-1]) / spacing).astype(int)  # (d, h, w)
        assert np.all(index >= 0) and np.all(index < vol.shape)
        if row["pathology_type"] == "nodule":
            assert vol[tuple(index)] > -300  # the centre of a solid nodule


def test_dataset_zip_archives_have_one_top_folder(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, n_studies=2, seed=1, matrix="tiny", zip_archives=True)
    rows = _read_labels(labels)
    for row in rows:
        archive = tmp_path / row["path"]
        assert archive.suffix == ".zip"
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
        assert {n.split("/")[0] for n in names} == {row["study_id"]}
        assert len(names) >= int(row["n_slices"]) or row["multiframe"] == "1"


def test_variety_covers_the_encodings(tmp_path: Path) -> None:
    from ctscreen.synth import plan_studies

    specs = plan_studies(80, seed=0, matrix="small")
    assert {s.patient_position for s in specs} == {"HFS", "FFS"}
    assert {s.transfer_syntax for s in specs} == {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
    }
    assert any(s.multiframe for s in specs) and any(s.localizer for s in specs)
    assert any(s.extensionless for s in specs) and any(s.thick_series for s in specs)
    assert all(96 <= s.shape[1] <= 192 for s in specs)
    assert all(280 <= s.shape[2] * s.spacing[2] <= 420 for s in specs)
    plain = plan_studies(3, seed=0, variety=False)
    assert {(s.patient_position, s.transfer_syntax, s.multiframe) for s in plain} == {
        ("HFS", ExplicitVRLittleEndian, False)
    }


def test_cli_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctscreen.cli import EXIT_OK
    from ctscreen.cli import synth as synth_cli

    parser = argparse.ArgumentParser()
    synth_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "synth",
            str(tmp_path / "out"),
            "--studies",
            "2",
            "--seed",
            "4",
            "--matrix",
            "tiny",
            "--no-variety",
        ]
    )
    assert args.func(args) == EXIT_OK
    assert "labels" in capsys.readouterr().out
    rows = _read_labels(tmp_path / "out" / "labels.csv")
    assert len(rows) == 2 and all((tmp_path / "out" / r["path"]).is_dir() for r in rows)
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", str(tmp_path), "--studies", "0"])


# --- intensity-matched phantoms -----------------------------------------------------------

MATCHED = {"shape": (24, 48, 48), "spacing": (11.0, 7.0, 7.0), "realism": "matched"}


@pytest.mark.parametrize("kind", PATHOLOGIES)
def test_matched_normal_spends_the_same_voxels_as_the_lesion_elsewhere(kind: str) -> None:
    """Same seed: the lesion study and its normal twin hold the same HU histogram, but
    the lesion's voxels differ only in the lesion study's recorded box."""
    from ctscreen.baseline import hu_histogram_features

    sick = make_phantom(seed=8, pathology=kind, **MATCHED)
    twin = make_phantom(seed=8, decoy=kind, **MATCHED)
    assert sick.label == 1 and sick.lesions and all(les.kind == kind for les in sick.lesions)
    assert twin.label == 0 and twin.lesions == () and twin.pathology is None
    f_sick = hu_histogram_features(sick.hu, hu_min=-1350, hu_max=150)
    f_twin = hu_histogram_features(twin.hu, hu_min=-1350, hu_max=150)
    changed = np.abs(sick.hu - twin.hu) > 150
    # the finding moves at least 0.1% of the voxels ...
    assert changed.mean() > 0.001
    # ... yet every histogram bin agrees within a small fraction of that
    assert np.abs(f_sick[:-2] - f_twin[:-2]).max() < 0.2 * changed.mean() + 2e-4
    # and the lesion sits where its box says (the twin's voxels lie elsewhere)
    les = max(sick.lesions, key=lambda x: x.volume_ml)
    d0, d1, h0, h1, w0, w1 = les.bbox_index
    lesion_box = np.zeros_like(changed)
    lesion_box[d0 : d1 + 1, h0 : h1 + 1, w0 : w1 + 1] = True
    assert (changed & lesion_box).sum() > 0
    assert (changed & ~lesion_box).sum() > 0


def test_matched_default_draws_a_decoy_and_easy_is_unchanged() -> None:
    a = make_phantom(seed=2, **MATCHED)
    b = make_phantom(seed=2, **MATCHED)
    np.testing.assert_array_equal(a.hu, b.hu)
    easy = make_phantom(seed=2, shape=MATCHED["shape"], spacing=MATCHED["spacing"])
    assert not np.array_equal(a.hu, easy.hu)
    np.testing.assert_array_equal(
        easy.hu,
        make_phantom(seed=2, shape=MATCHED["shape"], spacing=MATCHED["spacing"], realism="easy").hu,
    )
    with pytest.raises(ValueError, match="realism"):
        make_phantom(seed=2, realism="hard")
    with pytest.raises(ValueError, match="decoy"):
        make_phantom(seed=2, realism="matched", decoy="fracture")


def test_matched_plan_keeps_the_easy_studies_and_cycles_decoys_over_the_kinds() -> None:
    from ctscreen.synth import plan_studies

    kinds = ("consolidation", "effusion", "pneumothorax")
    easy = plan_studies(30, seed=5, matrix="tiny", pathologies=kinds)
    matched = plan_studies(30, seed=5, matrix="tiny", pathologies=kinds, realism="matched")
    assert [(s.pathology, s.shape, s.seed) for s in easy] == [
        (s.pathology, s.shape, s.seed) for s in matched
    ]
    assert all(s.realism == "easy" and s.decoy is None for s in easy)
    decoys = [s.decoy for s in matched if s.pathology is None]
    assert all(s.decoy is None for s in matched if s.pathology is not None)
    assert sorted(set(decoys)) == sorted(kinds)
    assert max(decoys.count(k) for k in kinds) - min(decoys.count(k) for k in kinds) <= 1


@pytest.mark.slow
def test_hu_histogram_separates_easy_studies_but_not_matched_ones() -> None:
    """The reason for the matched set: on 60 studies of each realism, the cross-validated
    HU-histogram baseline reads the label off the easy phantoms, not off matched ones."""
    from ctscreen.baseline import hu_histogram_features, shortcut_baseline
    from ctscreen.synth import plan_studies

    aucs = {}
    for realism in ("easy", "matched"):
        features, labels = [], []
        for spec in plan_studies(60, seed=1, matrix="tiny", realism=realism):
            ph = make_phantom(
                seed=spec.seed,
                shape=(20, 40, 40),
                spacing=(14.0, 8.5, 8.5),
                pathology=spec.pathology,
                realism=spec.realism,
                decoy=spec.decoy,
            )
            features.append(hu_histogram_features(ph.hu, hu_min=-1350, hu_max=150))
            labels.append(ph.label)
        result = shortcut_baseline(np.array(features), np.array(labels), n_boot=200, repeats=1)
        aucs[realism] = result.roc_auc["value"]
    assert aucs["easy"] > 0.75, aucs
    assert aucs["matched"] < 0.65, aucs


def test_cli_writes_a_matched_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctscreen.cli import EXIT_OK
    from ctscreen.cli import synth as synth_cli

    parser = argparse.ArgumentParser()
    synth_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "synth",
            str(tmp_path / "out"),
            "--studies",
            "2",
            "--matrix",
            "tiny",
            "--no-variety",
            "--realism",
            "matched",
            "--pathologies",
            "effusion",
        ]
    )
    assert args.func(args) == EXIT_OK
    assert "intensity-matched" in capsys.readouterr().out
    rows = _read_labels(tmp_path / "out" / "labels.csv")
    assert sorted(r["pathology_type"] for r in rows) == ["effusion", "none"]
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", str(tmp_path), "--pathologies", "fracture"])
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", str(tmp_path), "--realism", "hard"])
