"""``ctscreen predict`` end to end through the CLI, on synthetic archives and bad input."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.uid import JPEG2000Lossless

from ctscreen.card import ModelCard
from ctscreen.cli import main
from ctscreen.config import PreprocessConfig
from ctscreen.model import build_model
from ctscreen.report import REQUIRED_COLUMNS
from ctscreen.synth.dicom_writer import uid_from, write_localizer
from ctscreen.weights import save_checkpoint

SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("w") / "model.pth"
    save_checkpoint(path, build_model(), ModelCard(preprocess=PreprocessConfig(shape=SHAPE)))
    return path


def _zip_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"{top or folder.name}/{f.relative_to(folder).as_posix()}")
    return archive


def _predict(
    tmp_path: Path, weights: Path, *inputs: Path, extra: tuple[str, ...] = ()
) -> tuple[int, pd.DataFrame]:
    out = tmp_path / "results.xlsx"
    code = main(
        [
            "--no-progress",
            "predict",
            *map(str, inputs),
            "--weights",
            str(weights),
            "-o",
            str(out),
            "--precision",
            "fp32",
            "--overwrite",  # the helper writes one scratch table per test folder
            *extra,
        ]
    )
    return code, pd.read_excel(out, sheet_name=0)


def test_same_study_in_every_form_gets_the_same_probability(
    make_series, tmp_path: Path, weights: Path
) -> None:
    common = dict(
        seed=11, study_uid="1.2.826.0.1.3680043.10.1", series_uid="1.2.826.0.1.3680043.10.1.1"
    )
    forms: dict[str, Path] = {}
    paths, _ = make_series(name="folder", **common)
    forms["folder"] = paths[0].parent
    forms["zip"] = _zip_folder(forms["folder"], tmp_path / "study.zip", top="norma_anon")
    for name, options in {
        "ffs": {"patient_position": "FFS"},
        "shuffled": {"shuffle_names": True, "extensionless": True},
        "multiframe": {"multiframe": True},
        "jpeg2000": {"transfer_syntax": JPEG2000Lossless},
    }.items():
        paths, _ = make_series(name=name, **common, **options)
        forms[name] = paths[0].parent
    code, table = _predict(tmp_path, weights, *forms.values())
    assert code == 0
    assert list(table.columns[:7]) == list(REQUIRED_COLUMNS)
    assert len(table) == len(forms)
    assert (table["processing_status"] == "Success").all()
    assert table["study_uid"].eq(common["study_uid"]).all()
    assert table["series_uid"].eq(common["series_uid"]).all()
    probabilities = table["probability_of_pathology"].astype(float)
    assert probabilities.between(0, 1).all()
    assert probabilities.max() - probabilities.min() < 1e-4
    assert table["pathology"].dtype.kind == "i"
    assert table["time_of_processing"].dtype.kind == "f" and (table["time_of_processing"] > 0).all()
    assert table.loc[1, "path_to_study"].endswith("study.zip/norma_anon")


def test_localizer_thick_and_thin_series_scores_the_thin_one(
    make_series, tmp_path: Path, weights: Path
) -> None:
    study_uid = str(uid_from("mixed-study"))
    thin_paths, phantom = make_series(
        seed=3,
        name="study/thin",
        study_uid=study_uid,
        spacing=(2.5, 5.0, 5.0),
        shape=(48, 64, 64),
        series_uid="1.2.826.0.1.3680043.10.2.1",
    )
    make_series(
        seed=3,
        name="study/thick",
        study_uid=study_uid,
        spacing=(5.0, 5.0, 5.0),
        shape=(24, 64, 64),
        series_uid="1.2.826.0.1.3680043.10.2.2",
        series_number=3,
    )
    write_localizer(
        phantom.hu,
        spacing=(2.5, 5.0, 5.0),
        out_dir=tmp_path / "study" / "scout",
        study_uid=study_uid,
        series_uid="1.2.826.0.1.3680043.10.2.3",
    )
    code, table = _predict(tmp_path, weights, tmp_path / "study")
    assert code == 0
    (row,) = table.to_dict("records")
    assert row["series_uid"] == "1.2.826.0.1.3680043.10.2.1"
    assert row["series_reason"].startswith("thinnest slices of 2 eligible series")
    assert "localizer" in row["series_reason"]
    code, per_series = _predict(tmp_path, weights, tmp_path / "study", extra=("--per-series",))
    assert sorted(per_series["series_uid"]) == [
        "1.2.826.0.1.3680043.10.2.1",
        "1.2.826.0.1.3680043.10.2.2",
    ]


def _bad_inputs(tmp_path: Path, good_file: Path) -> dict[str, Path]:
    bad = tmp_path / "bad"
    bad.mkdir()
    inputs = {}
    with zipfile.ZipFile(bad / "junk.zip", "w") as zf:
        zf.writestr("junk/readme.txt", "hello")
        zf.writestr("junk/image.png", b"\x89PNG\r\n\x1a\n" + bytes(100))
    inputs["junk"] = bad / "junk.zip"
    ds = pydicom.dcmread(good_file)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.Modality = "MR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with zipfile.ZipFile(bad / "mr.zip", "w") as zf:
        for k in range(20):
            zf.writestr(f"mr/{k}", buf.getvalue())
    inputs["mr"] = bad / "mr.zip"
    full = (bad / "mr.zip").read_bytes()
    (bad / "truncated.zip").write_bytes(full[: len(full) // 2])
    inputs["truncated"] = bad / "truncated.zip"
    with zipfile.ZipFile(bad / "slip.zip", "w") as zf:
        zf.writestr("ok/file", b"x")
        zf.writestr("../../escaped.txt", b"evil")
    inputs["slip"] = bad / "slip.zip"
    with zipfile.ZipFile(bad / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb/zeros", b"\0" * (50 * 1024 * 1024))
    inputs["bomb"] = bad / "bomb.zip"
    inputs["missing"] = bad / "does-not-exist.zip"
    return inputs


def test_bad_inputs_each_give_a_failure_row_and_the_run_goes_on(
    make_series, tmp_path: Path, weights: Path
) -> None:
    paths, _ = make_series(seed=2, name="good")
    bad = _bad_inputs(tmp_path, paths[0])
    code, table = _predict(
        tmp_path,
        weights,
        bad["junk"],
        bad["mr"],
        paths[0].parent,
        bad["truncated"],
        bad["slip"],
        bad["bomb"],
        bad["missing"],
    )
    assert code == 1
    assert list(table["processing_status"]) == [
        "Failure",
        "Failure",
        "Success",
        "Failure",
        "Failure",
        "Failure",
        "Failure",
    ]
    errors = table["error"].fillna("").tolist()
    assert "none of them DICOM" in errors[0]
    assert "MR Image Storage" in errors[1]
    assert "not a readable zip archive" in errors[3]
    assert "zip-slip" in errors[4]
    assert "decompression bomb" in errors[5]
    assert "does not exist" in errors[6]
    assert all(e.endswith((".", ")")) for i, e in enumerate(errors) if i != 2)
    assert (
        not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    )
    assert pd.isna(table.loc[0, "probability_of_pathology"])


def test_batches_and_parallel_readers_keep_order_failures_and_probabilities(
    make_series, tmp_path: Path, weights: Path
) -> None:
    good = [
        make_series(seed=s, name=f"good{s}", pathology=p)[0][0].parent
        for s, p in ((1, None), (2, "nodule"), (3, None), (4, "effusion"), (5, None))
    ]
    bad = _bad_inputs(tmp_path, good[0] / sorted(p.name for p in good[0].iterdir())[0])
    victim = sorted(good[2].iterdir())[5]  # a damaged file must be reported on its own study
    victim.write_bytes(victim.read_bytes()[:600])
    inputs = (good[0], bad["junk"], good[1], good[2], bad["truncated"], good[3], good[4])
    code1, one = _predict(tmp_path, weights, *inputs, extra=("--batch-size", "1"))
    code3, three = _predict(tmp_path, weights, *inputs, extra=("--batch-size", "3"))
    assert code1 == code3 == 1
    assert list(three["path_to_study"]) == list(one["path_to_study"])
    assert list(three["processing_status"]) == [
        "Success",
        "Failure",
        "Success",
        "Success",
        "Failure",
        "Success",
        "Success",
    ]
    scored = three["processing_status"] == "Success"
    np.testing.assert_allclose(
        three.loc[scored, "probability_of_pathology"],
        one.loc[scored, "probability_of_pathology"],
        atol=2e-6,
    )
    assert three.loc[scored, "probability_of_pathology"].nunique() == 5
    assert list(three["error"].fillna("")) == list(one["error"].fillna(""))
    code, threaded = _predict(tmp_path, weights, *inputs, extra=("--readers", "3"))
    assert code == 1
    assert list(threaded["path_to_study"]) == list(one["path_to_study"])
    assert list(threaded["error"].fillna("")) == list(one["error"].fillna(""))
    np.testing.assert_array_equal(
        threaded["probability_of_pathology"], one["probability_of_pathology"]
    )
    for table in (one, three, threaded):
        damaged = ["damaged DICOM" in str(w) for w in table["warnings"]]
        assert damaged == [False, False, False, True, False, False, False]


def test_two_studies_in_one_archive_give_two_rows(
    make_series, tmp_path: Path, weights: Path
) -> None:
    make_series(seed=1, name="both/patient1", study_uid="1.2.826.0.1.3680043.10.3")
    make_series(seed=2, name="both/patient2", study_uid="1.2.826.0.1.3680043.10.4")
    archive = _zip_folder(tmp_path / "both", tmp_path / "two.zip")
    code, table = _predict(tmp_path, weights, archive)
    assert code == 0
    assert sorted(table["study_uid"]) == ["1.2.826.0.1.3680043.10.3", "1.2.826.0.1.3680043.10.4"]
    assert sorted(table["path_to_study"]) == [
        f"{archive}/both/patient1",
        f"{archive}/both/patient2",
    ]


def test_csv_and_json_outputs_and_threshold_override(
    make_series, tmp_path: Path, weights: Path
) -> None:
    paths, _ = make_series(seed=9)
    for suffix in ("csv", "json"):
        out = tmp_path / f"r.{suffix}"
        assert (
            main(
                [
                    "--no-progress",
                    "predict",
                    str(paths[0].parent),
                    "-w",
                    str(weights),
                    "-o",
                    str(out),
                    "--threshold",
                    "0",
                    "--precision",
                    "fp32",
                ]
            )
            == 0
        )
        table = pd.read_csv(out) if suffix == "csv" else pd.read_json(out)
        assert list(table.columns[:7]) == list(REQUIRED_COLUMNS)
        assert table.loc[0, "pathology"] == 1


def test_missing_weights_is_one_sentence_and_exit_2(tmp_path: Path, capsys, make_series) -> None:
    paths, _ = make_series(seed=1)
    code = main(
        [
            "predict",
            str(paths[0].parent),
            "-w",
            str(tmp_path / "nope.pth"),
            "-o",
            str(tmp_path / "r.xlsx"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "r.xlsx").exists()


def test_original_command_without_weights_says_what_to_do(
    tmp_path: Path, make_series, monkeypatch, capsys
) -> None:
    import runpy
    import sys

    paths, _ = make_series(seed=1)
    archive = _zip_folder(paths[0].parent, tmp_path / "norma_anon.zip")
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", ["run_hackathon_infer.py", str(archive)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(root / "run_hackathon_infer.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "runs_binary/binary_r3d18/best.pth" in capsys.readouterr().err


def test_original_command_with_default_weights_writes_hackathon_results(
    tmp_path: Path, make_series, monkeypatch, weights: Path
) -> None:
    import runpy
    import sys

    paths, _ = make_series(seed=1)
    archive = _zip_folder(paths[0].parent, tmp_path / "pneumonia_anon.zip")
    (tmp_path / "runs_binary" / "binary_r3d18").mkdir(parents=True)
    shutil.copy(weights, tmp_path / "runs_binary" / "binary_r3d18" / "best.pth")
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", ["run_hackathon_infer.py", archive.name, "--no-localization"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(root / "run_hackathon_infer.py"), run_name="__main__")
    assert exit_info.value.code == 0
    table = pd.read_excel(tmp_path / "hackathon_results.xlsx")
    assert list(table.columns[:7]) == list(REQUIRED_COLUMNS) and len(table) == 1


def test_real_chest_series_scores(dicom_root: Path, tmp_path: Path, weights: Path) -> None:
    code, table = _predict(
        tmp_path,
        weights,
        dicom_root / "chest-lidc-idri-0001",
        dicom_root / "edge-dose-reports-openrem",
    )
    assert code == 1
    first = table.iloc[0]
    assert first["processing_status"] == "Success"
    assert first["series_uid"].endswith("179049373636438705059720603192")
    assert first["n_slices"] == 133
    assert set(table.iloc[1:]["processing_status"]) == {"Failure"}


def test_per_slice_scores_follow_the_slices_for_feet_first_and_shuffled_copies(
    make_series, tmp_path: Path, weights: Path
) -> None:
    common = dict(
        seed=21, study_uid="1.2.826.0.1.3680043.10.5", series_uid="1.2.826.0.1.3680043.10.5.1"
    )
    hfs, phantom = make_series(name="hfs", **common)
    shuffled, _ = make_series(name="shuffled", shuffle_names=True, extensionless=True, **common)
    ffs, _ = make_series(name="ffs", patient_position="FFS", **common)
    code, table = _predict(
        tmp_path, weights, hfs[0].parent, shuffled[0].parent, ffs[0].parent, extra=("--per-slice",)
    )
    assert code == 0
    n = phantom.hu.shape[0]
    assert len(table) == 3 * n
    by_input = {name: part for name, part in table.groupby("input_path", sort=False)}
    first, second, third = (by_input[str(p[0].parent)] for p in (hfs, shuffled, ffs))
    # the same instances (same SOPInstanceUIDs) keep the same score, whatever the file order
    scores = dict(zip(first["sop_instance_uid"], first["probability_of_pathology"], strict=True))
    pairs = zip(second["sop_instance_uid"], second["probability_of_pathology"], strict=True)
    for uid, score in pairs:
        assert score == pytest.approx(scores[uid], abs=1e-5)
    # feet-first: other files, same anatomy; slice k from the feet scores the same
    np.testing.assert_allclose(
        first.sort_values("slice_index")["probability_of_pathology"].to_numpy(),
        third.sort_values("slice_index")["probability_of_pathology"].to_numpy(),
        atol=1e-5,
    )
    # slice_index 0 is the most inferior slice: instance 1 for feet-first, the last for head-first
    assert third.set_index("slice_index").loc[0, "instance_number"] == 1
    assert first.set_index("slice_index").loc[0, "instance_number"] == n
    # the study probability is the same on every row of a series
    assert first["study_probability"].nunique() == 1
    assert set(first["processing_status"]) == {"Success"}


def test_an_unforeseen_error_in_one_study_is_a_failure_row_not_a_crash(
    make_series, tmp_path: Path, weights: Path, monkeypatch
) -> None:
    import ctscreen.pipeline as inference

    bad, _ = make_series(seed=4, name="bad", study_uid="1.2.826.0.1.3680043.10.6")
    good, _ = make_series(seed=5, name="good", study_uid="1.2.826.0.1.3680043.10.7")
    real_build = inference.build_volume

    def flaky_build(series, **kwargs):
        if series.first.study_uid == "1.2.826.0.1.3680043.10.6":
            raise IndexError("index 3 is out of bounds")
        return real_build(series, **kwargs)

    monkeypatch.setattr(inference, "build_volume", flaky_build)
    code, table = _predict(tmp_path, weights, bad[0].parent, good[0].parent)
    assert code == 1
    assert list(table["processing_status"]) == ["Failure", "Success"]
    assert table.loc[0, "error"].startswith("unexpected error while reading this study (IndexError")
