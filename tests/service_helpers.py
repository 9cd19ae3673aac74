"""Shared helpers of the service tests: a tiny checkpoint, synthetic study archives, polling."""

from __future__ import annotations

import socket
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctscreen.card import ModelCard
from ctscreen.config import PreprocessConfig
from ctscreen.model import build_model
from ctscreen.synth.dicom_writer import uid_from, write_series
from ctscreen.synth.phantom import make_phantom
from ctscreen.weights import save_checkpoint

#: Input shape of the tiny test model (a forward pass takes well under a second).
TINY_SHAPE = (16, 32, 32)


def tiny_checkpoint(path: Path, shape: tuple[int, int, int] = TINY_SHAPE, seed: int = 1234) -> Path:
    """A random-weight checkpoint with a real model card."""
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(), ModelCard(preprocess=PreprocessConfig(shape=shape)))
    return path


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
