"""The volume value object and its one canonical orientation.

Canonical orientation (shared by DICOM and NIfTI readers):

* ``hu`` is a float32 array indexed ``[d, h, w]``.
* axis 0 (depth, D) runs from the patient's feet towards the head  (+S),
* axis 1 (height, H) runs from anterior to posterior                (+P),
* axis 2 (width, W) runs from the patient's right to left           (+L).

So ``hu[k]`` is an axial slice shown as radiologists view it (anterior at the top,
the patient's right on the viewer's left), and ``hu[0]`` is the most inferior
slice. The same anatomy gives the same array whether the scan ran head-first or
feet-first and whatever order the files came in.

``affine`` maps a homogeneous voxel index ``(d, h, w, 1)`` to DICOM patient
coordinates (LPS, millimetres): x grows to the patient's left, y to posterior,
z to superior. Geometry with a gantry tilt or an oblique plane keeps its true
direction cosines in the affine; only the axis order and signs are made canonical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import io_orientation

from .errors import VolumeError

#: Which LPS world axis each canonical array axis follows: d -> z(S), h -> y(P), w -> x(L).
CANONICAL_WORLD_AXES: tuple[int, int, int] = (2, 1, 0)


@dataclass(frozen=True, eq=False)
class SliceRef:
    """Where one canonical slice (index along D) came from."""

    sop_instance_uid: str
    instance_number: int | None = None
    frame: int | None = None  # 1-based frame number inside a multi-frame object


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units, in the canonical orientation.

    Attributes:
        hu: float32 array ``[D, H, W]`` in HU (see the module docstring).
        spacing: voxel size in mm along (D, H, W).
        affine: 4x4 float64 matrix, voxel index (d, h, w) -> LPS mm.
        slices: one :class:`SliceRef` per index along D, in canonical order.
        warnings: what was off in the source but did not stop the build
            (gaps, duplicates, non-uniform spacing, gantry tilt, ...).
        source: a human-readable description of where the volume came from.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    slices: tuple[SliceRef, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # A volume without voxels (one value broadcast over the shape, as
        # ``pipeline.without_voxels`` makes it) pickles as that value and the shape,
        # not as D x H x W floats: results cross process boundaries (Ray) cheaply.
        fields = (self.spacing, self.affine, self.slices, self.warnings, self.source)
        if self.hu.size and not any(self.hu.strides):
            return (_broadcast_volume, (self.hu.flat[0], self.hu.shape, *fields))
        return (Volume, (self.hu, *fields))

    @property
    def shape(self) -> tuple[int, int, int]:
        d, h, w = self.hu.shape
        return (int(d), int(h), int(w))

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(s.sop_instance_uid for s in self.slices)

    @property
    def instance_numbers(self) -> tuple[int | None, ...]:
        return tuple(s.instance_number for s in self.slices)


def _broadcast_volume(value: np.generic, shape: tuple[int, ...], *fields: object) -> Volume:
    """Rebuild a pickled volume whose voxels are one value broadcast over ``shape``."""
    return Volume(np.broadcast_to(value, shape), *fields)  # type: ignore[arg-type]


def canonical_permutation(
    affine: np.ndarray,
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to reorder and flip an array so that its axes follow (+S, +P, +L).

    Args:
        affine: 4x4 matrix mapping the array's voxel index to LPS mm.

    Returns:
        ``(perm, flips)``: transpose the array by ``perm``, then flip every output
        axis ``k`` for which ``flips[k]`` is true.

    Raises:
        VolumeError: the affine is not finite or its axes do not span 3D space.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise VolumeError(f"the voxel-to-patient affine is not a finite 4x4 matrix: {matrix!r}")
    ornt = io_orientation(matrix)
    perm: list[int] = []
    flips: list[bool] = []
    for world_axis in CANONICAL_WORLD_AXES:
        (matches,) = np.nonzero(ornt[:, 0] == world_axis)
        if matches.size == 0:
            raise VolumeError(
                "the voxel axes do not span 3D space (a zero or repeated spacing or direction "
                "in PixelSpacing, ImageOrientationPatient or the slice positions), so the "
                "volume has no orientation."
            )
        source_axis = int(matches[0])
        perm.append(source_axis)
        flips.append(bool(ornt[source_axis, 1] < 0))
    return (perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2])


def reorient_affine(
    affine: np.ndarray,
    shape: tuple[int, ...],
    perm: tuple[int, int, int],
    flips: tuple[bool, bool, bool],
) -> np.ndarray:
    """The affine of ``flip(transpose(array, perm), flips)`` given the array's affine.

    Args:
        affine: 4x4 matrix of the original array (index -> LPS mm).
        shape: the original array's shape.
        perm: transpose order (output axis k takes input axis ``perm[k]``).
        flips: which output axes are reversed after the transpose.
    """
    # new index n -> old index o:  o[perm[k]] = (shape[perm[k]] - 1 - n[k]) if flip else n[k]
    to_old = np.zeros((4, 4), dtype=np.float64)
    to_old[3, 3] = 1.0
    for k, src in enumerate(perm):
        if flips[k]:
            to_old[src, k] = -1.0
            to_old[src, 3] = shape[src] - 1
        else:
            to_old[src, k] = 1.0
    return np.asarray(affine, dtype=np.float64) @ to_old


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (lengths of the affine's columns)."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))
