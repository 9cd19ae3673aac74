"""The scoring path's two public stages, and the engine options (no Ray needed here)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctscreen import Screener
from ctscreen.pipeline import PreparedStudy, prepare, without_voxels
from ctscreen.report import result_rows, rows_to_frame, write_table
from ctscreen.screener import read_settings
from ctscreen.volume import SliceRef, Volume
from ctscreen.weights import load_checkpoint

COMMON = {"device": "cpu", "backend": "torch", "precision": "fp32"}


def test_prepare_then_score_prepared_is_what_score_gives(
    make_series, tiny_checkpoint: Path
) -> None:
    inputs = [make_series(seed=s, name=f"study{s}")[0][0].parent for s in range(3)]
    missing = inputs[0].parent / "missing.zip"
    inputs.insert(1, missing)
    screener = Screener(tiny_checkpoint, **COMMON)
    whole = list(screener.score(inputs))

    # The reading stage needs the model card only, not a loaded backend.
    settings = read_settings(load_checkpoint(tiny_checkpoint), study_timeout=600.0)
    assert settings == screener.read_settings()
    prepared = [item for path in inputs for item in prepare(path, settings)]
    assert [type(item) for item in prepared] == [PreparedStudy] * 4
    assert prepared[1].array is None and prepared[1].location == str(missing)
    staged = [r for item in prepared for r in screener.score_prepared([item])]

    assert [r.location for r in staged] == [r.location for r in whole]
    assert [r.error for r in staged] == [r.error for r in whole]
    assert whole[1].error and "missing.zip" in whole[1].error
    p_whole = [r.probability for r in whole if r.ok]
    p_staged = [r.probability for r in staged if r.ok]
    assert len(p_whole) == 3 and np.ptp(p_whole) > 1e-4
    np.testing.assert_allclose(p_staged, p_whole, atol=1e-6)
    assert all(item.array is None for item in prepared)  # dropped once scored


def test_a_volume_without_voxels_pickles_as_its_geometry_only() -> None:
    hu = np.zeros((80, 256, 256), np.float32)
    volume = Volume(hu, (2.5, 0.7, 0.7), np.diag([0.7, 0.7, 2.5, 1.0]), (SliceRef("1.2", 7),))
    geometry = without_voxels(volume)
    blob = pickle.dumps(geometry)
    assert len(blob) < 2_000 < hu.nbytes
    back = pickle.loads(blob)
    assert back.shape == (80, 256, 256) and np.isnan(back.hu[3, 4, 5])
    assert back.spacing == volume.spacing and back.slices[0].instance_number == 7
    np.testing.assert_array_equal(back.affine, volume.affine)
    whole = pickle.loads(pickle.dumps(volume))  # a volume with voxels keeps them
    assert whole.hu.flags.writeable and np.array_equal(whole.hu, hu)


def test_a_parquet_table_reads_back_with_the_same_columns_and_values(
    make_series, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("pyarrow")
    folder = make_series(seed=0)[0][0].parent
    screener = Screener(tiny_checkpoint, **COMMON)
    results = list(screener.score([folder, tmp_path / "missing"]))
    frame = rows_to_frame(row for r in results for row in result_rows(r))
    path = write_table(frame, tmp_path / "results.parquet", run_info={"engine": "local"})
    back = pd.read_parquet(path)
    assert list(back.columns) == list(frame.columns)
    assert list(back["processing_status"]) == ["Success", "Failure"]
    assert back.loc[0, "probability_of_pathology"] == frame.loc[0, "probability_of_pathology"]
    assert (tmp_path / "results.run.json").exists()


def test_engine_ray_without_ray_says_how_to_install_it_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run_cli
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now fails as if not installed
    out = tmp_path / "results.xlsx"
    result = run_cli(
        "predict", tmp_path / "a.zip", "-w", tmp_path / "no-such-model.pth", "-o", out,
        "--engine", "ray",
    )  # fmt: skip
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    # Checked before the weights and the inputs (neither exists), so nothing was read.
    assert lines[0].startswith("ctscreen: error: --engine ray needs Ray Data")
    assert 'pip install "ctscreen[ray]"' in lines[0]
    assert not out.exists() and not (tmp_path / "results.xlsx.journal.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--address", "auto"], "--address needs --engine ray"),
        (["--ray-cpus", "2", "--ray-scorers", "1"], "--ray-cpus, --ray-scorers needs --engine"),
    ],
)
def test_ray_options_need_the_ray_engine(
    flags: list[str], message: str, tmp_path: Path, tiny_checkpoint: Path, run_cli
) -> None:
    result = run_cli("predict", tmp_path, "-w", tiny_checkpoint, "-o", tmp_path / "r.csv", *flags)
    assert result.code == 2
    assert message in result.err
