"""``path_to_study``: the deepest folder holding the series a row was scored from, and
rows in the order their studies come in the input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from ctscreen.config import PreprocessConfig
from ctscreen.pipeline import ReadSettings, prepare
from ctscreen.synth.dicom_writer import uid_from

SETTINGS = ReadSettings(config=PreprocessConfig(shape=(8, 16, 16)))


def _rows(path: Path, settings: ReadSettings = SETTINGS) -> list[tuple[str, str, str]]:
    return [(i.location, i.study_uid, i.error or "") for i in prepare(path, settings)]


def test_rtstruct_beside_the_ct_names_the_ct_folder(
    dicom_root: Path, tmp_path: Path, make_series
) -> None:
    """A real RTSTRUCT (dicompyler's sample) in study/rtstruct, a CT series of the same
    study in study/ct: the row is found at study/ct, not at study or study/rtstruct."""
    source = dicom_root / "edge-rtstruct-with-ct-dicompyler" / "rtstruct"
    (rtstruct,) = source.iterdir()
    study_uid = str(pydicom.dcmread(rtstruct, stop_before_pixels=True).StudyInstanceUID)
    study = tmp_path / "study"
    (study / "rtstruct").mkdir(parents=True)
    shutil.copy(rtstruct, study / "rtstruct" / rtstruct.name)
    make_series(seed=3, name="study/ct", study_uid=study_uid)
    [(location, uid, error)] = _rows(study)
    assert (location, uid, error) == (f"{study}/ct", study_uid, "")


def test_a_study_that_cannot_be_scored_names_the_folder_of_all_its_series(
    dicom_root: Path,
) -> None:
    """The real sample has a one-slice CT in ct/ and an RTSTRUCT in rtstruct/: the
    failure names the study's folder, not the RTSTRUCT's."""
    root = dicom_root / "edge-rtstruct-with-ct-dicompyler"
    [(location, _, error)] = _rows(root)
    assert location == str(root)
    assert f"was found in {root} (" in error
    assert "rtstruct (" not in error


def test_one_study_uid_in_two_folders_gives_each_row_its_own_folder(
    tmp_path: Path, make_series
) -> None:
    study_uid = str(uid_from("shared-study", 1))
    make_series(seed=1, name="export/a", study_uid=study_uid)
    make_series(seed=2, name="export/b", study_uid=study_uid, shape=(32, 64, 64))
    per_series = ReadSettings(config=SETTINGS.config, all_series=True)
    rows = _rows(tmp_path / "export", per_series)
    assert sorted(location for location, _, _ in rows) == [
        f"{tmp_path}/export/a",
        f"{tmp_path}/export/b",
    ]
    # one row per study: the folder of the series it chose (the one with more slices)
    [(location, uid, error)] = _rows(tmp_path / "export")
    assert (location, uid, error) == (f"{tmp_path}/export/b", study_uid, "")


def test_studies_come_in_the_order_of_their_folders_not_of_their_uids(
    tmp_path: Path, make_series
) -> None:
    uids = {name: str(uid_from("order", seed)) for seed, name in enumerate("cab")}
    assert sorted(uids.values()) != [uids[n] for n in "abc"]  # UID order differs
    for name in "cab":
        make_series(seed=ord(name), name=f"all/{name}", study_uid=uids[name])
    rows = _rows(tmp_path / "all")
    assert [location for location, _, _ in rows] == [f"{tmp_path}/all/{n}" for n in "abc"]
    assert [uid for _, uid, _ in rows] == [uids[n] for n in "abc"]


@pytest.mark.parametrize("archive", [False, True])
def test_localizer_in_its_own_folder_is_not_part_of_the_path(
    tmp_path: Path, make_series, archive: bool
) -> None:
    from ctscreen.synth.dicom_writer import write_localizer

    study_uid = str(uid_from("with-scout", 0))
    _, phantom = make_series(seed=5, name="p1/axial", study_uid=study_uid)
    write_localizer(
        phantom.hu,
        spacing=(5.0, 5.0, 5.0),
        out_dir=tmp_path / "p1" / "scout",
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "scout")),
    )
    target: Path = tmp_path / "p1"
    if archive:
        target = Path(shutil.make_archive(str(tmp_path / "p1"), "zip", tmp_path, "p1"))
    [(location, uid, error)] = _rows(target)
    assert error == "" and uid == study_uid
    assert location == f"{target}/p1/axial" if archive else f"{target}/axial"
