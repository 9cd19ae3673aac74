"""Registry schema, dataset adapters on miniature dataset roots, merge and the CLI."""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctscreen.cli import EXIT_OK, EXIT_PARTIAL
from ctscreen.cli import registry as registry_cli
from ctscreen.data.registry import (
    REGISTRY_COLUMNS,
    RegistryRow,
    merge_registries,
    read_registry,
    rows_to_frame,
    write_registry,
)
from ctscreen.data.sources import build_source, read_study_header, resolve_columns
from ctscreen.data.sources.covid19_1110 import build_covid19_1110
from ctscreen.data.sources.custom import build_custom, parse_mapping
from ctscreen.data.sources.ldct_lungcr import build_ldct_lungcr
from ctscreen.data.sources.mosmed_vii import COLUMN_SYNONYMS as VII_SYNONYMS
from ctscreen.data.sources.mosmed_vii import build_mosmed_vii
from ctscreen.errors import ConfigError, DatasetError

# --------------------------------------------------------------------------- helpers


def write_ct(
    path: Path, *, study_uid: str, patient_id: str | None, series_uid: str = "", instance: int = 1
) -> Path:
    """Write a minimal valid 8x8 CT Image Storage file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(instance)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.full((8, 8), 24, dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(folder: Path, *, study_uid: str, patient_id: str | None, n: int = 2) -> Path:
    series = generate_uid()
    for i in range(n):
        write_ct(
            folder / "series_1" / f"IM{i:04d}",
            study_uid=study_uid,
            patient_id=patient_id,
            series_uid=series,
            instance=i + 1,
        )
    return folder


def write_nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((4, 8, 8), -800, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def row(
    key: str, label: int = 0, *, uid: str = "", patient: str = "", dataset: str = "demo"
) -> RegistryRow:
    return RegistryRow(
        study_key=key,
        path=f"/data/{key}",
        path_type="dicom",
        label=label,
        dataset=dataset,
        patient_id=patient,
        study_uid=uid,
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    registry_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- schema


def test_rows_round_trip_through_csv(tmp_path: Path) -> None:
    frame = rows_to_frame([row("demo:a", 0, uid="1.2.3", patient="p1"), row("demo:b", 1)])
    assert tuple(frame.columns) == REGISTRY_COLUMNS
    out = write_registry(frame, tmp_path / "sub" / "reg.csv")
    assert sorted(os.listdir(out.parent)) == ["reg.csv"]  # no temporary file left behind
    back = read_registry(out)
    assert back["study_key"].tolist() == ["demo:a", "demo:b"]
    assert back["label"].tolist() == [0, 1]
    assert back["study_uid"].tolist() == ["1.2.3", ""]
    assert back["label"].dtype == np.int64


def test_row_rejects_bad_label_and_path_type() -> None:
    with pytest.raises(DatasetError, match="label 2"):
        row("demo:a", 2)
    with pytest.raises(DatasetError, match="path_type 'png'"):
        RegistryRow(study_key="k", path="p", path_type="png", label=0, dataset="d")


def test_read_registry_names_bad_column_and_row(tmp_path: Path) -> None:
    frame = rows_to_frame([row("demo:a"), row("demo:b"), row("demo:c")])
    bad = frame.astype({"label": object})
    bad.loc[1, "label"] = "maybe"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(DatasetError, match=r"column 'label' in row 3 holds 'maybe'"):
        read_registry(path)
    frame.drop(columns=["path_type"]).to_csv(path, index=False)
    with pytest.raises(DatasetError, match="lacks the column.*path_type"):
        read_registry(path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_registry(tmp_path / "nope.csv")


def test_merge_drops_duplicate_keys_and_uids_keeping_first() -> None:
    a = rows_to_frame([row("x:1", 1, uid="1.1"), row("x:2", 0, uid="1.2")])
    b = rows_to_frame([row("y:9", 1, uid="1.1"), row("x:2", 0), row("y:3", 0, uid="1.3")])
    merged, notes = merge_registries([a, b])
    assert merged["study_key"].tolist() == ["x:1", "x:2", "y:3"]
    assert len(notes) == 2
    assert any("y:9" in n and "StudyInstanceUID" in n for n in notes)


def test_merge_conflicting_labels_drop_or_error() -> None:
    a = rows_to_frame([row("x:1", 0, uid="1.1"), row("x:2", 1)])
    b = rows_to_frame([row("y:1", 1, uid="1.1")])
    merged, notes = merge_registries([a, b])
    assert merged["study_key"].tolist() == ["x:2"]
    assert notes and notes[0].startswith("conflict")
    with pytest.raises(DatasetError, match="same study"):
        merge_registries([a, b], on_conflict="error")


# --------------------------------------------------------------------------- adapters


@pytest.fixture()
def covid_root(tmp_path: Path) -> Path:
    root = tmp_path / "COVID19_1110"
    table = []
    for i, cat in enumerate(["CT-0", "CT-0", "CT-2", "CT-4"], start=1):
        rel = f"/studies/{cat}/study_{i:04d}.nii.gz"
        write_nifti(root / rel.lstrip("/"))
        table.append(
            {"study_id": f"study_{i:04d}", "category": cat, "study_file": rel, "mask_file": ""}
        )
    table.append(
        {
            "study_id": "study_0005",
            "category": "CT-1",
            "study_file": "/studies/CT-1/study_0005.nii.gz",
            "mask_file": "",
        }
    )
    pd.DataFrame(table).to_excel(root / "dataset_registry.xlsx", index=False)
    return root


def test_covid19_1110_rows_labels_and_missing(covid_root: Path) -> None:
    result = build_covid19_1110(covid_root)
    rows = result.rows.set_index("study_key")
    assert list(rows.index) == [f"covid19_1110:study_{i:04d}" for i in range(1, 5)]
    assert rows["label"].tolist() == [0, 0, 1, 1]
    assert rows["source_category"].tolist() == ["CT-0", "CT-0", "CT-2", "CT-4"]
    assert set(rows["path_type"]) == {"nifti"}
    assert all(Path(p).is_file() for p in rows["path"])
    assert nib.load(rows["path"].iloc[0]).shape == (4, 8, 8)
    assert result.missing == [str(covid_root / "studies/CT-1/study_0005.nii.gz")]
    assert any("no patient ids" in n for n in result.notes)


def test_missing_root_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist; download MosMedData COVID19_1110"):
        build_covid19_1110(tmp_path / "absent")


@pytest.fixture()
def vii_root(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "CT-COVID19-VII"
    uids = {}
    layout = {
        "patient_001": ["study_a", "study_b"],
        "patient_002": ["study_c", "study_d"],
        "patient_003": ["study_e"],
    }
    for patient, studies in layout.items():
        for study in studies:
            uids[study] = generate_uid()
            write_study(root / "dicom" / patient / study, study_uid=uids[study], patient_id=None)
    return root, uids


def test_mosmed_vii_detects_unusual_columns(vii_root: tuple[Path, dict[str, str]]) -> None:
    root, uids = vii_root
    pd.DataFrame(
        {
            "Study Instance UID": [
                uids["study_a"],
                uids["study_b"],
                "study_c",
                "dicom/patient_002/study_d",
                "1.2.999",
            ],
            "DIAGNOSIS": ["CT-0", "COVID-19", "Normal", "CT-3", "CT-1"],
            "Patient": ["P1", "P1", "P2", "P2", "P9"],
        }
    ).to_excel(root / "dataset_registry.xlsx", index=False)
    result = build_mosmed_vii(root)
    rows = result.rows
    assert rows["study_key"].tolist() == [
        f"mosmed_vii:patient_00{p}/study_{s}" for p, s in [(1, "a"), (1, "b"), (2, "c"), (2, "d")]
    ]
    assert rows["label"].tolist() == [0, 1, 0, 1]
    assert rows["patient_id"].tolist() == ["P1", "P1", "P2", "P2"]
    assert rows["study_uid"].tolist() == [
        uids[s] for s in ("study_a", "study_b", "study_c", "study_d")
    ]
    assert len(result.missing) == 1 and "1.2.999" in result.missing[0]
    assert any("1 study folder(s) on disk are not in the registry" in n for n in result.notes)


def test_mosmed_vii_wrong_column_then_column_map(vii_root: tuple[Path, dict[str, str]]) -> None:
    root, uids = vii_root
    pd.DataFrame({"Exam": ["study_a", "study_e"], "Diagnosis": ["CT-0", "CT-2"]}).to_csv(
        root / "labels.csv", index=False
    )
    with pytest.raises(DatasetError) as info:
        build_mosmed_vii(root)
    message = info.value.message
    assert "no study column found" in message and "'Exam'" in message
    assert "--column-map" in message
    result = build_mosmed_vii(root, column_map={"study": "Exam"})
    assert result.rows["label"].tolist() == [0, 1]
    # without a patient column, patient ids come from the patient folders
    assert result.rows["patient_id"].tolist() == ["patient_001", "patient_003"]
    with pytest.raises(DatasetError, match="has no column 'Exams'"):
        build_mosmed_vii(root, column_map={"study": "Exams"})


def test_mosmed_vii_ambiguous_label_column_is_an_error(
    vii_root: tuple[Path, dict[str, str]],
) -> None:
    root, _ = vii_root
    pd.DataFrame({"study": ["study_a"], "label": ["0"], "class": ["CT-0"]}).to_csv(
        root / "dataset_registry.csv", index=False
    )
    with pytest.raises(DatasetError, match="label column is ambiguous"):
        build_mosmed_vii(root)
    result = build_mosmed_vii(root, column_map={"label": "class"}, label_map={"CT-0": 0})
    assert result.rows["label"].tolist() == [0]


def test_mosmed_vii_without_registry_needs_default_label(
    vii_root: tuple[Path, dict[str, str]],
) -> None:
    root, _ = vii_root
    with pytest.raises(DatasetError, match="default_label"):
        build_mosmed_vii(root)
    result = build_mosmed_vii(root, default_label=1)
    assert len(result.rows) == 5
    assert result.rows["patient_id"].tolist() == ["patient_001"] * 2 + ["patient_002"] * 2 + [
        "patient_003"
    ]


@pytest.fixture()
def ldct_root(tmp_path: Path) -> Path:
    root = tmp_path / "LDCT-LUNGCR"
    write_study(root / "studies" / "s1", study_uid="1.2.840.1", patient_id="PAT-1")
    write_study(root / "studies" / "s2", study_uid="1.2.840.2", patient_id="ANONYMOUS")
    write_study(root / "studies" / "s3", study_uid="1.2.840.3", patient_id="PAT-1")
    pd.DataFrame(
        {
            "study_instance_anon": ["s1", "s2", "s3", "s4", "s5"],
            "pathology": ["yes", 0, "True", "no", "perhaps"],
        }
    ).to_excel(root / "dataset_registry.xlsx", index=False)
    return root


def test_ldct_lungcr_rows_patients_and_missing(ldct_root: Path) -> None:
    result = build_ldct_lungcr(ldct_root)
    rows = result.rows
    assert rows["study_key"].tolist() == ["ldct_lungcr:s1", "ldct_lungcr:s2", "ldct_lungcr:s3"]
    assert rows["label"].tolist() == [1, 0, 1]
    # PatientID from the header; the placeholder ANONYMOUS falls back to the study id
    assert rows["patient_id"].tolist() == ["PAT-1", "s2", "PAT-1"]
    assert rows["study_uid"].tolist() == ["1.2.840.1", "1.2.840.2", "1.2.840.3"]
    assert rows["path"].tolist() == [str(ldct_root / "studies" / s) for s in ("s1", "s2", "s3")]
    assert result.missing == [str(ldct_root / "studies" / "s4")]
    assert any("'perhaps'" in n for n in result.notes)


@pytest.fixture()
def custom_root(tmp_path: Path) -> Path:
    root = tmp_path / "custom"
    write_study(root / "norma_anon" / "study1", study_uid="1.9.1", patient_id="N1")
    # a zip holding one study in a top folder with extension-less names
    src = write_study(tmp_path / "zipsrc" / "10000FA3", study_uid="1.9.2", patient_id="N2")
    with zipfile.ZipFile(root / "norma_anon" / "study2.zip", "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src.parent).as_posix())
    write_study(root / "pneumonia_anon" / "study3", study_uid="1.9.3", patient_id="")
    (root / "pneumonia_anon" / "empty_study").mkdir()
    (root / "pneumonia_anon" / "broken.zip").write_bytes(b"not a zip at all")
    (root / "other").mkdir()
    return root


def test_custom_folders_zips_and_missing(custom_root: Path) -> None:
    result = build_custom(custom_root)
    rows = result.rows
    assert rows["study_key"].tolist() == [
        "custom:norma_anon/study1",
        "custom:norma_anon/study2.zip",
        "custom:pneumonia_anon/study3",
    ]
    assert rows["label"].tolist() == [0, 0, 1]
    assert rows["study_uid"].tolist() == ["1.9.1", "1.9.2", "1.9.3"]
    assert rows["patient_id"].tolist() == ["N1", "N2", ""]
    assert rows["path"].iloc[1].endswith("study2.zip")
    missing = "\n".join(result.missing)
    assert len(result.missing) == 3
    assert "pneumotorax_anon (class folder)" in missing
    assert "empty_study" in missing and "broken.zip" in missing
    assert any("other" in n for n in result.notes)


def test_custom_mapping_parser() -> None:
    assert parse_mapping("norma_anon=0, pneumonia_anon=1") == {"norma_anon": 0, "pneumonia_anon": 1}
    with pytest.raises(ConfigError, match="has no '='"):
        parse_mapping("norma_anon:0")
    with pytest.raises(ConfigError, match="labels are 0 or 1"):
        parse_mapping("norma_anon=2")
    with pytest.raises(ConfigError, match="twice"):
        parse_mapping("a=0,a=1")


def test_custom_with_no_mapped_folder_lists_what_it_found(custom_root: Path) -> None:
    with pytest.raises(DatasetError, match="folders found: norma_anon, other, pneumonia_anon"):
        build_custom(custom_root, "covid=1")


def test_build_source_rejects_options_a_source_does_not_take(custom_root: Path) -> None:
    with pytest.raises(ConfigError, match="does not take option.*column_map"):
        build_source("custom", custom_root, column_map={"study": "x"})
    with pytest.raises(ConfigError, match="unknown dataset source"):
        build_source("kaggle", custom_root)


def test_resolve_columns_prefers_exact_synonyms() -> None:
    synonyms = {"study": ("study_id", "study_file"), "label": ("category",)}
    cols = resolve_columns(
        ["Study ID", "study_notes", "Category"], synonyms, required=("study", "label")
    )
    assert cols == {"study": "Study ID", "label": "Category"}
    # Russian headers of a MosMed export, read with the type VII synonyms
    cols = resolve_columns(
        ["Пациент", "Исследование", "Диагноз", "Комментарий"],
        VII_SYNONYMS,
        required=("study", "label"),
    )
    assert cols == {"study": "Исследование", "label": "Диагноз", "patient": "Пациент"}


def test_same_study_through_two_sources_is_merged_once(tmp_path: Path) -> None:
    """A study copied into a custom class folder and present in type VII merges once."""
    root_vii = tmp_path / "vii"
    write_study(root_vii / "dicom" / "patient_001" / "s1", study_uid="1.7.1", patient_id=None)
    write_study(root_vii / "dicom" / "patient_001" / "s2", study_uid="1.7.2", patient_id=None)
    pd.DataFrame({"study": ["s1", "s2"], "category": ["CT-1", "CT-2"]}).to_csv(
        root_vii / "dataset_registry.csv", index=False
    )
    root_custom = tmp_path / "custom"
    write_study(root_custom / "pneumonia_anon" / "copy_of_s1", study_uid="1.7.1", patient_id="X")
    write_study(root_custom / "pneumonia_anon" / "other", study_uid="1.7.9", patient_id="Y")
    vii = build_mosmed_vii(root_vii).rows
    custom = build_custom(root_custom, {"pneumonia_anon": 1}).rows
    merged, notes = merge_registries([vii, custom])
    assert merged["study_uid"].tolist() == ["1.7.1", "1.7.2", "1.7.9"]
    assert merged["study_key"].iloc[0] == "mosmed_vii:patient_001/s1"
    assert notes == [
        "duplicate: dropped custom:pneumonia_anon/copy_of_s1 (same StudyInstanceUID "
        "as kept mosmed_vii:patient_001/s1)"
    ]


def test_header_read_skips_non_dicom_files(tmp_path: Path) -> None:
    study = tmp_path / "study"
    (study / "annotations").mkdir(parents=True)
    for i in range(8):
        (study / "annotations" / f"{i}.xml").write_text("<xml/>")
    (study / "aaa_readme").write_text("not dicom")
    write_ct(study / "series" / "IM1", study_uid="1.5.5", patient_id="Q")
    header = read_study_header(study)
    assert header is not None and (header.study_uid, header.patient_id) == ("1.5.5", "Q")
    assert header.file.endswith("IM1")


def test_header_read_on_real_public_dicom() -> None:
    root = Path(
        os.environ.get("CTSCREEN_TEST_DICOM")
        or Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
    )
    study = root / "chest-lung-pet-ct-dx-a0001"
    if not study.is_dir():
        pytest.skip("public test DICOM not available")
    header = read_study_header(study)
    assert header is not None
    ds = pydicom.dcmread(header.file, stop_before_pixels=True)
    assert header.study_uid == ds.StudyInstanceUID
    assert header.patient_id == ds.PatientID


# --------------------------------------------------------------------------- CLI


def test_cli_build_and_merge(
    custom_root: Path, ldct_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_custom = tmp_path / "reg" / "custom.csv"
    args = parse(
        [
            "registry",
            "build",
            "custom",
            str(custom_root),
            "-o",
            str(out_custom),
            "--mapping",
            "norma_anon=0,pneumonia_anon=1",
        ]
    )
    assert args.func(args) == EXIT_PARTIAL  # two broken studies
    captured = capsys.readouterr()
    assert "warning: studies listed by the dataset but missing on disk: 2" in captured.err
    assert "3 studies" in captured.out
    assert len(read_registry(out_custom)) == 3

    out_ldct = tmp_path / "reg" / "ldct.csv"
    args = parse(
        [
            "registry",
            "build",
            "ldct_lungcr",
            str(ldct_root),
            "-o",
            str(out_ldct),
            "--mapping",
            "yes=1,true=1,0=0,no=0",
        ]
    )
    assert args.func(args) == EXIT_PARTIAL  # s4 missing
    capsys.readouterr()

    merged_path = tmp_path / "merged.csv"
    args = parse(
        [
            "registry",
            "merge",
            str(out_custom),
            str(out_ldct),
            str(out_custom),
            "-o",
            str(merged_path),
        ]
    )
    assert args.func(args) == EXIT_OK
    captured = capsys.readouterr()
    assert "duplicate studies dropped: 3" in captured.err
    merged = read_registry(merged_path)
    assert len(merged) == 6
    assert merged["study_key"].is_unique


def test_cli_build_bad_column_map_is_config_error(
    vii_root: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, _ = vii_root
    args = parse(
        [
            "registry",
            "build",
            "mosmed_vii",
            str(root),
            "-o",
            str(tmp_path / "x.csv"),
            "--column-map",
            "study",
        ]
    )
    with pytest.raises(ConfigError, match="--column-map item 'study' has no '='"):
        args.func(args)
