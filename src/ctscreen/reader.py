"""One entry point from a registry path to a canonical volume."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import SelectionConfig
from .dicom.discover import discover
from .dicom.select import select_series
from .dicom.volume import build_volume
from .errors import InputError, VolumeError
from .nifti import read_nifti
from .volume import Volume

PATH_TYPES = ("dicom", "nifti")


def load_dicom_study(path: Path | str, *, selection: SelectionConfig | None = None) -> Volume:
    """The scored series of the one study in a folder or zip, as a canonical volume.

    Raises:
        VolumeError: the path holds several studies (point at one of them).
        CtscreenError: any discovery, selection or decoding error.
    """
    with tempfile.TemporaryDirectory(prefix="ctscreen-") as tmp:
        found = discover(path, work_dir=Path(tmp))
        if len(found.studies) != 1:
            raise VolumeError(
                f"{path} holds {len(found.studies)} studies; point the registry at one study."
            )
        chosen = select_series(found.studies[0].series, selection)
        return build_volume(chosen.best.series)


def load_volume(path: Path | str, path_type: str) -> Volume:
    """Load a registry entry: ``path_type`` is ``"dicom"`` (folder/zip) or ``"nifti"``."""
    if path_type == "nifti":
        return read_nifti(path)
    if path_type == "dicom":
        return load_dicom_study(path)
    raise InputError(f"unknown path_type {path_type!r}; use one of {PATH_TYPES}.")
