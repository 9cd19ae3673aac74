"""NIfTI volumes (MosMedData COVID19_1110 and similar) into the canonical volume.

NIfTI stores a RAS+ affine; DICOM patient space is LPS+. The affine is converted
(negate x and y) and the array is transposed and flipped into the same canonical
orientation the DICOM reader produces, so the same volume saved as DICOM and as
NIfTI gives equal arrays.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, VolumeError
from .volume import SliceRef, Volume, canonical_permutation, reorient_affine, spacing_from_affine

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti(path: Path | str) -> Volume:
    """Read a 3D NIfTI file as a canonical HU volume.

    The stored values are taken as HU after the header's scl_slope/scl_inter
    (as MosMedData stores them).

    Raises:
        InputError: the file is missing or not a readable NIfTI file.
        VolumeError: the image is not 3D (a 4D series needs one volume picked).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; check the path in the registry.")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path.name} is not a readable NIfTI file ({exc}).") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(
            f"{path.name} has {data.ndim} dimensions {data.shape}; ctscreen needs one 3D volume."
        )
    affine_lps = _RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
    perm, flips = canonical_permutation(affine_lps)
    axes = [k for k in range(3) if flips[k]]
    hu = np.ascontiguousarray(np.flip(np.transpose(data, perm), axes), dtype=np.float32)
    affine = reorient_affine(affine_lps, data.shape, perm, flips)
    return Volume(
        hu=hu,
        spacing=spacing_from_affine(affine),
        affine=affine,
        slices=tuple(SliceRef(sop_instance_uid="") for _ in range(hu.shape[0])),
        warnings=(),
        source=str(path),
    )
