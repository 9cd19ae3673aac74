"""Write a canonical HU volume as a NIfTI file with an honest RAS affine.

The array is deliberately stored in a non-canonical axis order: nibabel's usual
``(x, y, z)`` order in RAS+ orientation (see :func:`nifti_layout`), which reverses
two axes and transposes all three relative to :mod:`ctscreen.volume`. A reader
only recovers the canonical array if it really reorients by the affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..volume import Volume
from .phantom import canonical_affine

#: LPS <-> RAS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_layout(hu: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-lay a canonical array into file order and give the matching RAS affine.

    File axis ``i`` follows the patient's left -> right (canonical axis 2 reversed),
    ``j`` posterior -> anterior (canonical axis 1 reversed) and ``k`` feet -> head
    (canonical axis 0), i.e. an ``RAS`` ordered array as most NIfTI tools write.

    Args:
        hu: canonical array ``[D, H, W]``.
        affine_lps: its canonical index -> LPS mm affine.

    Returns:
        ``(data, affine_ras)`` where ``data[i, j, k] = hu[k, H-1-j, W-1-i]``.
    """
    d, h, w = hu.shape
    data = np.transpose(hu, (2, 1, 0))[::-1, ::-1, :]
    # file index (i, j, k, 1) -> canonical index (d, h, w, 1)
    to_canonical = np.array(
        [
            [0.0, 0.0, 1.0, 0.0],
            [0.0, -1.0, 0.0, h - 1.0],
            [-1.0, 0.0, 0.0, w - 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    affine_ras = LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64) @ to_canonical
    return np.ascontiguousarray(data), affine_ras


def write_nifti(
    volume_or_hu: Volume | np.ndarray,
    *,
    path: Path,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write a ``.nii.gz`` whose affine maps the stored voxels to RAS mm.

    Args:
        volume_or_hu: a :class:`~ctscreen.volume.Volume` (its affine is used) or a
            canonical float array ``[D, H, W]`` in HU.
        path: output file (``.nii.gz`` or ``.nii``); parent folders are created.
        spacing: voxel size in mm along (D, H, W); needed with a plain array.
        origin: LPS mm of canonical voxel ``[0, 0, 0]``; used with a plain array.

    Returns:
        ``path``.

    Raises:
        ValueError: when a plain array is given without ``spacing``.
    """
    if isinstance(volume_or_hu, Volume):
        hu = volume_or_hu.hu
        affine_lps = volume_or_hu.affine
    else:
        if spacing is None:
            raise ValueError("write_nifti needs spacing when given a plain array")
        hu = np.asarray(volume_or_hu)
        affine_lps = canonical_affine(
            (float(spacing[0]), float(spacing[1]), float(spacing[2])),
            (float(origin[0]), float(origin[1]), float(origin[2])),
        )
    stored = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    data, affine_ras = nifti_layout(stored, affine_lps)
    image = nib.Nifti1Image(data, affine_ras)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_data_dtype(np.int16)
    image.set_qform(affine_ras, code=1)
    image.set_sform(affine_ras, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path
