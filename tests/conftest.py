"""Shared fixtures: the real DICOM folder, a factory of tiny synthetic series, a tiny
random-weight checkpoint and an in-process CLI runner."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctscreen.synth.dicom_writer import uid_from, write_series
from ctscreen.synth.phantom import Phantom, make_phantom

#: Network input of the tiny test checkpoints: small enough for a fast forward pass.
TINY_INPUT = (16, 32, 32)
#: Default size of synthetic test series: small enough for a fast test.
SMALL_SHAPE = (24, 64, 64)
SMALL_SPACING = (5.0, 5.0, 5.0)
SMALL_ORIGIN = (-157.5, -170.0, -320.0)


#: Roughly what the suite holds on disk at once (full r3d_18 checkpoints are 130-400 MB;
#: a passing test's folder is removed when it ends, see pyproject.toml).
SUITE_DISK_BYTES = 4 << 30


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a run in which every test passed, remove the run's temporary root.

    ``tmp_path_retention_policy = "failed"`` removes a passing test's ``tmp_path``, but
    not the folders of session fixtures (``tmp_path_factory.mktemp``: the tiny
    checkpoint with its OpenVINO export, the DDP run), about 1 GB in all. A failed run
    keeps everything for inspection.
    """
    factory = getattr(session.config, "_tmp_path_factory", None)
    if exitstatus != 0 or factory is None or getattr(factory, "_basetemp", None) is None:
        return
    shutil.rmtree(factory.getbasetemp(), ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    """After a failed or short-of-space run, the free space where the tests write: a full
    disk shows up as errors in fixtures (a DICOM or checkpoint write refused) that do not
    name the cause."""
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if exitstatus != 0 or free < SUITE_DISK_BYTES:
        terminalreporter.write_line(
            f"free disk space in {where}: {free / 2**30:.1f} GiB (the suite needs about "
            f"{SUITE_DISK_BYTES / 2**30:.0f} GiB)"
        )


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


def make_checkpoint(
    path: Path, *, seed: int = 1234, shape: tuple[int, int, int] = TINY_INPUT, **card: Any
) -> Path:
    """Save a random-weight r3d_18 checkpoint (model card input ``shape``) at ``path``."""
    import torch

    from ctscreen.card import ModelCard
    from ctscreen.config import PreprocessConfig
    from ctscreen.model import build_model
    from ctscreen.weights import save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(
        path, build_model(), ModelCard(preprocess=PreprocessConfig(shape=shape), **card)
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint taking ``TINY_INPUT``, shared by the whole session
    (read-only: copy it before changing it)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint") / "model.pth")


class CliRun:
    """What one in-process ``ctscreen`` command gave."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture()
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """Run ``ctscreen <args>`` in this process (``--no-progress``), as ``main(argv)``.

    Returns a function ``run_cli(*args) -> CliRun`` with the exit code and what
    the command printed to stdout and stderr.
    """
    from ctscreen.cli import main

    def _run(*args: object) -> CliRun:
        capsys.readouterr()  # drop what came before
        code = main(["--no-progress", *map(str, args)])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return _run


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep measured backend choices and exports of the tests out of the user's cache."""
    os.environ["CTSCREEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))
