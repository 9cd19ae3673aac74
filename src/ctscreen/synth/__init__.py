"""Synthetic chest CT: seeded phantoms written as DICOM series or NIfTI files.

Used by the tests, the offline demo and the benchmarks, so that the whole path
(archives -> training -> prediction -> Excel) runs without any real data.
"""

from __future__ import annotations

from .dataset import LABEL_COLUMNS, StudySpec, generate_dataset, plan_studies, write_study
from .dicom_writer import (
    PIXEL_ENCODINGS,
    TRANSFER_SYNTAXES,
    PixelEncoding,
    write_localizer,
    write_secondary_capture,
    write_series,
)
from .nifti_writer import write_nifti
from .phantom import PATHOLOGIES, Lesion, Phantom, canonical_affine, make_phantom

__all__ = [
    "LABEL_COLUMNS",
    "PATHOLOGIES",
    "PIXEL_ENCODINGS",
    "TRANSFER_SYNTAXES",
    "Lesion",
    "Phantom",
    "PixelEncoding",
    "StudySpec",
    "canonical_affine",
    "generate_dataset",
    "make_phantom",
    "plan_studies",
    "write_localizer",
    "write_nifti",
    "write_secondary_capture",
    "write_series",
    "write_study",
]
