"""Shared fixtures: the real DICOM folder and a factory of tiny synthetic series."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctscreen.synth.dicom_writer import uid_from, write_series
from ctscreen.synth.phantom import Phantom, make_phantom

#: Default size of synthetic test series: small enough for a fast test.
SMALL_SHAPE = (24, 64, 64)
SMALL_SPACING = (5.0, 5.0, 5.0)
SMALL_ORIGIN = (-157.5, -170.0, -320.0)


def _real_dicom_root() -> Path:
    env = os.environ.get("CTSCREEN_TEST_DICOM")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


@pytest.fixture(scope="session")
def dicom_root() -> Path:
    """The folder of real public CT DICOM (``SOURCES.md`` inside); skips when absent."""
    root = _real_dicom_root()
    if not root.is_dir():
        pytest.skip(f"real DICOM test data not found at {root} (set CTSCREEN_TEST_DICOM)")
    return root


MakeSeries = Callable[..., tuple[list[Path], Phantom]]


@pytest.fixture()
def make_series(tmp_path: Path) -> MakeSeries:
    """A factory writing a small synthetic CT series under ``tmp_path``.

    Call it as ``make_series(seed=0, pathology=None, shape=..., spacing=...,
    origin=..., name="series", **write_series_options)``; it returns
    ``(paths, phantom)``. Writer options are those of
    :func:`ctscreen.synth.dicom_writer.write_series` (``patient_position``,
    ``transfer_syntax``, ``multiframe``, ``extensionless``, ``shuffle_names``,
    ``pixel_encoding``, ...). UIDs follow from ``seed`` and ``name``; pass
    ``study_uid``/``series_uid`` to put several series in one study.
    """

    def _make(
        *,
        seed: int = 0,
        pathology: str | None = None,
        shape: tuple[int, int, int] = SMALL_SHAPE,
        spacing: tuple[float, float, float] = SMALL_SPACING,
        origin: tuple[float, float, float] = SMALL_ORIGIN,
        name: str = "series",
        **options: Any,
    ) -> tuple[list[Path], Phantom]:
        phantom = make_phantom(seed=seed, shape=shape, spacing=spacing, pathology=pathology)
        study_uid = options.pop("study_uid", str(uid_from("test-study", seed)))
        series_uid = options.pop("series_uid", str(uid_from(study_uid, name)))
        paths = write_series(
            phantom.hu,
            spacing=spacing,
            out_dir=tmp_path / name,
            study_uid=study_uid,
            series_uid=series_uid,
            origin=origin,
            seed=seed,
            **options,
        )
        return paths, phantom

    return _make
