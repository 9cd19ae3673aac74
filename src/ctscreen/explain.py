"""Per-slice scores and a localisation box from one forward pass.

r3d_18 ends in global average pooling and one linear layer, so its logit is
exactly ``mean(cam) + bias`` over the positions of the last feature grid
(:func:`ctscreen.model.forward_with_cam`). Averaging the map over each depth
position gives a per-depth logit whose mean is the study logit; these are
interpolated back to every original slice through the resize and the
canonical orientation.

Coordinates: the feature grid, the network input and the canonical volume all
span the same field of view with voxel-centre alignment, so a feature index
``c`` on an axis of ``n`` cells sits at the fraction ``(c + 0.5) / n`` of that
axis, as does canonical voxel ``i`` of ``N`` at ``(i + 0.5) / N``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .volume import Volume

#: A feature cell is hot when its activation reaches this share of the maximum.
BOX_FRACTION = 0.5
#: No box when more than this share of the cells is hot: evidence spread over most of
#: the scan (a flat map) localises nothing, and a box round it would mislead.
MAX_HOT_SHARE = 0.5


def sigmoid(x: float | np.ndarray) -> np.ndarray:
    """The probability of a logit (or of each logit of an array), float64 in [0, 1].

    The one logistic function of ctscreen (study, slice and quantisation-check
    probabilities): no overflow, so a logit of -1000 gives exactly 0 and no warning.
    A NaN logit gives NaN; callers refuse non-finite outputs before this.
    """
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def depth_logits(cam: np.ndarray, bias: float) -> np.ndarray:
    """Logit per feature-grid depth: ``mean_{h,w} cam[d] + bias`` (their mean is the logit)."""
    return cam.reshape(cam.shape[0], -1).mean(axis=1) + float(bias)


def slice_logits(cam: np.ndarray, bias: float, n_slices: int) -> np.ndarray:
    """Per-depth logits linearly interpolated onto ``n_slices`` canonical slices."""
    per_depth = depth_logits(cam, bias)
    cells = per_depth.shape[0]
    centres = (np.arange(n_slices) + 0.5) / n_slices * cells - 0.5
    return np.interp(centres, np.arange(cells), per_depth)


def slice_scores(cam: np.ndarray, bias: float, n_slices: int) -> np.ndarray:
    """Score in [0, 1] of every canonical slice: the probability the model would give
    a study that looked everywhere like the neighbourhood of that slice."""
    return sigmoid(slice_logits(cam, bias, n_slices))


def localization_box(cam: np.ndarray, volume: Volume) -> tuple[float, ...] | None:
    """Box around the strongest positive evidence, in patient coordinates.

    The hot cells are those whose activation is at least ``BOX_FRACTION`` of the
    maximum; the box holds the connected group of them (faces, edges or corners
    touching) that contains the maximum, so a second, separate hot spot does not
    stretch it across the scan.

    Returns:
        ``(x_min, x_max, y_min, y_max, z_min, z_max)`` in DICOM patient
        coordinates (LPS, mm: x to the patient's left, y posterior, z superior);
        None when no cell is positive, or when more than ``MAX_HOT_SHARE`` of the
        cells are hot (the evidence is not in one region).
    """
    if cam.size == 0 or not np.isfinite(cam).all() or not np.isfinite(volume.affine).all():
        return None
    peak = float(cam.max())
    if peak <= 0:
        return None
    hot = cam >= BOX_FRACTION * peak
    if hot.mean() > MAX_HOT_SHARE:
        return None
    groups, _ = ndimage.label(hot, structure=np.ones((3,) * cam.ndim, dtype=bool))
    region = np.argwhere(groups == groups[np.unravel_index(np.argmax(cam), cam.shape)])
    lo = region.min(axis=0)
    hi = region.max(axis=0) + 1  # cell edges
    grid = np.asarray(cam.shape, dtype=np.float64)
    shape = np.asarray(volume.shape, dtype=np.float64)
    # fraction of the field of view -> continuous canonical voxel index (edge at -0.5)
    edges = np.stack([lo / grid * shape - 0.5, hi / grid * shape - 0.5], axis=1)
    world = _corners(edges) @ volume.affine.T
    mins, maxs = world[:, :3].min(axis=0), world[:, :3].max(axis=0)
    if not (np.isfinite(mins).all() and np.isfinite(maxs).all()):
        return None
    return tuple(round(float(v), 1) for pair in zip(mins, maxs, strict=True) for v in pair)


def _corners(ranges: np.ndarray) -> np.ndarray:
    """The 8 corners ``[8, 4]`` (homogeneous) of the box ``[[a0, a1], [b0, b1], [c0, c1]]``."""
    return np.array([[a, b, c, 1.0] for a, b, c in itertools.product(*ranges)], dtype=np.float64)


def box_in_voxels(box: Sequence[float], volume: Volume) -> np.ndarray:
    """A patient-coordinate box as canonical voxel-edge ranges: the inverse of
    :func:`localization_box`'s mapping.

    Args:
        box: ``(x_min, x_max, y_min, y_max, z_min, z_max)`` in LPS mm.
        volume: the volume whose affine maps voxel index to LPS mm.

    Returns:
        ``[[d_lo, d_hi], [h_lo, h_hi], [w_lo, w_hi]]`` in continuous voxel index
        (voxel ``i`` spans ``i - 0.5`` to ``i + 0.5``), the bounds of the box's corners.
    """
    x0, x1, y0, y1, z0, z1 = (float(v) for v in box)
    index = _corners(np.array([[x0, x1], [y0, y1], [z0, z1]])) @ np.linalg.inv(volume.affine).T
    return np.stack([index[:, :3].min(axis=0), index[:, :3].max(axis=0)], axis=1)
