"""The preprocessing cache and the dataset that reads it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ctscreen.config import PreprocessConfig
from ctscreen.data import cache as cache_lib
from ctscreen.data.dataset import StudyDataset, select_rows
from ctscreen.errors import DatasetError, VolumeError
from ctscreen.nifti import read_nifti
from ctscreen.preprocess import preprocess
from ctscreen.train.augment import AugmentConfig, augment_volume

SMALL = PreprocessConfig(shape=(8, 16, 16))


def write_nifti(path, seed: int, shape=(24, 20, 12)) -> None:
    """A small HU volume (x, y, z): air around a soft-tissue body holding a "lung"
    (the cache refuses what predict refuses, a volume without lung among them)."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[:, :, 1:-1] = 40.0
    hu[3:-3, 3:-3, 2:-2] = rng.normal(-700, 200, (shape[0] - 6, shape[1] - 6, shape[2] - 4))
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))


def make_registry(tmp_path, n: int = 4) -> pd.DataFrame:
    rows = []
    for i in range(n):
        path = tmp_path / f"study{i}.nii.gz"
        write_nifti(path, seed=i)
        rows.append(
            {
                "study_key": f"t:{i}",
                "path": str(path),
                "path_type": "nifti",
                "label": i % 2,
                "dataset": "t",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture()
def counting(monkeypatch):
    """Count calls of decode_study while keeping the real decoder."""
    calls: list[str] = []
    real = cache_lib.decode_study

    def wrapped(path, path_type, config):
        calls.append(str(path))
        return real(path, path_type, config)

    monkeypatch.setattr(cache_lib, "decode_study", wrapped)
    return calls


def test_entries_reused_and_config_isolated(tmp_path, counting) -> None:
    frame = make_registry(tmp_path)
    cache_dir = tmp_path / "cache"
    first = cache_lib.build_cache(frame, cache_dir, SMALL, workers=1, progress=False)
    assert (first.n_built, first.n_reused, first.n_failed) == (4, 0, 0)
    assert len(counting) == 4

    second = cache_lib.build_cache(frame, cache_dir, SMALL, workers=1, progress=False)
    assert (second.n_built, second.n_reused) == (0, 4)
    assert len(counting) == 4  # nothing decoded again

    other = PreprocessConfig(window_level=40, window_width=400, shape=(8, 16, 16))
    third = cache_lib.build_cache(frame, cache_dir, other, workers=1, progress=False)
    assert third.n_built == 4 and third.root != first.root
    assert len(counting) == 8
    assert len(list(first.root.glob("*.npy"))) == len(list(third.root.glob("*.npy"))) == 4
    # the entries of the two configurations differ (another window, other values)
    key, src = frame.loc[0, "study_key"], frame.loc[0, "path"]
    a = cache_lib.load_entry(cache_lib.entry_path(cache_dir, SMALL, key, src))
    b = cache_lib.load_entry(cache_lib.entry_path(cache_dir, other, key, src))
    assert a.shape == b.shape == (8, 16, 16) and not np.allclose(a, b)
    saved = json.loads((first.root / "config.json").read_text())
    assert PreprocessConfig.from_dict(saved["preprocess"]) == SMALL


def test_entry_matches_direct_preprocessing_within_quantisation(tmp_path) -> None:
    frame = make_registry(tmp_path, n=1)
    report = cache_lib.build_cache(frame, tmp_path / "c", SMALL, workers=1, progress=False)
    entry = next(report.root.glob("*.npy"))
    assert np.load(entry).dtype == np.uint8
    direct = preprocess(read_nifti(frame.loc[0, "path"]), SMALL)
    cached = cache_lib.load_entry(entry)
    assert np.abs(cached - direct).max() <= 0.5 / 255 + 1e-6
    # 1/510 of the 1500 HU window: under 3 HU
    assert np.abs(cached - direct).max() * SMALL.window_width < 3.0


def test_failing_study_is_recorded_not_raised(tmp_path, counting) -> None:
    frame = make_registry(tmp_path, n=3)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    frame.loc[len(frame)] = {
        "study_key": "t:bad",
        "path": str(broken),
        "path_type": "nifti",
        "label": 1,
        "dataset": "t",
    }
    cache_dir = tmp_path / "cache"
    report = cache_lib.build_cache(frame, cache_dir, SMALL, workers=1, progress=False)
    assert report.n_built == 3 and report.failed_keys == {"t:bad"}
    failure = report.failures[0]
    assert failure.code == "INPUT" and "NIfTI" in failure.message
    manifest = cache_lib.read_manifest(report.root)
    statuses = {rec["study_key"]: rec["status"] for rec in manifest.values()}
    assert statuses == {"t:0": "ok", "t:1": "ok", "t:2": "ok", "t:bad": "failed"}
    # a known failure is reported again without decoding, unless retried
    n_calls = len(counting)
    again = cache_lib.build_cache(frame, cache_dir, SMALL, workers=1, progress=False)
    assert again.failed_keys == {"t:bad"} and len(counting) == n_calls
    cache_lib.build_cache(frame, cache_dir, SMALL, workers=1, progress=False, retry_failed=True)
    assert len(counting) == n_calls + 1


def test_loader_errors_of_any_ctscreen_type_are_recorded(tmp_path, monkeypatch) -> None:
    def fails(path, path_type, config):
        raise VolumeError("slices overlap; re-export the series.")

    monkeypatch.setattr(cache_lib, "decode_study", fails)
    frame = make_registry(tmp_path, n=2)
    report = cache_lib.build_cache(frame, tmp_path / "c", SMALL, workers=1, progress=False)
    assert report.n_failed == 2 and {f.code for f in report.failures} == {"VOLUME"}


def test_process_pool_build(tmp_path) -> None:
    frame = make_registry(tmp_path, n=3)
    report = cache_lib.build_cache(frame, tmp_path / "c", SMALL, workers=2, progress=False)
    assert (report.n_built, report.n_failed) == (3, 0)
    assert len(list(report.root.glob("*.npy"))) == 3
    assert not list(report.root.glob(".*tmp"))


def test_damaged_entry_and_duplicate_keys(tmp_path) -> None:
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="damaged"):
        cache_lib.load_entry(bad)
    frame = make_registry(tmp_path, n=2)
    frame.loc[1, "study_key"] = frame.loc[0, "study_key"]
    with pytest.raises(DatasetError, match="twice"):
        cache_lib.build_cache(frame, tmp_path / "c", SMALL, progress=False)


def test_dataset_reads_cache_and_falls_back(tmp_path, counting) -> None:
    frame = make_registry(tmp_path, n=3)
    rows = select_rows(frame, ["t:2", "t:0"])
    assert rows["study_key"].tolist() == ["t:2", "t:0"]
    with pytest.raises(DatasetError, match="not in the registry"):
        select_rows(frame, ["t:9"])

    uncached = StudyDataset(rows, SMALL)
    x, y = uncached[0]
    assert x.shape == (1, 8, 16, 16) and x.dtype == torch.float32 and float(y) == 0.0
    assert len(counting) == 1

    cached = StudyDataset(rows, SMALL, cache_dir=tmp_path / "c")
    x1, _ = cached[0]  # miss: decodes and writes the entry
    x2, _ = cached[0]  # hit
    assert len(counting) == 2
    assert torch.equal(x1, x2)
    assert torch.allclose(x1, x, atol=0.5 / 255 + 1e-6)


def test_augmentation_is_seeded_bounded_and_keeps_shape() -> None:
    x = torch.rand(1, 8, 16, 16)
    a = augment_volume(x, generator=torch.Generator().manual_seed(1))
    b = augment_volume(x, generator=torch.Generator().manual_seed(1))
    c = augment_volume(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # with every transform off, the volume is returned unchanged
    off = AugmentConfig(flip_lr=0, intensity_scale=0, intensity_shift=0, translate=0, zoom=0)
    assert torch.equal(augment_volume(x, off), x)
    # the flip alone mirrors the W (patient left-right) axis only
    flip = AugmentConfig(flip_lr=1.0, intensity_scale=0, intensity_shift=0, translate=0, zoom=0)
    assert torch.equal(augment_volume(x, flip), x.flip(-1))


def test_cache_command_reports_failures_with_exit_code(tmp_path, capsys) -> None:
    import argparse

    from ctscreen.cli import EXIT_PARTIAL
    from ctscreen.cli import cache as cli_cache
    from ctscreen.data.registry import write_registry

    frame = make_registry(tmp_path, n=2)
    frame.loc[len(frame)] = {
        "study_key": "t:gone",
        "path": str(tmp_path / "missing.nii.gz"),
        "path_type": "nifti",
        "label": 0,
        "dataset": "t",
    }
    for column in ("patient_id", "study_uid", "source_category"):
        frame[column] = ""
    registry = write_registry(frame, tmp_path / "merged.csv")
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-progress", action="store_true")
    cli_cache.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "--no-progress",
            "cache",
            str(registry),
            "--cache-dir",
            str(tmp_path / "c"),
            "--workers",
            "1",
            "--shape",
            "8",
            "16",
            "16",
            "--window-level",
            "-500",
        ]
    )
    assert args.func(args) == EXIT_PARTIAL
    out = capsys.readouterr().out
    assert "2 built, 1 failed" in out and "FAILED t:gone (INPUT)" in out
    config = PreprocessConfig(window_level=-500, shape=(8, 16, 16))
    assert cache_lib.cache_root(tmp_path / "c", config).is_dir()
    assert len(list(cache_lib.cache_root(tmp_path / "c", config).glob("*.npy"))) == 2


def test_config_hash_ignores_int_float_spelling() -> None:
    a = PreprocessConfig(window_level=-600, window_width=1500, shape=(8, 16, 16))
    b = PreprocessConfig(window_level=-600.0, window_width=1500.0, shape=(8, 16, 16))
    assert cache_lib.config_hash(a) == cache_lib.config_hash(b)
    assert cache_lib.config_hash(a) != cache_lib.config_hash(PreprocessConfig(shape=(8, 16, 17)))
