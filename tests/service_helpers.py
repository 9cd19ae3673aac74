"""Shared helpers of the service tests: synthetic study archives, a free port, polling."""

from __future__ import annotations

import socket
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctscreen.synth.dicom_writer import uid_from, write_series
from ctscreen.synth.phantom import make_phantom


def study_zip(
    folder: Path,
    name: str,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = (24, 64, 64),
    pathology: str | None = None,
) -> Path:
    """A zip archive holding one synthetic chest CT study in a top folder named like the zip."""
    spacing = (5.0, 5.0, 5.0)
    phantom = make_phantom(seed=seed, shape=shape, spacing=spacing, pathology=pathology)
    study_uid = str(uid_from("service-study", name, seed))
    series_dir = folder / f"{name}-series"
    paths = write_series(
        phantom.hu,
        spacing=spacing,
        out_dir=series_dir,
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "series")),
        origin=(-157.5, -170.0, -320.0),
        seed=seed,
        extensionless=True,
    )
    archive = folder / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, f"{name}/{p.name}")
    return archive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], *, timeout: float, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        time.sleep(interval)
