"""The chest check: real head and abdomen series are refused, real and synthetic chests pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctscreen.chest import (
    CHEST,
    CHEST_LUNG_SLICE_SHARE,
    NOT_CHEST,
    UNSURE,
    check_chest,
    region_from_tags,
    require_chest,
)
from ctscreen.config import SelectionConfig
from ctscreen.dicom.discover import discover
from ctscreen.dicom.select import select_series
from ctscreen.dicom.volume import build_volume
from ctscreen.errors import NotChestError
from ctscreen.synth.phantom import PATHOLOGIES, canonical_affine, make_phantom
from ctscreen.volume import Volume


def _real_series(root: Path, folder: str, tmp_path: Path):
    found = discover(root / folder, work_dir=tmp_path / "w")
    series = select_series(found.studies[0].series, SelectionConfig(min_slices=2)).best.series
    return build_volume(series, decode_workers=1), series.first.region_tags


@pytest.mark.parametrize(
    ("folder", "lung_slices", "n_slices"),
    [
        ("chest-lidc-idri-0001", 78, 133),
        ("chest-lung-pet-ct-dx-a0001", 43, 64),
        ("chest-lung-pet-ct-dx-a0002", 22, 30),
    ],
)
def test_real_chest_series_are_chest(
    dicom_root: Path, tmp_path: Path, folder: str, lung_slices: int, n_slices: int
) -> None:
    volume, tags = _real_series(dicom_root, folder, tmp_path)
    check = check_chest(volume, tags)
    assert check.verdict == CHEST
    assert (check.lung_slices, check.n_slices) == (lung_slices, n_slices)
    assert require_chest(volume, tags) == ()


@pytest.mark.parametrize(
    ("folder", "peak_below"),
    [("edge-gantry-tilt-ge-head", 0.05), ("edge-empty-uids-totalseg-abdomen", 0.02)],
)
def test_real_head_and_abdomen_are_not_chest(
    dicom_root: Path, tmp_path: Path, folder: str, peak_below: float
) -> None:
    volume, tags = _real_series(dicom_root, folder, tmp_path)
    check = check_chest(volume, tags)
    assert check.verdict == NOT_CHEST
    assert check.lung_slices == 0 and check.peak_fraction < peak_below
    with pytest.raises(NotChestError, match=r"^not a chest CT: aerated lung .* on 0 of"):
        require_chest(volume, tags)


def _phantom_volume(pathology: str | None, seed: int, shape=(24, 64, 64), spacing=(5.0, 5.0, 5.0)):
    phantom = make_phantom(seed=seed, shape=shape, spacing=spacing, pathology=pathology)
    return Volume(hu=phantom.hu, spacing=spacing, affine=canonical_affine(spacing, (0.0, 0.0, 0.0)))


@pytest.mark.parametrize("pathology", [None, *PATHOLOGIES])
def test_synthetic_phantoms_of_every_kind_are_chest(pathology: str | None) -> None:
    for seed in range(3):
        check = check_chest(_phantom_volume(pathology, seed))
        assert check.verdict == CHEST, (pathology, seed, check.describe())
        assert check.lung_slice_share >= CHEST_LUNG_SLICE_SHARE + 0.2


def test_lungs_cut_to_a_few_slices_are_unsure_and_the_tags_settle_it() -> None:
    volume = _phantom_volume(None, 0, shape=(40, 64, 64))
    hu = volume.hu.copy()
    lung = (hu >= -950) & (hu <= -500)
    hu[8:][lung[8:]] = 40.0  # lungs kept on the lowest 8 of 40 slices only (0.2)
    cut = Volume(hu=hu, spacing=volume.spacing, affine=volume.affine)
    assert check_chest(cut).verdict == UNSURE
    (warning,) = require_chest(cut)
    assert warning.startswith("this may not be a chest CT, scored anyway")
    assert check_chest(cut, [("BodyPartExamined", "ABDOMEN")]).verdict == NOT_CHEST
    assert check_chest(cut, [("BodyPartExamined", "CHEST")]).verdict == UNSURE


def test_wrong_rescale_is_named_in_the_refusal() -> None:
    volume = _phantom_volume(None, 1)
    shifted = Volume(hu=volume.hu + 1024.0, spacing=volume.spacing, affine=volume.affine)
    with pytest.raises(NotChestError, match="the rescale to HU .* may be wrong"):
        require_chest(shifted)


def test_a_disagreeing_tag_is_a_warning_when_the_image_is_clearly_chest() -> None:
    (warning,) = require_chest(_phantom_volume(None, 2), [("BodyPartExamined", "HEAD")])
    assert "BodyPartExamined 'HEAD'" in warning and "scored as chest CT" in warning


@pytest.mark.parametrize(
    ("tags", "region"),
    [
        ([("BodyPartExamined", "HEAD")], "other"),
        ([("BodyPartExamined", ""), ("StudyDescription", "CT CHEST W/O")], "chest"),
        ([("ProtocolName", "Thorax^Routine")], "chest"),
        ([("SeriesDescription", "ОГК 1.0")], "chest"),
        ([("BodyPartExamined", "ABDOMEN"), ("StudyDescription", "Chest Abdomen Pelvis")], "chest"),
        ([("SeriesDescription", "JPEG 2000 Compressed Image")], ""),
    ],
)
def test_region_from_tags(tags: list[tuple[str, str]], region: str) -> None:
    assert region_from_tags(tags).region == region


def test_an_empty_volume_is_not_chest() -> None:
    hu = np.full((20, 32, 32), -1000.0, dtype=np.float32)
    volume = Volume(hu=hu, spacing=(5.0, 5.0, 5.0), affine=np.eye(4))
    assert check_chest(volume).verdict == NOT_CHEST
