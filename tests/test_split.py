"""Patient-grouped, label-stratified split of a registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctscreen.cli import EXIT_OK
from ctscreen.cli import split as split_cli
from ctscreen.data.registry import RegistryRow, rows_to_frame, write_registry
from ctscreen.data.split import (
    read_keys,
    split_groups,
    split_registry,
    write_keys,
)
from ctscreen.errors import ConfigError, DatasetError


def make_registry(n_patients: int = 20, *, seed: int = 7) -> pd.DataFrame:
    """Patients with 1-4 studies each, ~35% pathology, plus studies with no patient id."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        sick = rng.random() < 0.35
        for s in range(int(rng.integers(1, 5))):
            # a patient's later study may differ (e.g. a follow-up after recovery)
            label = int(sick) if s < 2 else int(not sick)
            rows.append(
                RegistryRow(
                    study_key=f"ds:{p:03d}-{s}",
                    path=f"/x/{p}/{s}",
                    path_type="dicom",
                    label=label,
                    dataset="ds",
                    patient_id=f"patient_{p:03d}",
                )
            )
    for i in range(8):
        rows.append(
            RegistryRow(
                study_key=f"other:{i}",
                path=f"/y/{i}",
                path_type="nifti",
                label=i % 2,
                dataset="other",
            )
        )
    return rows_to_frame(rows)


def patients_of(frame: pd.DataFrame, keys: tuple[str, ...]) -> set[tuple[str, str]]:
    """(dataset, patient_id) pairs of the given keys, read straight from the columns."""
    part = frame[frame["study_key"].isin(keys) & (frame["patient_id"] != "")]
    return set(zip(part["dataset"], part["patient_id"], strict=True))


def test_no_patient_on_both_sides_and_ratio_kept() -> None:
    frame = make_registry()
    assert len(frame) >= 40
    result = split_registry(frame, val_fraction=0.2, seed=0)
    assert set(result.train_keys).isdisjoint(result.val_keys)
    assert set(result.train_keys) | set(result.val_keys) == set(frame["study_key"])
    assert patients_of(frame, result.train_keys).isdisjoint(patients_of(frame, result.val_keys))
    assert result.summary["method"] == "stratified_group_kfold"
    val = frame[frame["study_key"].isin(result.val_keys)]
    assert 0.1 <= len(val) / len(frame) <= 0.3
    assert abs(val["label"].mean() - frame["label"].mean()) <= 0.12
    counts = result.summary["counts"]
    assert counts["val"]["0"] + counts["val"]["1"] == len(result.val_keys)
    assert counts["val"]["1"] == int(val["label"].sum())


def test_split_is_deterministic_per_seed() -> None:
    frame = make_registry()
    first = split_registry(frame, seed=0)
    again = split_registry(frame.sample(frac=1.0, random_state=0).sort_index(), seed=0)
    assert first.val_keys == again.val_keys and first.train_keys == again.train_keys
    other = split_registry(frame, seed=1)
    assert set(other.val_keys) != set(first.val_keys)


def test_same_patient_id_in_two_datasets_are_different_groups() -> None:
    frame = rows_to_frame(
        [
            RegistryRow("a:1", "/a/1", "dicom", 0, "a", patient_id="patient_001"),
            RegistryRow("a:2", "/a/2", "dicom", 1, "a", patient_id="patient_001"),
            RegistryRow("b:1", "/b/1", "dicom", 0, "b", patient_id="patient_001"),
            RegistryRow("b:2", "/b/2", "dicom", 0, "b"),
        ]
    )
    groups = split_groups(frame).tolist()
    assert groups[0] == groups[1]
    assert len(set(groups)) == 3


def test_tiny_registry_falls_back_to_grouped_shuffle() -> None:
    frame = rows_to_frame(
        [
            RegistryRow(f"d:{i}", f"/d/{i}", "dicom", i % 2, "d", patient_id=f"p{i // 2}")
            for i in range(6)
        ]
    )
    result = split_registry(frame, val_fraction=0.2, seed=3)
    assert result.summary["method"] == "grouped_shuffle"
    assert result.train_keys and result.val_keys
    assert patients_of(frame, result.train_keys).isdisjoint(patients_of(frame, result.val_keys))


def test_split_rejects_bad_inputs() -> None:
    one_patient = rows_to_frame(
        [RegistryRow(f"d:{i}", f"/d/{i}", "dicom", i % 2, "d", patient_id="p") for i in range(4)]
    )
    with pytest.raises(DatasetError, match="at least 2 patients"):
        split_registry(one_patient)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_registry(make_registry(), val_fraction=1.0)


def test_keys_round_trip(tmp_path: Path) -> None:
    keys = ["covid19_1110:study_0001", "custom:норма/исследование.zip"]
    path = write_keys(keys, tmp_path / "k" / "train_keys.txt")
    assert read_keys(path) == keys
    path.write_text("a\n\nb\na\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="twice"):
        read_keys(path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_keys(tmp_path / "none.txt")


def test_cli_split_writes_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = make_registry()
    reg = write_registry(frame, tmp_path / "merged.csv")
    parser = argparse.ArgumentParser()
    split_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "split",
            str(reg),
            "--out-dir",
            str(tmp_path / "data"),
            "--val-fraction",
            "0.25",
            "--seed",
            "5",
        ]
    )
    assert args.func(args) == EXIT_OK
    train = read_keys(tmp_path / "data" / "train_keys.txt")
    val = read_keys(tmp_path / "data" / "val_keys.txt")
    expected = split_registry(frame, val_fraction=0.25, seed=5)
    assert tuple(train) == expected.train_keys and tuple(val) == expected.val_keys
    summary = json.loads((tmp_path / "data" / "split_summary.json").read_text())
    assert summary["seed"] == 5 and summary["studies"]["val"] == len(val)
    out = capsys.readouterr().out
    assert f"val   {len(val):6d} studies" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["split", str(reg), "--out-dir", "x", "--val-fraction", "1.5"])
