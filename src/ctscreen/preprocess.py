"""HU volume -> network input: window to [0, 1], then resize to a fixed shape.

The resize covers the whole field of view (no crop, no pad). Each axis is
resampled on its own: axes that shrink use area averaging (every source voxel
contributes, so thin structures and noise do not alias), axes that grow use
linear interpolation. Both use voxel-centre alignment (``align_corners=False``).

It is numpy only, so the runtime that scores an exported bundle needs no
PyTorch. The arithmetic is PyTorch's: area averaging is its adaptive average
pooling (output voxel ``i`` of ``n`` is the plain mean of input voxels
``floor(i L / n)`` to ``ceil((i + 1) L / n)``, the ``mode="area"`` of
``F.interpolate``) and linear is its ``mode="linear", align_corners=False``;
``tests/test_preprocess.py`` holds both against PyTorch to float32 rounding.
"""

from __future__ import annotations

import numpy as np

from .config import PreprocessConfig
from .volume import Volume


def window_to_unit(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map HU to float32 in [0, 1] through the configured window (new array)."""
    out = np.subtract(hu, np.float32(config.hu_min), dtype=np.float32)
    out *= np.float32(1.0 / config.window_width)
    return np.clip(out, 0.0, 1.0, out=out)


def area_bins(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last input index of each of ``size`` area bins over ``length``."""
    i = np.arange(size, dtype=np.int64)
    starts = (i * length) // size
    ends = -((-(i + 1) * length) // size)  # ceiling division
    return starts, ends


def _area_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Shrink ``axis`` of ``x`` to ``size`` by averaging each (possibly overlapping) bin."""
    starts, ends = area_bins(x.shape[axis], size)
    # reduceat sums x[idx[k]:idx[k+1]]; interleaving starts and ends gives every bin at
    # the even places (the last bin runs to the end of the axis by itself).
    idx = np.empty(2 * size - 1, dtype=np.int64)
    idx[0::2] = starts
    idx[1::2] = ends[:-1]
    sums = np.add.reduceat(x, idx, axis=axis, dtype=np.float32)
    sums = np.take(sums, np.arange(0, 2 * size - 1, 2), axis=axis)
    counts = (ends - starts).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = size
    sums /= counts.reshape(shape)
    return sums


def _linear_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Grow ``axis`` of ``x`` to ``size`` by linear interpolation between voxel centres."""
    length = x.shape[axis]
    scale = np.float32(length) / np.float32(size)
    source = np.maximum((np.arange(size, dtype=np.float32) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(source.astype(np.int64), length - 1)
    high = np.minimum(low + 1, length - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    weight = np.clip(source - low, 0.0, 1.0).astype(np.float32).reshape(shape)
    out = np.take(x, low, axis=axis) * (np.float32(1.0) - weight)
    out += np.take(x, high, axis=axis) * weight
    return out


def resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Resize one axis of a float32 array (area down, linear up; unchanged when equal)."""
    if x.shape[axis] == size:
        return x
    if size < x.shape[axis]:
        return _area_axis(x, axis, size)
    return _linear_axis(x, axis, size)


def preprocess_array(
    hu: np.ndarray, config: PreprocessConfig, *, chunk_slices: int = 8
) -> np.ndarray:
    """Window and resize a canonical HU array; returns float32 ``config.shape`` in [0, 1].

    Slices are windowed and resized in-plane a chunk at a time, so the extra
    memory stays at a few slices whatever the size of the volume.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D [D, H, W] array, got shape {hu.shape}")
    depth, height, width = config.shape
    planes = np.empty((hu.shape[0], height, width), dtype=np.float32)
    for start in range(0, hu.shape[0], chunk_slices):
        chunk = window_to_unit(hu[start : start + chunk_slices], config)
        planes[start : start + chunk_slices] = resize_axis(resize_axis(chunk, 1, height), 2, width)
    out = resize_axis(planes, 0, depth)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def preprocess(volume: Volume, config: PreprocessConfig) -> np.ndarray:
    """The network input for one volume: float32 ``config.shape`` in [0, 1]."""
    return preprocess_array(volume.hu, config)
