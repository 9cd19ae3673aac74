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


def window_to_unit(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map HU to float32 in [0, 1] through the configured window (new array)."""
    out = np.asarray(hu, dtype=np.float32) - np.float32(config.hu_min)
    out *= np.float32(1.0 / config.window_width)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _resize_axis(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Resize one spatial axis of a ``[D, H, W]`` tensor (area down, linear up)."""
    if x.shape[axis] == size:
        return x
    moved = x.movedim(axis, -1)
    lead = moved.shape[:-1]
    flat = moved.reshape(1, -1, moved.shape[-1])  # [1, C, L] treats other axes as channels
    mode = "area" if size < flat.shape[-1] else "linear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    resized = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return resized.reshape(*lead, size).movedim(-1, axis)


def resize_volume(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize a ``[D, H, W]`` float32 array to ``shape`` (see the module docstring)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    # Shrink the largest reductions first so later passes work on less data.
    order = sorted(range(3), key=lambda a: shape[a] / t.shape[a])
    for axis in order:
        t = _resize_axis(t, axis, shape[axis])
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def preprocess_array(
    hu: np.ndarray, config: PreprocessConfig, *, chunk_slices: int = 32
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
        chunk = torch.from_numpy(window_to_unit(hu[start : start + chunk_slices], config))
        chunk = _resize_axis(_resize_axis(chunk, 1, height), 2, width)
        planes[start : start + chunk_slices] = chunk.numpy()
    out = resize_volume(planes, config.shape)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def preprocess(volume: Volume, config: PreprocessConfig) -> np.ndarray:
    """The network input for one volume: float32 ``config.shape`` in [0, 1]."""
    return preprocess_array(volume.hu, config)
