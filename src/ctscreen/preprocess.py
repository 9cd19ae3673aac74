"""HU volume -> network input: window to [0, 1], then resize to a fixed shape.

The resize covers the whole field of view (no crop, no pad). Each axis is
resampled on its own: axes that shrink use area averaging (every source voxel
contributes, so thin structures and noise do not alias), axes that grow use
linear interpolation. Both use voxel-centre alignment (``align_corners=False``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import PreprocessConfig
from .volume import Volume


def window_to_unit(hu: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """Map HU to float32 in [0, 1] through the configured window (new tensor)."""
    source = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
    return source.sub(config.hu_min).mul_(1.0 / config.window_width).clamp_(0.0, 1.0)


def _resize_axis(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Resize one spatial axis of a ``[D, H, W]`` tensor (area down, linear up)."""
    if x.shape[axis] == size:
        return x
    moved = x.movedim(axis, -1)
    lead = moved.shape[:-1]
    flat = moved.reshape(1, -1, moved.shape[-1])  # [1, C, L] treats other axes as channels
    if size < flat.shape[-1]:
        resized = F.interpolate(flat, size=size, mode="area")
    else:
        resized = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return resized.reshape(*lead, size).movedim(-1, axis)


def _resize_planes(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the two in-plane axes of ``[N, H, W]``; one 2D area pass when both shrink
    (area averaging is separable, so this equals two 1D passes, only faster)."""
    if height < x.shape[1] and width < x.shape[2]:
        return F.adaptive_avg_pool2d(x, (height, width))
    return _resize_axis(_resize_axis(x, 1, height), 2, width)


def resize_volume(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize a ``[D, H, W]`` float32 array to ``shape`` (see the module docstring)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    # Shrink the largest reductions first so later passes work on less data.
    order = sorted(range(3), key=lambda a: shape[a] / t.shape[a])
    for axis in order:
        t = _resize_axis(t, axis, shape[axis])
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def _resize_depth(planes: torch.Tensor, depth: int) -> torch.Tensor:
    """Resize axis 0 of ``[N, H, W]`` without copying the planes first."""
    if planes.shape[0] == depth:
        return planes
    x = planes[None, None]  # [1, 1, N, H, W]; H and W keep their size
    size = (depth, planes.shape[1], planes.shape[2])
    if depth < planes.shape[0]:
        return F.adaptive_avg_pool3d(x, size)[0, 0]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]


def preprocess_array(
    hu: np.ndarray, config: PreprocessConfig, *, chunk_slices: int = 8
) -> np.ndarray:
    """Window and resize a canonical HU array; returns float32 ``config.shape`` in [0, 1].

    Slices are windowed and resized in-plane a chunk at a time, so the extra
    memory stays at a few slices whatever the size of the volume.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D [D, H, W] array, got shape {hu.shape}")
    _, height, width = config.shape
    planes = torch.empty((hu.shape[0], height, width), dtype=torch.float32)
    for start in range(0, hu.shape[0], chunk_slices):
        chunk = window_to_unit(hu[start : start + chunk_slices], config)
        planes[start : start + chunk_slices] = _resize_planes(chunk, height, width)
    out = _resize_depth(planes, config.shape[0]).clamp_(0.0, 1.0)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def preprocess(volume: Volume, config: PreprocessConfig) -> np.ndarray:
    """The network input for one volume: float32 ``config.shape`` in [0, 1]."""
    return preprocess_array(volume.hu, config)
